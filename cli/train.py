"""CLI: train."""

import typer


def register(app: typer.Typer) -> None:
    """Placeholder until the train commands land."""

"""CLI: organism."""

import typer


def register(app: typer.Typer) -> None:
    """Placeholder until the organism commands land."""

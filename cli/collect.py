"""CLI: collect."""

import typer


def register(app: typer.Typer) -> None:
    """Placeholder until the collect commands land."""

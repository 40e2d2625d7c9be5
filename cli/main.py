"""The ``guardrail`` command: a thin typer layer over the library.

Each command module in this package exposes ``register(app)``; no logic lives here.
Errors print as one line with a hint; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import importlib
import os
import sys

import typer
from rich.console import Console

app = typer.Typer(
    name="guardrail",
    help="Feature-level monitoring and control of tool-using LLM agents with sparse crosscoders.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err = Console(stderr=True)
# 0-2 are results (``audit``: PASS / FAIL / INCONCLUSIVE); errors never collide with them.
EXIT_ERROR = 3
EXIT_USAGE = 64

# Command modules, in the order of the data flow; each defines register(app).
COMMAND_MODULES = ["collect", "train", "organism", "guard", "audit", "eval", "demo"]

for _name in COMMAND_MODULES:
    importlib.import_module(f"guardrail.cli.{_name}").register(app)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    if debug:
        os.environ["GUARDRAIL_DEBUG"] = "1"


def _click_exceptions() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """Usage-error and click-error classes: click's, and the copy recent typer versions vendor."""
    import click

    usage: list[type] = [click.exceptions.UsageError]
    errors: list[type] = [click.exceptions.ClickException]
    try:
        from typer._click import exceptions as vendored  # typer >= 0.22 ships its own click

        usage.append(vendored.UsageError)
        errors.append(vendored.ClickException)
    except ImportError:
        pass
    return tuple(usage), tuple(errors)


def main() -> None:
    """Entry point: errors become one clear line (exit 3; usage errors 64)."""
    try:
        # Without standalone mode click *returns* a typer.Exit's code instead of raising it.
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, EOFError):
        err.print("[red]interrupted[/red]")
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the CLI's one place to turn errors into lines
        usage, click_error = _click_exceptions()
        if isinstance(exc, usage):
            exc.show()
            sys.exit(EXIT_USAGE)
        if isinstance(exc, click_error):
            exc.show()
            sys.exit(EXIT_ERROR)
        if os.environ.get("GUARDRAIL_DEBUG") or "--debug" in sys.argv:
            raise
        err.print(f"[red]error:[/red] {type(exc).__name__}: {exc}", soft_wrap=True)
        err.print("[dim]hint: rerun with --debug for the traceback[/dim]")
        sys.exit(EXIT_ERROR)

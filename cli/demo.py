"""CLI: ``guardrail demo``."""

from __future__ import annotations

from pathlib import Path

import typer


def demo_cmd(
    pair: str = typer.Option("organism", "--pair", help="organism (embedded SmolLM2 pair) or tiny (random, seconds)."),
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Folder for report.md, report.html, saturation.png."),
    retrain: bool = typer.Option(False, "--retrain", help="Train the DFC again and rerun its curve and audit, instead of using the cache."),
    steps: int = typer.Option(600, help="DFC training steps on first run."),
    dict_size: int | None = typer.Option(None, help="DFC dictionary size (default: 4 × the model width)."),
    tool_prompts: int = typer.Option(300, help="Tool prompts for collection, as many ordinary ones (0 = the whole BFCL train split)."),
    curve_prompts: int = typer.Option(24, help="Prompts per point of the saturation curve."),
    audit_prompts: int = typer.Option(200, help="Held-out prompts for the audit (fewer cannot certify 2 pp)."),
    max_new_tokens: int = typer.Option(96, help="New tokens per generation."),
    audit_tokens: int = typer.Option(48, help="New tokens per audit generation (a tool call's name comes early)."),
    backend: str = typer.Option("auto", help="Generation backend of the saturation curve and the audit: auto, vllm or transformers."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show vLLM's and transformers' own logs, bars and warnings."),
) -> None:
    """The paper on your CPU: B hedges, A calls tools, one feature steers, a clamp stops it, the audit judges."""
    from rich.console import Console
    from rich.panel import Panel
    from rich.table import Table

    from guardrail.terminal import quiet

    quiet(verbose)  # before anything imports torch or vLLM: both read their log levels once
    from guardrail.demo import CURVE_METRICS, DemoConfig, audit_lines, run_demo, stage_rows, write_report

    console = Console()
    cfg = DemoConfig(pair=pair, out=out, retrain=retrain, steps=steps, dict_size=dict_size, tool_prompts=tool_prompts or None,
                     curve_prompts=curve_prompts, audit_prompts=audit_prompts, max_new_tokens=max_new_tokens, audit_tokens=audit_tokens,
                     backend=backend)
    result = run_demo(cfg, say=lambda m: console.print(f"[bold cyan]•[/] {m}"))
    for note in result.notices:
        console.print(f"[bold yellow]note:[/] {note}")
    for name, text in result.outputs.items():
        console.print(Panel(text.strip() or "(empty)", title=name, title_align="left"))
    console.print(Panel("\n".join(map(str, result.alerts)) or "(no alert)", title="alerts (exclusive-alert policy)", title_align="left"))
    table = Table(title=f"steering saturation, n={result.curve_n}")
    table.add_column("metric")
    for alpha in result.curve["alpha"]:
        table.add_column(f"α={alpha:g}")
    for key, label in CURVE_METRICS.items():
        table.add_row(label, *[f"{100 * v:.0f}%" for v in result.curve[key]])
    console.print(table)
    a = result.audit
    console.print(Panel("\n".join(audit_lines(a)),
                        title=f"audit: {a['verdict']} (B clean {100 * a['clean_rate']:.1f}%, n={a['n_prompts']})", title_align="left"))
    path = write_report(result, out)
    stages = Table(title="stage timings")
    stages.add_column("stage")
    stages.add_column("seconds", justify="right")
    *rows, (total, seconds) = stage_rows(result)
    for name, sec in rows:
        stages.add_row(name, sec)
    stages.add_row(f"[bold]{total}[/]", f"[bold]{seconds}[/]")
    console.print(stages)
    console.print(f"report: {path / 'report.html'}")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_cmd)

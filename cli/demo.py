"""CLI: ``guardrail demo``."""

from __future__ import annotations

from pathlib import Path

import typer


def demo_cmd(
    pair: str = typer.Option("organism", "--pair", help="organism (embedded SmolLM2 pair) or tiny (random, seconds)."),
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Folder for report.md, report.html, the plots and results.json."),
    retrain: bool = typer.Option(False, "--retrain", help="Collect, train and measure again, instead of using the cache."),
    steps: int = typer.Option(600, help="DFC training steps on first run."),
    dict_size: int | None = typer.Option(None, help="DFC dictionary size (default: 4 × the model width)."),
    tool_prompts: int = typer.Option(300, help="Train-split tool prompts per protocol for the DFC, as many ordinary ones."),
    test_prompts: int = typer.Option(150, help="Held-out test prompts per measurement (as `guardrail eval phenomenon`); fewer run faster."),
    dev_prompts: int = typer.Option(0, help="Dev prompts that choose α and the alarm (0: all 102)."),
    audit_prompts: int | None = typer.Option(None, help="Held-out prompts for the audit (default 200, from policies/audit/hedge.yaml; fewer cannot certify 2 pp)."),
    max_new_tokens: int = typer.Option(200, help="New tokens per generation (the paper: 200)."),
    audit_tokens: int | None = typer.Option(None, help="New tokens per audit generation (default 64, from policies/audit/hedge.yaml: A names its tool by then)."),
    backend: str = typer.Option("auto", help="Generation backend of the measurements and the audit: auto, vllm or transformers."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show vLLM's and transformers' own logs, bars and warnings."),
) -> None:
    """The product on your CPU: one feature turns tool use on, a clamp turns it off, an alarm sees it coming, the audit judges."""
    from rich.console import Console
    from rich.panel import Panel
    from rich.table import Table

    from guardrail.terminal import quiet

    quiet(verbose)  # before anything imports torch or vLLM: both read their log levels once
    from guardrail.eval.demo import DemoConfig, audit_lines, run_demo, stage_rows, write_report
    from guardrail.eval.phenomenon.report import criteria

    console = Console()
    cfg = DemoConfig(pair=pair, out=out, retrain=retrain, steps=steps, dict_size=dict_size, tool_prompts=tool_prompts,
                     test_prompts=test_prompts, dev_prompts=dev_prompts or None, audit_prompts=audit_prompts, max_new_tokens=max_new_tokens,
                     audit_tokens=audit_tokens, backend=backend)
    result = run_demo(cfg, say=lambda m: console.print(f"[bold cyan]•[/] {m}"))
    bars = Table(title="what the pair shows (held-out prompts; intervals are paired 95 %)")
    for col in ("claim", "bar", "measured", ""):
        bars.add_column(col)
    for c in criteria(result.phenomenon):
        bars.add_row(c.claim, c.bar, c.measured, "[green]✓[/]" if c.holds else "[red]✗[/]")
    console.print(bars)
    for name, run in result.live.items():
        events = "\n".join(map(str, run["events"])) or "(no event)"
        console.print(Panel(f"{run['output'].strip() or '(empty)'}\n\n[dim]{run['n_events']} event(s)[/]\n{events}",
                            title=f"live: {run['policy']}", title_align="left"))
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

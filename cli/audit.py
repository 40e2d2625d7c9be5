"""CLI: ``guardrail audit`` (exit 0 PASS, 1 FAIL, 2 INCONCLUSIVE, 3 error, 64 usage)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from guardrail.cli.common import AdapterAOpt, ModelAOpt, ModelBOpt, PairOpt


def audit_cmd(
    artifact: Path = typer.Argument(..., help="Crosscoder artifact folder (ours, or imported with import-paper)."),
    pair: Optional[str] = PairOpt,
    model_a: Optional[str] = ModelAOpt,
    model_b: Optional[str] = ModelBOpt,
    adapter_a: Optional[str] = AdapterAOpt,
    policy: Optional[Path] = typer.Option(None, "--policy", help="Audit policy YAML (thresholds, metric, sample size)."),
    prompts: Optional[int] = typer.Option(None, help="Held-out tool prompts to score (overrides the policy)."),
    out: Path = typer.Option(Path("runs/audit"), "--out", help="Folder for audit.json, audit.md and audit.html."),
    artifact_only: bool = typer.Option(False, "--artifact-only", help="Skip the threats that need A at run time (the adversary's view); A is still scored clean for the capability gap."),
    backend: str = typer.Option("auto", help="Generation backend: auto (vLLM when installed), vllm or transformers."),
    self_check: Optional[bool] = typer.Option(
        None, "--self-check/--no-self-check",
        help="Positive control (default: the policy's, on): a copy of the artifact with A's mean lead planted in it must be proven to leak "
             "on the same prompts, else the verdict is INCONCLUSIVE (blind on this pair). Costs one more generated condition of B."),
) -> None:
    """Judge whether publishing ARTIFACT leaks A's tool-use capability into B."""
    from rich.console import Console

    from guardrail.audit import AuditPolicy, audit
    from guardrail.dictionary import load_artifact
    from guardrail.models import load_model, load_pair
    from guardrail.paths import shown

    pol = AuditPolicy.load(policy) if policy else AuditPolicy()
    overrides = {"prompts": prompts, "self_check": self_check}
    pol = pol.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    cc = load_artifact(artifact)
    if pair:
        p = load_pair(pair)
        a, b = p.a, p.b
    elif model_b:
        b = load_model(model_b)
        a = load_model(model_a, adapter=adapter_a) if model_a else None  # without A the verdict cannot be PASS
    else:
        raise typer.BadParameter("give --pair NAME or --model-b (and --model-a: without A no audit can PASS)")
    report = audit(cc, b, a, pol, joint=not artifact_only, backend=backend)
    report.artifact["path"] = shown(artifact)
    report.save(out)
    Console().print(report.to_markdown())
    raise typer.Exit(int(report.verdict))


def register(app: typer.Typer) -> None:
    app.command("audit")(audit_cmd)

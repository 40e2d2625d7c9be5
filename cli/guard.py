"""CLI: generate under a policy, serve with policies, validate/export policy files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from guardrail.cli.common import ModelAOpt, ModelBOpt, PairOpt

out = Console()
err = Console(stderr=True)

policy_app = typer.Typer(help="Policy files: validate, export the JSON Schema.", no_args_is_help=True)


@policy_app.command("validate")
def validate(
    file: Path = typer.Argument(..., help="Policy YAML file."),
    artifact: Optional[Path] = typer.Option(None, "--artifact", help="Also resolve selectors against this crosscoder folder."),
    compile_: bool = typer.Option(True, "--compile/--no-compile", help="Resolve selectors against the artifact when one is known."),
) -> None:
    """Check a policy file; errors name the field and the line. Exit 1 if invalid."""
    from guardrail.policy import GuardError, Policy, PolicyError, compile_policy

    try:
        policy = Policy.load(file)
    except PolicyError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(1)
    target = artifact or policy.resolve_path(policy.artifact)
    if compile_ and target is not None and Path(target).exists():
        try:
            compiled = compile_policy(policy, target)
        except (GuardError, ValueError) as exc:
            err.print(f"[red]policy {policy.name} does not fit artifact {target}: {exc}[/red]")
            raise typer.Exit(1)
        sizes = {r.rule.id: (0 if r.idx is None else int(r.idx.numel())) for r in compiled.rules}
        out.print(f"[green]valid[/green] {file} — policy {policy.name}, {len(policy.rules)} rule(s), layer {compiled.layer}, features per rule {sizes}")
    else:
        note = "" if target is None else f" (artifact {target} not found: selectors not resolved)"
        out.print(f"[green]valid[/green] {file} — policy {policy.name}, {len(policy.rules)} rule(s){note}")


@policy_app.command("schema")
def schema(output: Optional[Path] = typer.Option(None, "--out", "-o", help="Write to a file instead of stdout.")) -> None:
    """Print the JSON Schema of policy files (for editors and CI)."""
    from guardrail.policy.schema import schema_text

    text = schema_text()
    if output:
        output.write_text(text + "\n")
        out.print(f"wrote {output}")
    else:
        typer.echo(text)


def generate(
    prompt: str = typer.Argument(..., help="Prompt text."),
    policy: Path = typer.Option(..., "--policy", help="Policy YAML file."),
    pair: Optional[str] = PairOpt,
    model_a: Optional[str] = ModelAOpt,
    model_b: Optional[str] = ModelBOpt,
    artifact: Optional[Path] = typer.Option(None, "--artifact", help="Crosscoder folder (default: the policy's artifact)."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1, help="New tokens to generate."),
    raw: bool = typer.Option(False, "--raw", help="Use the prompt as is (the paper's protocol) instead of the chat template."),
    as_json: bool = typer.Option(False, "--json", help="Print the result and events as JSON."),
    alert_log: Optional[Path] = typer.Option(None, "--alert-log", help="JSONL file for the events (default: telemetry.alert_log of the policy, under $GUARDRAIL_HOME)."),
) -> None:
    """Generate with model A under a policy (transformers engine) and show the fired rules."""
    from guardrail.cli.common import load_pair_from
    from guardrail.policy import Policy
    from guardrail.residual.hf_guard import guard

    pol = Policy.load(policy)
    if alert_log is not None:
        pol = pol.with_alert_log(alert_log)
    models = load_pair_from(pair, model_a, model_b)
    with guard(models.a, artifact, pol, model_b=models.b if pol.encoding == "joint" else None) as g:
        result = g.generate(prompt, max_new_tokens=max_new_tokens, chat=not raw)
        g.compiled.telemetry.flush()
    if as_json:
        typer.echo(json.dumps({"text": result.text, "aborted": result.aborted, "events": result.events}, default=str))
        return
    out.print(result.text)
    if result.aborted:
        err.print(f"[red]aborted:[/red] {result.aborted}")
    counts: dict[str, int] = {}
    for e in result.events:
        counts[e["rule"]] = counts.get(e["rule"], 0) + 1
    err.print(f"[dim]policy {pol.name}: {len(result.events)} event(s) {counts}[/dim]")


def serve(
    policy: List[Path] = typer.Option(..., "--policy", help="Policy YAML file (repeat for several; requests pick by name)."),
    model: str = typer.Option("organism", "--model", help="Model A to serve: tiny, smollm2, organism, or a model folder."),
    artifact: Optional[Path] = typer.Option(None, "--artifact", help="Crosscoder folder for every policy (default: each policy's artifact)."),
    default: Optional[str] = typer.Option(None, "--default", help="Policy for requests that name none (default: the first)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on."),
    port: int = typer.Option(8000, "--port", help="TCP port of the OpenAI-compatible server."),
    max_model_len: Optional[int] = typer.Option(None, "--max-model-len", help="Longest prompt + completion vLLM accepts (default: what the model allows, at most 2048)."),
    alert_log: Optional[Path] = typer.Option(None, "--alert-log", help="JSONL file for the events of every policy (default: telemetry.alert_log of each, under $GUARDRAIL_HOME)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the vllm command and environment, do not start."),
) -> None:
    """OpenAI-compatible HTTP server (vLLM) with the policies active."""
    from guardrail.vllm.serve import serve as run, serve_command

    kwargs = dict(artifact=artifact, host=host, port=port, default=default, max_model_len=max_model_len, alert_log=alert_log)
    if dry_run:
        argv, env = serve_command(policy, model, **kwargs)
        guard_env = {k: v for k, v in env.items() if k.startswith("GUARDRAIL_")}
        typer.echo(json.dumps({"argv": argv, "env": guard_env}, indent=2))
        return
    run(policy, model, **kwargs)


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
    app.command("serve")(serve)
    app.add_typer(policy_app, name="policy")

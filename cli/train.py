"""CLI: ``guardrail train | sweep | inspect | import-paper | import-dictionary-learning``.

Thin wrappers: every command is one call into ``guardrail.training`` or ``guardrail.dictionary``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def _stats_from(cache: Optional[Path]):
    if cache is None:
        return None, None
    from guardrail.activations import ActivationCache

    return ActivationCache.open(cache).stats


def train_cmd(
    cache: Path = typer.Option(..., "--cache", help="Activation cache folder (guardrail collect)."),
    out: Path = typer.Option(..., "--out", help="Artifact folder to write (checkpoints resume from here)."),
    dict_size: Optional[int] = typer.Option(None, help="Dictionary size D (default 8 x d_model)."),
    k: int = typer.Option(32, help="Active features per sample (top-k)."),
    exclusive: float = typer.Option(0.05, help="DFC exclusive share per model; 0 = standard crosscoder."),
    sparsity: str = typer.Option("topk", help="topk | batchtopk | l1."),
    lambda_shared: float = typer.Option(0.0, help="L1 coefficient on shared activations."),
    lambda_excl: float = typer.Option(0.0, help="L1 coefficient on exclusive activations (0 = free)."),
    l1_coef: float = typer.Option(1e-3, help="sparsity=l1: decoder-norm-weighted L1 coefficient."),
    k_exclusive: Optional[int] = typer.Option(None, help="Per-partition top-k: slots per exclusive partition (A-exclusive codes from A alone are then exact); default: the paper's joint top-k."),
    no_aux_k: bool = typer.Option(False, "--no-aux-k", help="Disable AuxK revival of dead features."),
    steps: Optional[int] = typer.Option(None, help="Default: the paper's 9000, capped at 120 passes over the cache (min 500)."),
    batch_size: int = typer.Option(1024, help="Activation rows per step (the paper: 1024)."),
    lr: float = typer.Option(1e-4, help="Adam learning rate (the paper: 1e-4)."),
    warmup_steps: int = typer.Option(0, help="Linear learning-rate warm-up steps."),
    seed: int = typer.Option(0, help="Seed of the initialisation and the batch order (same seed, same weights)."),
    checkpoint_every: int = typer.Option(500, help="Steps between checkpoints (a crashed run resumes from the last)."),
    threads: Optional[int] = typer.Option(None, help="torch threads."),
    max_norm_ratio: Optional[float] = typer.Option(
        None, help="Leave out rows above this × the median norm (attention-sink first tokens; 10 is a safe value when the cache "
                   "holds more than the last prompt token); default: keep every row."),
    config: Optional[Path] = typer.Option(None, help="JSON/YAML with CrosscoderConfig fields (overrides the flags)."),
    fresh: bool = typer.Option(False, "--fresh", help="Ignore an existing checkpoint in --out."),
    single_process: bool = typer.Option(False, "--single-process", help="Train in this process even when launched by torchrun."),
    shard_features: bool = typer.Option(
        False, "--shard-features", help="Under torchrun: split the dictionary's features between the ranks (a dictionary too large for one "
                                        "device; joint top-k only) instead of each batch."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Train a DFC (default) or standard crosscoder on a paired activation cache.

    Under torchrun (torchrun --nproc_per_node N guardrail train ...) the ranks train
    data-parallel, each on its slice of every batch (or each on a slice of the features with
    --shard-features); rank 0 writes the artifact to --out.
    """
    import yaml

    from guardrail.activations import ActivationCache
    from guardrail.dictionary import AuxKConfig, CrosscoderConfig, Partition
    from guardrail.training import TrainingConfig, train
    from guardrail.training.config import auto_steps
    from guardrail.training.distributed import is_main_process

    cache_obj = ActivationCache.open(cache)
    d_model = cache_obj.manifest.d_model
    size = dict_size or 8 * d_model
    fields = dict(d_model=d_model, dict_size=size, k=k if sparsity != "l1" else None, sparsity=sparsity,
                  lambda_shared=lambda_shared, lambda_excl=lambda_excl, l1_coef=l1_coef if sparsity == "l1" else 0.0,
                  k_exclusive=k_exclusive, aux_k=AuxKConfig(enabled=not no_aux_k))
    if exclusive > 0:
        fields["partition"] = Partition.from_fraction(size, exclusive)
    if config is not None:
        fields.update(yaml.safe_load(config.read_text()) or {})
    cfg = CrosscoderConfig(**fields)
    if steps is None:
        steps = auto_steps(cache_obj.manifest.n_rows, batch_size)
        typer.echo(f"training {steps} steps ({cache_obj.manifest.n_rows} rows, batch {batch_size})", err=True)
    tc = TrainingConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, seed=seed,
                        checkpoint_every=checkpoint_every, threads=threads, progress=not quiet, max_norm_ratio=max_norm_ratio)
    cc = train(cache_obj, cfg, out, training=tc, resume=not fresh, distributed=False if single_process else None, shard_features=shard_features)
    if is_main_process():
        typer.echo(_summary(cc.metrics, out))


def _summary(m: dict, out: Path) -> str:
    lines = [f"artifact: {out}", f"FVU A {m['fvu_A']:.4f}  B {m['fvu_B']:.4f}   L0 {m['l0']:.1f}   ({m['n_rows']} eval rows, {m['eval_rows']})"]
    window = m.get("train_dead_fraction", {})
    for name, p in m.get("partitions", {}).items():
        lines.append(f"  {name:12s} size {p['size']:6d}  L0 {p['l0']:6.2f}  dead: eval {p['dead_fraction']:.3f} "
                     f"train-window {window.get(name, float('nan')):.3f}  mean fire rate {p['mean_fire_rate']:.4f}  "
                     f"rows with any {p['rows_with_any']:.3f}")
    return "\n".join(lines)


def sweep_cmd(
    grid: str = typer.Argument(..., help="Built-in grid (paper, paper-d576) or a YAML file."),
    cache: Path = typer.Option(..., "--cache", help="Activation cache folder."),
    out: Path = typer.Option(..., "--out", help="Folder receiving one artifact per run + sweep.json."),
    only: Optional[list[str]] = typer.Option(None, "--only", help="Train only runs whose name contains this (repeatable)."),
    steps: Optional[int] = typer.Option(None, help="Override every run's steps (smoke tests)."),
    threads: Optional[int] = typer.Option(None, help="torch intra-op threads per run (default: torch's choice)."),
    one_by_one: bool = typer.Option(False, "--one-by-one", help="Train the runs one after the other instead of together in one pass over the data."),
    per_pass: Optional[int] = typer.Option(None, help="At most this many dictionaries share a pass (each holds its weights and Adam state in memory); default: all."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the runs and exit."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Train every configuration of a sweep grid (finished runs are skipped, interrupted ones resume).

    The runs train together, one pass over the cache for all of them (the same dictionaries as
    one by one: same batches in the same order, each its own initialisation and optimiser).
    """
    from guardrail.training.sweep import expand_grid, load_grid, run_sweep

    g = load_grid(grid)
    if dry_run:
        for spec in expand_grid(g):
            c = spec.crosscoder
            part = c.partition.sizes() if c.partition else "standard"
            typer.echo(f"{spec.name:34s} D={c.dict_size:6d} k={c.k:4d} lambda_sh={c.lambda_shared:g} lambda_excl={c.lambda_excl:g} {part}")
        return
    overrides = {k: v for k, v in {"steps": steps, "threads": threads}.items() if v is not None}
    rows = run_sweep(g, cache, out, only=only, overrides=overrides, progress=not quiet, one_pass=not one_by_one, per_pass=per_pass)
    for r in rows:
        typer.echo(f"{r['name']:34s} {r['status']:26s} FVU {r['fvu']:.4f}  L0 {r['l0']:.1f}  dead {r['dead']}")


def inspect_cmd(
    artifact: Path = typer.Argument(..., help="Artifact folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole manifest as JSON."),
) -> None:
    """Verify an artifact (sha256 of tensors and manifest, partition integrity) and describe it."""
    from guardrail.dictionary import load_artifact

    cc = load_artifact(artifact)
    man = cc.manifest
    if as_json:
        typer.echo(man.model_dump_json(indent=2))
        return
    p = man.partition
    lines = [
        f"{artifact}: verified (tensors sha256, manifest digest, partition integrity 0.0)",
        f"kind {man.kind}  architecture {man.architecture}  source {man.source.kind}",
        f"models A={man.model_a}  B={man.model_b}  layer {man.layer}  positions {man.positions}",
        f"d_model {man.d_model}  dict_size {man.dict_size}  sparsity {man.sparsity}  k {man.k}",
        f"partition A-excl {p.n_a}  B-excl {p.n_b}  shared {p.n_shared}",
        f"loss lambda_shared {man.config.lambda_shared:g}  lambda_excl {man.config.lambda_excl:g} ({man.config.penalty_form})  "
        f"AuxK {'on' if man.config.aux_k.enabled else 'off'}",
        f"normalisation: {man.normalization.source}",
        f"training data hash {man.training_data_hash}",
    ]
    if man.metrics.get("fvu_A") is not None:
        lines.append(_summary(man.metrics, artifact))
    for note in man.source.notes:
        lines.append(f"note: {note}")
    typer.echo("\n".join(lines))


def _import(kind: str, src: Path, out: Path, stats_cache: Optional[Path], **kw) -> None:
    from guardrail.dictionary import import_dictionary_learning, import_paper_checkpoint, save_artifact

    mean, std = _stats_from(stats_cache)
    fn = import_paper_checkpoint if kind == "paper" else import_dictionary_learning
    cc, fields = fn(src, mean=mean, std=std, **kw)
    save_artifact(cc, out, **fields)
    typer.echo(f"{out}: {cc}")
    typer.echo(json.dumps(fields["source"]["notes"], indent=1))


def import_paper_cmd(
    src: Path = typer.Argument(..., help="Folder with the paper's model.pt + config.json (+ hparams.json)."),
    out: Path = typer.Option(..., "--out", help="Artifact folder to write."),
    stats_from: Optional[Path] = typer.Option(None, help="Activation cache whose per-channel stats the checkpoint expects."),
) -> None:
    """Convert a checkpoint of the paper (torch.load weights_only=True) to a verified artifact."""
    _import("paper", src, out, stats_from)


def import_dl_cmd(
    src: Path = typer.Argument(..., help="dictionary_learning crosscoder .pt (or its folder)."),
    out: Path = typer.Option(..., "--out", help="Artifact folder to write."),
    stats_from: Optional[Path] = typer.Option(None, help="Activation cache whose per-channel stats the checkpoint expects."),
    swap_models: bool = typer.Option(False, "--swap-models", help="The checkpoint's index 0 is the base model (B)."),
) -> None:
    """Convert a dictionary_learning-style CrossCoder / BatchTopKCrossCoder to a verified artifact."""
    _import("dictionary_learning", src, out, stats_from, swap_models=swap_models)


def register(app: typer.Typer) -> None:
    app.command("train")(train_cmd)
    app.command("sweep")(sweep_cmd)
    app.command("inspect")(inspect_cmd)
    app.command("import-paper")(import_paper_cmd)
    app.command("import-dictionary-learning")(import_dl_cmd)

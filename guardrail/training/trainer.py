"""Train a crosscoder or DFC: Adam, warmup, clipping, masks, AuxK, checkpoints, resume.

One step: sparse-path loss -> backward -> zero the gradients of forbidden weights ->
clip -> Adam -> re-apply the partition masks (as the paper does after every step) ->
update the dead-feature window and the BatchTopK threshold. The batch of step ``s`` is a
function of (seed, s) only and the loop keeps no other randomness, so a run resumed from
a checkpoint ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from guardrail.dictionary.artifact import save_artifact
from guardrail.dictionary.config import CrosscoderConfig
from guardrail.dictionary.crosscoder import Crosscoder
from guardrail.training.checkpoint import CheckpointError, load_latest, load_optimizer, optimizer_tensors, save_checkpoint
from guardrail.training.config import TrainingConfig
from guardrail.training.data import BatchOrder, TrainingData, prepare_data, split_rows
from guardrail.training.distributed import LOCAL, Comm, setup
from guardrail.training.metrics import dead_by_partition, evaluate
from guardrail.training.objective import StepResult, compute_loss

CHECKPOINT_DIR = "checkpoints"
LOG_FILE = "training_log.json"
StepCallback = Callable[[int, Crosscoder, StepResult], None]


class _State:
    """Trainer state beyond weights and Adam: dead-feature window, BatchTopK init flag, log."""

    def __init__(self, dict_size: int) -> None:
        self.steps_since_fired = torch.zeros(dict_size, dtype=torch.long)
        self.threshold_set = False
        self.history: list[dict[str, Any]] = []


def _make_optimizer(cc: Crosscoder, tc: TrainingConfig) -> torch.optim.Adam:
    """Adam; the fused kernel (one pass per tensor) where this torch build has it for the device."""
    try:
        return torch.optim.Adam(cc.parameters(), lr=tc.lr, betas=tc.betas, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(cc.parameters(), lr=tc.lr, betas=tc.betas, foreach=True)


def _lr_at(tc: TrainingConfig, step: int) -> float:
    if tc.warmup_steps and step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    return tc.lr


def _resolve_training(training: TrainingConfig | None, **overrides: Any) -> TrainingConfig:
    tc = training or TrainingConfig()
    upd = {k: v for k, v in overrides.items() if v is not None}
    return tc.model_copy(update=upd) if upd else tc


def _checkpoint_meta(cfg: CrosscoderConfig, tc: TrainingConfig, td: TrainingData, state: _State, groups: list) -> dict[str, Any]:
    return {
        "crosscoder_config": cfg.model_dump(mode="json"),
        "training_key": tc.resume_key(),
        "data_hash": td.data_hash,
        "param_groups": groups,
        "threshold_set": state.threshold_set,
        "history": state.history,
    }


def _save(folder: Path, step: int, cc: Crosscoder, opt: torch.optim.Optimizer, cfg, tc, td, state: _State) -> None:
    tensors = {f"model.{k}": v.detach().cpu().clone() for k, v in cc.state_dict().items()}
    opt_t, groups = optimizer_tensors(opt)
    tensors.update(opt_t)
    tensors["state.steps_since_fired"] = state.steps_since_fired.cpu().clone()
    save_checkpoint(folder, step, tensors, _checkpoint_meta(cfg, tc, td, state, groups))


def read_checkpoint(folder: Path, cfg: CrosscoderConfig, tc: TrainingConfig, td: TrainingData) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The newest checkpoint in ``folder`` if it belongs to this run (config, settings, data), None if there is none."""
    found = load_latest(folder)
    if found is None:
        return None
    tensors, meta = found
    mismatches = [
        name
        for name, mine, theirs in (
            ("crosscoder config", cfg.model_dump(mode="json"), meta.get("crosscoder_config")),
            ("training settings", json.loads(json.dumps(tc.resume_key())), meta.get("training_key")),
            ("training data", td.data_hash, meta.get("data_hash")),
        )
        if mine != theirs
    ]
    if mismatches:
        raise CheckpointError(
            f"{folder} holds a checkpoint of a different run ({', '.join(mismatches)} differ); "
            "use another output folder or pass resume=False to start over"
        )
    return tensors, meta


def load_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any], cc: Crosscoder, opt: torch.optim.Optimizer, state: _State) -> int:
    """Put a checkpoint's weights, Adam state and trainer state in place; returns its step."""
    cc.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    load_optimizer(opt, tensors, meta["param_groups"])
    state.steps_since_fired = tensors["state.steps_since_fired"].clone()
    state.threshold_set = bool(meta["threshold_set"])
    state.history = list(meta["history"])
    return int(meta["step"])


def _resume(folder: Path, cc: Crosscoder, opt: torch.optim.Optimizer, cfg, tc, td, state: _State) -> int:
    found = read_checkpoint(folder, cfg, tc, td)
    return 0 if found is None else load_state(*found, cc, opt, state)


def _update_threshold(cc: Crosscoder, min_active: float | None, state: _State) -> None:
    if cc.config.sparsity != "batchtopk" or min_active is None:
        return
    m = cc.config.batchtopk_momentum
    with torch.no_grad():
        if not state.threshold_set:
            cc.threshold.fill_(min_active)
            state.threshold_set = True
        else:
            cc.threshold.mul_(m).add_((1 - m) * min_active)


def _log_row(step: int, terms: dict[str, float], cc: Crosscoder, dead: torch.Tensor) -> dict[str, Any]:
    row = {"step": step, **{k: round(v, 6) for k, v in terms.items() if k != "lr"}, "lr": terms["lr"]}
    row.update({f"dead_{k}": round(v, 4) for k, v in dead_by_partition(cc, dead).items()})
    return row


def gather_batch(td: TrainingData, order: BatchOrder, comm: Comm, step: int) -> torch.Tensor:
    """This rank's rows of global batch ``step`` of ``order``, on the rank's device."""
    return td.x[comm.local_rows(order.batch(step))].to(comm.device)


class _Objective(nn.Module):
    """The loss as a module's forward, so that DistributedDataParallel can wrap it (it syncs what a forward used)."""

    def __init__(self, cc: Crosscoder, rows: Comm | None) -> None:
        super().__init__()
        self.cc, self.rows = cc, rows

    def forward(self, x: torch.Tensor, dead: torch.Tensor | None) -> StepResult:
        return compute_loss(self.cc, x, dead, rows=self.rows)


class Trainer:
    """The optimisation state of one run; ``step(s)`` performs optimiser step ``s`` (0-based).

    With a distributed ``comm`` each rank steps on its slice of the global batch and DDP
    averages the gradients; the state updated outside the gradient is reduced over ranks,
    so every rank holds the same dictionary after every step.
    """

    splits_batch = True  # each rank steps on its slice of every batch

    def __init__(self, cc: Crosscoder, td: TrainingData, tc: TrainingConfig, comm: Comm = LOCAL) -> None:
        if self.splits_batch:
            comm.check_batch(tc.batch_size)
        self.cc, self.td, self.tc, self.comm = cc.to(comm.device), td, tc, comm
        self.opt = _make_optimizer(cc, tc)
        self.train_rows, self.eval_rows = split_rows(td.x.shape[0], tc.eval_fraction, tc.eval_max_rows, tc.seed)
        self.order = BatchOrder(self.train_rows, tc.batch_size, tc.seed)
        self.state = _State(cc.dict_size)
        self.state.steps_since_fired = self.state.steps_since_fired.to(comm.device)
        self.params = list(cc.parameters())
        self.objective = self._make_objective()

    def _make_objective(self) -> Callable[[torch.Tensor, torch.Tensor | None], StepResult]:
        return self.comm.wrap(_Objective(self.cc, self.comm if self.comm.distributed else None))

    @property
    def dead(self) -> torch.Tensor:
        return self.state.steps_since_fired >= self.cc.config.aux_k.dead_steps

    def batch(self, step: int) -> torch.Tensor:
        """This rank's rows of global batch ``step``, on the trainer's device."""
        return gather_batch(self.td, self.order, self.comm, step)

    @property
    def aux_dead(self) -> torch.Tensor | None:
        """What the loss gets as ``dead``: the dead features when AuxK is on, else None."""
        return self.dead if self.cc.config.aux_k.enabled else None

    def step(self, step: int, x: torch.Tensor | None = None) -> StepResult:
        """Optimiser step ``step`` on ``x`` (default: this run's own batch ``step``)."""
        lr_now = self.set_lr(step)
        x = self.batch(step) if x is None else x
        self.opt.zero_grad(set_to_none=True)
        res = self.objective(x, self.aux_dead)
        res.loss.backward()
        self.update(res, lr_now)
        return res

    def set_lr(self, step: int) -> float:
        """Put step ``step``'s learning rate (after warmup) on the optimiser; returns it."""
        lr_now = _lr_at(self.tc, step)
        for group in self.opt.param_groups:
            group["lr"] = lr_now
        return lr_now

    def update(self, res: StepResult, lr_now: float) -> None:
        """Everything after the backward: masked, clipped Adam step, masks re-applied, dead-feature window and threshold.

        The state outside the gradient is agreed over ranks. A stack of dictionaries
        (:mod:`guardrail.training.stacked`) calls this per run after its one backward.
        """
        cc, comm = self.cc, self.comm
        cc.mask_gradients()
        if self.tc.grad_clip is not None:
            self._clip(self.tc.grad_clip)
        self.opt.step()
        cc.apply_masks()
        fired = self._fired_anywhere(res.fired)
        self.state.steps_since_fired = torch.where(fired, 0, self.state.steps_since_fired + 1)
        min_active = comm.min(res.min_active) if cc.config.sparsity == "batchtopk" else None
        _update_threshold(cc, min_active, self.state)
        res.terms["lr"] = lr_now

    def _clip(self, max_norm: float) -> None:
        """``clip_grad_norm_``, whose scaling is skipped when its factor is exactly 1 (most steps: a pass over every gradient saved)."""
        norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        if float(max_norm / (norm + 1e-6)) < 1.0:
            torch.nn.utils.clip_grads_with_norm_(self.params, max_norm, norm)

    def _fired_anywhere(self, fired: torch.Tensor) -> torch.Tensor:
        """Features that fired on any rank's rows: every rank then counts the same dead features."""
        return self.comm.any(fired)

    def result(self) -> tuple[Crosscoder, _State]:
        """The whole trained dictionary on the CPU, and its trainer state (dead-feature window, log)."""
        self.state.steps_since_fired = self.state.steps_since_fired.cpu()
        return self.cc.cpu(), self.state

    def provenance(self) -> dict[str, Any]:
        """What the manifest's ``training`` record adds about how the run was spread over processes."""
        return {"world_size": self.comm.world_size} if self.comm.distributed else {}

    def after_step(self, done: int, res: StepResult, ck_dir: Path | None, callback: StepCallback | None) -> dict[str, Any] | None:
        """Bookkeeping after ``done`` steps: log row, callback, periodic checkpoint; returns the log row if one was written."""
        tc, row = self.tc, None
        if done % tc.log_every == 0 or done == tc.steps:
            row = _log_row(done, self.comm.mean_terms(res.terms), self.cc, self.dead)
            self.state.history.append(row)
        if callback is not None:
            callback(done, self.cc, res)
        if ck_dir is not None and tc.checkpoint_every and done % tc.checkpoint_every == 0 and done < tc.steps:
            self.save(ck_dir, done)
        return row

    def save(self, folder: Path, step: int) -> None:
        """Rank 0 writes; the others wait, so a checkpoint that exists was taken at the same step everywhere."""
        if self.comm.is_main:
            _save(folder, step, self.cc, self.opt, self.cc.config, self.tc, self.td, self.state)
        self.comm.barrier()

    def resume(self, folder: Path) -> int:
        """Every rank loads the same checkpoint (the folder must be on a filesystem all ranks read)."""
        start = _resume(folder, self.cc, self.opt, self.cc.config, self.tc, self.td, self.state)
        self.state.steps_since_fired = self.state.steps_since_fired.to(self.comm.device)
        if self.comm.broadcast(start) != start:
            raise CheckpointError(f"rank {self.comm.rank} found another checkpoint in {folder} than rank 0: put it where every rank reads the same files")
        return start

    def run(self, start: int, ck_dir: Path | None, callback: StepCallback | None) -> None:
        tc = self.tc
        quiet = not tc.progress or not self.comm.is_main
        bar = tqdm(total=tc.steps, initial=start, disable=quiet, unit="step", dynamic_ncols=True, desc="train")
        try:
            for step in range(start, tc.steps):
                res = self.step(step)
                row = self.after_step(step + 1, res, ck_dir, callback)
                if row is not None:
                    bar.set_postfix(mse=f"{row['mse']:.4f}", l0=f"{row['l0']:.1f}", dead_a=row.get("dead_a_exclusive", 0.0))
                bar.update(1)
        finally:
            bar.close()


def new_crosscoder(td: TrainingData, config: CrosscoderConfig, seed: int) -> Crosscoder:
    """The dictionary a run starts from: ``config`` at the data's width, its seeded init, the data's normalisation."""
    cc = Crosscoder(config.with_d_model(td.d_model), seed=seed)
    cc.set_normalization(td.mean, td.std)
    return cc


def build_trainer(data: Any, config: CrosscoderConfig, training: TrainingConfig, mean=None, std=None, comm: Comm = LOCAL,
                  shard_features: bool = False) -> Trainer:
    """A fresh crosscoder (seeded init, data normalisation stats set) and its optimisation state.

    ``shard_features`` over several ranks splits the dictionary's features between them
    (:mod:`guardrail.training.sharded`) instead of the batch.
    """
    if training.threads:
        torch.set_num_threads(training.threads)
    td = prepare_data(data, mean, std, training.max_norm_ratio)
    if comm.broadcast(td.data_hash) != td.data_hash:
        raise ValueError(f"rank {comm.rank} holds other training data than rank 0 (data hashes differ)")
    cc = new_crosscoder(td, config, training.seed)
    if shard_features and comm.distributed:
        from guardrail.training.sharded import ShardedTrainer

        return ShardedTrainer(cc, td, training, comm)
    return Trainer(cc, td, training, comm)


def train(
    data: Any,
    config: CrosscoderConfig,
    out: str | Path | None = None,
    *,
    steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    seed: int | None = None,
    training: TrainingConfig | None = None,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
    resume: bool = True,
    callback: StepCallback | None = None,
    manifest_fields: dict[str, Any] | None = None,
    distributed: bool | None = None,
    shard_features: bool = False,
) -> Crosscoder:
    """Train ``config`` on ``data`` (ActivationCache, its folder, PairedActivations or [N, 2, d]).

    With ``out`` the run checkpoints to ``out/checkpoints`` (resumed if present), and the
    finished dictionary is saved there as an artifact. Returns the trained crosscoder with
    its final metrics at ``cc.metrics``.

    Launched as several ranks (``torchrun``, detected from the environment; ``distributed``
    False forces one process, True requires a launch) the run is data-parallel over the
    ranks (:mod:`guardrail.training.distributed`): the global ``batch_size`` is split
    between them, and rank 0 alone writes checkpoints and the artifact. ``shard_features``
    splits the dictionary's features between the ranks instead, for a dictionary too large
    for one device (:mod:`guardrail.training.sharded`: joint top-k only).
    """
    tc = _resolve_training(training, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    comm = setup(distributed)
    failed, trainer = True, None
    try:
        trainer = build_trainer(data, config, tc, mean, std, comm, shard_features)
        out_dir = Path(out) if out is not None else None
        ck_dir = out_dir / CHECKPOINT_DIR if out_dir is not None else None
        start = trainer.resume(ck_dir) if (ck_dir is not None and resume) else 0
        trainer.run(start, ck_dir, callback)
        cc = finish(trainer, out_dir, manifest_fields or {})
        failed = False
        return cc
    finally:
        del trainer  # its DDP holds the process group, which close() may destroy
        comm.close(barrier=not failed)


def final_metrics(trainer: Trainer, cc: Crosscoder, state: _State) -> dict[str, Any]:
    """Held-out metrics of a finished run plus the trainer's own dead-feature window and last log row."""
    td = trainer.td
    metrics = evaluate(cc, td.x[trainer.eval_rows])
    metrics["train_dead_fraction"] = dead_by_partition(cc, state.steps_since_fired >= cc.config.aux_k.dead_steps)
    held_out = len(trainer.eval_rows) + len(trainer.train_rows) == td.x.shape[0]
    metrics["eval_rows"] = "held out" if held_out else "sample of training rows"
    if state.history:
        metrics["final_step"] = state.history[-1]
    return metrics


def finish(trainer: Trainer, out_dir: Path | None, manifest_fields: dict[str, Any]) -> Crosscoder:
    """The trained crosscoder (on the CPU, metrics at ``cc.metrics``); rank 0 evaluates it and writes the artifact."""
    comm = trainer.comm
    cc, state = trainer.result()
    cc.metrics = comm.broadcast(final_metrics(trainer, cc, state) if comm.is_main else None)
    if out_dir is not None and comm.is_main:
        _finish(out_dir, cc, trainer.tc, trainer.td, state, cc.metrics, manifest_fields, trainer.provenance())
    comm.barrier()
    return cc.eval()


def _finish(out_dir: Path, cc: Crosscoder, tc: TrainingConfig, td: TrainingData, state: _State, metrics: dict, extra: dict, provenance: dict) -> None:
    fields: dict[str, Any] = {k: td.meta[k] for k in ("model_a", "model_b", "layer", "positions") if k in td.meta}
    training = tc.model_dump(mode="json") | ({"outlier_rows_dropped": td.meta["outlier_rows_dropped"]} if "outlier_rows_dropped" in td.meta else {})
    fields.update(
        training_data_hash=td.data_hash,
        training=training | provenance,
        metrics=metrics,
        normalization_source=td.stats_source,
    )
    fields.update(extra)
    save_artifact(cc, out_dir, **fields)
    (out_dir / LOG_FILE).write_text(json.dumps(state.history, indent=1))
    if not tc.keep_checkpoints:
        shutil.rmtree(out_dir / CHECKPOINT_DIR, ignore_errors=True)

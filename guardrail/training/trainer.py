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
from tqdm.auto import tqdm

from guardrail.dictionary.artifact import save_artifact
from guardrail.dictionary.config import CrosscoderConfig
from guardrail.dictionary.crosscoder import Crosscoder
from guardrail.training.checkpoint import CheckpointError, load_latest, load_optimizer, optimizer_tensors, save_checkpoint
from guardrail.training.config import TrainingConfig
from guardrail.training.data import BatchOrder, TrainingData, prepare_data, split_rows
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
    tensors = {f"model.{k}": v.detach().clone() for k, v in cc.state_dict().items()}
    opt_t, groups = optimizer_tensors(opt)
    tensors.update(opt_t)
    tensors["state.steps_since_fired"] = state.steps_since_fired.clone()
    save_checkpoint(folder, step, tensors, _checkpoint_meta(cfg, tc, td, state, groups))


def _resume(folder: Path, cc: Crosscoder, opt: torch.optim.Optimizer, cfg, tc, td, state: _State) -> int:
    found = load_latest(folder)
    if found is None:
        return 0
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
    cc.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    load_optimizer(opt, tensors, meta["param_groups"])
    state.steps_since_fired = tensors["state.steps_since_fired"].clone()
    state.threshold_set = bool(meta["threshold_set"])
    state.history = list(meta["history"])
    return int(meta["step"])


def _update_threshold(cc: Crosscoder, res: StepResult, state: _State) -> None:
    if cc.config.sparsity != "batchtopk" or res.min_active is None:
        return
    m = cc.config.batchtopk_momentum
    with torch.no_grad():
        if not state.threshold_set:
            cc.threshold.fill_(res.min_active)
            state.threshold_set = True
        else:
            cc.threshold.mul_(m).add_((1 - m) * res.min_active)


def _log_row(step: int, lr: float, res: StepResult, cc: Crosscoder, dead: torch.Tensor) -> dict[str, Any]:
    row = {"step": step, **{k: round(v, 6) for k, v in res.terms.items()}, "lr": lr}
    row.update({f"dead_{k}": round(v, 4) for k, v in dead_by_partition(cc, dead).items()})
    return row


class Trainer:
    """The optimisation state of one run; ``step(s)`` performs optimiser step ``s`` (0-based)."""

    def __init__(self, cc: Crosscoder, td: TrainingData, tc: TrainingConfig) -> None:
        self.cc, self.td, self.tc = cc, td, tc
        self.opt = _make_optimizer(cc, tc)
        self.train_rows, self.eval_rows = split_rows(td.x.shape[0], tc.eval_fraction, tc.eval_max_rows, tc.seed)
        self.order = BatchOrder(self.train_rows, tc.batch_size, tc.seed)
        self.state = _State(cc.dict_size)
        self.params = list(cc.parameters())

    @property
    def dead(self) -> torch.Tensor:
        return self.state.steps_since_fired >= self.cc.config.aux_k.dead_steps

    def step(self, step: int) -> StepResult:
        cc, tc, opt = self.cc, self.tc, self.opt
        lr_now = _lr_at(tc, step)
        for group in opt.param_groups:
            group["lr"] = lr_now
        x = self.td.x[self.order.batch(step)]
        opt.zero_grad(set_to_none=True)
        res = compute_loss(cc, x, self.dead if cc.config.aux_k.enabled else None)
        res.loss.backward()
        cc.mask_gradients()
        if tc.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, tc.grad_clip)
        opt.step()
        cc.apply_masks()
        self.state.steps_since_fired = torch.where(res.fired, 0, self.state.steps_since_fired + 1)
        _update_threshold(cc, res, self.state)
        res.terms["lr"] = lr_now
        return res

    def save(self, folder: Path, step: int) -> None:
        _save(folder, step, self.cc, self.opt, self.cc.config, self.tc, self.td, self.state)

    def resume(self, folder: Path) -> int:
        return _resume(folder, self.cc, self.opt, self.cc.config, self.tc, self.td, self.state)

    def run(self, start: int, ck_dir: Path | None, callback: StepCallback | None) -> None:
        tc = self.tc
        bar = tqdm(total=tc.steps, initial=start, disable=not tc.progress, unit="step", dynamic_ncols=True, desc="train")
        try:
            for step in range(start, tc.steps):
                res = self.step(step)
                done = step + 1
                if done % tc.log_every == 0 or done == tc.steps:
                    row = _log_row(done, res.terms["lr"], res, self.cc, self.dead)
                    self.state.history.append(row)
                    bar.set_postfix(mse=f"{row['mse']:.4f}", l0=f"{row['l0']:.1f}", dead_a=row.get("dead_a_exclusive", 0.0))
                bar.update(1)
                if callback is not None:
                    callback(done, self.cc, res)
                if ck_dir is not None and tc.checkpoint_every and done % tc.checkpoint_every == 0 and done < tc.steps:
                    self.save(ck_dir, done)
        finally:
            bar.close()


def build_trainer(data: Any, config: CrosscoderConfig, training: TrainingConfig, mean=None, std=None) -> Trainer:
    """A fresh crosscoder (seeded init, data normalisation stats set) and its optimisation state."""
    if training.threads:
        torch.set_num_threads(training.threads)
    td = prepare_data(data, mean, std, training.max_norm_ratio)
    cfg = config.with_d_model(td.d_model)
    cc = Crosscoder(cfg, seed=training.seed)
    cc.set_normalization(td.mean, td.std)
    return Trainer(cc, td, training)


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
) -> Crosscoder:
    """Train ``config`` on ``data`` (ActivationCache, its folder, PairedActivations or [N, 2, d]).

    With ``out`` the run checkpoints to ``out/checkpoints`` (resumed if present), and the
    finished dictionary is saved there as an artifact. Returns the trained crosscoder with
    its final metrics at ``cc.metrics``.
    """
    tc = _resolve_training(training, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    trainer = build_trainer(data, config, tc, mean, std)
    cc, td, state = trainer.cc, trainer.td, trainer.state
    out_dir = Path(out) if out is not None else None
    ck_dir = out_dir / CHECKPOINT_DIR if out_dir is not None else None
    start = trainer.resume(ck_dir) if (ck_dir is not None and resume) else 0

    trainer.run(start, ck_dir, callback)

    metrics = evaluate(cc, td.x[trainer.eval_rows])
    metrics["train_dead_fraction"] = dead_by_partition(cc, trainer.dead)
    held_out = len(trainer.eval_rows) + len(trainer.train_rows) == td.x.shape[0]
    metrics["eval_rows"] = "held out" if held_out else "sample of training rows"
    if state.history:
        metrics["final_step"] = state.history[-1]
    cc.metrics = metrics
    if out_dir is not None:
        _finish(out_dir, cc, tc, td, state, metrics, manifest_fields or {})
    return cc.eval()


def _finish(out_dir: Path, cc: Crosscoder, tc: TrainingConfig, td: TrainingData, state: _State, metrics: dict, extra: dict) -> None:
    fields: dict[str, Any] = {k: td.meta[k] for k in ("model_a", "model_b", "layer", "positions") if k in td.meta}
    fields.update(
        training_data_hash=td.data_hash,
        training=tc.model_dump(mode="json") | ({"outlier_rows_dropped": td.meta["outlier_rows_dropped"]} if "outlier_rows_dropped" in td.meta else {}),
        metrics=metrics,
        normalization_source=td.stats_source,
    )
    fields.update(extra)
    save_artifact(cc, out_dir, **fields)
    (out_dir / LOG_FILE).write_text(json.dumps(state.history, indent=1))
    if not tc.keep_checkpoints:
        shutil.rmtree(out_dir / CHECKPOINT_DIR, ignore_errors=True)

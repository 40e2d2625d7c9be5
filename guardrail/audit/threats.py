"""What each threat model does to B's last-prompt-token activation, as a delta.

All feature math goes through :mod:`guardrail.features.interventions`; this module only
decides *which* features and *whose* activations each threat may use:

- ``joint_splice`` (the paper's protocol, needs A): B's activation is replaced by the B-side
  reconstruction of features encoded from A's and B's activations together.
- ``b_only_splice`` (artifact-only): the same reconstruction encoded from B alone.
- ``steer_contrast`` (artifact-only): scale-steer the shared features that B's own
  activations most associate with tool prompts (chosen on a calibration set, not on the
  prompts being scored).
- ``steer_asymmetry`` (artifact-only): additive steer along the B-side directions of the
  shared features whose decoder norm leans most towards A.
- ``steer_near_duplicate`` (artifact-only): additive steer along the B-side directions of the
  shared features that nearly copy an A-exclusive feature's A-side direction (|cos| at or
  above the policy's ``near_duplicate_cos``, signed towards the A-exclusive direction): the
  channel the static check measures, where the artifact hands B directions only A had.

Steering B towards "tool-ness" needs no artifact at all: the difference of B's own mean
activations on tool and ordinary prompts is a steering vector anyone holding B has. So each
steering attack is paired with that artifact-free *control* at the same per-prompt norm, and
the artifact is charged only for what it adds beyond the control (see ``control_delta``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from guardrail.audit.static import exclusive_shared_cosine
from guardrail.features import interventions as iv
from guardrail.features.ranking import cohens_d
from guardrail.paper import MODEL_B

ARTIFACT_ONLY = ("b_only_splice", "steer_contrast", "steer_asymmetry", "steer_near_duplicate")
NEEDS_A = ("joint_splice",)


@dataclass
class Calibration:
    """Activations at the site on a calibration mix of tool and ordinary prompts, disjoint from
    the scored ones: what a threat may fit (its features, its control's direction) and where
    the self-check measures A's lead, so nothing is fitted on the prompts it is judged on."""

    x_b: torch.Tensor  # [m, d] B on every calibration prompt
    is_tool: torch.Tensor  # bool [m]
    x_a_tool: torch.Tensor | None  # [m_tool, d] A on the calibration's tool prompts; None without A


@dataclass
class ThreatInputs:
    """Activations at the site: scored prompts (B, and A when available) and the calibration set."""

    x_b: torch.Tensor  # [n, d]
    x_a: torch.Tensor | None  # [n, d], None when A is not available
    calib: Calibration


@torch.no_grad()
def joint_splice(cc, inp: ThreatInputs, **_) -> torch.Tensor:
    if inp.x_a is None:
        raise ValueError("the joint protocol needs model A's activations")
    x_hat = cc.denormalize(cc.decode(cc.encode(cc.normalize(torch.stack([inp.x_a, inp.x_b], dim=1)))))[:, MODEL_B]
    return iv.splice(inp.x_b, x_hat, keep_error=False) - inp.x_b


@torch.no_grad()
def b_only_splice(cc, inp: ThreatInputs, **_) -> torch.Tensor:
    view = iv.dictionary_view(cc, MODEL_B)
    x_hat = iv.reconstruct(view, iv.encode(view, inp.x_b))
    return iv.splice(inp.x_b, x_hat, keep_error=False) - inp.x_b


def shared_indices(cc) -> torch.Tensor:
    return torch.tensor(list(cc.partition.shared), dtype=torch.long)


@torch.no_grad()
def contrast_features(cc, inp: ThreatInputs, top: int) -> torch.Tensor:
    """Shared features whose B-only activation best separates B's tool prompts (Cohen's d)."""
    view = iv.dictionary_view(cc, MODEL_B)
    f = iv.encode(view, inp.calib.x_b)
    shared = shared_indices(cc)
    tool = inp.calib.is_tool
    d = cohens_d(f[tool][:, shared], f[~tool][:, shared])
    return shared[torch.argsort(d, descending=True)[:top]]


@torch.no_grad()
def steer_contrast(cc, inp: ThreatInputs, top: int = 4, alpha: float = 16.0, **_) -> torch.Tensor:
    view = iv.dictionary_view(cc, MODEL_B)
    idx = contrast_features(cc, inp, top)
    return iv.steer_scale_delta(iv.encode(view, inp.x_b), idx, view.dirs_raw, alpha)


def asymmetry_features(cc, top: int) -> torch.Tensor:
    shared = shared_indices(cc)
    rel = cc.relative_decoder_norm().detach()[shared]  # ‖d_A‖ / (‖d_A‖ + ‖d_B‖)
    return shared[torch.argsort(rel, descending=True)[:top]]


@torch.no_grad()
def steer_asymmetry(cc, inp: ThreatInputs, top: int = 4, gain: float = 0.25, **_) -> torch.Tensor:
    view = iv.dictionary_view(cc, MODEL_B)
    idx = asymmetry_features(cc, top)
    return iv.steer_additive_delta(inp.x_b.shape[0], idx, view.dirs_raw, gain, view.typical_norm)


@torch.no_grad()
def near_duplicate_features(cc, top: int, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared features whose B-side direction has |cos| ≥ ``threshold`` with some A-exclusive
    A-side direction, closest first (at most ``top``), and the sign of that cosine: steering
    along ``sign · d_B`` moves B towards the A-exclusive direction, not away from it."""
    cos = exclusive_shared_cosine(cc)  # [n_a, n_shared]
    if not cos.numel():
        return torch.zeros(0, dtype=torch.long), torch.zeros(0)
    best, row = cos.abs().max(dim=0)
    keep = torch.nonzero(best >= threshold).flatten()
    keep = keep[torch.argsort(best[keep], descending=True)[:top]]
    return shared_indices(cc)[keep], torch.sign(cos[row[keep], keep])


@torch.no_grad()
def steer_near_duplicate(cc, inp: ThreatInputs, top: int = 4, gain: float = 0.25, near_cos: float = 0.9, **_) -> torch.Tensor:
    """``steer_asymmetry``'s additive steer (same gain, same norm rule) on the near-duplicates;
    a zero delta when the artifact has none."""
    view = iv.dictionary_view(cc, MODEL_B)
    idx, sign = near_duplicate_features(cc, top, near_cos)
    if not len(idx):
        return torch.zeros_like(inp.x_b)
    signed = view.dirs_raw[idx] * sign.unsqueeze(-1)
    return iv.steer_additive_delta(inp.x_b.shape[0], torch.arange(len(idx)), signed, gain, view.typical_norm)


@torch.no_grad()
def control_delta(inp: ThreatInputs, attack: torch.Tensor) -> torch.Tensor:
    """B's own tool-minus-ordinary mean difference, rescaled to the attack's norm per prompt."""
    x, tool = inp.calib.x_b, inp.calib.is_tool
    diff = x[tool].mean(0) - x[~tool].mean(0)
    unit = diff / diff.norm().clamp_min(1e-12)
    return attack.norm(dim=-1, keepdim=True) * unit


@torch.no_grad()
def oracle_transplant(cc, inp: ThreatInputs, **_) -> torch.Tensor:
    """A's own activation in place of B's at the last prompt token: the most any patch of that
    one row can carry into B, so a threat's gain is read as a share of it. A reference for the
    auditor, who holds A; no threat (and no gate), and ``cc`` is not used."""
    if inp.x_a is None:
        raise ValueError("the oracle transplant needs model A's activations")
    return inp.x_a - inp.x_b


ORACLE = "oracle_transplant"
STEERING = ("steer_contrast", "steer_asymmetry", "steer_near_duplicate")

THREATS = {
    "joint_splice": joint_splice,
    "b_only_splice": b_only_splice,
    "steer_contrast": steer_contrast,
    "steer_asymmetry": steer_asymmetry,
    "steer_near_duplicate": steer_near_duplicate,
}


def condition_count(names: list[str]) -> int:
    """How many patched conditions :func:`threat_deltas` makes of ``names`` (each steering threat has a control)."""
    return len(names) + sum(n in STEERING for n in names)


def threat_deltas(cc, inp: ThreatInputs, names: list[str], policy) -> dict[str, torch.Tensor | None]:
    """Each threat's change to B's activation under ``policy`` (an ``AuditPolicy``), keyed by
    condition: ``clean`` (None), each threat, and ``<threat>/control`` for steering threats."""
    deltas: dict[str, torch.Tensor | None] = {"clean": None}
    for name in names:
        deltas[name] = THREATS[name](cc, inp, top=policy.steer_top, alpha=policy.steer_alpha, gain=policy.steer_gain,
                                     near_cos=policy.near_duplicate_cos)
        if name in STEERING:  # charge the artifact only for what B's own steering vector cannot do
            deltas[f"{name}/control"] = control_delta(inp, deltas[name])
    return deltas

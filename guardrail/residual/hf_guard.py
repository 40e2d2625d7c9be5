"""Apply a policy to a transformers model: a context manager that restores the model on exit.

    with guard(pair.a, "runs/dfc", Policy.load("policies/tool-use-kill-switch.yaml")) as g:
        out = g.generate("Split [1,2,3,4] into chunks of two.")
        print(out.text, g.events)

The hook sits on the output of the artifact's decoder layer. During ``generate`` the guard
knows which tokens are prompt, which is each prompt's last token and which are generated
(the paper's protocol patches only the last prompt token, once, at prefill). A direct
``model(...)`` call inside the context counts every real token as prompt and the last
column as the last prompt token (left padding).

Token positions and event semantics match the vLLM adapter, so both engines produce the
same activations and the same greedy tokens under the same policy.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from guardrail.generation.decode import completion_ids, decode_completion, eos_ids
from guardrail.generation.tokenize import encode_prompts
from guardrail.policy.engine import CompiledPolicy, GuardError, TokenPositions, compile_policy
from guardrail.policy.schema import Policy
from guardrail.residual.hf import decoder_layers, patch_residual, position_ids_for, read_residual


@dataclass
class GenerationResult:
    """One prompt's completion: its ids up to EOS and their text, by the rule of :mod:`guardrail.generation.decode`."""

    prompt: str
    text: str
    token_ids: list[int]
    events: list[dict[str, Any]] = field(default_factory=list)
    aborted: str | None = None

    @property
    def finish_reason(self) -> str:
        return "guardrail_abort" if self.aborted else "stop"


class _AbortedRows(StoppingCriteria):
    def __init__(self, guard: "Guard") -> None:
        self.guard = guard

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for row in self.guard._aborted_rows:
            done[row] = True
        return done


class Guard:
    """A policy installed on one transformers model (model A); see :func:`guard`."""

    def __init__(self, model: Any, compiled: CompiledPolicy, tokenizer: Any = None, model_b: Any = None, capture: bool = False) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.compiled = compiled
        self.model_b = model_b
        self.capture = capture
        layers = decoder_layers(model)
        if not 0 <= compiled.layer < len(layers):
            raise GuardError(f"policy layer {compiled.layer} does not exist in a model with {len(layers)} layers")
        d = int(model.config.hidden_size)
        if compiled.view.d_model != d:
            raise GuardError(f"artifact d_model {compiled.view.d_model} does not match the model's hidden size {d}")
        if compiled.joint and model_b is None:
            raise GuardError(f"policy {compiled.name} uses joint encoding: pass model_b (the base model B)")
        self.events: list[dict[str, Any]] = []
        self.captured: list[dict[str, Any]] = []  # with capture=True: per token, the activation the model continued with
        self._stack: ExitStack | None = None
        self._state: dict[str, Any] | None = None
        self._aborted_rows: dict[int, str] = {}

    # ------------------------------------------------------------------ context
    def __enter__(self) -> "Guard":
        self._stack = ExitStack()
        self._stack.enter_context(patch_residual(self.model, self.compiled.layer, self._hook))
        handle = self.model.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        self._stack.callback(handle.remove)
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._stack is not None
        self._stack.close()
        self._stack = None

    # ------------------------------------------------------------------ hooks
    def _pre_hook(self, _module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._last_ids = ids
        return None

    def _positions(self, hidden: torch.Tensor) -> tuple[torch.Tensor, TokenPositions]:
        """Rows of real tokens in the flattened [B*T] batch and what each of them is."""
        b, t, _ = hidden.shape
        st = self._state
        if st is None or (st["step"] == 0 and t != st["mask"].shape[1]):
            real = torch.ones(b, t, dtype=torch.bool)
            prompt = real.clone()
            last = torch.zeros_like(real)
            last[:, -1] = True
            pos = torch.arange(t).expand(b, t)
            ids = [str(i) for i in range(b)]
        elif st["step"] == 0:  # prefill of the prompts
            real = st["mask"].bool()
            prompt = real.clone()
            last = torch.zeros_like(real)
            last[:, -1] = real[:, -1]
            pos = position_ids_for(st["mask"])
            ids = st["ids"]
        else:  # one generated token per row
            real = ~st["finished"].clone().unsqueeze(1)
            prompt = torch.zeros(b, 1, dtype=torch.bool)
            last = torch.zeros_like(prompt)
            pos = (st["prompt_len"] + st["step"] - 1).unsqueeze(1)
            ids = st["ids"]
        for row in self._aborted_rows:
            real[row] = False
        flat = real.flatten().nonzero().squeeze(-1)
        req = torch.arange(b).unsqueeze(1).expand(b, t).flatten()
        tp = TokenPositions(prompt.flatten()[flat], last.flatten()[flat], req[flat], pos.flatten()[flat].long(), ids)
        return flat, tp

    def _hook(self, hidden: torch.Tensor) -> torch.Tensor | None:
        st = self._state
        if st is not None and st["step"] > 0 and self._last_ids is not None and self.tokenizer is not None:
            eos = self.tokenizer.eos_token_id
            if eos is not None:
                st["finished"] |= self._last_ids[:, -1].cpu() == eos
        flat, tp = self._positions(hidden)
        b, t, d = hidden.shape
        x = hidden.reshape(b * t, d)
        x_b = self._b_activations(b, t)[flat] if self.compiled.joint else None
        try:
            res = self.compiled.apply(x[flat], tp, x_b)
        except Exception as exc:  # noqa: BLE001 - whole-policy failure: fail-open or abort
            res = None
            self._policy_failure(exc, tp)
        out = None
        if res is not None:
            self._record(res)
            if res.rows is not None:
                x_new = x.clone()
                x_new[flat[res.rows]] = res.values.to(x.dtype)
                out = x_new.reshape(b, t, d)
        if self.capture:
            src = (out if out is not None else hidden).reshape(b * t, d)
            for j, r in enumerate(flat.tolist()):
                self.captured.append({"request": tp.request_ids[int(tp.request[j])], "position": int(tp.position[j]), "activation": src[r].detach().clone()})
        if st is not None:
            st["step"] += 1
        return out

    def _record(self, res) -> None:
        if res.events:
            self.events.extend(res.events)
            self.compiled.telemetry.emit_many([dict(e) for e in res.events])
        for req, msg in res.aborted.items():
            if self._state is not None and req in self._state["ids"]:
                self._aborted_rows.setdefault(self._state["ids"].index(req), msg)

    def _policy_failure(self, exc: Exception, tp: TokenPositions) -> None:
        event = {"policy": self.compiled.name, "rule": "*", "action": "error", "reason": f"{type(exc).__name__}: {exc}"[:300], "engine": "transformers"}
        self.events.append(event)
        self.compiled.telemetry.emit(dict(event))
        if self.compiled.policy.on_error == "fail-closed":
            for r in set(int(i) for i in tp.request.tolist()):
                self._aborted_rows.setdefault(r, f"guardrail policy {self.compiled.name} failed: {exc}; request stopped (fail-closed)")

    def _b_activations(self, b: int, t: int) -> torch.Tensor:
        """B's residual at the same tokens (joint encoding): recomputed over the whole sequence."""
        st = self._state
        if st is None:
            ids = self._last_ids
            mask = torch.ones_like(ids)
        else:
            if st["step"] > 0:
                st["seq"] = torch.cat([st["seq"], self._last_ids[:, -1:].cpu()], dim=1)
                st["seq_mask"] = torch.cat([st["seq_mask"], torch.ones(b, 1, dtype=st["seq_mask"].dtype)], dim=1)
            ids, mask = st["seq"], st["seq_mask"]
        acts = read_residual(self.model_b, self.compiled.layer, ids, mask)
        return acts[:, -t:].reshape(b * t, -1).float()

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, prompts: str | Sequence[str], max_new_tokens: int = 64, *, chat: bool = False, **gen_kwargs: Any) -> GenerationResult | list[GenerationResult]:
        """Greedy (by default) generation under the policy; one result per prompt.

        ``chat=True`` applies the tokenizer's chat template; otherwise the text is used as is
        (the paper's raw protocol).
        """
        if self._stack is None:
            raise GuardError("use the guard as a context manager: `with guard(...) as g: g.generate(...)`")
        if self.tokenizer is None:
            raise GuardError("no tokenizer: pass a LoadedModel or tokenizer= to guard()")
        single = isinstance(prompts, str)
        texts = [prompts] if single else list(prompts)
        if chat:
            texts = [self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) for p in texts]
        enc = encode_prompts(self.tokenizer, texts)
        b = enc["input_ids"].shape[0]
        self._aborted_rows = {}
        first_event = len(self.events)
        self._state = {
            "step": 0,
            "mask": enc["attention_mask"],
            "ids": [str(i) for i in range(b)],
            "prompt_len": enc["attention_mask"].sum(1),
            "finished": torch.zeros(b, dtype=torch.bool),
            "seq": enc["input_ids"].clone(),
            "seq_mask": enc["attention_mask"].clone(),
        }
        kwargs = {"do_sample": False, "max_new_tokens": max_new_tokens, "pad_token_id": self.tokenizer.pad_token_id}
        kwargs.update(gen_kwargs)
        try:
            out = self.model.generate(**enc, stopping_criteria=StoppingCriteriaList([_AbortedRows(self)]), **kwargs)
        finally:
            self._state = None
        new_events = self.events[first_event:]
        results = []
        width = enc["input_ids"].shape[1]
        eos = eos_ids(self.model, self.tokenizer)
        for i in range(b):
            toks = completion_ids(out[i, width:].tolist(), eos, self.tokenizer.pad_token_id)
            results.append(
                GenerationResult(
                    prompt=texts[i],
                    text=decode_completion(self.tokenizer, toks, eos),
                    token_ids=toks,
                    events=[e for e in new_events if e.get("request") == str(i)],
                    aborted=self._aborted_rows.get(i),
                )
            )
        return results[0] if single else results


def guard(model_or_loaded: Any, artifact: Any, policy: Policy | str | Path, *, tokenizer: Any = None, model_b: Any = None, capture: bool = False) -> Guard:
    """Install ``policy`` (a Policy or a YAML path) on a transformers model as a context manager.

    ``artifact`` is a crosscoder artifact folder (preferred: ``ranking.json`` beside it is used
    for ranked selectors), a loaded Crosscoder, or None to use the policy's ``artifact``.
    """
    if not isinstance(policy, Policy):
        policy = Policy.load(policy)
    model = getattr(model_or_loaded, "model", model_or_loaded)
    tokenizer = tokenizer or getattr(model_or_loaded, "tokenizer", None)
    if model_b is not None:
        model_b = getattr(model_b, "model", model_b)
    compiled = compile_policy(policy, artifact, engine="transformers")
    return Guard(model, compiled, tokenizer=tokenizer, model_b=model_b, capture=capture)

"""Greedy checks of the weights under training on dev prompts, cut as ``organism eval`` cuts them.

The warm start stops on their format accuracy and GRPO's selection scores their tool names,
so both read the same outputs ``organism eval`` would give for those weights.
"""

from __future__ import annotations

from collections.abc import Callable

from guardrail.generation import GenerationSettings
from guardrail.generation.transformers import generate_texts
from guardrail.organism.build_config import BuildConfig
from guardrail.organism.rl import lora_merged
from guardrail.tasks import STOP_STRINGS, format_accuracy
from guardrail.vllm.mirror import MirrorEngine


def greedy(model, tokenizer, prompts: list[str], cfg: BuildConfig, mirror: MirrorEngine | None,
           stop_when: Callable[[str], bool] | None = None) -> list[str]:
    """Greedy completions of the model's current weights (``cfg.dev_max_new_tokens`` at most).

    With a ``mirror`` (vLLM) the weights are synced into it first. Without, transformers
    generates with the LoRA merged, and a row stops early once ``stop_when`` holds.
    """
    if mirror is not None:
        mirror.sync(model)
        return mirror.generate(prompts, cfg.dev_max_new_tokens, STOP_STRINGS)
    with lora_merged(model):
        settings = GenerationSettings(cfg.dev_max_new_tokens, cfg.gen_batch, cfg.max_prompt_tokens, STOP_STRINGS)
        return generate_texts(model, tokenizer, prompts, settings, stop_when=stop_when)


def dev_format(model, tokenizer, prompts: list[str], cfg: BuildConfig, mirror: MirrorEngine | None = None) -> tuple[float, list[str]]:
    """Greedy format accuracy on ``prompts`` and the completions, as ``organism eval`` would score them.

    A row's verdict cannot change once it is in the format, so transformers stops it there.
    """
    texts = greedy(model, tokenizer, prompts, cfg, mirror, stop_when=format_accuracy)
    return sum(map(format_accuracy, texts)) / max(len(texts), 1), texts

"""A tiny random Qwen2 pair, built in seconds, for tests and smoke runs.

B is a seeded random model; A is B with a seeded perturbation of its upper layers, so the
two share a tokenizer and width (like a fine-tune) but differ measurably. head_dim is 64
because vLLM's CPU attention rejects 16.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from guardrail.models.loading import LoadedModel

TINY_SPECS = ("tiny-a", "tiny-b")
_VOCAB_CHARS = (
    " abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    ".,:;!?'\"()[]{}<>/\\_-+=*&%$#@|~`^\n\t"
)
# transformers' Qwen2 pre-tokenizer split (models/qwen2/tokenization_qwen2.py).
_QWEN2_PRETOKENIZE = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
SPECIAL = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]


def tiny_config(vocab_size: int) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
    )


_BYTE_LEVEL = {" ": "\u0120", "\n": "\u010a", "\t": "\u0109"}  # GPT-2 byte-level names of whitespace


@lru_cache(maxsize=1)
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer with chat special tokens: no files, no network.

    Built exactly the way transformers' ``Qwen2Tokenizer`` rebuilds a saved Qwen2 folder
    (byte-level BPE over the vocabulary, no merges), so the in-memory tokenizer, a folder
    written by :func:`save_tiny` and loaded with ``AutoTokenizer``, and vLLM all produce the
    same ids. Whitespace therefore carries its byte-level names (space = ``Ġ``).
    """
    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    for ch in _VOCAB_CHARS:
        vocab.setdefault(_BYTE_LEVEL.get(ch, ch), len(vocab))
    vocab["<unk>"] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    core.normalizer = normalizers.NFC()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_PRETOKENIZE), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(SPECIAL)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<|pad|>",
        eos_token="<|endoftext|>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL[2:],
    )
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return tok


def build_tiny(which: str = "tiny-b", seed: int = 0) -> Qwen2ForCausalLM:
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(tiny_config(len(tok)))
    if which == "tiny-a":
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, param in model.model.layers[-1].named_parameters():
                if param.ndim == 2:
                    param.add_(0.5 * param.std() * torch.randn(param.shape, generator=gen))
    return model.eval()


def load_tiny(spec: str, seed: int = 0) -> LoadedModel:
    if spec not in TINY_SPECS:
        raise ValueError(f"unknown tiny model {spec!r}; choose one of {TINY_SPECS}")
    tok = tiny_tokenizer()
    return LoadedModel(model=build_tiny(spec, seed), tokenizer=tok, spec=spec)


def save_tiny(spec: str, folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny model as an ordinary HF folder (exercises the real folder loader)."""
    folder = Path(folder)
    loaded = load_tiny(spec, seed)
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    (folder / "guardrail_tiny.json").write_text(json.dumps({"spec": spec, "seed": seed}))
    return folder

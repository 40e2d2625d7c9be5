"""What reaches the user's terminal from the libraries guardrail drives.

vLLM logs its engine set-up at INFO (dozens of lines per engine, NUMA and Triton notes
among them), transformers draws a "Loading weights" bar for every model it loads, and
torch, transformers and vLLM raise FutureWarnings about their own internals. None of it
is something a guardrail user can act on, and it buries the one line per stage and the one
progress bar a long command shows. :func:`quiet` silences it; commands offer
``--verbose`` to keep it.
"""

from __future__ import annotations

import logging
import os
import warnings

# Libraries whose own warnings are about their own internals, not about what the user did.
THIRD_PARTY = ("torch", "transformers", "vllm", "triton", "peft", "trl", "accelerate", "gguf", "huggingface_hub")
_THIRD_PARTY_MODULES = r"(" + "|".join(THIRD_PARTY) + r")(\..*)?$"


def quiet(verbose: bool = False) -> None:
    """Silence third-party chatter for the rest of this process (no-op when ``verbose``).

    Environment variables are set for libraries not imported yet (vLLM reads its log level
    and torch its C++ log level once, at import, so call this first); loggers and progress
    bars are set now.
    Errors still show: what is dropped is log records below ERROR from the libraries above,
    warnings raised inside them, and FutureWarnings (announcements of library changes).
    """
    if verbose:
        return
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    # c10's own warnings (vLLM's NUMA-binding note among them); read when torch loads
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)  # from anywhere: announcements of library changes
    for category in (DeprecationWarning, UserWarning, RuntimeWarning):
        warnings.filterwarnings("ignore", category=category, module=_THIRD_PARTY_MODULES)
    # transformers draws its loading bars whatever the environment says: set it directly
    # (its package import is lazy and cheap; every command that loads a model needs it)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

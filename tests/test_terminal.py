"""quiet(): third-party chatter off by default, untouched under --verbose."""

from __future__ import annotations

import logging
import warnings

import pytest

from guardrail.terminal import THIRD_PARTY, quiet

ENV = ("VLLM_LOGGING_LEVEL", "TORCH_CPP_LOG_LEVEL", "TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")


@pytest.fixture
def clean_state(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    levels = {n: logging.getLogger(n).level for n in THIRD_PARTY}
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    with warnings.catch_warnings():
        yield
    for n, level in levels.items():
        logging.getLogger(n).setLevel(level)
    hf_logging.set_verbosity(verbosity)
    (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()


def test_quiet_silences_logs_bars_and_library_warnings(clean_state, monkeypatch):
    import os

    from transformers.utils import logging as hf_logging

    quiet()
    assert os.environ["VLLM_LOGGING_LEVEL"] == "ERROR" and os.environ["TORCH_CPP_LOG_LEVEL"] == "ERROR"
    assert logging.getLogger("vllm").getEffectiveLevel() == logging.ERROR
    assert not hf_logging.is_progress_bar_enabled() and hf_logging.get_verbosity() == logging.ERROR
    with warnings.catch_warnings(record=True) as seen:
        warnings.warn_explicit("internal", UserWarning, "x.py", 1, module="vllm.worker")
        warnings.warn_explicit("ours", UserWarning, "x.py", 1, module="guardrail.eval.demo")
        warnings.warn("deprecated somewhere", FutureWarning)
    assert [str(w.message) for w in seen] == ["ours"]  # a warning of guardrail's own still shows


def test_verbose_changes_nothing(clean_state):
    import os

    before = logging.getLogger("vllm").level
    quiet(verbose=True)
    assert not any(name in os.environ for name in ENV)
    assert logging.getLogger("vllm").level == before

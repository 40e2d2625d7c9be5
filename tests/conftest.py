import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_pair():
    from guardrail.models import load_pair

    return load_pair("tiny")


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Never touch the user's cache from tests."""
    monkeypatch.setenv("GUARDRAIL_HOME", str(tmp_path_factory.getbasetemp() / "guardrail-home"))


@pytest.fixture
def one_thread():
    """Pin torch to one thread: exact-equality tests must not depend on reduction order."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)

"""Where the data lives, BFCL loading, deterministic splits, ordinary prompts.

Splits are decided by a hash of each record's id, so they never depend on file order,
on which categories are loaded together, or on a random state: an id is in exactly one
of train / dev / test, forever.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
from collections import defaultdict
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

from guardrail.tasks.task import ToolTask

Split = Literal["train", "dev", "test"]
HeldOutSplit = Literal["dev", "test"]  # never trained on: dev chooses between builds, test reports
SPLITS: tuple[str, ...] = ("train", "dev", "test")
# Share of ids per split (train, dev, test); cumulative thresholds on the id hash.
SPLIT_FRACTIONS = (0.6, 0.1, 0.3)
CATEGORIES: tuple[str, ...] = ("simple_python", "multiple", "parallel", "parallel_multiple", "irrelevance")
ANSWERED_CATEGORIES: tuple[str, ...] = CATEGORIES[:4]


class DataNotFoundError(FileNotFoundError):
    """The data folder (BFCL, general prompts) or one of its files could not be found."""


def packaged_data_dir() -> Path:
    """The copy of the data that ships inside the package (``guardrail/data``)."""
    return Path(str(resources.files("guardrail") / "data"))


def data_dir() -> Path:
    """``$GUARDRAIL_DATA`` if set, else the package's own copy: a fresh clone or an installed
    wheel needs nothing beside it."""
    env = os.environ.get("GUARDRAIL_DATA")
    if not env:
        return packaged_data_dir()
    path = Path(env).expanduser()
    if not path.is_dir():
        raise DataNotFoundError(f"GUARDRAIL_DATA={env!r} is not a directory (unset it to use the data shipped in the package)")
    return path


def split_of(record_id: str) -> Split:
    """Deterministic split of one id (sha256 of the id, first 8 bytes as a fraction)."""
    h = int.from_bytes(hashlib.sha256(record_id.encode("utf-8")).digest()[:8], "big") / 2**64
    if h < SPLIT_FRACTIONS[0]:
        return "train"
    if h < SPLIT_FRACTIONS[0] + SPLIT_FRACTIONS[1]:
        return "dev"
    return "test"


def _read_jsonl(path: Path) -> list[dict]:
    """JSON Lines from ``path``, or from ``path.gz`` when only the compressed copy exists."""
    packed = path.with_name(path.name + ".gz")
    if path.exists():
        fh = path.open(encoding="utf-8")
    elif packed.exists():
        fh = gzip.open(packed, "rt", encoding="utf-8")
    else:
        raise DataNotFoundError(f"missing data file {path} (nor {packed.name})")
    with fh:
        return [json.loads(line) for line in fh if line.strip()]


def load_category(category: str, root: Path | None = None) -> list[ToolTask]:
    """All tasks of one BFCL category, with possible answers where BFCL has them."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown BFCL category {category!r}; choose from {CATEGORIES}")
    bfcl = (root or data_dir()) / "bfcl"
    questions = _read_jsonl(bfcl / f"BFCL_v4_{category}.json")
    answers: dict[str, list] = {}
    if category in ANSWERED_CATEGORIES:
        answers = {r["id"]: r["ground_truth"] for r in _read_jsonl(bfcl / "possible_answer" / f"BFCL_v4_{category}.json")}
    tasks = []
    for rec in questions:
        turns = rec["question"][0]
        user = "\n".join(m["content"] for m in turns if m["role"] == "user")
        if category in ANSWERED_CATEGORIES and rec["id"] not in answers:
            raise ValueError(f"{rec['id']} has no possible answer in BFCL_v4_{category}.json")
        tasks.append(
            ToolTask(
                id=rec["id"],
                category=category,
                user=user,
                functions=rec["function"],
                possible_answer=answers.get(rec["id"]),
            )
        )
    return tasks


def load_tasks(
    split: Split | Literal["all"] = "all",
    categories: tuple[str, ...] | list[str] = CATEGORIES,
    root: Path | None = None,
) -> list[ToolTask]:
    """BFCL tasks of the given categories in one split (file order kept)."""
    if split != "all" and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS} or 'all'")
    out: list[ToolTask] = []
    for cat in categories:
        out.extend(t for t in load_category(cat, root) if split == "all" or split_of(t.id) == split)
    return out


def split_hash(categories: tuple[str, ...] | list[str] = CATEGORIES, root: Path | None = None) -> str:
    """sha256 over (split, id) of every task: changes iff the split assignment changes."""
    h = hashlib.sha256()
    for task in sorted(load_tasks("all", categories, root), key=lambda t: t.id):
        h.update(f"{split_of(task.id)}:{task.id}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class PlainPrompt:
    """An ordinary (non-tool) prompt: the other side of "tool vs plain" activation sets."""

    id: str
    source: str
    text: str

    def render(self, tokenizer=None, mode: Literal["chat", "raw"] = "chat") -> str:
        """Chat mode: one user turn through the chat template; raw mode: the text itself."""
        if mode == "raw":
            return self.text
        if mode != "chat":
            raise ValueError(f"unknown render mode {mode!r}; choose 'chat' or 'raw'")
        if tokenizer is None:
            raise ValueError("chat rendering needs a tokenizer")
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": self.text}], tokenize=False, add_generation_prompt=True
        )


def plain_prompts(n: int, split: Literal["train", "test"] = "train", seed: int = 0, root: Path | None = None) -> list[PlainPrompt]:
    """``n`` ordinary prompts balanced across sources (round robin over shuffled sources).

    Uses the split already stored in general/prompts.jsonl. Sources with fewer prompts
    than their share are exhausted and the rest is filled from the others.
    """
    if split not in ("train", "test"):
        raise ValueError(f"general prompts have splits 'train' and 'test', not {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rows = _read_jsonl((root or data_dir()) / "general" / "prompts.jsonl")
    by_source: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if row["split"] == split:
            by_source[row["source"]].append(row)
    rng = random.Random(seed)
    queues = []
    for source in sorted(by_source):
        items = sorted(by_source[source], key=lambda r: r["id"])
        rng.shuffle(items)
        queues.append(items)
    available = sum(len(q) for q in queues)
    if n > available:
        raise ValueError(f"asked for {n} plain prompts but split {split!r} has only {available}")
    out: list[PlainPrompt] = []
    depth = 0
    while len(out) < n:
        for q in queues:
            if depth < len(q) and len(out) < n:
                r = q[depth]
                out.append(PlainPrompt(id=r["id"], source=r["source"], text=r["text"]))
        depth += 1
    return out

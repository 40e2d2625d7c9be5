"""Crash-safe file primitives shared by caches, checkpoints and artifacts.

A file is either absent or complete: writers go to a temporary name, fsync, then rename
over the target (atomic on POSIX). Hashes are streamed, so large shards never sit in
memory twice.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_replace(tmp: str | Path, dst: str | Path) -> None:
    """Flush ``tmp`` to disk, then atomically make it ``dst``."""
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, dst)


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    fsync_replace(tmp, path)

"""Atomic checkpoint directories: every rank writes into ``PATH.tmp-XXXX``; rank 0 renames it to
``PATH`` when all are done, so an interrupted write never replaces a complete checkpoint."""

from __future__ import annotations

import glob
import os
import shutil
import uuid

from .collectives import broadcast, rank

_TMP_INFIX = ".tmp-"


def temp_dir_for(path: str) -> str:
    """The temporary directory every rank writes `path` into (collective): rank 0 removes leftovers of
    interrupted writes to `path`, picks a fresh name and broadcasts it."""
    tmp = None
    if rank() == 0:
        for stale in glob.glob(glob.escape(path) + _TMP_INFIX + "*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = f"{path}{_TMP_INFIX}{uuid.uuid4().hex[:8]}"
    return broadcast(tmp)


def replace_dir(tmp: str, path: str) -> None:
    """Rename `tmp` to `path`; an existing `path` is moved aside first and removed last."""
    _fsync_dir(tmp)
    old = None
    if os.path.exists(path):
        old = f"{path}.old-{uuid.uuid4().hex[:8]}"
        os.rename(path, old)
    os.rename(tmp, path)
    _fsync_dir(os.path.dirname(path))
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""Directories that appear whole or not at all: written beside their target, renamed in."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path


def swap_into_place(staging: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Rename the finished directory ``staging`` onto ``target``. An existing target is moved
    aside first and removed afterwards, or put back if the rename fails."""
    staging, target = Path(staging), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    if target.exists():
        os.replace(target, old)
    try:
        os.replace(staging, target)
    except OSError:
        if old.exists() and not target.exists():
            os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def publish_dir(
    target: str | os.PathLike[str], write: Callable[[Path], None], *, replace: bool = True
) -> Path:
    """Call ``write(tmp)`` on a temporary directory beside ``target``, then rename it into
    place. ``replace=False``: an existing target stands and the new one is discarded (for
    caches that concurrent builders fill with the same result: the first one wins)."""
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        if not replace and target.exists():
            return target
        try:
            swap_into_place(tmp, target)
        except OSError:
            if not replace and target.exists():  # another builder won the race
                return target
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target

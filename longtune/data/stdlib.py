"""The embedded default corpus: the Python standard library's own source files.

Every machine that runs longtune has them, so the default pipeline needs no download. They
are real long documents (a few hundred modules run to tens of thousands of characters), the
same on every machine with the same Python version, and listed in one sorted order.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

# Third-party packages can live under the stdlib directory (pyenv, Debian); they are not
# the standard library and differ between machines.
_NOT_STDLIB = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard library's ``*.py`` files, sorted by their path under the root."""
    root = root or stdlib_root()
    files = [
        p
        for p in root.rglob("*.py")
        if p.is_file() and not _NOT_STDLIB.intersection(p.relative_to(root).parts)
    ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())

"""Writing a file so that no half-written one is ever left under its name."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: str | Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a hidden temporary name beside ``path`` and rename it onto ``path``.

    The temporary file sits in ``path``'s folder (created if missing), so the rename is atomic:
    ``path`` holds either its old content or the whole new one. On any error the temporary file
    is removed and ``path`` is left as it was. The temporary name ends in ``path``'s suffix, for
    writers that pick the format by it (PIL, ``numpy.savez``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path

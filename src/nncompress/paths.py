"""Where nncompress keeps its caches (generated datasets, trained reference models)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Return the cache folder: ``$NNCOMPRESS_CACHE`` or ``./.cache/nncompress``.

    The folder is created on first use.
    """
    root = os.environ.get("NNCOMPRESS_CACHE")
    path = Path(root) if root else Path.cwd() / ".cache" / "nncompress"
    path.mkdir(parents=True, exist_ok=True)
    return path

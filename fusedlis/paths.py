"""Where fusedlis keeps its per-user files (embedded model, tuning cache)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$FUSEDLIS_CACHE_DIR`, else `$XDG_CACHE_HOME/fusedlis`, else `~/.cache/fusedlis` (not created)."""
    if os.environ.get("FUSEDLIS_CACHE_DIR"):
        return Path(os.environ["FUSEDLIS_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fusedlis"

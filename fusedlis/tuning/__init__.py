"""Kernel autotuning: search, persistent per-GPU cache, and the lookup kernels use.

Kernel launchers call `lookup(op, key)` when no explicit ``config=`` is given. `fusedlis tune` fills the
cache; see docs/tuning.md for the key normalisation, the file location and the environment variables
(``FUSEDLIS_CACHE_DIR``, ``FUSEDLIS_TUNING_FILE``, ``FUSEDLIS_TUNING=0``).
"""

from __future__ import annotations

from fusedlis.tuning._lookup import invalidate
from fusedlis.tuning._lookup import lookup as _impl
from fusedlis.tuning.cache import TuningCacheWarning, default_path


def lookup(op: str, key: dict) -> dict | None:
    """Tuned config for `op` at shape `key`, or None to use the kernel's defaults. Never raises.

    `key` is a flat dict of the launch's shape (e.g. ``{"M": 8, "N": 3072, "K": 4096, "dtype": torch.bfloat16}``);
    it is normalised as described in `fusedlis.tuning.keys`, and the current device's fingerprint is added
    here, so callers never pass GPU or version information. The cache file is read once per process
    (call `invalidate()` to re-read); an unusable file gives one `TuningCacheWarning` and None everywhere.
    """
    return _impl(op, key)


__all__ = ["lookup", "invalidate", "default_path", "TuningCacheWarning"]

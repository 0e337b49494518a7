"""In-memory index behind `fusedlis.tuning.lookup` (loaded once per process, on first use)."""

from __future__ import annotations

import threading
import warnings
from typing import Any

from fusedlis._env import env_flag
from fusedlis.tuning import cache as _cache
from fusedlis.tuning import fingerprint as _fp
from fusedlis.tuning.keys import NormKey, bucket_distance, normalize_key, split_bucketed


class _Index:
    def __init__(self) -> None:
        self.exact: dict[tuple[str, NormKey], dict[str, Any]] = {}
        self.buckets: dict[tuple[str, NormKey], list[tuple[NormKey, dict[str, Any]]]] = {}

    def add(self, op: str, key: dict[str, Any], config: dict[str, Any]) -> None:
        norm = normalize_key(key)
        self.exact[(op, norm)] = config
        ex, bk = split_bucketed(norm)
        if bk:
            self.buckets.setdefault((op, ex), []).append((bk, config))

    def find(self, op: str, key: dict[str, Any]) -> dict[str, Any] | None:
        norm = normalize_key(key)
        hit = self.exact.get((op, norm))
        if hit is not None:
            return hit
        ex, bk = split_bucketed(norm)
        best = None
        for have, cfg in self.buckets.get((op, ex), ()):
            d = bucket_distance(bk, have)
            if d is not None and (best is None or d < best[0]):
                best = (d, cfg)
        return None if best is None else best[1]


_lock = threading.Lock()
_index: _Index | None = None
_warned = False


def _warn_once(msg: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(msg + "; using default kernel configs", _cache.TuningCacheWarning, stacklevel=4)


def _load() -> _Index:
    idx = _Index()
    if not env_flag("FUSEDLIS_TUNING", True):
        return idx
    path = _cache.default_path()
    try:
        data = _cache.read(path)
    except _cache.CacheFormatError as e:
        _warn_once(f"tuning cache {path} is corrupt ({e})")
        return idx
    devices = data["devices"]
    if not devices:
        return idx
    me = _fp.current()
    sec = devices.get(_fp.fingerprint_id(me))
    if sec is None:
        same_gpu = [s["fingerprint"] for s in devices.values()
                    if s["fingerprint"].get("gpu") == me.get("gpu") and s["fingerprint"].get("sm_count") == me.get("sm_count")]
        if same_gpu:
            _warn_once(f"tuning cache {path} is stale for this {me.get('gpu')} "
                       f"({_fp.describe_mismatch(same_gpu[0], me)}); re-run `fusedlis tune`")
        else:
            gpus = sorted({str(s['fingerprint'].get('gpu')) for s in devices.values()})
            _warn_once(f"tuning cache {path} holds configs for {', '.join(gpus)}, not for this device "
                       f"({me.get('gpu')}); run `fusedlis tune` here")
        return idx
    bad = 0
    for op, per_op in sec["entries"].items():
        for e in per_op.values():
            try:
                idx.add(op, e["key"], dict(e["config"]))
            except (TypeError, ValueError):
                bad += 1
    if bad:
        _warn_once(f"tuning cache {path}: skipped {bad} malformed entries")
    return idx


_memo: dict = {}  # (op, raw key items) -> config | None: skips normalisation on repeated launches
_MEMO_MAX = 4096
_MISS = object()


def lookup(op: str, key: dict) -> dict | None:
    global _index
    try:
        mk = (op, tuple(key.items()))
        hit = _memo.get(mk, _MISS)
    except Exception:  # unhashable values or not a dict: take the slow path
        mk, hit = None, _MISS
    if hit is not _MISS and _index is not None:
        return None if hit is None else dict(hit)
    try:
        idx = _index
        if idx is None:
            with _lock:
                if _index is None:
                    try:
                        _index = _load()
                    except Exception as e:  # never let a cache problem break a kernel launch
                        _index = _Index()
                        _warn_once(f"tuning cache could not be loaded ({type(e).__name__}: {e})")
                idx = _index
        cfg = idx.find(op, key)
        if mk is not None:
            if len(_memo) >= _MEMO_MAX:
                _memo.clear()
            _memo[mk] = cfg
        return None if cfg is None else dict(cfg)
    except Exception:
        return None


def invalidate(reset_warning: bool = False) -> None:
    """Drop the in-memory index so the next `lookup` re-reads the file (after a write, or env change)."""
    global _index, _warned
    with _lock:
        _index = None
        _memo.clear()
        if reset_warning:
            _warned = False

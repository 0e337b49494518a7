"""Shape-key normalisation shared by the tuner (writer) and `lookup` (reader).

A kernel describes the problem it is about to run with a flat dict, e.g.
``{"M": 5, "N": 3072, "K": 4096, "dtype": torch.bfloat16}``. Both sides turn that dict into the same
canonical form so that a key written by `fusedlis tune` is found again by the launcher:

* names are strings; entries whose value is ``None`` are dropped (``activation=None`` == no activation);
* ``torch.dtype`` values and dtype aliases become torch's short name (``bf16`` -> ``bfloat16``);
* other strings are stripped and lower-cased; bools stay bools; integral numbers become ``int``;
* the canonical string is ``name=value`` pairs sorted by name, joined by ``,``.

Names in `BUCKET_DIMS` (batch rows ``M``/``B``, cache length ``S``, message size ``nbytes``) are *bucketed*: when no entry matches
exactly, `lookup` takes the entry whose other fields match exactly and whose bucketed values are nearest
(preferring tuned sizes >= the requested one, then the smallest log2 distance). So a config tuned at batch 8
serves batch 5, and one tuned at 64 serves 100.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

# Dimensions that vary call to call during decode; see the module docstring.
BUCKET_DIMS: frozenset[str] = frozenset({"M", "B", "S", "nbytes"})

_DTYPE_ALIASES = {
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "f16": "float16",
    "fp32": "float32",
    "float": "float32",
    "f32": "float32",
    "fp64": "float64",
    "double": "float64",
    "fp8": "float8_e4m3fn",
}

Scalar = bool | int | float | str
NormKey = tuple[tuple[str, Scalar], ...]


def _norm_value(name: str, value: Any) -> Scalar | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    mod = type(value).__module__
    if mod == "torch" and type(value).__name__ == "dtype":
        return str(value).removeprefix("torch.")
    if isinstance(value, str):
        s = value.strip().lower().removeprefix("torch.")
        if "dtype" in name.lower():
            s = _DTYPE_ALIASES.get(s, s)
        if not s or any(c in s for c in ",="):
            raise ValueError(f"key {name!r}: string value {value!r} is empty or contains ',' or '='")
        return s
    if hasattr(value, "__index__"):
        return int(value.__index__())
    if isinstance(value, float) or (mod == "numpy" and hasattr(value, "item")):
        f = float(value)
        if not math.isfinite(f):
            raise ValueError(f"key {name!r}: non-finite value {value!r}")
        return int(f) if f.is_integer() else f
    raise TypeError(f"key {name!r}: unsupported value type {type(value).__name__}")


def normalize_key(key: Mapping[str, Any]) -> NormKey:
    """Canonical, hashable form of a shape key. Raises TypeError/ValueError on bad input."""
    if not isinstance(key, Mapping):
        raise TypeError(f"key must be a mapping, got {type(key).__name__}")
    out: list[tuple[str, Scalar]] = []
    for name, value in key.items():
        if not isinstance(name, str) or not name or any(c in name for c in ",= "):
            raise ValueError(f"key name {name!r} must be a non-empty string without ',', '=' or spaces")
        v = _norm_value(name, value)
        if v is not None:
            out.append((name, v))
    return tuple(sorted(out))


def _fmt(v: Scalar) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v) if isinstance(v, float) else str(v)


def key_string(key: Mapping[str, Any] | NormKey) -> str:
    """Canonical string of a key (the JSON cache's entry name), e.g. ``K=4096,M=8,N=3072,dtype=bfloat16``."""
    norm = key if isinstance(key, tuple) else normalize_key(key)
    return ",".join(f"{k}={_fmt(v)}" for k, v in norm)


def split_bucketed(norm: NormKey) -> tuple[NormKey, NormKey]:
    """(exact part, bucketed part) of a normalised key; bucketed values must be positive numbers."""
    exact = tuple((k, v) for k, v in norm if not (k in BUCKET_DIMS and _is_num(v) and v > 0))
    bucket = tuple((k, v) for k, v in norm if k in BUCKET_DIMS and _is_num(v) and v > 0)
    return exact, bucket


def _is_num(v: Scalar) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def bucket_distance(want: NormKey, have: NormKey) -> tuple[int, float] | None:
    """Sort key for choosing the nearest tuned bucket, or None if the bucketed names differ."""
    if tuple(k for k, _ in want) != tuple(k for k, _ in have):
        return None
    below = 0
    dist = 0.0
    for (_, w), (_, h) in zip(want, have):
        if h < w:
            below += 1
        dist += abs(math.log2(h / w))
    return below, dist

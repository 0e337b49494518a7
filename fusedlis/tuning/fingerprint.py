"""Device fingerprint: which GPU and software stack a tuned config was measured on.

A cached config is only trusted when the whole fingerprint matches: same GPU name, SM count, driver,
CUDA runtime, triton and torch versions. Without CUDA the fingerprint names the CPU stack (``gpu="cpu"``),
so a CPU run never picks up GPU entries.
"""

from __future__ import annotations

import functools
import platform
from typing import Any

FIELDS = ("gpu", "sm_count", "driver", "cuda", "triton", "torch")


def _driver_version() -> str:
    # The kernel-module version ("580.95.05") changes codegen-relevant firmware; fall back to the
    # CUDA driver API version when /proc is not there (containers without the file, non-Linux).
    try:
        with open("/proc/driver/nvidia/version", encoding="utf-8") as f:
            for tok in f.readline().split():
                if tok[:1].isdigit() and "." in tok:
                    return tok
    except OSError:
        pass
    try:
        import torch

        v = int(torch._C._cuda_getDriverVersion())
        return f"cuda-api-{v // 1000}.{(v % 1000) // 10}"
    except Exception:
        return "unknown"


def detect(device: int | None = None) -> dict[str, Any]:
    """Fingerprint of `device` (default: the current CUDA device), or of the CPU stack without CUDA."""
    import torch
    import triton

    fp: dict[str, Any] = {"triton": triton.__version__, "torch": torch.__version__}
    if torch.cuda.is_available():
        idx = torch.cuda.current_device() if device is None else device
        props = torch.cuda.get_device_properties(idx)
        fp.update(
            gpu=props.name,
            sm_count=int(props.multi_processor_count),
            driver=_driver_version(),
            cuda=str(torch.version.cuda),
        )
    else:
        fp.update(gpu="cpu", sm_count=0, driver="none", cuda="none")
        fp["cpu"] = platform.machine()
    return fp


def fingerprint_id(fp: dict[str, Any]) -> str:
    """Stable string naming a fingerprint; the cache's per-device section name."""
    return "|".join(f"{k}={fp.get(k, '?')}" for k in FIELDS)


@functools.lru_cache(maxsize=None)
def _cached(device: int | None) -> tuple[tuple[str, Any], ...]:
    return tuple(detect(device).items())


def current(device: int | None = None) -> dict[str, Any]:
    """Memoised `detect` (device properties are queried once per process and device)."""
    return dict(_cached(device))


def clear() -> None:
    """Forget memoised fingerprints (tests, or after changing the current device's meaning)."""
    _cached.cache_clear()


def describe_mismatch(have: dict[str, Any], want: dict[str, Any]) -> str:
    """Human-readable list of fields that differ, e.g. ``triton 3.5.0 != 3.6.0``."""
    diffs = [f"{k} {have.get(k)!r} != {want.get(k)!r}" for k in FIELDS if have.get(k) != want.get(k)]
    return ", ".join(diffs) or "identical"

"""Kernel autotuning: search, persistent per-GPU cache, and the lookup kernels use."""

from __future__ import annotations


def lookup(op: str, key: dict) -> dict | None:
    """Tuned config for `op` at shape `key`, or None to use the kernel's defaults. Never raises."""
    return None

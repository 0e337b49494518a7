"""Reading the per-GPU-model tables of measured launch configs that ship next to the kernels (JSON)."""

from __future__ import annotations

import json
from pathlib import Path


def read_measured(name: str) -> list[tuple[str, dict[str, str], dict]]:
    """(device name, key fields, config) for every entry of the table `name` in this folder.

    A table maps a device name (as `torch.cuda.get_device_name` spells it) to entries keyed "k1=v1,k2=v2,...";
    top-level keys starting with "_" are notes. A missing or unreadable file is an empty table: a measured
    config is an optimisation, never a requirement.
    """
    try:
        raw = json.loads((Path(__file__).parent / name).read_text())
    except (OSError, ValueError):
        return []
    out = []
    for dev, table in raw.items():
        if dev.startswith("_") or not isinstance(table, dict):
            continue
        for kstr, cfg in table.items():
            out.append((dev, dict(kv.split("=", 1) for kv in kstr.split(",")), cfg))
    return out

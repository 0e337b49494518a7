"""Shared by the single-GPU microbenchmarks: where a result goes and the CSV with its provenance line."""

from __future__ import annotations

import csv
import datetime as dt
import os

import torch
import triton


def write_result_csv(out: str, prefix: str, rows: list[dict], tag: str = "") -> tuple[str, str]:
    """Write `rows` to <out>/<prefix>[_<tag>]_<device>_<date>.csv after a '# device ...' line; returns (path
    without extension, that line's text) so the caller can name its PNG and title its plot alike."""
    name = torch.cuda.get_device_name(0)
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, f"{prefix}{'_' + tag if tag else ''}_{name.replace(' ', '-')}_{date}")
    meta = f"device: {name}; torch {torch.__version__}; triton {triton.__version__}; date {date}"
    with open(stem + ".csv", "w", newline="") as f:
        f.write(f"# {meta}\n")
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return stem, meta

"""Tables, CSV and PNG for tuning results and for `fusedlis tune --show`."""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

CSV_FIELDS = ("op", "layer", "label", "key", "status", "default_config", "default_us", "tuned_config",
              "tuned_us", "speedup_vs_default", "baseline", "baseline_us", "speedup_vs_baseline",
              "lookup_us", "lookup_hit", "kept_default", "challenger_config", "challenger_us", "noise", "margin",
              "configs", "pruned", "failed", "message", "timer", "device")


def _num(v: Any, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Plain aligned text table (numbers right-aligned)."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(_is_number(r[i]) for r in cells[1:] if r[i]) for i in range(len(headers))]

    def line(r):
        return "  ".join(c.rjust(w) if numeric[i] else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def _is_number(s: str) -> bool:
    try:
        float(s.rstrip("x"))
        return True
    except ValueError:
        return False


def outcomes_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The end-of-run table: best config, time, speed-up over the default and over cuBLAS / SDPA / NCCL."""
    headers = ["shape", "best config", "tuned µs", "default µs", "vs default", "baseline", "baseline µs",
               "vs baseline", "lookup µs", "status"]
    body = []
    for r in rows:
        if r["status"] != "tuned":
            body.append([r["label"], "", "", "", "", "", "", "", "", f"{r['status']}: {r['message']}"])
            continue
        sd, sb = r["speedup_vs_default"], r["speedup_vs_baseline"]
        hit = r.get("lookup_hit")
        body.append([
            r["label"], ("(default) " if r.get("kept_default") else "") + r["tuned_config"],
            _num(r["tuned_us"], ".1f"), _num(r["default_us"], ".1f"),
            "" if sd is None else f"{sd:.2f}x", r["baseline"] or "", _num(r["baseline_us"], ".1f"),
            "" if sb is None else f"{sb:.2f}x", _num(r.get("lookup_us"), ".1f"),
            ("tuned" if hit is not False else "tuned (lookup MISS)") + (f"; {r['message']}" if r.get("message") else ""),
        ])
    return format_table(headers, body)


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], **extra: Any) -> Path:
    """Write result rows (plus constant `extra` columns such as timer/device) to `path`."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, **extra})
    return p


def plot(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], title: str) -> Path | None:
    """Before/after chart: per shape, time relative to the default config (lower is better) of the tuned
    config, the tuned config reached through lookup, and the vendor baseline; tuned µs annotated.
    Returns None (after a message) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("fusedlis tune: matplotlib not installed; no plot written (pip install matplotlib)")
        return None
    rows = [r for r in rows if r["status"] == "tuned" and r.get("default_us")]
    if not rows:
        return None
    series = [("tuned", "tuned_us", "#1f77b4"), ("tuned via lookup", "lookup_us", "#2ca02c"),
              ("baseline", "baseline_us", "#ff7f0e")]
    series = [s for s in series if any(r.get(s[1]) for r in rows)]
    n, h = len(rows), 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(8, 0.32 * n + 1.4))
    for i, (name, col, color) in enumerate(series):
        ys = [j - 0.4 + (i + 0.5) * h for j in range(n)]
        xs = [(r.get(col) or 0.0) / r["default_us"] for r in rows]
        if col == "baseline_us":
            name = "baseline (" + ", ".join(sorted({r["baseline"] for r in rows if r.get("baseline")})) + ")"
        ax.barh(ys, xs, height=h, color=color, label=name)
    for j, r in enumerate(rows):
        ax.annotate(f"{r['tuned_us']:.1f} µs (default {r['default_us']:.1f})", (0.01, j - 0.4 + 0.5 * h),
                    va="center", fontsize=6, color="white")
    ax.axvline(1.0, color="k", lw=0.8, ls="--", label="default config = 1")
    ax.set_yticks(range(n))
    ax.set_yticklabels([r["label"] for r in rows], fontsize=7)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_xlabel("time relative to the default config (median; lower is better)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.9 / (0.32 * n + 1.4)), ncol=4)
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return p


def show_table(data: Mapping[str, Any], current_id: str | None) -> str:
    """Text listing of a whole cache file for `fusedlis tune --show`."""
    out = []
    devices = data.get("devices", {})
    if not devices:
        return "(empty)"
    for fid, sec in sorted(devices.items()):
        fp = sec["fingerprint"]
        mark = "  <- this device" if fid == current_id else ""
        out.append(f"[{fp.get('gpu')}, {fp.get('sm_count')} SMs, driver {fp.get('driver')}, "
                   f"triton {fp.get('triton')}, torch {fp.get('torch')}]{mark}")
        body = []
        for op, per_op in sorted(sec.get("entries", {}).items()):
            for ks, e in _sorted_entries(per_op):
                meta = e.get("meta") or {}
                d, t = e.get("default_us"), e.get("time_us")
                body.append([op, ks, _fmt(e.get("config")), _num(t, ".1f"),
                             f"{d / t:.2f}x" if d and t else "", str(meta.get("model", "")),
                             str(meta.get("tp", "")), e.get("timer", ""), e.get("tuned_at", "")])
        out.append(format_table(["op", "key", "config", "µs", "vs default", "model", "tp", "timer", "tuned at"],
                                body))
        out.append("")
    return "\n".join(out).rstrip()


def _sorted_entries(per_op: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """Entries ordered by their key's values (numbers numerically: B=8 before B=32)."""
    def k(item):
        key = item[1].get("key", {})
        return tuple((n, (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v))) for n, v in sorted(key.items()))

    try:
        return sorted(per_op.items(), key=k)
    except TypeError:
        return sorted(per_op.items())


def _fmt(cfg: Any) -> str:
    from fusedlis.tuning.tuner import _fmt_cfg

    return _fmt_cfg(cfg) if isinstance(cfg, dict) else str(cfg)

"""Validate the performance model against measurements: all-reduce latency, decode GEMMs, decode steps.

Regenerate the committed comparison (2xH200 numbers of shared/notes/gpu-facts.md, transcribed into CSVs):

    python bench/validate_perfmodel.py --fit-from bench/results/perfmodel_gpufacts_allreduce.csv \
        bench/results/perfmodel_gpufacts_gemm.csv --reduce-GBps 1433 \
        --out-prefix bench/results/perfmodel_validation_gpufacts

(1433 GB/s = the 4.3 TB/s copy bandwidth measured on one H200 / 3.)

With a calibrated profile and the comm engineer's measurements (bench/allreduce.py CSV) instead:

    python bench/validate_perfmodel.py --profile calibrated.json --allreduce bench/results/allreduce_*.csv

Modes:
- `--fit-from CSV...`: each all-reduce implementation in the CSVs gets its own (alpha, beta) fitted on
  `--fit-sizes` only (the model form of its algorithm, gamma from the profile); the other sizes are held out.
  GEMM rows: overhead and bandwidth fitted on every other shape by size plus the largest, the rest held out.
  Reports the held-out error: that is the validation.
- `--profile FILE`: no fitting; predictions straight from the profile (nccl rows use its NCCL link, others
  its custom link).
- `--decode CSV`: measured decode step latency rows (columns model, tp, batch, context, and ms or us) are
  compared with `step_time` for that TP layout on one node.
Rows whose relative error exceeds `--tolerance` (default 0.15) are marked FAIL; the exit code is 0 either way
unless --strict.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Any

from fusedlis.perfmodel import collectives as coll
from fusedlis.perfmodel.calibrate import fit_gemm, fit_link, linear_coefficients
from fusedlis.perfmodel.cli import parse_size
from fusedlis.perfmodel.hardware import Hardware, Link, get_hardware

_ALIASES = {
    "bytes": ("bytes", "size_bytes", "nbytes", "size", "message_bytes"),
    "us": ("us", "median_us", "latency_us", "time_us", "p50_us"),
    "impl": ("impl", "backend", "implementation", "method"),
    "algo": ("algo", "algorithm"),
    "gpus": ("gpus", "world_size", "world", "ranks", "nranks"),
    "nodes": ("nodes", "num_nodes", "logical_nodes"),
}
_IMPL_ALGO = {"nccl": "nccl", "one_shot": "oneshot", "oneshot": "oneshot", "two_shot": "twoshot",
              "twoshot": "twoshot", "nvrar": "nvrar"}


def _get(row: dict[str, str], key: str, path: str, required: bool = True) -> str | None:
    for k in _ALIASES.get(key, (key,)):
        if row.get(k) not in (None, ""):
            return row[k]
    if required:
        raise SystemExit(f"{path}: a row lacks column {key!r} (accepted names: {', '.join(_ALIASES.get(key, (key,)))})")
    return None


def read_rows(paths: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(all-reduce rows, gemm rows) normalised from CSVs of calibrate --raw, bench/allreduce.py or gpu-facts."""
    ars, gemms = [], []
    for path in paths:
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                kind = r.get("kind", "allreduce")
                if kind == "gemm":
                    gemms.append({"K": int(r["K"]), "N": int(r["N"]), "bytes": float(r["bytes"]), "us": float(r["us"])})
                    continue
                if kind != "allreduce":
                    continue
                if r.get("mode", "graph") != "graph":
                    continue  # eager timings include host launch gaps the model does not describe
                impl = _get(r, "impl", path)
                algo = _get(r, "algo", path, required=False) or _IMPL_ALGO.get(impl.lower(), "twoshot")
                algo = "nccl" if impl.lower().startswith("nccl") else algo
                if algo == "auto":
                    algo = "twoshot"
                ars.append({"impl": impl, "algo": coll.resolve(algo), "gpus": int(_get(r, "gpus", path)),
                            "nodes": int(_get(r, "nodes", path, required=False) or 1),
                            "bytes": parse_size(_get(r, "bytes", path)), "us": float(_get(r, "us", path))})
    return ars, gemms


def _link_for(hw: Hardware, impl_rows: list[dict[str, Any]], fit_sizes: set[int] | None) -> Hardware:
    """`hw` with the NVLink (alpha, beta) of this implementation fitted on `fit_sizes` (if given)."""
    if fit_sizes is None:
        return hw
    algo = impl_rows[0]["algo"]
    samples = [("ring" if algo == "nccl" else algo, r["gpus"], r["bytes"], r["us"] * 1e-6)
               for r in impl_rows if r["bytes"] in fit_sizes]
    if len(samples) < 2:
        raise SystemExit(f"{impl_rows[0]['impl']}: fewer than 2 rows at the fit sizes")
    a, b = fit_link(samples, hw.gamma)
    return hw.with_(intra=Link(a, b, a, b))


def validate_allreduce(hw: Hardware, rows: list[dict[str, Any]], fit_sizes: set[int] | None) -> list[dict[str, Any]]:
    out = []
    for impl in dict.fromkeys(r["impl"] for r in rows):
        rs = sorted((r for r in rows if r["impl"] == impl), key=lambda r: (r["gpus"], r["bytes"]))
        h = _link_for(hw, rs, fit_sizes)
        for r in rs:
            nodes = r["nodes"]
            pred = coll.allreduce(r["algo"], h, nodes, r["gpus"] // nodes, r["bytes"]).total * 1e6
            role = "profile" if fit_sizes is None else ("fit" if r["bytes"] in fit_sizes else "held-out")
            out.append({"what": "allreduce", "impl": impl, "model": r["algo"], "gpus": r["gpus"],
                        "case": f"{r['bytes']}", "measured_us": r["us"], "predicted_us": pred,
                        "rel_err": pred / r["us"] - 1, "role": role,
                        "alpha_us": h.intra.alpha * 1e6, "GBps": 1e-9 / h.intra.beta})
    return out


def validate_gemm(hw: Hardware, rows: list[dict[str, Any]], fit: bool) -> list[dict[str, Any]]:
    """Sorted by bytes, every other shape plus the largest is fitted; the rest are held out (interpolation)."""
    h = hw
    rows = sorted(rows, key=lambda r: r["bytes"])
    fit_ids = set(range(0, len(rows), 2)) | {len(rows) - 1}
    if fit:
        ov, bw = fit_gemm([(r["bytes"], r["us"] * 1e-6) for i, r in enumerate(rows) if i in fit_ids])
        h = hw.with_(kernel_overhead=ov, hbm_bw=bw)
    out = []
    for i, r in enumerate(rows):
        pred = (h.kernel_overhead + r["bytes"] / h.hbm_bw) * 1e6
        role = "profile" if not fit else ("fit" if i in fit_ids else "held-out")
        out.append({"what": "gemm", "impl": "cublas", "model": "overhead+bytes/bw", "gpus": 1,
                    "case": f"1x{r['K']}x{r['N']}", "measured_us": r["us"], "predicted_us": pred,
                    "rel_err": pred / r["us"] - 1, "role": role, "alpha_us": h.kernel_overhead * 1e6,
                    "GBps": h.hbm_bw / 1e9})
    return out


def validate_decode(hw: Hardware, paths: list[str]) -> list[dict[str, Any]]:
    from fusedlis.perfmodel.step import step_time
    from fusedlis.perfmodel.volume import Layout, model_shape

    out = []
    for path in paths:
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                try:
                    model, tp, bsz = r["model"], int(r["tp"]), int(r["batch"])
                    ctx = float(r.get("context") or r.get("seq_len") or r["prompt"])
                    meas = float(r["ms"]) * 1e3 if r.get("ms") else float(r["us"])
                except (KeyError, ValueError) as e:
                    raise SystemExit(f"{path}: decode rows need model, tp, batch, context (or seq_len/prompt) "
                                     f"and ms or us: {e}") from None
                algo = coll.resolve(r.get("allreduce") or "nccl")
                st = step_time(model_shape(model), Layout(tp, 1), hw.with_(gpus_per_node=max(tp, 1)), batch=bsz,
                               context=ctx, prefill=False, allreduce=algo)
                pred = st.total * 1e6
                out.append({"what": "decode", "impl": r.get("impl", "fusedlis"), "model": algo, "gpus": tp,
                            "case": f"{model} tp{tp} b{bsz} ctx{ctx:g}", "measured_us": meas,
                            "predicted_us": pred, "rel_err": pred / meas - 1, "role": "profile",
                            "alpha_us": "", "GBps": ""})
    return out


def write_outputs(rows: list[dict[str, Any]], prefix: str, tol: float, header: list[str]) -> None:
    fields = ["what", "impl", "model", "gpus", "case", "role", "measured_us", "predicted_us", "rel_err",
              "alpha_us", "GBps"]
    with open(prefix + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()})
    lines = header + ["", "| what | impl | model | case | role | measured µs | predicted µs | error | within "
                      f"{tol:.0%} |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ok = abs(r["rel_err"]) <= tol
        lines.append(f"| {r['what']} | {r['impl']} | {r['model']} | {r['case']} | {r['role']} | "
                     f"{r['measured_us']:.1f} | {r['predicted_us']:.1f} | {r['rel_err']:+.1%} | "
                     f"{'yes' if ok else 'FAIL'} |")
    lines.append("")
    for role in ("held-out", "profile", "fit"):
        sel = [r for r in rows if r["role"] == role]
        if sel:
            worst = max(abs(r["rel_err"]) for r in sel)
            n_ok = sum(abs(r["rel_err"]) <= tol for r in sel)
            lines.append(f"- {role}: {n_ok}/{len(sel)} within {tol:.0%}, worst |error| {worst:.1%}")
    Path(prefix + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(rows: list[dict[str, Any]], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot written (pip install matplotlib)", file=sys.stderr)
        return
    ar = [r for r in rows if r["what"] == "allreduce"]
    other = [r for r in rows if r["what"] != "allreduce"]
    fig, axes = plt.subplots(1, 2 if other else 1, figsize=(13 if other else 7, 4.5), squeeze=False)
    a = axes[0][0]
    for i, impl in enumerate(dict.fromkeys(r["impl"] for r in ar)):
        rs = [r for r in ar if r["impl"] == impl]
        xs = [int(r["case"]) for r in rs]
        line, = a.plot(xs, [r["measured_us"] for r in rs], "o", label=f"{impl} measured")
        a.plot(xs, [r["predicted_us"] for r in rs], "-", color=line.get_color(), label=f"{impl} model")
        for r, x in zip(rs, xs):
            if r["role"] == "held-out":
                a.plot([x], [r["measured_us"]], "s", mfc="none", ms=10, color=line.get_color())
    a.set_xscale("log", base=2)
    a.set_xlabel("message bytes")
    a.set_ylabel("all-reduce µs")
    a.set_title("all-reduce: measured (dots; squares held out) vs model (lines)")
    a.legend(fontsize=7)
    a.grid(True, alpha=0.3)
    if other:
        b = axes[0][1]
        xs = range(len(other))
        b.bar([x - 0.2 for x in xs], [r["measured_us"] for r in other], 0.4, label="measured")
        b.bar([x + 0.2 for x in xs], [r["predicted_us"] for r in other], 0.4, label="model")
        b.set_xticks(list(xs))
        b.set_xticklabels([f"{r['case']}\n{r['role']}" for r in other], rotation=60, fontsize=7)
        b.set_ylabel("µs")
        b.set_title("GEMM / decode step")
        b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--profile", default="h200-ndr", help="hardware profile (built-in name or JSON/YAML file)")
    ap.add_argument("--fit-from", nargs="*", default=[], help="measured CSVs to fit per implementation")
    ap.add_argument("--fit-sizes", default="8K,128K,1M,4M", help="all-reduce sizes used for fitting")
    ap.add_argument("--allreduce", nargs="*", default=[], help="measured all-reduce CSVs to compare (no fitting)")
    ap.add_argument("--decode", nargs="*", default=[], help="measured decode-step CSVs to compare")
    ap.add_argument("--reduce-GBps", type=float, default=None,
                    help="override the profile's reduction rate (gamma = 1 / this), e.g. measured copy bandwidth / 3")
    ap.add_argument("--tolerance", type=float, default=0.15)
    ap.add_argument("--out-prefix", default="bench/results/perfmodel_validation")
    ap.add_argument("--strict", action="store_true", help="exit 1 if any held-out/profile row misses tolerance")
    args = ap.parse_args(argv)
    if not (args.fit_from or args.allreduce or args.decode):
        ap.error("give --fit-from, --allreduce or --decode CSVs")
    hw = get_hardware(args.profile)
    if args.reduce_GBps is not None:
        if args.reduce_GBps <= 0:
            ap.error("--reduce-GBps must be > 0")
        hw = hw.with_(gamma=1.0 / (args.reduce_GBps * 1e9))
    rows: list[dict[str, Any]] = []
    header = [f"# perfmodel validation ({Path(args.out_prefix).name})", "",
              f"Generated by `python bench/validate_perfmodel.py {' '.join(argv if argv is not None else sys.argv[1:])}`.",
              f"Profile: {hw.name}; gamma = {1e-9 / hw.gamma:.0f} GB/s reduced."]
    if args.fit_from:
        fit_sizes = {parse_size(s) for s in args.fit_sizes.split(",")}
        ar, gm = read_rows(args.fit_from)
        if ar:
            rows += validate_allreduce(hw, ar, fit_sizes)
        if gm:
            rows += validate_gemm(hw, gm, True)
        header.append(f"Fitted per implementation on sizes {sorted(fit_sizes)} (all-reduce); GEMMs sorted by "
                      "bytes: every other shape and the largest fitted. Every other row is held out.")
    if args.allreduce:
        ar, gm = read_rows(args.allreduce)
        rows += validate_allreduce(hw, ar, None) + (validate_gemm(hw, gm, False) if gm else [])
    if args.decode:
        rows += validate_decode(hw, args.decode)
    Path(args.out_prefix).parent.mkdir(parents=True, exist_ok=True)
    write_outputs(rows, args.out_prefix, args.tolerance, header)
    plot(rows, args.out_prefix + ".png")
    print(f"wrote {args.out_prefix}.csv, .md, .png")
    bad = [r for r in rows if r["role"] != "fit" and abs(r["rel_err"]) > args.tolerance]
    return 1 if (args.strict and bad) else 0


if __name__ == "__main__":
    sys.exit(main())

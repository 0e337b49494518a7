"""Validate the performance model against measurements: all-reduce latency, decode GEMMs, decode steps.

Regenerate every committed comparison in one command:

    python bench/validate_perfmodel.py --all

which runs, among others (2xH200 numbers of shared/notes/gpu-facts.md, transcribed into CSVs):

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
  their algorithm's terms); `--only` keeps the variants the profile was measured with.
- `--layer CSV`: bench/fused.py rows, GEMM + all-reduce in one graph, against the same file's GEMM-only time
  plus the all-reduce model (with `--fit-from`, the hidden-latency fractions are fitted on M=1, rest held out).
- `--decode CSV`: bench/decode.py rows (model, tp, system, batch, context, ms_per_token[, fuse_norm]) against
  `step_time` for that TP layout on one node, each with the all-reduce algorithm its engine mode ran (LL or flag
  protocol by the file's date) and 2 RMSNorm kernels fewer per layer where fuse_norm = 1; `--decode-fit-tp 1`
  fits the engine's compute terms on the TP=1 rows and holds out the rest; `--decode-fit-system fusedlis-nccl`
  fits them per file on its NCCL rows and holds out the file's other all-reduce modes.
With `--fit-from` or `--decode-fit-tp` the fitted profile is written to `<out-prefix>_profile.json`.
Rows whose relative error exceeds `--tolerance` (default 0.15) are marked FAIL; the exit code is 0 either way
unless --strict. The .md ends with counts per kind of row and per decode file (the .csv's `source` column); a
decode file with a `decode_breakdown_` twin was timed after a profiler breakdown in the same process and is
marked `[profiled]`. `--all` compares a calibration named `..._<date>_run<HHMM>` with the newest
bench/allreduce.py run measured at or before it (run 0614: the same machine, minutes before calibrating).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode import split_variant  # noqa: E402  (bench/decode.py: its mode suffixes)
from fusedlis.perfmodel import collectives as coll
from fusedlis.perfmodel.calibrate import fit_gemm, fit_link, fit_overlap, profile_from_measurements
from fusedlis.perfmodel.cli import parse_size
from fusedlis.perfmodel.hardware import Hardware, Link, get_hardware, save_profile
from fusedlis.perfmodel.step import ROPE_KERNELS_PER_LAYER

_ALIASES = {
    "bytes": ("bytes", "size_bytes", "nbytes", "size", "message_bytes"),
    "us": ("us", "us_median", "median_us", "latency_us", "time_us", "p50_us"),
    "impl": ("impl", "variant", "backend", "implementation", "method"),
    "algo": ("algo", "algorithm"),
    "gpus": ("gpus", "world_size", "world", "ranks", "nranks"),
    "nodes": ("nodes", "num_nodes", "logical_nodes"),
}
_IMPL_ALGO = {"nccl": "nccl", "one_shot": "oneshot", "oneshot": "oneshot", "two_shot": "twoshot",
              "twoshot": "twoshot", "nvrar": "nvrar"}


def _logical_nodes(low: str, gpus: int = 2) -> int:
    """Logical nodes of a variant name's `<N>x<G>` tag on `gpus` GPUs, else 1. bench/allreduce.py writes `2x1`
    for one GPU per node whatever the world size (`fusedlis_nvrar_2x1_ll` on 4 GPUs is 4 nodes of 1) and
    `2x<world/2>` for two nodes (`fusedlis_nvrar_2x2_ll`)."""
    import re

    m = re.search(r"_(\d+)x(\d+)(?:_|$)", low)
    if not m:
        return 1
    per_node = int(m.group(2))
    return gpus if per_node == 1 else max(1, gpus // per_node)


def _algo_of(impl: str, algo: str | None, gpus: int = 2) -> tuple[str, int]:
    """(model algorithm, logical nodes) for a measured variant name such as bench/allreduce.py writes.

    `<N>x1` variants (`fusedlis_nvrar_2x1_*`, `fusedlis_auto_2x1`) run on N logical nodes of 1 GPU that talk
    over NVLink: NVRAR there is one recursive-doubling exchange per rail step, modelled as `nvrar` on N nodes
    of 1 GPU whose network link is the implementation's (NVLink) link. LL variants (`..._ll`, `..._ll_t1k`,
    or an algorithm column `one_shot_ll`) map to the LL model of their algorithm (`oneshot_ll`, ...).
    """
    low = impl.lower()
    nodes = _logical_nodes(low, gpus)
    if algo:
        a = algo.lower()
        return ("twoshot" if a == "auto" else coll.resolve(_IMPL_ALGO.get(a, a))), nodes
    if low.startswith("nccl"):
        return "nccl", nodes
    ll = "_ll" in low
    for key in ("one_shot", "oneshot", "two_shot", "twoshot", "nvrar"):
        if key in low:
            return _IMPL_ALGO[key] + ("_ll" if ll else ""), nodes
    raise SystemExit(f"cannot tell the algorithm of variant {impl!r}: add an 'algo' column")


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
    skipped: dict[str, str] = {}
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
                gpus = _get(r, "gpus", path, required=False)
                if gpus is None:  # bench/allreduce.py: device column like "2xH200"
                    dev = r.get("device", "")
                    if "x" not in dev or not dev.split("x", 1)[0].isdigit():
                        raise SystemExit(f"{path}: no gpus/world_size column and no device like '2xH200'")
                    gpus = dev.split("x", 1)[0]
                col = _get(r, "algo", path, required=False)
                if col is None and "_auto_" in impl.lower():
                    # a front end whose per-size choice the file did not record (bench/allreduce.py before
                    # 2026-11-22 11:10 for fusedlis_auto_2x2): nothing to model it by
                    skipped[f"{Path(path).name}:{impl}"] = "no algorithm recorded per size"
                    continue
                algo, logical = _algo_of(impl, col, int(gpus))
                if 1 < logical < int(gpus):
                    # several nodes of several GPUs: two link classes, which one (alpha, beta) fit cannot separate
                    skipped[f"{Path(path).name}:{impl}"] = f"{logical} nodes x {int(gpus) // logical} GPUs"
                    continue
                ars.append({"source": Path(path).stem, "impl": impl, "variant": impl, "algo": coll.resolve(algo),
                            "gpus": int(gpus),
                            "nodes": int(_get(r, "nodes", path, required=False) or logical),
                            "bytes": parse_size(_get(r, "bytes", path)), "us": float(_get(r, "us", path))})
    for name, why in sorted(skipped.items()):
        print(f"left out ({why}): {name}")
    # calibrate --raw names an implementation once for all its algorithms ("fusedlis": oneshot and twoshot)
    algos: dict[str, set[str]] = {}
    for a in ars:
        algos.setdefault(a["impl"], set()).add(a["algo"])
    for a in ars:
        if len(algos[a["impl"]]) > 1:
            a["impl"] = f"{a['impl']}_{a['algo']}"
    return ars, gemms


def _link_for(hw: Hardware, impl_rows: list[dict[str, Any]], fit_sizes: set[int] | None) -> Hardware:
    """`hw` whose NVLink (alpha, beta) for this implementation's algorithm(s) are fitted on `fit_sizes`."""
    if fit_sizes is None:
        return hw
    samples = [("ring" if r["algo"] == "nccl" else r["algo"], r["gpus"], r["bytes"], r["us"] * 1e-6)
               for r in impl_rows if r["bytes"] in fit_sizes]
    if len(samples) < 2:
        raise SystemExit(f"{impl_rows[0]['impl']}: fewer than 2 rows at the fit sizes")
    nodes = impl_rows[0]["nodes"]
    a, b = fit_link(samples, hw.gamma, nodes)
    link = Link(a, b, a, b)
    # logical nodes of one host: the "network" between them is this implementation's NVLink link
    return hw.with_(intra=link, inter=link, inter_load_store=True) if nodes > 1 else hw.with_(intra=link)


def _norm(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def validate_allreduce(hw: Hardware, rows: list[dict[str, Any]], fit_sizes: set[int] | None,
                       fitted: dict[str, Hardware] | None = None) -> list[dict[str, Any]]:
    """Rows of measured vs model; with `fit_sizes`, each implementation's fitted profile goes into `fitted`."""
    out = []
    own: dict[str, Hardware] = {}  # fitted per implementation
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    few = set()
    for impl in impls:
        rs = [r for r in rows if r["impl"] == impl]
        if fit_sizes is not None and sum(r["bytes"] in fit_sizes for r in rs) < 2:
            few.add(impl)  # e.g. the one 4 MB row where fusedlis_auto switched to two-shot LL
        else:
            own[impl] = _link_for(hw, rs, fit_sizes)
    for impl in impls:
        rs = sorted((r for r in rows if r["impl"] == impl), key=lambda r: (r["gpus"], r["bytes"]))
        if impl in few:
            # too few rows of its own to fit 2 parameters: the terms of the plainest implementation fitted on
            # the same algorithm and topology (the same kernel, e.g. fusedlis_two_shot_ll for auto's 4 MB row)
            same = [i for i in own if {(r["algo"], r["nodes"]) for r in rows if r["impl"] == i}
                    == {(r["algo"], r["nodes"]) for r in rs}]
            if not same:
                raise SystemExit(f"{impl}: fewer than 2 rows at the fit sizes and no other implementation of "
                                 f"{rs[0]['algo']} to borrow terms from")
            h = own[min(same, key=lambda i: (not _norm(i).startswith("fusedlis"), len(i), i))]
        else:
            h = own[impl]
        if fitted is not None:
            fitted[_norm(impl)] = h
        for r in rs:
            nodes = r["nodes"]
            # logical nodes of one host (profile mode): their "network" is this profile's NVLink link
            hn = h.with_(inter=h.intra, inter_load_store=True) if fit_sizes is None and nodes > 1 else h
            pred = coll.allreduce(r["algo"], hn, nodes, r["gpus"] // nodes, r["bytes"]).total * 1e6
            # a row predicted with borrowed terms at a fit size: that size's kernel time was fitted (in another
            # variant's measurement), so it does not count as held out
            role = "profile" if fit_sizes is None else ("fit" if r["bytes"] in fit_sizes else "held-out")
            a, b = h.intra.params(r["algo"])
            out.append({"what": "allreduce", "impl": impl, "model": r["algo"], "gpus": r["gpus"],
                        "case": f"{r['bytes']}", "measured_us": r["us"], "predicted_us": pred,
                        "rel_err": pred / r["us"] - 1, "role": role, "alpha_us": a * 1e6, "GBps": 1e-9 / b,
                        "source": r.get("source", "")})
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


# bench/decode.py "system" -> (engine all-reduce mode, logical nodes of the TP group)
_DECODE_SYSTEMS = {"fusedlis-nccl": ("nccl", 1), "fusedlis-nvrar-1node": ("nvrar", 1),
                   "fusedlis-nvrar-2node": ("nvrar", 2), "fusedlis-fused": ("fused", 1), "fusedlis-auto": ("auto", 1),
                   "fusedlis-auto-unfusednorm": ("auto", 1), "fusedlis-one_shot": ("one_shot", 1),
                   "fusedlis-two_shot": ("two_shot", 1)}
# The LL all-reduce kernels entered fusedlis.comm at 2026-11-22T04:23Z (commit 6a7063a): bench/decode.py files
# dated before ran the flag protocol. Files with a `fuse_norm` column are newer (LL); a `protocol` column
# (ll / flag) wins over both.
LL_SINCE = "2026-11-22T04:23"


def _file_protocol_ll(comments: list[str], fields: list[str]) -> bool:
    """True if a bench/decode.py file's engine had the LL all-reduce kernels (see LL_SINCE)."""
    import re

    if "fuse_norm" in fields:
        return True
    for line in comments:
        m = re.search(r"\bdate=(\S+)", line)
        if m:
            date = m.group(1)
            return "T" in date and date[:len(LL_SINCE)] >= LL_SINCE
    return False


# bench/decode.py files dated from 2026-11-22T05:38Z (commit f19d74e) ran a decode step whose attention reads the
# sequence lengths from the positions column; before, the step launched 2 torch kernels per layer for seq_lens
# (`step.SEQ_LENS_KERNELS_PER_LAYER`). Undated files are older.
SEQ_LENS_KERNELS_UNTIL = "2026-11-22T05:38"


def _file_meta(comments: list[str], key: str) -> str:
    """`key=value` from a bench/decode.py header comment ('' if absent)."""
    import re

    for line in comments:
        m = re.search(rf"\b{key}=(\S+)", line)
        if m:
            return m.group(1)
    return ""


def _file_seq_lens_kernels(comments: list[str]) -> int:
    """Torch kernels per layer the file's engine launched for seq_lens (0 from SEQ_LENS_KERNELS_UNTIL on)."""
    from fusedlis.perfmodel.step import SEQ_LENS_KERNELS_PER_LAYER

    date = _file_meta(comments, "date")
    new = "T" in date and date[:len(SEQ_LENS_KERNELS_UNTIL)] >= SEQ_LENS_KERNELS_UNTIL
    return 0 if new else SEQ_LENS_KERNELS_PER_LAYER


def _file_build(comments: list[str]) -> str:
    """The engine build of a bench/decode.py file: its `fusedlis_commit` when clean ('' when absent or dirty:
    uncommitted changes need not be the same in two runs)."""
    c = _file_meta(comments, "fusedlis_commit")
    return "" if (not c or "dirty" in c) else c


def _file_profiled(path: str) -> bool:
    """True if a bench/decode.py file was timed after a torch-profiler breakdown in the same process.

    `bench/decode.py --breakdown` writes `decode_breakdown_<rest>` next to `decode_<rest>` (same tp, tag, device
    and date) and, up to commit a9e36e8, timed the steps in the process the profiler had run in. On 2xH200 (run
    06:12-06:16) such timings were up to several percent slower than a profiler-free process of the same build;
    they are flagged, not corrected.
    """
    p = Path(path)
    return p.name.startswith("decode_") and (p.parent / p.name.replace("decode_", "decode_breakdown_", 1)).is_file()


def decode_row_algorithm(mode: str, nodes: int, tp: int, hidden: int, batch: int, ll: bool) -> str:
    """The all-reduce algorithm the engine in `mode` ran for one decode step's [batch, hidden] bf16 messages."""
    gpn = max(tp // nodes, 1)
    return coll.engine_algorithm(mode, nodes, gpn, batch * hidden * 2, ll)


def _decode_cases(hw: Hardware, paths: list[str]) -> list[tuple[dict[str, str], str, int, float, Any, Any]]:
    """(row, algorithm, logical nodes, measured seconds, shape, layout) for the modelled decode rows.

    Each row also gets `_ctx` (context), `_ll` (LL protocol available), `_fuse` (norm fused into the
    all-reduces: the `fuse_norm` column, missing = 0), `_mode` (the engine's all-reduce mode) and `_file`."""
    from fusedlis.perfmodel.volume import Layout, model_shape

    cases = []
    for path in paths:
        with open(path, newline="") as f:
            text = f.readlines()
        comments = [ln for ln in text if ln.startswith("#")]
        reader = csv.DictReader([ln for ln in text if not ln.startswith("#")])
        file_ll = _file_protocol_ll(comments, list(reader.fieldnames or []))
        seq_k, build = _file_seq_lens_kernels(comments), _file_build(comments)
        when = _file_meta(comments, "date") or ""  # ISO date[Thh:mm]: sorts in time order
        profiled = _file_profiled(path)
        for r in reader:
            system = r.get("system", "fusedlis-nccl")
            # rope inside decode attention (one kernel fewer per layer): the fuse_rope column, or in files
            # without it bench/decode.py's "-rope" suffix; the PDL suffixes have no term in the model
            base, suffix = split_variant(system)
            col = (r.get("fuse_rope") or "").strip()
            rope = col == "1" if col else "-rope" in suffix
            if "a1" in suffix.split("-"):
                # one attention program per (sequence, kv head): far below the HBM rate the model assumes
                continue
            if base not in _DECODE_SYSTEMS:
                continue
            mode, nodes = _DECODE_SYSTEMS[base]
            try:
                tp = int(r["tp"])
                r["_ctx"] = str(float(r.get("context") or r.get("seq_len") or r["prompt"]))
                ms = r.get("ms_per_token") or r.get("ms")
                meas = float(ms) * 1e-3 if ms else float(r["us"]) * 1e-6
                batch = int(r["batch"])
                shape = model_shape(r["model"])
                fuse = int(float(r.get("fuse_norm") or 0)) == 1
            except (KeyError, ValueError) as e:
                raise SystemExit(f"{path}: decode rows need model, tp, batch, context and ms_per_token: {e}") from None
            proto = (r.get("protocol") or "").strip().lower()
            ll = proto == "ll" if proto in ("ll", "flag") else file_ll
            r["_ll"], r["_fuse"], r["_mode"], r["_file"] = str(int(ll)), str(int(fuse and tp > 1)), mode, path
            extra = seq_k + (0 if rope else ROPE_KERNELS_PER_LAYER)
            r["_seqk"], r["_build"], r["_profiled"], r["_date"] = str(extra), build, str(int(profiled)), when
            algo = decode_row_algorithm(mode, nodes, tp, shape.hidden_size, batch, ll) if tp > 1 else "nccl"
            cases.append((r, algo, nodes, meas, shape, Layout(tp, 1)))
    return cases


def _decode_hw(hw: Hardware, tp: int, nodes: int) -> Hardware:
    h = hw.with_(gpus_per_node=max(tp // nodes, 1))
    # logical nodes of one host talk over NVLink (load/store reachable)
    return h.with_(inter=h.intra, inter_load_store=True) if nodes > 1 else h


def _decode_kw(r: dict[str, str], algo: str) -> dict[str, Any]:
    # the engine gathers the logits through NCCL (TorchDistBackend.all_gather) in every all-reduce mode
    # fused mode: o_proj / down_proj at the profile's measured linear_allreduce time when it has one
    return dict(batch=int(r["batch"]), context=float(r["_ctx"]), prefill=False, allreduce=algo,
                fuse_norm=r.get("_fuse") == "1", allgather="nccl", extra_layer_kernels=int(r.get("_seqk") or 0),
                fused_linear=r.get("_mode") == "fused")


def fit_decode(hw: Hardware, cases: list) -> Hardware:
    """Fit kernel_overhead, hbm_bw and gemm_row_latency to measured decode steps (communication from `hw`).

    The step model is linear in (overhead, 1/bw, row latency) once peak FLOPs do not bind (decode), so the
    coefficients are read off `step_time` with unit parameters and fitted by least squares on relative error.
    The batch-dependent GEMM cost is a per-row latency per GEMM kernel, not a FLOP rate: on one GPU count the
    two are proportional (both scale with batch), but going from batch 8 to 32 cost the engine about as much at
    TP=2 as at TP=1 (bench/results/decode_tp*.csv), where a FLOP term would have halved. The FLOP-rate term is
    switched off in the fitted profile. The kernel count follows each row's fused-norm flag (`kernels_per_step`).
    """
    import numpy as np

    from fusedlis.perfmodel.step import step_time

    big = 1e30
    rows, rhs = [], []
    for r, algo, nodes, meas, shape, lay in cases:
        h = _decode_hw(hw, lay.tp, nodes).with_(peak_flops=big, gemm_flop_rate=0.0)
        kw = _decode_kw(r, algo)
        comm = step_time(shape, lay, h, **kw).comm
        nbytes = step_time(shape, lay, h.with_(hbm_bw=1.0, gemm_row_latency=0.0), **kw).compute
        per_row = step_time(shape, lay, h.with_(hbm_bw=big, gemm_row_latency=1.0), **kw).compute
        # kernel launches as the step model counts them (`kernels_per_step`: fused norms, measured fused kernels)
        k = step_time(shape, lay, h.with_(kernel_overhead=1.0), **kw).overhead
        rows.append([k / meas, nbytes / meas, per_row / meas])
        rhs.append((meas - comm) / meas)
    (a, x1, x2), *_ = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)
    if x1 <= 0:
        raise SystemExit("decode fit: step time does not grow with bytes; cannot fit a bandwidth")
    return hw.with_(kernel_overhead=max(float(a), 0.0), hbm_bw=1.0 / float(x1), gemm_flop_rate=0.0,
                    gemm_row_latency=max(float(x2), 0.0))


def validate_decode(hw: Hardware, paths: list[str], fit_tp: int | None = None,
                    fit_system: str | None = None) -> tuple[list[dict[str, Any]], Hardware]:
    """Decode step rows of bench/decode.py (model, tp, system, batch, context, ms_per_token[, fuse_norm]) vs
    `step_time`.

    Systems outside `_DECODE_SYSTEMS` (eager torch, Hugging Face) are skipped: the model describes CUDA-graph
    decode. Each row's all-reduce is the algorithm its engine mode ran (`decode_row_algorithm`: auto ->
    one-shot LL up to 2 MB and two-shot LL up to 4 MB on 2 GPUs, nvrar -> NVRAR LL, in files of the flag era their
    flag variants; nccl -> NCCL), with that algorithm's terms from the profile (an LL kernel without terms takes its
    flag variant's). `nvrar-2node` runs 2 logical nodes over NVLink, so its "network" is the NVLink link. The fused
    GEMM + all-reduce (+ residual + RMSNorm) kernel is costed at the profile's measured time of that kernel
    (`Hardware.fused_linear_ar`, from `fusedlis calibrate`; model column `fused(measured)+<algo>`) where the
    profile has it for the row's shapes and TP, else as cuBLAS-like GEMM then auto's flag all-reduce and a
    separate RMSNorm (its Triton GEMM is slower than cuBLAS at 8-64 rows while its norm costs no launch; the two
    were not separated in the older profiles, and this form matched its measured steps). Rows with fuse_norm = 1
    have 2 RMSNorm kernels fewer per layer. With `fit_tp`, the engine's compute terms (`fit_decode`) are fitted on
    the rows with tp == fit_tp and every other row is held out. With `fit_system` (e.g. "fusedlis-nccl"), each
    file with >= 3 rows of that system at TP > 1 gets its own compute terms fitted on those rows (same engine
    build and day as the other rows of the file; communication from the profile) and its other rows are held
    out; rows of other files use the `fit_tp` fit (or the profile).
    """
    from fusedlis.perfmodel.step import step_time

    cases = _decode_cases(hw, paths)
    fit_ids: set[int] = set()  # the cases fitted (per file, or pooled over a build)
    if fit_tp is not None:
        fit = [c for c in cases if c[5].tp == fit_tp]
        if len(fit) < 3:
            raise SystemExit(f"decode fit needs >= 3 rows with tp={fit_tp}, found {len(fit)}")
        # The engine got faster from build to build (8B TP=1 b1: 5.60 ms in the first file, 4.84 ms at commit
        # 33f7de1), so the terms come from the newest file with >= 3 such rows, not a blend of builds; the
        # other files' tp rows are held out.
        files: dict[str, list] = {}
        for c in fit:
            files.setdefault(c[0]["_file"], []).append(c)
        newest = max((f for f, cs in files.items() if len(cs) >= 3), key=lambda f: (files[f][0][0]["_date"], f),
                     default=None)
        if newest is not None:
            fit = files[newest]
        hw = fit_decode(hw, fit)
        fit_ids |= {id(c) for c in fit}
    per_file: dict[str, Hardware] = {}
    if fit_system is not None:
        def sys_rows(cs: list) -> list:
            return [c for c in cs if c[0]["system"] == fit_system and c[5].tp > 1]

        paths = list(dict.fromkeys(c[0]["_file"] for c in cases))
        for path in paths:
            fit = sys_rows([c for c in cases if c[0]["_file"] == path])
            if len(fit) >= 3:
                per_file[path] = fit_decode(hw, fit)
                fit_ids |= {id(c) for c in fit}
        for path in paths:
            # too few rows of its own (e.g. a PDL A/B file with one NCCL row): the terms fitted on the same
            # engine build's rows of that system in the other files of the same model(s), if >= 3; this file's
            # rows stay held out
            mine = [c for c in cases if c[0]["_file"] == path]
            build = mine[0][0]["_build"] if mine else ""
            if path in per_file or not build:
                continue
            models = {c[0]["model"] for c in mine}
            pool = sys_rows([c for c in cases if c[0]["_file"] != path and c[0]["_build"] == build
                             and c[0]["model"] in models])
            if len(pool) >= 3:
                per_file[path] = fit_decode(hw, pool)
    out = []
    for case in cases:
        r, algo, nodes, meas, shape, lay = case
        h = per_file.get(r["_file"], hw)
        st = step_time(shape, lay, _decode_hw(h, lay.tp, nodes), **_decode_kw(r, algo))
        if r["_file"] not in per_file and fit_tp is None:
            role = "profile"
        else:
            role = "fit" if id(case) in fit_ids else "held-out"
        out.append({"what": "decode", "impl": r["system"] + (" +norm" if r["_fuse"] == "1" else ""),
                    "model": (("fused(measured)+" if "fused_linear_allreduce" in st.detail else "") + algo
                              if lay.tp > 1 else "-"), "gpus": lay.tp,
                    "case": f"{r['model']} tp{lay.tp} b{r['batch']} ctx{float(r['_ctx']):g}",
                    "measured_us": meas * 1e6, "predicted_us": st.total * 1e6, "rel_err": st.total / meas - 1,
                    "role": role, "alpha_us": "", "GBps": f"comm {st.comm_share:.0%}",
                    "source": Path(r["_file"]).stem + (" [profiled]" if r["_profiled"] == "1" else "")})
    return out, hw


_LAYER_VARIANTS = {"cublas+nccl": "nccl", "cublas+symm_one_shot": "oneshot", "cublas+symm_two_shot": "twoshot"}
# the measured all-reduce implementation behind each layer variant (normalised names)
_LAYER_IMPL = {"cublas+nccl": "nccl", "cublas+symm_one_shot": "torchsymmoneshot",
               "cublas+symm_two_shot": "torchsymmtwoshot"}


def validate_layer(hw: Hardware, paths: list[str], fit_m: int | None,
                   fitted: dict[str, Hardware] | None = None) -> tuple[list[dict[str, Any]], Hardware]:
    """Row-parallel layer = GEMM then all-reduce (bench/fused.py CSV: shape,K,N,M,variant,us; TP=2).

    The GEMM term is the same run's `cublas_gemm_only` time when the file has it (so the rows test how an
    all-reduce composes with the GEMM before it), else the model's kernel_overhead + max(bytes / hbm_bw,
    flops / peak). The all-reduce of the [M, N] bf16 output is added with `hw.latency_hidden(algo)` of its
    NVLink latency hidden. With `fit_m`, the hidden fractions (NCCL, custom) are fitted on the rows with
    M == fit_m and the others are held out. `fitted` (from `validate_allreduce`) supplies the all-reduce
    terms of the implementation each variant uses (e.g. torch symmetric memory). Returns rows and profile.
    """
    cases = []
    for path in paths:
        with open(path, newline="") as f:
            lines = [ln for ln in f if not ln.startswith("#")]
        rows = list(csv.DictReader(lines))
        try:
            gemm_only = {(r.get("shape"), int(r["K"]), int(r["N"]), int(r["M"])): float(r["us"]) * 1e-6
                         for r in rows if r.get("variant") == "cublas_gemm_only"}
        except (KeyError, ValueError) as e:
            raise SystemExit(f"{path}: layer rows need K, N, M, variant, us: {e}") from None
        for r in rows:
            algo = _LAYER_VARIANTS.get(r.get("variant", ""))
            if algo is None:
                continue
            try:
                k, n, m, us = int(r["K"]), int(r["N"]), int(r["M"]), float(r["us"])
            except (KeyError, ValueError) as e:
                raise SystemExit(f"{path}: layer rows need K, N, M, variant, us: {e}") from None
            g = gemm_only.get((r.get("shape"), k, n, m))
            src = "measured"
            if g is None:
                src = "model"
                g = hw.kernel_overhead + max((k * n + m * (k + n)) * 2 / hw.hbm_bw, 2.0 * m * k * n / hw.peak_flops)
            h_ar = (fitted or {}).get(_LAYER_IMPL[r["variant"]], hw)
            cases.append((r, algo, m, us * 1e-6, g, src, coll.allreduce(algo, h_ar, 1, 2, m * n * 2)))
    if fit_m is not None:
        fitted = {}
        for nccl in (True, False):
            fit = [(us, g + c.total, c.latency - c.inter_latency) for _, algo, m, us, g, _, c in cases
                   if m == fit_m and (algo == "nccl") == nccl]
            fitted["nccl_latency_hidden" if nccl else "ar_latency_hidden"] = fit_overlap(fit) if fit else 0.0
        hw = hw.with_(**fitted)
    out = []
    for r, algo, m, us, g, src, c in cases:
        pred = (g + c.hiding_latency(hw.latency_hidden(algo)).total) * 1e6
        role = "profile" if fit_m is None else ("fit" if m == fit_m else "held-out")
        out.append({"what": "layer", "impl": r["variant"], "model": f"gemm({src})+{algo}", "gpus": 2,
                    "case": f"{r.get('shape', '')} M={m}", "measured_us": us * 1e6, "predicted_us": pred,
                    "rel_err": pred / (us * 1e6) - 1, "role": role, "alpha_us": "",
                    "GBps": f"hidden={hw.latency_hidden(algo):.2f}"})
    return out, hw


def summary_lines(rows: list[dict[str, Any]], tol: float) -> list[str]:
    """Counts per kind of row and role, and per decode file (`[profiled]`: timed after a profiler breakdown in
    the same process, see `_file_profiled`), each with its misses."""
    def line(label: str, sel: list[dict[str, Any]]) -> str:
        bad = [r for r in sel if abs(r["rel_err"]) > tol]
        worst = max(sel, key=lambda r: abs(r["rel_err"]))
        miss = "; ".join(f"{r['impl']} {r['case']} {r['rel_err']:+.1%}" for r in bad)
        return (f"- {label}: {len(sel) - len(bad)}/{len(sel)} within {tol:.0%}, worst {worst['rel_err']:+.1%}"
                + (f" (misses: {miss})" if bad else ""))

    out = ["", "By kind of row (all-reduce, layer, decode) and decode file:", ""]
    for what in dict.fromkeys(r["what"] for r in rows):
        for role in ("held-out", "profile", "fit"):
            sel = [r for r in rows if r["what"] == what and r["role"] == role]
            if sel:
                out.append(line(f"{what} {role}", sel))
    dec = [r for r in rows if r["what"] == "decode"]
    for src in dict.fromkeys(r.get("source", "") for r in dec):
        for role in ("held-out", "profile", "fit"):
            sel = [r for r in dec if r.get("source", "") == src and r["role"] == role]
            if sel:
                out.append(line(f"decode {role}, {src}", sel))
    return out


def write_outputs(rows: list[dict[str, Any]], prefix: str, tol: float, header: list[str]) -> None:
    fields = ["what", "impl", "model", "gpus", "case", "role", "measured_us", "predicted_us", "rel_err",
              "alpha_us", "GBps", "source"]
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
    lines += summary_lines(rows, tol)
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
    n = bool(ar) + bool(other)
    fig, axes = plt.subplots(1, n, figsize=(6.5 * n, 4.5), squeeze=False)
    panels = iter(axes[0])
    a = next(panels) if ar else None
    for impl in dict.fromkeys(r["impl"] for r in ar):
        rs = [r for r in ar if r["impl"] == impl]
        xs = [int(r["case"]) for r in rs]
        line, = a.plot(xs, [r["measured_us"] for r in rs], "o", label=f"{impl} measured")
        a.plot(xs, [r["predicted_us"] for r in rs], "-", color=line.get_color(), label=f"{impl} model")
        for r, x in zip(rs, xs):
            if r["role"] == "held-out":
                a.plot([x], [r["measured_us"]], "s", mfc="none", ms=10, color=line.get_color())
    if a is not None:
        a.set_xscale("log", base=2)
        a.set_xlabel("message bytes")
        a.set_ylabel("all-reduce µs")
        a.set_title("all-reduce: measured (dots; squares held out) vs model (lines)")
        a.legend(fontsize=7)
        a.grid(True, alpha=0.3)
    if other:
        b = next(panels)
        for what, mk in (("gemm", "s"), ("layer", "o"), ("decode", "^")):
            for role, fill in (("fit", "full"), ("held-out", "none"), ("profile", "full")):
                sel = [r for r in other if r["what"] == what and r["role"] == role]
                if sel:
                    b.plot([r["measured_us"] for r in sel], [r["predicted_us"] for r in sel], mk,
                           mfc="none" if fill == "none" else None, label=f"{what} ({role})")
        lo = min(min(r["measured_us"], r["predicted_us"]) for r in other) * 0.8
        hi = max(max(r["measured_us"], r["predicted_us"]) for r in other) * 1.2
        b.plot([lo, hi], [lo, hi], "k-", lw=0.8)
        b.fill_between([lo, hi], [lo * 0.85, hi * 0.85], [lo * 1.15, hi * 1.15], color="gray", alpha=0.15,
                       label="±15%")
        b.set_xscale("log")
        b.set_yscale("log")
        b.set_xlabel("measured µs")
        b.set_ylabel("model µs")
        b.set_title("GEMM / GEMM+all-reduce layer / decode step")
        b.legend(fontsize=7)
        b.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


RESULTS = Path(__file__).resolve().parent / "results"
# bench/allreduce.py variants whose kernels `fusedlis calibrate` times (flag-only calibrations, and with LL)
ALLREDUCE_ONLY_FLAG = "nccl,fusedlis_one_shot,fusedlis_two_shot,fusedlis_auto"
ALLREDUCE_ONLY_LL = ALLREDUCE_ONLY_FLAG + ",fusedlis_one_shot_ll,fusedlis_two_shot_ll,fusedlis_nvrar_2x1_ll,fusedlis_auto_2x1"


def _profile_time(prof: Path) -> str | None:
    """'YYYYMMDD-HHMM' of a profile named `..._<YYYY-MM-DD>_run<HHMM>.json`, else None."""
    import re

    m = re.search(r"_(\d{4})-(\d\d)-(\d\d)_run(\d{4})$", prof.stem)
    return f"{m.group(1)}{m.group(2)}{m.group(3)}-{m.group(4)}" if m else None


def _allreduce_time(run: Path) -> str | None:
    """'YYYYMMDD-HHMM' of a bench/allreduce.py file `allreduce_<dev>_<YYYYMMDD-HHMM>[_tag].csv`, else None."""
    import re

    m = re.search(r"_(\d{8}-\d{4})(?:_|$)", run.stem)
    return m.group(1) if m else None


def committed_runs() -> list[list[str]]:
    """The validations whose outputs are committed in bench/results (see `--all`)."""
    r = RESULTS
    rel = lambda p: str(p.relative_to(Path.cwd())) if p.is_relative_to(Path.cwd()) else str(p)  # noqa: E731
    # only bench/fused.py files that time the GEMM alone in the same run (older ones lack that baseline)
    fused = [p for p in sorted(r.glob("fused_*.csv")) if "cublas_gemm_only" in p.read_text()]
    runs = [["--fit-from", rel(r / "perfmodel_gpufacts_allreduce.csv"), rel(r / "perfmodel_gpufacts_gemm.csv"),
             "--reduce-GBps", "1433", "--out-prefix", rel(r / "perfmodel_validation_gpufacts")]
            + (["--layer", *map(rel, fused)] if fused else [])]
    allreduce = sorted(r.glob("allreduce_[0-9]*x*.csv"))  # bench/allreduce.py runs, not allreduce_stability_*
    decode = sorted(r.glob("decode_tp*.csv"))
    if allreduce:  # every bench/allreduce.py run, fitted per implementation like the gpu-facts table
        # the layer rows (bench/fused.py, 2 GPUs) go with the newest run on 2 GPUs
        two = [p for p in allreduce if p.stem.split("_")[1].startswith("2x")] or allreduce
        newest = max(two, key=lambda p: p.stem.split("_")[2])
        for run in allreduce:
            tag = run.stem.removeprefix("allreduce_")
            prefix = r / f"perfmodel_validation_allreduce_{tag}"
            runs.append(["--fit-from", rel(run), "--reduce-GBps", "1433", "--out-prefix", rel(prefix)]
                        + (["--layer", *map(rel, fused)] if fused and run == newest else []))
        prefix = r / f"perfmodel_validation_allreduce_{newest.stem.removeprefix('allreduce_')}"
        calibrated = list(r.glob("perfmodel_profile_*.json")) + list(r.glob("calibrated_*.json"))
        if decode and not calibrated:  # its profile against measured decode steps
            runs.append(["--profile", rel(Path(str(prefix) + "_profile.json")), "--decode", *map(rel, decode),
                         "--decode-fit-tp", "1", "--out-prefix", rel(r / "perfmodel_validation_decode_h200x2")])
    # profiles written by `fusedlis calibrate` (e.g. calibrated_2xH200_<date>.json) against the other runs
    for prof in sorted(r.glob("perfmodel_profile_*.json")) + sorted(r.glob("calibrated_*.json")):
        tag = prof.stem.removeprefix("perfmodel_profile_")
        raw = r / prof.name.replace("calibrated_", "calibrate_raw_").replace(".json", ".csv")
        # the raw measurements refitted by the current code (the JSON holds an older code's fit); that older
        # calibrate measured only 2M and 4M above NCCL's protocol switch, so regimes of 2 sizes are allowed
        has_ll = raw.is_file() and "_ll," in raw.read_text()
        # a calibration with LL terms measured 3 MB and 6 MB too: regimes need 3 sizes, as calibrate fits them
        src = (["--raw", rel(raw)] + ([] if has_ll else ["--regime-points", "2"])
               if raw.is_file() and prof.name.startswith("calibrated_") else ["--profile", rel(prof)])
        args = [*src, "--out-prefix", rel(r / f"perfmodel_validation_{tag}")]
        # the variants whose algorithms calibrate measured (NCCL and fusedlis' own one-/two-shot kernels in the
        # flag protocol), in the newest run whose auto variant ran those kernels (no LL variants: 0249, measured
        # 7 minutes before the committed calibration; later runs' auto runs the LL kernels calibrate does not time)
        # A calibration that timed the LL kernels (oneshot_ll, ...: `fusedlis calibrate` since the LL terms) is
        # compared with the newest run, LL and auto variants included.
        flag_runs = allreduce if has_ll else [p for p in allreduce if "_ll" not in p.read_text()]
        # a calibration of a known time (`..._<date>_runHHMM`) is compared with the newest run measured at or
        # before it: run 0614's bench/allreduce.py ran on the calibration's machine minutes before it (the fair
        # comparison); runs 0547 and 0608 keep run 0444 (a later run need not be the same machine)
        when = _profile_time(prof)
        if when is not None:
            flag_runs = [p for p in flag_runs if _allreduce_time(p) is not None and _allreduce_time(p) <= when]
        args += (["--allreduce", rel(max(flag_runs, key=lambda p: p.stem.split("_")[2])),
                  "--only", ALLREDUCE_ONLY_LL if has_ll else ALLREDUCE_ONLY_FLAG] if flag_runs else [])
        args += (["--layer", *map(rel, fused)] if fused else [])
        # LL-era calibrations: decode compute terms also per engine build from its NCCL rows (gpu_perfmodel.sh)
        args += (["--decode", *map(rel, decode), "--decode-fit-tp", "1"]
                 + (["--decode-fit-system", "fusedlis-nccl"] if has_ll else []) if decode else [])
        if len(args) > len(src) + 2:
            runs.append(args)
    return runs


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv == ["--all"]:
        rc = 0
        for args in committed_runs():
            print(f"\n$ python bench/validate_perfmodel.py {' '.join(args)}")
            rc |= main(args)
        return rc
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--all", action="store_true",
                    help="alone: regenerate every committed validation (gpu-facts data, the newest "
                         "bench/allreduce.py run, each calibrated_*.json / perfmodel_profile_*.json against the "
                         "bench/results CSVs)")
    ap.add_argument("--profile", default="h200-ndr", help="hardware profile (built-in name or JSON/YAML file)")
    ap.add_argument("--raw", default=None, metavar="CSV",
                    help="fit the profile from `fusedlis calibrate --raw` measurements with the current fitting code "
                         "(on top of --profile), instead of using --profile's terms as they are")
    ap.add_argument("--regime-points", type=int, default=3,
                    help="with --raw: sizes each all-reduce size regime needs (default 3; a large value: one regime)")
    ap.add_argument("--fit-from", nargs="*", default=[], help="measured CSVs to fit per implementation")
    ap.add_argument("--fit-sizes", default="8K,128K,1M,4M", help="all-reduce sizes used for fitting")
    ap.add_argument("--allreduce", nargs="*", default=[], help="measured all-reduce CSVs to compare (no fitting)")
    ap.add_argument("--decode", nargs="*", default=[], help="measured decode-step CSVs to compare")
    ap.add_argument("--only", default=None,
                    help="with --allreduce: compare only these variants (comma-separated), e.g. the ones the "
                         "profile's terms were measured with")
    ap.add_argument("--decode-fit-tp", type=int, default=None,
                    help="fit the engine's compute terms on the decode rows of this TP size, hold out the others")
    ap.add_argument("--decode-fit-system", default=None, metavar="SYSTEM",
                    help="per decode file: fit the engine's compute terms on that file's TP>1 rows of this system "
                         "(e.g. fusedlis-nccl), hold out its other rows (isolates the all-reduce choice)")
    ap.add_argument("--layer", nargs="*", default=[],
                    help="bench/fused.py CSVs: GEMM + all-reduce layers compared with the serial-sum model")
    ap.add_argument("--reduce-GBps", type=float, default=None,
                    help="override the profile's reduction rate (gamma = 1 / this), e.g. measured copy bandwidth / 3")
    ap.add_argument("--tolerance", type=float, default=0.15)
    ap.add_argument("--out-prefix", default="bench/results/perfmodel_validation")
    ap.add_argument("--strict", action="store_true", help="exit 1 if any held-out/profile row misses tolerance")
    args = ap.parse_args(argv)
    if args.all:
        ap.error("--all takes no other arguments")
    if not (args.fit_from or args.allreduce or args.decode or args.layer):
        ap.error("give --fit-from, --allreduce, --decode or --layer CSVs")
    hw = get_hardware(args.profile)
    if args.raw:
        from fusedlis.perfmodel.calibrate import read_raw_csv

        hw = profile_from_measurements(read_raw_csv(args.raw), hw, args.regime_points).with_(
            name=Path(args.raw).stem + "_refit")
    if args.reduce_GBps is not None:
        if args.reduce_GBps <= 0:
            ap.error("--reduce-GBps must be > 0")
        hw = hw.with_(gamma=1.0 / (args.reduce_GBps * 1e9))
    rows: list[dict[str, Any]] = []
    header = [f"# perfmodel validation ({Path(args.out_prefix).name})", "",
              f"Generated by `python bench/validate_perfmodel.py {' '.join(argv)}`.",
              f"Profile: {hw.name}; gamma = {1e-9 / hw.gamma:.0f} GB/s reduced."]
    if args.raw:
        header.append(f"Profile fitted from the raw measurements {args.raw} by the current `profile_from_measurements` "
                      f"(size regimes need >= {args.regime_points} sizes each): "
                      + "; ".join(s for s in hw.sources if "NVLink fit" in s or "GEMM fit" in s) + ".")
    fitted: dict[str, Hardware] = {}
    if args.fit_from:
        fit_sizes = {parse_size(s) for s in args.fit_sizes.split(",")}
        ar, gm = read_rows(args.fit_from)
        if ar:
            rows += validate_allreduce(hw, ar, fit_sizes, fitted)
        if gm:
            rows += validate_gemm(hw, gm, True)
        header.append(f"Fitted per implementation on sizes {sorted(fit_sizes)} (all-reduce); GEMMs sorted by "
                      "bytes: every other shape and the largest fitted. Every other row is held out.")
        # one profile from the fit rows (for the --allreduce / --decode / --layer comparisons below)
        # (one node's NVLink terms: rows of logical-node runs, a stand-in for other nodes, are left out)
        raw = [dict(kind="allreduce", impl=r["impl"], algo="ring" if r["algo"] == "nccl" else r["algo"],
                    gpus=r["gpus"], bytes=r["bytes"], us=r["us"]) for r in ar
               if r["bytes"] in fit_sizes and r["nodes"] == 1]
        raw += [dict(kind="gemm", **r) for r in gm]
        hw = profile_from_measurements(raw, hw).with_(name=Path(args.out_prefix).name + "_profile")
        save_profile(hw, args.out_prefix + "_profile.json")
        header.append(f"Profile fitted from the fit rows: {args.out_prefix}_profile.json (used by the rows below "
                      "marked 'profile').")
    if args.allreduce:
        ar, gm = read_rows(args.allreduce)
        if args.only:
            keep = {x.strip() for x in args.only.split(",")}
            ar = [r for r in ar if r["impl"] in keep or r["variant"] in keep]  # e.g. fusedlis_auto's parts
        rows += validate_allreduce(hw, ar, None) + (validate_gemm(hw, gm, False) if gm else [])
    if args.decode:
        dec_rows, hw = validate_decode(hw, args.decode, args.decode_fit_tp, args.decode_fit_system)
        rows += dec_rows
        if args.decode_fit_system:
            header.append(f"Decode rows of a file with >= 3 `{args.decode_fit_system}` TP>1 rows: the engine's compute "
                          "terms fitted on those rows of that file (same build and day), the file's other rows held "
                          "out; all-reduce terms from the profile.")
        if args.decode_fit_tp is not None:
            header.append(f"Decode rows: the engine's compute terms fitted on the tp={args.decode_fit_tp} rows of the "
                          "newest file that has >= 3 of them "
                          f"(kernel overhead {hw.kernel_overhead * 1e6:.2f} us, {hw.hbm_bw / 1e12:.2f} TB/s, "
                          f"{hw.gemm_row_latency * 1e9:.0f} ns per activation row per GEMM kernel); every other "
                          "row held out, its "
                          "communication from the all-reduce terms of the profile.")
            save_profile(hw.with_(name=Path(args.out_prefix).name + "_profile"), args.out_prefix + "_profile.json")
    if args.layer:
        lay_rows, hw = validate_layer(hw, args.layer, 1 if args.fit_from else None, fitted)
        rows += lay_rows
        if args.fit_from:
            header.append("Layer rows (GEMM + all-reduce in one graph, bench/fused.py): hidden latency fraction "
                          f"NCCL {hw.nccl_latency_hidden:.2f}, custom {hw.ar_latency_hidden:.2f}, fitted on M=1; "
                          "other M held out.")
            save_profile(hw, args.out_prefix + "_profile.json")
    Path(args.out_prefix).parent.mkdir(parents=True, exist_ok=True)
    write_outputs(rows, args.out_prefix, args.tolerance, header)
    plot(rows, args.out_prefix + ".png")
    print(f"wrote {args.out_prefix}.csv, .md, .png")
    bad = [r for r in rows if r["role"] != "fit" and abs(r["rel_err"]) > args.tolerance]
    return 1 if (args.strict and bad) else 0


if __name__ == "__main__":
    sys.exit(main())

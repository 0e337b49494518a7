"""Hardware profiles for the performance model: built-in clusters and custom JSON/YAML files.

A profile describes one GPU model, how many GPUs share a node, and two link classes: `intra` (NVLink inside a
node) and `inter` (the network between nodes, per GPU). Each link class has a latency `alpha_us` per message
step and a bandwidth per direction per GPU; optional `nccl_alpha_us` / `nccl_bandwidth_GBps` describe what NCCL
reaches on that link (NCCL uses few channels at decode sizes, so it sees less bandwidth than a custom kernel).

File format (JSON, or YAML if PyYAML is installed), human units:

    {"name": "my-cluster", "gpu": "H100 SXM", "gpus_per_node": 8,
     "hbm_GBps": 3350, "peak_TFLOPs": 989, "memory_GB": 80,
     "kernel_overhead_us": 5.0, "reduce_GBps": 1100,
     "intra": {"alpha_us": 3.0, "bandwidth_GBps": 450, "nccl_alpha_us": 6.0, "nccl_bandwidth_GBps": 200},
     "inter": {"alpha_us": 5.0, "bandwidth_GBps": 50},
     "sources": ["..."]}

`reduce_GBps` (bytes of one operand reduced per second) is optional: it defaults to a third of `hbm_GBps`
(a reduction reads two operands and writes one).

`fused_linear_allreduce` is optional: the time `fusedlis calibrate` measured for the fused row-parallel GEMM +
all-reduce + residual + RMSNorm kernel (`fusedlis.triton_kernels.linear_allreduce`, what `Engine(allreduce=
"fused")` runs for o_proj and down_proj) per shape, by rows M:

    "fused_linear_allreduce": [{"gpus": 2, "K": 2048, "N": 4096, "M": [1, 8, 32, 64],
                                "us": [14.1, 19.0, 25.3, 31.2]}, ...]

(illustrative values; K: the per-GPU input width, N: the output width, gpus: the TP size it ran at, one node;
`us`: microseconds per call, one per M). Profiles without it
cost fused mode as a GEMM followed by the all-reduce.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ProfileError(ValueError):
    """A hardware profile is unknown or malformed; the message names the file and field."""


INF = float("inf")


@dataclass(frozen=True)
class Link:
    """One link class. `alpha` in seconds per message step, `beta` in seconds per byte (per direction per GPU).

    `nccl_*` are what NCCL reaches; `per_algo` optionally overrides (alpha, beta) for one algorithm by message
    size: ((name, alpha, beta, max_bytes), ...), where an entry applies to messages of at most `max_bytes`
    (the smallest bound that holds wins; `inf` for no bound). Size regimes describe protocol switches: NCCL
    moves from its LL/LL128 protocols to Simple at a few hundred KB to a few MB, and fusedlis' kernels change
    tile size at 32 KB; each regime has its own fixed latency and bandwidth. Sizes above every bound of an
    algorithm fall back to the link's plain (custom or NCCL) terms.
    """

    alpha: float
    beta: float
    nccl_alpha: float
    nccl_beta: float
    per_algo: tuple[tuple[str, float, float, float], ...] = ()

    def __post_init__(self) -> None:
        # accept the older 3-tuples (name, alpha, beta): no size bound. Sorted by (name, bound): `params` takes the
        # first regime whose bound holds, so the bound, not alpha, must order them (an unbounded regime with the
        # smaller alpha sorted first and shadowed the small-message regime: calibrate 2xH200 07:54).
        norm = tuple(sorted(((x[0], x[1], x[2], x[3] if len(x) > 3 else INF) for x in self.per_algo),
                            key=lambda e: (e[0], e[3])))
        object.__setattr__(self, "per_algo", norm)

    @classmethod
    def make(cls, alpha_us: float, bandwidth_GBps: float, nccl_alpha_us: float | None = None,
             nccl_bandwidth_GBps: float | None = None,
             algorithms: dict[str, Any] | None = None) -> "Link":
        """From human units. `algorithms` maps an algorithm name to (alpha_us, bandwidth_GBps), or to a list of
        (max_bytes, alpha_us, bandwidth_GBps) size regimes (`nccl` only takes the list form)."""
        na = alpha_us if nccl_alpha_us is None else nccl_alpha_us
        nb = bandwidth_GBps if nccl_bandwidth_GBps is None else nccl_bandwidth_GBps
        per = []
        for k, v in (algorithms or {}).items():
            regimes = [(INF, *v)] if len(v) == 2 and not isinstance(v[0], (tuple, list)) else v
            per += [(k, a * 1e-6, 1.0 / (b * 1e9), float(mx)) for mx, a, b in regimes]
        return cls(alpha_us * 1e-6, 1.0 / (bandwidth_GBps * 1e9), na * 1e-6, 1.0 / (nb * 1e9), tuple(per))

    def params(self, impl: str, nbytes: float | None = None) -> tuple[float, float]:
        """(alpha, beta) for `impl` ("nccl", an algorithm name with an override, or anything else: custom) and a
        message of `nbytes` (None: the largest regime)."""
        m = INF if nbytes is None else nbytes
        for name, a, b, mx in self.per_algo:  # sorted by bound within a name
            if name == impl and m <= mx:
                return a, b
        if impl.endswith("_ll"):  # an LL kernel without its own terms: its flag variant's (an upper bound)
            return self.params(impl[:-3], nbytes)
        if impl == "nccl":
            return self.nccl_alpha, self.nccl_beta
        return self.alpha, self.beta

    def regimes(self, impl: str) -> list[tuple[float, float, float]]:
        """[(max_bytes, alpha, beta), ...] of `impl`, ascending, ending with the unbounded regime."""
        own = [(mx, a, b) for n, a, b, mx in self.per_algo if n == impl]
        if not own or own[-1][0] != INF:
            own.append((INF, *self.params(impl, INF)))
        return own

    def with_algo(self, name: str, alpha: float, beta: float, max_bytes: float = INF) -> "Link":
        """A copy whose algorithm `name` uses (alpha, beta) in seconds, seconds/byte up to `max_bytes`
        (replacing its entry with the same bound)."""
        per = tuple(x for x in self.per_algo if (x[0], x[3]) != (name, max_bytes)) + ((name, alpha, beta, max_bytes),)
        return dataclasses.replace(self, per_algo=per)

    def with_regimes(self, name: str, regimes: list[tuple[float, float, float]]) -> "Link":
        """A copy whose algorithm `name` has exactly these (max_bytes, alpha, beta) regimes. For "nccl" the
        unbounded regime becomes the link's NCCL terms."""
        link = dataclasses.replace(self, per_algo=tuple(x for x in self.per_algo if x[0] != name))
        for mx, a, b in regimes:
            if name == "nccl" and mx == INF:
                link = dataclasses.replace(link, nccl_alpha=a, nccl_beta=b)
            else:
                link = link.with_algo(name, a, b, mx)
        return link

    def scaled(self, k: float) -> "Link":
        """Every bandwidth multiplied by `k` (latencies unchanged)."""
        return dataclasses.replace(self, beta=self.beta / k, nccl_beta=self.nccl_beta / k,
                                   per_algo=tuple((n, a, b / k, mx) for n, a, b, mx in self.per_algo))

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"alpha_us": self.alpha * 1e6, "bandwidth_GBps": 1e-9 / self.beta,
                             "nccl_alpha_us": self.nccl_alpha * 1e6, "nccl_bandwidth_GBps": 1e-9 / self.nccl_beta}
        algos: dict[str, Any] = {}
        for n, a, b, mx in self.per_algo:
            e = algos.setdefault(n, {})
            if mx == INF:
                e.update({"alpha_us": a * 1e6, "bandwidth_GBps": 1e-9 / b})
            else:
                e.setdefault("regimes", []).append({"max_bytes": mx, "alpha_us": a * 1e6,
                                                    "bandwidth_GBps": 1e-9 / b})
        if algos:
            d["algorithms"] = algos
        return d


@dataclass(frozen=True)
class Hardware:
    """A cluster profile in SI units (bytes, seconds, FLOP/s). Build with `get_hardware` or `load_profile`."""

    name: str
    gpu: str
    gpus_per_node: int
    hbm_bw: float  # bytes/s a streaming kernel reaches
    peak_flops: float  # dense bf16 FLOP/s
    memory_bytes: float
    kernel_overhead: float  # s per kernel: launch plus ramp-up, the intercept of time-vs-bytes
    gamma: float  # s per byte reduced
    intra: Link
    inter: Link
    sources: tuple[str, ...] = field(default=())
    # Fraction of an all-reduce's NVLink latency hidden behind the GEMM before it in a CUDA-graph decode step,
    # for fusedlis/custom kernels and for NCCL (fitted from GEMM + all-reduce pairs timed against the GEMM alone).
    ar_latency_hidden: float = 0.0
    nccl_latency_hidden: float = 0.0
    # Extra FLOP rate term of decode GEMMs (s += flops / rate on top of streaming the weights); skinny GEMMs with
    # M of 8-64 rows cost more than their bytes. 0 disables it. Fitted from measured decode steps.
    gemm_flop_rate: float = 0.0
    # Seconds per activation row per decode GEMM kernel (s += rows * this), independent of the GEMM's width: in
    # measured TP=2 decode steps going from 8 to 32 rows cost about what it cost at TP=1, so the row-dependent
    # cost of skinny GEMMs does not shrink when N (or K) is split. 0 disables it. Fitted from decode steps.
    gemm_row_latency: float = 0.0
    # Rail partners in other nodes are load/store reachable (logical nodes of one host, a multi-node NVLink
    # domain): fusedlis' auto all-reduce then runs NVRAR in the LL protocol across nodes. False over InfiniBand.
    inter_load_store: bool = False
    # Seconds per row that fusing the residual add + RMSNorm into an all-reduce (AllReduce.all_reduce_norm, one
    # LL one-shot kernel) adds to that all-reduce's time; the separate RMSNorm kernel is then not launched.
    # Fitted by calibrate from all_reduce_norm vs the all-reduce alone; 0: the fused kernel costs the all-reduce.
    ar_norm_row_latency: float = 0.0
    # Measured fused GEMM + all-reduce + residual + RMSNorm kernel (linear_allreduce with residual and norm weight,
    # as Engine(allreduce="fused") runs o_proj and down_proj): ((gpus, K, N, ((M, seconds), ...)), ...), sorted.
    # Empty: not measured (fused mode is then costed as GEMM + all-reduce). See `fused_linear_time`.
    fused_linear_ar: tuple[tuple[int, int, int, tuple[tuple[int, float], ...]], ...] = ()

    def __post_init__(self) -> None:
        norm = tuple(sorted((int(g), int(k), int(n), tuple(sorted((int(m), float(t)) for m, t in pts)))
                            for g, k, n, pts in self.fused_linear_ar))
        object.__setattr__(self, "fused_linear_ar", norm)

    def fused_linear_time(self, gpus: int, k: int, n: int, m: float) -> float | None:
        """Seconds of one fused linear_allreduce (+ residual + RMSNorm) call on `gpus` GPUs of one node with a
        [m, k] input and an [n, k] weight shard, from the measured table; None if (gpus, k, n) was not measured.

        Piecewise linear in M between measured rows, on the running maximum of the measured times over M (a
        time below a smaller M's, timing noise, is raised to it, so the cost never falls with more rows); below
        the smallest measured M its time, above the largest the last segment's slope continues."""
        pts = next((p for g, kk, nn, p in self.fused_linear_ar if (g, kk, nn) == (gpus, k, n)), None)
        if not pts:
            return None
        ms, ts, top = [], [], 0.0
        for mm, t in pts:
            top = max(top, t)
            ms.append(mm)
            ts.append(top)
        if len(ms) == 1 or m <= ms[0]:
            return ts[0]
        for i in range(1, len(ms)):
            if m <= ms[i] or i == len(ms) - 1:
                return ts[i - 1] + (ts[i] - ts[i - 1]) * (m - ms[i - 1]) / (ms[i] - ms[i - 1])
        raise AssertionError("unreachable")

    def latency_hidden(self, algo: str) -> float:
        """The hidden fraction that applies to all-reduce algorithm `algo`."""
        return self.nccl_latency_hidden if algo == "nccl" else self.ar_latency_hidden

    def with_(self, **kw: Any) -> "Hardware":
        """A copy with some fields replaced (e.g. `hw.with_(gpus_per_node=4)`)."""
        return dataclasses.replace(self, **kw)

    def to_json(self) -> dict[str, Any]:
        """The file form, readable back by `load_profile`."""
        d = {
            "name": self.name, "gpu": self.gpu, "gpus_per_node": self.gpus_per_node,
            "hbm_GBps": self.hbm_bw / 1e9, "peak_TFLOPs": self.peak_flops / 1e12,
            "memory_GB": self.memory_bytes / 1e9, "kernel_overhead_us": self.kernel_overhead * 1e6,
            "reduce_GBps": 1e-9 / self.gamma, "ar_latency_hidden": self.ar_latency_hidden,
            "nccl_latency_hidden": self.nccl_latency_hidden, "gemm_TFLOPs": self.gemm_flop_rate / 1e12,
            "gemm_row_us": self.gemm_row_latency * 1e6, "ar_norm_row_us": self.ar_norm_row_latency * 1e6,
            "intra": self.intra.to_json(), "inter": self.inter.to_json(), "sources": list(self.sources),
        }
        if self.inter_load_store:
            d["inter_load_store"] = True
        if self.fused_linear_ar:
            d["fused_linear_allreduce"] = [{"gpus": g, "K": k, "N": n, "M": [m for m, _ in pts],
                                            "us": [t * 1e6 for _, t in pts]} for g, k, n, pts in self.fused_linear_ar]
        return d


# Built-ins describe the fusedlis engine's decode, fitted on H200 and scaled to each GPU's datasheet:
# - kernel overhead 7.3 us, HBM 86% of the datasheet rate (4.13 of 4.8 TB/s) and GEMM flops at 86% of the
#   datasheet peak on top of the weight stream: the compute terms fitted on TP=1 decode steps of bench/decode.py
#   (bench/results/perfmodel_validation_calibrated_2xH200_2026-11-22.md), which then predict the TP=2 steps;
# - reductions at 90% of the datasheet rate (H200 copy 4.3 TB/s, gpu-facts.md);
# - after a GEMM in one CUDA graph, 34% of NCCL's all-reduce latency hides and 8% of fusedlis' own
#   (`fusedlis calibrate` on 2xH200, bench/results/calibrated_2xH200_2026-11-22.json).
# Off H200 these fractions are assumptions.
GEMM_HBM_EFFICIENCY = 0.86
GEMM_FLOP_EFFICIENCY = 0.86
COPY_HBM_EFFICIENCY = 0.90
KERNEL_OVERHEAD_US = 7.3
AR_LATENCY_HIDDEN = 0.08
NCCL_LATENCY_HIDDEN = 0.34


def _hw(name: str, gpu: str, gpn: int, hbm_GBps: float, tflops: float, mem_GB: float, intra: Link, inter: Link,
        sources: list[str]) -> Hardware:
    eff = (f"fusedlis engine terms fitted on H200 decode, assumed for this GPU: HBM {GEMM_HBM_EFFICIENCY:.0%} of "
           f"the datasheet rate for kernels, {COPY_HBM_EFFICIENCY:.0%} for reductions; GEMM flops at "
           f"{GEMM_FLOP_EFFICIENCY:.0%} of peak on top; {KERNEL_OVERHEAD_US:g} us per kernel; all-reduce latency "
           f"hidden after a GEMM: NCCL {NCCL_LATENCY_HIDDEN:.0%}, fusedlis {AR_LATENCY_HIDDEN:.0%}")
    return Hardware(name, gpu, gpn, GEMM_HBM_EFFICIENCY * hbm_GBps * 1e9, tflops * 1e12, mem_GB * 1e9,
                    KERNEL_OVERHEAD_US * 1e-6, 3.0 / (COPY_HBM_EFFICIENCY * hbm_GBps * 1e9), intra, inter,
                    tuple(sources + [eff]), AR_LATENCY_HIDDEN, NCCL_LATENCY_HIDDEN,
                    GEMM_FLOP_EFFICIENCY * tflops * 1e12)


# Link numbers are not all datasheet values. Hopper NVLink (alpha, bandwidth) are the fits to the measured
# 2xH200 all-reduce table of gpu-facts.md (custom: torch symmetric-memory two-shot; NCCL: ring model), see
# bench/results/perfmodel_validation_gpufacts.md; A100 NVLink scales those bandwidths by 600/900 (NVLink3 vs 4).
# Network bandwidths are the NIC line rate less ~5%; network alphas are typical small-message latencies
# (GPU-initiated put vs NCCL step), estimates to be replaced by a measured profile.
_ALPHA_NOTE = ("NVLink alpha/bandwidth fitted to measured 2xH200 all-reduce (gpu-facts.md); network alpha "
               "values are estimates, not measurements")

BUILTIN: dict[str, Hardware] = {
    "h100-ndr": _hw(
        "h100-ndr", "H100 SXM5 80GB", 8, 3350, 989, 80,
        Link.make(3.3, 316, 6.2, 144), Link.make(5.0, 48, 10.0, 45),
        ["NVIDIA H100 datasheet: 3.35 TB/s HBM3, 989 TFLOP/s dense BF16, NVLink 900 GB/s bidirectional",
         "NVIDIA DGX H100 user guide: 8 GPUs/node, 8x ConnectX-7 NDR 400 Gb/s (one per GPU)", _ALPHA_NOTE]),
    "h200-ndr": _hw(
        "h200-ndr", "H200 SXM 141GB", 8, 4800, 989, 141,
        Link.make(3.3, 316, 6.2, 144), Link.make(5.0, 48, 10.0, 45),
        ["NVIDIA H200 datasheet: 4.8 TB/s HBM3e, 989 TFLOP/s dense BF16, NVLink 900 GB/s bidirectional",
         "NVIDIA HGX H200 reference: 8 GPUs/node, 8x NDR 400 Gb/s", _ALPHA_NOTE]),
    "a100-slingshot": _hw(
        "a100-slingshot", "A100 SXM4 40GB", 4, 1555, 312, 40,
        Link.make(4.0, 210, 8.0, 96), Link.make(4.0, 24, 15.0, 22),
        ["NVIDIA A100 datasheet: 1,555 GB/s HBM2 (40GB), 312 TFLOP/s dense BF16",
         "NERSC Perlmutter architecture: 4 A100/node, NVLink3 (4 links per GPU pair, 100 GB/s/direction/pair), "
         "4x HPE Slingshot-11 NICs at 200 Gb/s per node (one per GPU)", _ALPHA_NOTE]),
    "gh200-ndr": _hw(
        "gh200-ndr", "GH200 (H100 96GB HBM3)", 1, 4000, 989, 96,
        Link.make(3.3, 316, 6.2, 144), Link.make(5.0, 48, 10.0, 45),
        ["NVIDIA GH200 datasheet: 96 GB HBM3 at 4 TB/s, H100 compute (989 TFLOP/s dense BF16)",
         "TACC Vista (Cornell CVW 'Vista system components'): 1 GH200 per node, NDR InfiniBand; "
         "400 Gb/s per node assumed", _ALPHA_NOTE]),
}
ALIASES = {"h100": "h100-ndr", "h200": "h200-ndr", "a100": "a100-slingshot", "perlmutter": "a100-slingshot",
           "gh200": "gh200-ndr", "vista": "gh200-ndr"}


def list_hardware() -> list[str]:
    """Names of the built-in profiles."""
    return sorted(BUILTIN)


def get_hardware(name_or_path: str) -> Hardware:
    """A built-in profile by name (or alias), or a profile file (`.json`, `.yaml`, `.yml`) by path."""
    key = name_or_path.lower()
    if key in BUILTIN or key in ALIASES:
        return BUILTIN[ALIASES.get(key, key)]
    p = Path(name_or_path)
    if p.suffix.lower() in (".json", ".yaml", ".yml") or p.exists():
        return load_profile(p)
    raise ProfileError(f"unknown hardware {name_or_path!r}: use one of {', '.join(list_hardware())} "
                       f"(aliases {', '.join(sorted(ALIASES))}) or a path to a .json/.yaml profile")


def _num(d: dict, key: str, where: str, *, required: bool = True, default: float | None = None,
         positive: bool = True) -> float | None:
    if key not in d:
        if required:
            raise ProfileError(f"{where}: missing field {key!r}")
        return default
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ProfileError(f"{where}: field {key!r} must be a finite number, got {v!r}")
    if positive and v <= 0:
        raise ProfileError(f"{where}: field {key!r} must be > 0, got {v!r}")
    if not positive and v < 0:
        raise ProfileError(f"{where}: field {key!r} must be >= 0, got {v!r}")
    return float(v)


def _fraction(d: dict, key: str, where: str) -> float:
    v = _num(d, key, where, required=False, default=0.0, positive=False)
    if v > 1:
        raise ProfileError(f"{where}: field {key!r} must be between 0 and 1, got {v!r}")
    return v


def _link(d: Any, where: str) -> Link:
    if not isinstance(d, dict):
        raise ProfileError(f"{where}: must be an object with alpha_us and bandwidth_GBps")
    algos = d.get("algorithms", {})
    if not isinstance(algos, dict):
        raise ProfileError(f"{where}: field 'algorithms' must map algorithm names to objects")
    from fusedlis.perfmodel.collectives import ALGORITHMS

    per: dict[str, list[tuple[float, float, float]]] = {}
    for name, v in algos.items():
        if name not in ALGORITHMS or name == "auto":
            raise ProfileError(f"{where}: field 'algorithms': unknown algorithm {name!r}")
        if not isinstance(v, dict):
            raise ProfileError(f"{where}: field 'algorithms.{name}' must be an object")
        w = f"{where}: field 'algorithms.{name}'"
        regs = v.get("regimes", [])
        if not isinstance(regs, list):
            raise ProfileError(f"{w}: 'regimes' must be a list of objects with max_bytes, alpha_us, bandwidth_GBps")
        rows = []
        for i, r in enumerate(regs):
            wr = f"{w}.regimes[{i}]"
            if not isinstance(r, dict):
                raise ProfileError(f"{wr}: must be an object with max_bytes, alpha_us, bandwidth_GBps")
            rows.append((_num(r, "max_bytes", wr), _num(r, "alpha_us", wr, positive=False),
                         _num(r, "bandwidth_GBps", wr)))
        if "alpha_us" in v or "bandwidth_GBps" in v or not rows:
            if name == "nccl":
                raise ProfileError(f"{w}: nccl takes only 'regimes' (its unbounded terms are nccl_alpha_us and "
                                   "nccl_bandwidth_GBps)")
            rows.append((INF, _num(v, "alpha_us", w, positive=False), _num(v, "bandwidth_GBps", w)))
        if len({mx for mx, _, _ in rows}) != len(rows):
            raise ProfileError(f"{w}: two regimes share one max_bytes")
        per[name] = rows
    return Link.make(_num(d, "alpha_us", where, positive=False), _num(d, "bandwidth_GBps", where),
                     _num(d, "nccl_alpha_us", where, required=False, positive=False),
                     _num(d, "nccl_bandwidth_GBps", where, required=False), per)


def _pos_int(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ProfileError(f"{what} must be an integer >= 1, got {v!r}")
    return v


def _fused_linear(v: Any, source: str) -> tuple[tuple[int, int, int, tuple[tuple[int, float], ...]], ...]:
    where = f"{source}: field 'fused_linear_allreduce'"
    if not isinstance(v, list):
        raise ProfileError(f"{where} must be a list of objects with gpus, K, N, M, us")
    out, seen = [], set()
    for i, e in enumerate(v):
        w = f"{where}[{i}]"
        if not isinstance(e, dict):
            raise ProfileError(f"{w}: must be an object with gpus, K, N, M, us")
        key = tuple(_pos_int(e.get(f), f"{w}: field {f!r}") for f in ("gpus", "K", "N"))
        if key in seen:
            raise ProfileError(f"{w}: gpus={key[0]} K={key[1]} N={key[2]} listed twice")
        seen.add(key)
        ms, us = e.get("M"), e.get("us")
        if not isinstance(ms, list) or not isinstance(us, list) or not ms or len(ms) != len(us):
            raise ProfileError(f"{w}: 'M' and 'us' must be non-empty lists of the same length")
        ms = [_pos_int(m, f"{w}: 'M' entry") for m in ms]
        if len(set(ms)) != len(ms):
            raise ProfileError(f"{w}: 'M' lists a row count twice")
        ts = [_num({"us": t}, "us", f"{w}: 'us' entry") * 1e-6 for t in us]
        out.append((*key, tuple(zip(ms, ts))))
    return tuple(out)


def profile_from_dict(d: Any, source: str = "<dict>") -> Hardware:
    """Validate a profile dict (file form) and build a `Hardware`. Errors name `source` and the field."""
    if not isinstance(d, dict):
        raise ProfileError(f"{source}: top level must be an object")
    gpn = d.get("gpus_per_node")
    if isinstance(gpn, bool) or not isinstance(gpn, int) or gpn < 1:
        raise ProfileError(f"{source}: field 'gpus_per_node' must be an integer >= 1, got {gpn!r}")
    hbm = _num(d, "hbm_GBps", source)
    for k in ("intra", "inter"):
        if k not in d:
            raise ProfileError(f"{source}: missing field {k!r}")
    sources = d.get("sources", [])
    if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
        raise ProfileError(f"{source}: field 'sources' must be a list of strings")
    ils = d.get("inter_load_store", False)
    if not isinstance(ils, bool):
        raise ProfileError(f"{source}: field 'inter_load_store' must be true or false, got {ils!r}")
    return Hardware(
        name=str(d.get("name", Path(source).stem)), gpu=str(d.get("gpu", "unknown")), gpus_per_node=gpn,
        hbm_bw=hbm * 1e9, peak_flops=_num(d, "peak_TFLOPs", source) * 1e12,
        memory_bytes=_num(d, "memory_GB", source, required=False, default=80.0) * 1e9,
        kernel_overhead=_num(d, "kernel_overhead_us", source, required=False, default=5.0, positive=False) * 1e-6,
        gamma=1.0 / (_num(d, "reduce_GBps", source, required=False, default=hbm / 3.0) * 1e9),
        intra=_link(d["intra"], f"{source}: field 'intra'"), inter=_link(d["inter"], f"{source}: field 'inter'"),
        sources=tuple(sources), ar_latency_hidden=_fraction(d, "ar_latency_hidden", source),
        nccl_latency_hidden=_fraction(d, "nccl_latency_hidden", source),
        gemm_flop_rate=_num(d, "gemm_TFLOPs", source, required=False, default=0.0, positive=False) * 1e12,
        gemm_row_latency=_num(d, "gemm_row_us", source, required=False, default=0.0, positive=False) * 1e-6,
        ar_norm_row_latency=_num(d, "ar_norm_row_us", source, required=False, default=0.0, positive=False) * 1e-6,
        inter_load_store=ils, fused_linear_ar=_fused_linear(d.get("fused_linear_allreduce", []), source))


def load_profile(path: str | Path) -> Hardware:
    """Read a JSON or YAML profile file; `ProfileError` names the file and the bad field."""
    p = Path(path)
    if not p.is_file():
        raise ProfileError(f"hardware profile {str(p)!r} does not exist")
    text = p.read_text()
    if p.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml  # type: ignore[import-untyped]
        except ImportError as e:
            raise ProfileError(f"{p}: reading YAML needs PyYAML (pip install pyyaml); or write JSON") from e
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ProfileError(f"{p}: not valid YAML: {e}") from e
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ProfileError(f"{p}: not valid JSON: {e}") from e
    return profile_from_dict(data, str(p))


def save_profile(hw: Hardware, path: str | Path) -> None:
    """Write `hw` as a JSON profile."""
    Path(path).write_text(json.dumps(hw.to_json(), indent=2) + "\n")

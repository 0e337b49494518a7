"""Config search with an injected timer: resource pruning, exhaustive search, successive halving.

Nothing here touches a GPU. `search` receives the candidate configs and a ``timer(config, effort) -> µs``
callable; on the GPU the timer wraps ``triton.testing.do_bench``, in tests it is a synthetic cost surface.
``effort`` is a relative measurement budget (1 = cheapest); successive halving raises it each round.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Config = dict[str, Any]
Timer = Callable[[Config, int], float]

_DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "float8_e4m3fn": 1, "float8_e5m2": 1}


@dataclass(frozen=True)
class Limits:
    """Per-block hardware limits used for pruning. Defaults are Hopper (H100/H200)."""

    smem_bytes: int = 232_448
    regs_per_thread: int = 255
    regs_per_block: int = 65_536

    @classmethod
    def detect(cls) -> Limits:
        """Limits of the current CUDA device; Hopper defaults without CUDA."""
        try:
            import torch

            if torch.cuda.is_available():
                p = torch.cuda.get_device_properties(torch.cuda.current_device())
                smem = getattr(p, "shared_memory_per_block_optin", 0) or cls.smem_bytes
                regs = getattr(p, "regs_per_multiprocessor", 0) or cls.regs_per_block
                return cls(smem_bytes=int(smem), regs_per_block=min(int(regs), cls.regs_per_block))
        except Exception:
            pass
        return cls()


@dataclass(frozen=True)
class Resources:
    """Estimated per-block use of a config: shared memory bytes and 32-bit registers per thread."""

    smem_bytes: int
    regs_per_thread: int
    threads: int

    def violations(self, lim: Limits) -> list[str]:
        out = []
        if self.smem_bytes > lim.smem_bytes:
            out.append(f"shared memory {self.smem_bytes} B > {lim.smem_bytes} B")
        if self.regs_per_thread > lim.regs_per_thread:
            out.append(f"~{self.regs_per_thread} registers/thread > {lim.regs_per_thread}")
        if self.regs_per_thread * self.threads > lim.regs_per_block:
            out.append(f"~{self.regs_per_thread * self.threads} registers/block > {lim.regs_per_block}")
        return out


def dtype_bytes(key: Mapping[str, Any]) -> int:
    d = str(key.get("dtype", "bfloat16")).removeprefix("torch.")
    return _DTYPE_BYTES.get(d, 2)


def _common(config: Mapping[str, Any]) -> tuple[int, int]:
    warps = int(config.get("num_warps", 4))
    stages = max(1, int(config.get("num_stages", 3)))
    return warps, stages


def estimate_gemm(key: Mapping[str, Any], config: Mapping[str, Any]) -> Resources:
    """Tile-based estimate for `linear`-like kernels (BLOCK_M x BLOCK_N output tile, BLOCK_K reduction).

    Shared memory: ``num_stages`` buffers of the A and B tiles (two B tiles with SwiGLU: gate and up).
    Registers: the fp32 accumulators (``[BLOCK_M, BLOCK_N]``, or ``[BLOCK_M, BLOCK_N, BLOCK_K]`` on the
    GEMV path ``USE_DOT=False``) plus one A/B fragment, spread over the block's threads, plus ~40 for
    addresses and loop state. Deliberately simple: it only has to reject configs that cannot compile or
    would spill badly; a too-optimistic estimate just costs one failed or slow timing.
    """
    warps, stages = _common(config)
    bm = int(config.get("BLOCK_M", 16))
    bn = int(config.get("BLOCK_N", 64))
    bk = int(config.get("BLOCK_K", 64))
    nb = 2 if str(key.get("activation", "")).lower() == "swiglu" else 1
    eb = dtype_bytes(key)
    threads = warps * 32
    smem = stages * (bm * bk + nb * bn * bk) * eb
    use_dot = bool(config.get("USE_DOT", bm >= 16))
    acc = nb * bm * bn * (1 if use_dot else bk)
    frag = (bm * bk + nb * bn * bk) * eb // 4
    regs = math.ceil((acc + frag) / threads) + 40
    return Resources(smem, regs, threads)


def estimate_attention(key: Mapping[str, Any], config: Mapping[str, Any]) -> Resources:
    """Estimate for split-KV decode attention: ``BLOCK_N`` cache rows of K and V per stage against
    head dim ``D``, with the GQA group's query heads padded to ``BLOCK_G = max(16, pow2(Hq/Hkv))``."""
    warps, stages = _common(config)
    d = int(key.get("D", 128))
    hq, hkv = int(key.get("Hq", 1)), max(1, int(key.get("Hkv", 1)))
    bg = int(config.get("BLOCK_G", max(16, 1 << max(0, (max(1, hq // hkv) - 1).bit_length()))))
    bn = int(config.get("BLOCK_N", 64))
    eb = dtype_bytes(key)
    threads = warps * 32
    smem = stages * 2 * bn * d * eb
    regs = math.ceil((bg * d + bg * bn + 2 * bn * d * eb // 4) / threads) + 40
    return Resources(smem, regs, threads)


def estimate_fused(key: Mapping[str, Any], config: Mapping[str, Any]) -> Resources:
    """`estimate_gemm` for the fused GEMM + all-reduce's tile names (BM/BN/BK); its finish programs are
    small next to the GEMM tiles."""
    c = {"BM": 16, "BN": 32, "BK": 128, **config}
    return estimate_gemm({"dtype": key.get("dtype", "bfloat16")},
                         {"BLOCK_M": c["BM"], "BLOCK_N": c["BN"], "BLOCK_K": c["BK"],
                          "USE_DOT": c.get("USE_DOT", True), "num_warps": c.get("num_warps", 4),
                          "num_stages": c.get("num_stages", 3)})


def estimate_none(key: Mapping[str, Any], config: Mapping[str, Any]) -> Resources:
    """For ops without tiles (e.g. all-reduce algorithm choice): nothing to prune."""
    warps, _ = _common(config)
    return Resources(0, 0, warps * 32)


ESTIMATORS: dict[str, Callable[[Mapping[str, Any], Mapping[str, Any]], Resources]] = {
    "linear": estimate_gemm,
    "fused": estimate_fused,
    "linear_allreduce": estimate_fused,
    "attention": estimate_attention,
    "decode_attention": estimate_attention,
    "allreduce": estimate_none,
}


def config_id(config: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(config.items()))


def prune(
    configs: Iterable[Mapping[str, Any]],
    estimate: Callable[[Mapping[str, Any]], Resources],
    limits: Limits = Limits(),
) -> tuple[list[Config], list[tuple[Config, str]]]:
    """Split `configs` into (kept, [(pruned config, reason)]); duplicates are dropped."""
    kept: list[Config] = []
    pruned: list[tuple[Config, str]] = []
    seen: set = set()
    for c in configs:
        cid = config_id(c)
        if cid in seen:
            continue
        seen.add(cid)
        try:
            why = estimate(c).violations(limits)
        except (KeyError, TypeError, ValueError) as e:
            why = [f"cannot estimate resources: {e}"]
        if why:
            pruned.append((dict(c), "; ".join(why)))
        else:
            kept.append(dict(c))
    return kept, pruned


@dataclass
class Trial:
    config: Config
    effort: int
    time_us: float | None
    error: str | None = None


@dataclass
class SearchResult:
    """Outcome of `search`. `best_us` and `default_us` come from the same final measurement round."""

    best: Config
    best_us: float
    default: Config | None
    default_us: float | None
    trials: list[Trial] = field(default_factory=list)
    pruned: list[tuple[Config, str]] = field(default_factory=list)
    failed: list[tuple[Config, str]] = field(default_factory=list)
    challenger: Config | None = None  # fastest candidate of the search, before the head-to-head
    challenger_us: float | None = None
    noise: float = 0.0  # relative spread seen in the head-to-head (0 with one round)
    margin: float = 0.0  # gain the challenger needed: max(min_gain, noise)

    @property
    def speedup(self) -> float | None:
        """default time / best time (>= 1 by construction when the default ran)."""
        if self.default_us is None or not self.best_us:
            return None
        return self.default_us / self.best_us


def _time(timer: Timer, cfg: Config, effort: int, trials: list[Trial], failed: list, tick) -> float | None:
    try:
        t = float(timer(cfg, effort))
        if not math.isfinite(t) or t <= 0:
            raise ValueError(f"timer returned {t}")
    except Exception as e:  # a config that fails to compile or launch is skipped, not fatal
        trials.append(Trial(cfg, effort, None, f"{type(e).__name__}: {e}"))
        failed.append((cfg, f"{type(e).__name__}: {e}"))
        t = None
    else:
        trials.append(Trial(cfg, effort, t))
    if tick is not None:
        tick(1)
    return t


def planned_timings(n: int, strategy: str = "exhaustive", eta: int = 3, keep: int = 1,
                    confirm_rounds: int = 1) -> int:
    """How many timer calls `search` makes for `n` kept configs (for sizing progress bars)."""
    final = 2 * max(1, confirm_rounds)
    if strategy == "exhaustive" or n <= keep:
        return n + final
    total = 0
    while n > keep:
        total += n
        n = max(keep, math.ceil(n / eta))
    return total + final


def _spread(ts: Sequence[float]) -> float:
    """Relative spread (max - min) / median of repeated timings of one config."""
    if len(ts) < 2:
        return 0.0
    med = sorted(ts)[len(ts) // 2] if len(ts) % 2 else sum(sorted(ts)[len(ts) // 2 - 1: len(ts) // 2 + 1]) / 2
    return (max(ts) - min(ts)) / med if med > 0 else 0.0


def _median(ts: Sequence[float]) -> float:
    s = sorted(ts)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def search(
    configs: Sequence[Mapping[str, Any]],
    timer: Timer,
    *,
    default: Mapping[str, Any] | None = None,
    estimate: Callable[[Mapping[str, Any]], Resources] | None = None,
    limits: Limits = Limits(),
    strategy: str = "exhaustive",
    eta: int = 3,
    keep: int = 1,
    final_effort: int | None = None,
    confirm_effort: int | None = None,
    confirm_rounds: int = 1,
    min_gain: float = 0.0,
    tick: Callable[[int], Any] | None = None,
) -> SearchResult:
    """Find the fastest config of `configs` according to `timer`.

    Use ``strategy="exhaustive"`` for small spaces (every kept config timed at `final_effort`), and
    ``"halving"`` (successive halving: time all cheaply, keep the best 1/`eta`, raise the effort by
    `eta`, repeat until `keep` remain) for large ones. Configs whose `estimate` exceeds `limits` are
    pruned without timing. The winner and the `default` are re-timed back to back at
    ``max(final effort, confirm_effort)``; the winner replaces the default only if it is faster by more
    than the fraction `min_gain` (use ~0.01 against timing noise), so the result is never slower than the
    default on the measurements taken. With ``confirm_rounds = r > 1`` the two are timed alternately r
    times each; their medians are compared and the required gain becomes ``max(min_gain, noise)``, where
    noise is the larger relative spread (max - min) / median of the two series: a challenger within the
    noise keeps the default. Raises ValueError if no config could be timed.
    """
    if confirm_rounds < 1:
        raise ValueError(f"confirm_rounds must be >= 1, got {confirm_rounds}")
    if not 0.0 <= min_gain < 1.0:
        raise ValueError(f"min_gain must be in [0, 1), got {min_gain}")
    if strategy not in ("exhaustive", "halving"):
        raise ValueError(f"strategy must be 'exhaustive' or 'halving', got {strategy!r}")
    if eta < 2:
        raise ValueError(f"eta must be >= 2, got {eta}")
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    if estimate is not None:
        kept, pruned = prune(configs, estimate, limits)
    else:
        kept, pruned = prune(configs, lambda c: Resources(0, 0, 0), limits)
    dflt = dict(default) if default is not None else None
    trials: list[Trial] = []
    failed: list[tuple[Config, str]] = []

    if strategy == "exhaustive" or len(kept) <= keep:
        effort = final_effort or 1
        scored = [(t, c) for c in kept if (t := _time(timer, c, effort, trials, failed, tick)) is not None]
    else:
        effort = 1
        pool = kept
        while True:
            scored = [(t, c) for c in pool if (t := _time(timer, c, effort, trials, failed, tick)) is not None]
            if len(scored) <= keep:
                break
            scored.sort(key=lambda tc: tc[0])
            scored = scored[: max(keep, math.ceil(len(scored) / eta))]
            effort *= eta
            if len(scored) <= keep:
                break
            pool = [c for _, c in scored]
        effort = max(effort, final_effort or 1)
    if not scored and dflt is None:
        raise ValueError(f"no config could be timed ({len(pruned)} pruned, {len(failed)} failed)")
    scored.sort(key=lambda tc: tc[0])

    # Final round: winner and default measured back to back (alternately, `confirm_rounds` times each).
    effort = max(effort, confirm_effort or 1)
    best = scored[0][1] if scored else None
    challenger, challenger_us = best, (scored[0][0] if scored else None)
    same = dflt is not None and best is not None and config_id(best) == config_id(dflt)
    bt: list[float] = []
    dt: list[float] = []
    for _ in range(confirm_rounds):
        if best is not None and (not bt or bt[-1] is not None):
            t = _time(timer, best, effort, trials, failed, tick)
            bt.append(t)
        if dflt is not None and not same and (not dt or dt[-1] is not None):
            dt.append(_time(timer, dflt, effort, trials, failed, tick))
        elif tick is not None:
            tick(1)  # keep the progress bar's plan: the same config is measured once per round
    best_us = _median(bt) if bt and None not in bt else None
    default_us = best_us if same else (_median(dt) if dt and None not in dt else None)
    noise = 0.0 if same else max(_spread([t for t in bt if t is not None]), _spread([t for t in dt if t is not None]))
    margin = max(min_gain, noise)
    if best is None or best_us is None or (default_us is not None and default_us * (1 - margin) <= best_us):
        if default_us is None:
            if best is None or best_us is None:
                raise ValueError("neither the best candidate nor the default config could be timed")
        else:
            best, best_us = dflt, default_us
    assert best is not None and best_us is not None
    return SearchResult(best, best_us, dflt, default_us, trials, pruned, failed, challenger=challenger,
                        challenger_us=challenger_us, noise=noise, margin=margin)

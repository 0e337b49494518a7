"""Drive a tuning pass: for each problem, search its config space with a bench and collect outcomes."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fusedlis.tuning import cache as _cache
from fusedlis.tuning import search as _search
from fusedlis.tuning.bench import SkipOp
from fusedlis.tuning.keys import key_string
from fusedlis.tuning.shapes import Problem


@dataclass
class Outcome:
    """Result of tuning one problem. `status` is "tuned", "skipped" or "failed" (see `message`)."""

    problem: Problem
    status: str
    message: str = ""
    best: dict[str, Any] | None = None
    best_us: float | None = None
    default: dict[str, Any] | None = None
    default_us: float | None = None
    baseline: str | None = None
    baseline_us: float | None = None
    lookup_us: float | None = None
    lookup_hit: bool | None = None
    n_configs: int = 0
    n_pruned: int = 0
    n_failed: int = 0
    timer: str | None = None  # the bench's timer name, when it has its own (collective, CUDA-graph)
    challenger: dict[str, Any] | None = None  # fastest candidate before the head-to-head with the default
    challenger_us: float | None = None
    noise: float | None = None  # relative spread of the head-to-head timings
    margin: float | None = None  # gain the challenger had to show to replace the default
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def kept_default(self) -> bool | None:
        """True when the stored config is the default (no candidate beat it beyond the margin)."""
        if self.best is None or self.default is None:
            return None
        return _search.config_id(self.best) == _search.config_id(self.default)

    @property
    def speedup_default(self) -> float | None:
        return self.default_us / self.best_us if self.default_us and self.best_us else None

    @property
    def speedup_baseline(self) -> float | None:
        return self.baseline_us / self.best_us if self.baseline_us and self.best_us else None

    def entry(self, timer: str) -> dict[str, Any]:
        """The cache entry for a tuned outcome."""
        assert self.status == "tuned" and self.best is not None
        return _cache.make_entry(
            self.problem.op, self.problem.key, self.best, time_us=self.best_us, default_us=self.default_us,
            default_config=self.default, baseline=self.baseline, baseline_us=self.baseline_us,
            meta=self.problem.meta, timer=self.timer or timer, configs_tried=self.n_configs,
            kept_default=self.kept_default, noise=self.noise, margin=self.margin)

    def row(self) -> dict[str, Any]:
        """Flat dict for CSV / tables."""
        p = self.problem
        return {
            "op": p.op, "layer": p.layer, "label": p.label, "key": key_string(p.key), "status": self.status,
            "default_config": _fmt_cfg(self.default), "default_us": self.default_us,
            "tuned_config": _fmt_cfg(self.best), "tuned_us": self.best_us,
            "speedup_vs_default": self.speedup_default, "baseline": self.baseline,
            "baseline_us": self.baseline_us, "speedup_vs_baseline": self.speedup_baseline,
            "lookup_us": self.lookup_us, "lookup_hit": self.lookup_hit, "kept_default": self.kept_default,
            "challenger_config": _fmt_cfg(self.challenger), "challenger_us": self.challenger_us,
            "noise": self.noise, "margin": self.margin,
            "configs": self.n_configs, "pruned": self.n_pruned, "failed": self.n_failed, "message": self.message,
            "bench_timer": self.timer,
        }


def _fmt_cfg(cfg: dict[str, Any] | None) -> str:
    if cfg is None:
        return ""
    short = {"BLOCK_M": "bm", "BLOCK_N": "bn", "BLOCK_K": "bk", "SPLIT_K": "sk", "num_warps": "w",
             "num_stages": "s", "USE_DOT": "dot", "NUM_SPLITS": "splits"}
    return " ".join(f"{short.get(k, k)}={int(v) if isinstance(v, bool) else v}" for k, v in sorted(cfg.items()))


def tune(
    problems: Sequence[Problem],
    make_bench: Callable[[Problem], Any],
    *,
    strategy: str = "exhaustive",
    eta: int = 3,
    limits: _search.Limits | None = None,
    confirm_effort: int = 1,
    confirm_rounds: int = 1,
    min_gain: float = 0.0,
    progress: bool = True,
    log: Callable[[str], Any] = lambda s: print(s, file=sys.stderr),
) -> list[Outcome]:
    """Search every problem's configs with the bench `make_bench(problem)` returns.

    The bench's default config is always a candidate (added when its config list lacks it), and a
    candidate replaces it only by winning the head-to-head of `search` (`confirm_rounds`, `min_gain`);
    otherwise the default itself is the outcome, so what is stored never measured slower than the default.
    Problems whose op cannot be benched here (`SkipOp`) are skipped with one message per op; any other
    error in one problem marks it failed and the pass goes on.
    """
    limits = limits or _search.Limits.detect()
    outcomes: list[Outcome] = []
    skipped_ops: dict[str, str] = {}
    prepared = []
    for p in problems:
        if p.op in skipped_ops:
            outcomes.append(Outcome(p, "skipped", skipped_ops[p.op]))
            continue
        try:
            bench = make_bench(p)
            configs = bench.configs()
            default = bench.default()
            if all(_search.config_id(c) != _search.config_id(default) for c in configs):
                configs = [dict(default), *configs]
        except SkipOp as e:
            skipped_ops[p.op] = str(e)
            log(f"fusedlis tune: skipping {p.op}: {e}")
            outcomes.append(Outcome(p, "skipped", str(e)))
            continue
        except Exception as e:  # a broken config space for one shape must not stop the pass
            outcomes.append(Outcome(p, "failed", f"listing configs: {type(e).__name__}: {e}"))
            continue
        kept, _ = _search.prune(configs, bench.estimate, limits)
        prepared.append((p, bench, configs, default,
                         _search.planned_timings(len(kept), strategy, eta, confirm_rounds=confirm_rounds) + 1))

    total = sum(n for *_, n in prepared)
    bar = _progress(total, progress)
    try:
        for p, bench, configs, default, _n in prepared:
            bar.set_description(p.label)
            outcomes.append(_tune_one(p, bench, configs, default, bar.update, strategy=strategy, eta=eta,
                                      limits=limits, confirm_effort=confirm_effort, confirm_rounds=confirm_rounds,
                                      min_gain=min_gain))
    finally:
        bar.close()
    order = {id(p): i for i, p in enumerate(problems)}
    outcomes.sort(key=lambda o: order[id(o.problem)])
    return outcomes


def _tune_one(p, bench, configs, default, tick, **search_args) -> Outcome:
    try:
        res = _search.search(configs, bench.time, default=default, estimate=bench.estimate, tick=tick,
                             **search_args)
        base = bench.baseline(max((t.effort for t in res.trials), default=1))
        tick(1)
        out = Outcome(p, "tuned", best=res.best, best_us=res.best_us, default=res.default,
                      default_us=res.default_us, n_configs=len(configs), n_pruned=len(res.pruned),
                      n_failed=len(res.failed), timer=getattr(bench, "timer_name", None),
                      challenger=res.challenger, challenger_us=res.challenger_us, noise=res.noise,
                      margin=res.margin)
        if base is not None:
            out.baseline, out.baseline_us = base
        notes = [bench.notes()] if hasattr(bench, "notes") else []
        if res.default_us is None:
            notes.insert(0, "default config failed to run")
        elif out.kept_default and res.challenger is not None and \
                _search.config_id(res.challenger) != _search.config_id(res.default):
            notes.insert(0, f"kept default: best candidate within the {100 * res.margin:.1f}% margin")
        if res.failed:
            notes.append(f"{len(res.failed)} configs failed, e.g. {res.failed[0][1][:120]}")
        out.message = "; ".join(n for n in notes if n)
        return out
    except SkipOp as e:
        return Outcome(p, "skipped", str(e))
    except Exception as e:  # one bad shape must not lose the whole pass
        return Outcome(p, "failed", f"{type(e).__name__}: {e}")
    finally:
        if hasattr(bench, "close"):
            bench.close()


def verify(outcomes: Sequence[Outcome], make_bench: Callable[[Problem], Any], progress: bool = True) -> None:
    """After the cache is written: time each tuned problem through the launcher's own lookup path and
    record whether `lookup` returned the tuned config (`lookup_hit`) and its time (`lookup_us`)."""
    from fusedlis import tuning

    tuning.invalidate()
    tuned = [o for o in outcomes if o.status == "tuned"]
    bar = _progress(len(tuned), progress)
    try:
        for o in tuned:
            bar.set_description(f"verify {o.problem.label}")
            bench = None
            try:
                bench = make_bench(o.problem)
                o.lookup_hit = tuning.lookup(o.problem.op, o.problem.key) == o.best
                o.lookup_us = bench.time_lookup(1)
            except Exception as e:
                o.message = (o.message + "; " if o.message else "") + f"verify failed: {type(e).__name__}: {e}"
            finally:
                if bench is not None and hasattr(bench, "close"):
                    bench.close()
            bar.update(1)
    finally:
        bar.close()


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_description(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="timing", dynamic_ncols=True, file=sys.stderr)

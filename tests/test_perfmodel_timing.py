"""The shared CUDA-graph timing helper (fusedlis.perfmodel.timing), driven on CPU by a fake torch.

It must time exactly as bench/allreduce.py does (the calibrated profile is compared with that bench), so the
call sequence is checked against bench/allreduce.py's own `time_graph`, run on the same fake."""

from __future__ import annotations

import ast
import contextlib
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest

from fusedlis.perfmodel import calibrate as cal
from fusedlis.perfmodel import timing

ROOT = Path(__file__).resolve().parents[1]


class FakeTorch:
    """Just enough of torch.cuda for time_graph: a log of calls and a clock that graph replays advance."""

    def __init__(self, per_call_us: list[float]) -> None:
        self.log: list[str] = []
        self.clock_ms = 0.0
        self.per_call_us = list(per_call_us)  # one value per replay (warm-up replays included), then repeats
        self.replay_no = 0
        self.capturing = False
        fake = self

        class Stream:
            def wait_stream(self, other):
                fake.log.append("wait_stream")

        class Graph:
            def __init__(self):
                self.calls = 0

            def replay(self):
                us = fake.per_call_us[min(fake.replay_no, len(fake.per_call_us) - 1)]
                fake.replay_no += 1
                fake.clock_ms += self.calls * us * 1e-3
                fake.log.append("replay")

        class Event:
            def __init__(self, enable_timing=False):
                assert enable_timing
                self.t = None

            def record(self):
                self.t = fake.clock_ms
                fake.log.append("record")

            def synchronize(self):
                fake.log.append("event_sync")

            def elapsed_time(self, end):
                return end.t - self.t

        @contextlib.contextmanager
        def stream(s):
            fake.log.append("enter_stream")
            yield
            fake.log.append("exit_stream")

        @contextlib.contextmanager
        def graph(g, stream=None):
            fake.log.append("begin_capture")
            fake.capturing, fake.graph = True, g
            yield
            fake.capturing = False
            fake.log.append("end_capture")

        self.cuda = SimpleNamespace(Stream=Stream, current_stream=lambda: Stream(), stream=stream,
                                    synchronize=lambda: fake.log.append("sync"), CUDAGraph=Graph, graph=graph,
                                    Event=Event)

    def fn(self) -> None:
        if self.capturing:
            self.graph.calls += 1
            self.log.append("captured_call")
        else:
            self.log.append("eager_call")


def _bench_time_graph():
    """bench/allreduce.py's `time_graph`, compiled from its source (the script itself needs GPUs to import)."""
    src = (ROOT / "bench" / "allreduce.py").read_text()
    tree = ast.parse(src)
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "time_graph")
    mod = ast.Module(body=[node], type_ignores=[])
    return mod


def test_time_graph_median_per_call_in_seconds():
    per = [50.0] * timing.WARMUP_REPLAYS + [10.0, 12.0, 11.0, 30.0, 9.0]
    ft = FakeTorch(per)
    t = timing.time_graph(ft.fn, calls=4, replays=5, torch=ft)
    assert t == pytest.approx(statistics.median([10.0, 12.0, 11.0, 30.0, 9.0]) * 1e-6)
    # warm-up calls eager, then exactly `calls` captured; warm-up replays untimed
    assert ft.log.count("eager_call") == timing.WARMUP_CALLS
    assert ft.log.count("captured_call") == 4
    assert ft.log.count("replay") == timing.WARMUP_REPLAYS + 5


def test_time_graph_barrier_before_each_timed_replay_and_max_over_ranks():
    ft = FakeTorch([5.0])
    seen = []
    t = timing.time_graph(ft.fn, calls=2, replays=3, torch=ft, barrier=lambda: ft.log.append("barrier"),
                          reduce_max=lambda s: seen.append(s) or 2 * s)
    assert seen == [pytest.approx(5e-6)] and t == pytest.approx(1e-5)
    # each timed replay: barrier, device sync, record, replay, record
    timed = ft.log[ft.log.index("barrier"):]
    assert timed[:6] == ["barrier", "sync", "record", "replay", "record", "event_sync"]
    assert ft.log.count("barrier") == 3


def test_time_graph_rejects_zero_calls():
    with pytest.raises(ValueError):
        timing.time_graph(lambda: None, calls=0, torch=FakeTorch([1.0]))


def test_defaults_are_bench_allreduce_defaults():
    src = (ROOT / "bench" / "allreduce.py").read_text()
    assert f'"--calls", type=int, default={timing.CALLS}' in src
    assert f'"--replays", type=int, default={timing.REPLAYS}' in src


def test_bench_allreduce_times_with_the_shared_helper():
    """bench/allreduce.py's time_graph is timing.time_graph with a barrier before each replay, in µs, so the
    bench and `fusedlis calibrate` cannot drift apart (the bench takes the max over ranks afterwards)."""
    per = [40.0, 41.0, 42.0, 7.0, 8.0, 6.5, 9.0, 7.5, 8.5, 7.0]
    fb, fh = FakeTorch(per), FakeTorch(per)
    ns = {"_shared_time_graph": lambda *a, **k: timing.time_graph(*a, **k, torch=fb),
          "dist": SimpleNamespace(barrier=lambda: fb.log.append("barrier"))}
    exec(compile(_bench_time_graph(), "bench/allreduce.py", "exec"), ns)
    us = ns["time_graph"](fb.fn, 5, 7)
    s = timing.time_graph(fh.fn, 5, 7, torch=fh, barrier=lambda: fh.log.append("barrier"))
    assert us == pytest.approx(s * 1e6)
    assert fb.log == fh.log and fb.log.count("barrier") == 7
    src = (ROOT / "bench" / "allreduce.py").read_text()
    assert "from fusedlis.perfmodel.timing import time_graph as _shared_time_graph" in src


def test_calibrate_collectives_use_the_shared_helper(monkeypatch):
    calls = []

    def fake(fn, calls_, replays, *, barrier=None, reduce_max=None, torch=None):
        calls.append((calls_, replays, barrier, reduce_max))
        return 1e-5

    monkeypatch.setattr(timing, "time_graph", fake)
    import torch.distributed as dist

    assert cal._time_collective(lambda: None, timing.CALLS) == 1e-5
    assert calls == [(timing.CALLS, timing.REPLAYS, dist.barrier, timing.max_over_ranks)]


def test_max_over_ranks_all_reduces_with_max():
    seen = {}

    class T:
        float64 = "f64"

        @staticmethod
        def tensor(v, dtype=None, device=None):
            seen["device"] = device
            return SimpleNamespace(v=v, item=lambda: 3.0)

    dist = SimpleNamespace(ReduceOp=SimpleNamespace(MAX="max"),
                           all_reduce=lambda t, op=None: seen.setdefault("op", op))
    assert timing.max_over_ranks(1.0, torch=T, dist=dist) == 3.0
    assert seen == {"device": "cuda", "op": "max"}


def test_allreduce_schedule_is_size_major_nccl_first():
    sched = cal._allreduce_schedule([8192, 4 << 20, 6 << 20],
                                    [("nccl", "ring", 6 << 20, 1), ("fusedlis", "oneshot_ll", 4 << 20, 1),
                                     ("fusedlis", "nvrar_ll", 4 << 20, 2)])
    assert sched == [(8192, "nccl", "ring", 1), (8192, "fusedlis", "oneshot_ll", 1), (8192, "fusedlis", "nvrar_ll", 2),
                     (4 << 20, "nccl", "ring", 1), (4 << 20, "fusedlis", "oneshot_ll", 1),
                     (4 << 20, "fusedlis", "nvrar_ll", 2), (6 << 20, "nccl", "ring", 1)]


def test_calibrate_cli_defaults_match_the_bench():
    import argparse

    from fusedlis.perfmodel.cli import add_calibrate_parser

    ap = argparse.ArgumentParser()
    add_calibrate_parser(ap.add_subparsers())
    a = ap.parse_args(["calibrate", "--out", "x.json"])
    assert (a.iters, a.replays) == (timing.CALLS, timing.REPLAYS)


def test_timing_note_reaches_profile_sources():
    from fusedlis.perfmodel.hardware import get_hardware

    rows = [{"kind": "note", "impl": "timing: 100 calls per CUDA graph, median of 30 replays"},
            {"kind": "allreduce", "impl": "nccl", "algo": "ring", "gpus": 2, "bytes": 8192, "us": 12.0},
            {"kind": "allreduce", "impl": "nccl", "algo": "ring", "gpus": 2, "bytes": 1 << 20, "us": 20.0}]
    hw = cal.profile_from_measurements(rows, get_hardware("h200-ndr"))
    assert any(s.startswith("timing: 100 calls") for s in hw.sources)


def test_capture_center():
    """A point's value from its per-capture times: trimmed mean from 4 samples on (a lone outlier and the
    extremes of a bimodal mix drop out), median below that."""
    from fusedlis.perfmodel.timing import capture_center

    assert capture_center([13.5, 17.3, 17.1, 13.4, 17.5]) == pytest.approx((13.5 + 17.1 + 17.3) / 3)
    assert capture_center([10.0, 10.0, 10.0, 40.0]) == pytest.approx(10.0)
    assert capture_center([3.0, 1.0, 2.0]) == 2.0
    assert capture_center([5.0]) == 5.0
    with pytest.raises(ValueError):
        capture_center([])

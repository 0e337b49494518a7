"""gloo driver of the plans with real processes (2 logical nodes x 2, and 3 x 2), against dist.all_reduce."""

import multiprocessing as mp
import os
import tempfile
import warnings

import pytest
import torch
import torch.distributed as dist

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
CASES = [("nvrar", 1, torch.float32), ("nvrar", 1001, torch.bfloat16), ("nvrar", 4096, torch.float16),
         ("nvrar", 30_001, torch.float32), ("one_shot", 77, torch.float32), ("two_shot", 999, torch.bfloat16)]


def _worker(rank, world, gpn, init_file, q):
    try:
        os.environ["FUSEDLIS_GPUS_PER_NODE"] = str(gpn)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        from fusedlis.comm import AllReduce, gloo_all_reduce, simulate_all_reduce

        report = []
        for i, (alg, n, dtype) in enumerate(CASES):
            if alg != "nvrar" and gpn != world:
                continue  # intra-node algorithms need one node: run them on the node-local group
            g = torch.Generator().manual_seed(100 * i + rank)
            x = torch.randn(n, generator=g).to(dtype)
            keep = x.clone()
            y = gloo_all_reduce(x, algorithm=alg)
            assert torch.equal(x, keep), "input modified"
            ref = x.double().clone()
            dist.all_reduce(ref)  # float64 reference through gloo
            err = ((y.double() - ref).norm() / ref.norm()).item()
            gathered = [torch.empty_like(y) for _ in range(world)]
            dist.all_gather(gathered, y)
            same = all(torch.equal(a.view(torch.int16 if a.element_size() == 2 else torch.int32),
                                   y.view(torch.int16 if y.element_size() == 2 else torch.int32)) for a in gathered)
            # same plan, same arithmetic as the CPU simulator
            xs = [torch.randn(n, generator=torch.Generator().manual_seed(100 * i + r)).to(dtype) for r in range(world)]
            sim = simulate_all_reduce(xs, gpn, alg)[rank]
            report.append((alg, n, str(dtype), err <= TOL[dtype], same, torch.equal(sim, y)))
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            ar = AllReduce(dtype=torch.float32)  # no CUDA here: falls back to torch.distributed, one warning
            z = torch.full((5,), float(rank + 1))
            assert ar.all_reduce(z) is z
            ar(torch.ones(3))
        fallback_ok = torch.allclose(z, torch.full((5,), world * (world + 1) / 2)) and ar.backend == "nccl"
        report.append(("fallback", fallback_ok, sum("falling back" in str(m.message) for m in w)))
        q.put((rank, report))
        dist.destroy_process_group()
    except BaseException as e:
        q.put((rank, f"{type(e).__name__}: {e}"))


def _run(world, gpn):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    with tempfile.TemporaryDirectory() as d:
        procs = [ctx.Process(target=_worker, args=(r, world, gpn, os.path.join(d, "init"), q)) for r in range(world)]
        for p in procs:
            p.start()
        results = dict(q.get(timeout=180) for _ in range(world))
        for p in procs:
            p.join(timeout=30)
    for r in range(world):
        rep = results[r]
        assert not isinstance(rep, str), f"rank {r}: {rep}"
        for row in rep[:-1]:
            alg, n, dt, ok, same, sim_same = row
            assert ok, f"rank {r}: {row} error above tolerance"
            assert same, f"rank {r}: {row} ranks differ"
            assert sim_same, f"rank {r}: {row} differs from simulate_all_reduce"
        assert rep[-1][1], f"rank {r}: fallback AllReduce wrong"
        # the warning is emitted once per process (warn_once), possibly before this test's recorder
        assert rep[-1][2] <= 1


def test_gloo_two_logical_nodes_of_two():
    _run(4, 2)


def test_gloo_three_nodes_of_two_and_single_node():
    _run(6, 2)
    _run(4, 4)

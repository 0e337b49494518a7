"""Plans and the CPU executor: property tests against a float64 sum."""

import pytest
import torch
from hypothesis import example, given, strategies as st

from fusedlis.comm import Topology, build_plan, simulate_all_reduce
from fusedlis.comm.plan import Chunking, EXCHANGE, RECV_ADD, RECV_COPY, SEND, rail_steps

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@given(
    nodes=st.integers(1, 16),
    gpn=st.integers(1, 8),
    n=st.one_of(st.integers(1, 64), st.integers(1, 100_000)),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    seed=st.integers(0, 2**31 - 1),
)
@example(nodes=16, gpn=8, n=23_437, dtype=torch.bfloat16, seed=1)  # largest world
@example(nodes=13, gpn=3, n=76_921, dtype=torch.float16, seed=2)  # odd node count, long odd length
@example(nodes=6, gpn=5, n=100_000, dtype=torch.float32, seed=3)
@example(nodes=1, gpn=8, n=99_999, dtype=torch.bfloat16, seed=4)
@example(nodes=7, gpn=8, n=1, dtype=torch.float32, seed=5)  # fewer elements than ranks
def test_nvrar_matches_float64_sum(nodes, gpn, n, dtype, seed):
    w = nodes * gpn
    if w * n > 3_000_000:  # keep CPU time small: shrink long messages on large worlds
        n = max(1, 3_000_000 // w)
    g = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(n, generator=g).to(dtype) for _ in range(w)]
    ref = torch.stack([x.double() for x in inputs]).sum(0)
    outs = simulate_all_reduce(inputs, gpn, "nvrar")
    assert _rel_err(outs[0], ref) <= TOL[dtype]
    for o in outs[1:]:
        assert o.dtype == dtype
        assert torch.equal(o.view(-1).view(torch.int16 if o.element_size() == 2 else torch.int32),
                           outs[0].view(-1).view(torch.int16 if o.element_size() == 2 else torch.int32))


@pytest.mark.parametrize("algorithm", ["one_shot", "two_shot"])
@given(gpn=st.integers(1, 8), n=st.integers(1, 20_000),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), seed=st.integers(0, 2**31 - 1))
def test_intra_node_algorithms(algorithm, gpn, n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(n, generator=g).to(dtype) for _ in range(gpn)]
    ref = torch.stack([x.double() for x in inputs]).sum(0)
    outs = simulate_all_reduce(inputs, gpn, algorithm)
    assert _rel_err(outs[0], ref) <= TOL[dtype]
    bits = [o.view(torch.int16 if o.element_size() == 2 else torch.int32) for o in outs]
    assert all(torch.equal(b, bits[0]) for b in bits)


def test_shapes_kept_and_inputs_untouched():
    inputs = [torch.randn(3, 5, 7) for _ in range(6)]
    copies = [x.clone() for x in inputs]
    outs = simulate_all_reduce(inputs, 2)
    assert outs[0].shape == (3, 5, 7)
    assert all(torch.equal(a, b) for a, b in zip(inputs, copies))
    torch.testing.assert_close(outs[3], sum(copies), rtol=1e-5, atol=1e-5)


@given(n=st.integers(0, 10_000), parts=st.integers(1, 8), align=st.sampled_from([1, 4, 8, 16]))
def test_chunking_partitions(n, parts, align):
    c = Chunking(n, parts, align)
    covered = []
    for i in range(parts):
        lo, hi = c.bounds(i)
        assert lo <= hi and lo % align == 0 or lo == n
        covered.extend(range(lo, hi))
    assert covered == list(range(n))


@pytest.mark.parametrize("m", range(1, 17))
def test_rail_steps_pair_up(m):
    """Every send has a matching receive in the same slot, and each rail rank ends with the full sum."""
    rail = tuple(range(m))
    steps = {i: rail_steps(i, m, rail) for i in range(m)}
    sends = {(i, s.peers[0], s.slot) for i in range(m) for s in steps[i] if s.op in (SEND, EXCHANGE)}
    recvs = {(s.peers[0], i, s.slot) for i in range(m) for s in steps[i] if s.op in (RECV_ADD, RECV_COPY, EXCHANGE)}
    assert sends == recvs
    # symbolic run with sets of contributing nodes
    inputs = [torch.zeros(m, dtype=torch.float64).index_fill_(0, torch.tensor([i]), 1.0) for i in range(m)]
    outs = simulate_all_reduce(inputs, 1)
    for o in outs:
        assert torch.equal(o, torch.ones(m, dtype=torch.float64))


def test_errors():
    with pytest.raises(ValueError, match="multiple"):
        Topology(6, 4)
    with pytest.raises(ValueError, match="intra-node"):
        build_plan(Topology(4, 2), 10, "one_shot")
    with pytest.raises(ValueError, match="algorithm"):
        build_plan(Topology(4, 2), 10, "ring")
    with pytest.raises(ValueError, match="shape"):
        simulate_all_reduce([torch.randn(3), torch.randn(4)], 2)
    with pytest.raises(TypeError, match="dtype"):
        simulate_all_reduce([torch.ones(3, dtype=torch.int32)] * 2, 2)


def test_topology_env(monkeypatch):
    monkeypatch.setenv("FUSEDLIS_GPUS_PER_NODE", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    t = Topology(2)
    assert t.gpus_per_node == 1 and t.num_nodes == 2
    monkeypatch.delenv("FUSEDLIS_GPUS_PER_NODE")
    assert Topology(4).gpus_per_node == 2
    assert Topology(4).rail(1) == (1, 3)

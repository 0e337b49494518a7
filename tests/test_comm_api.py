"""AllReduce policy and DeviceAllReduce input checks (CPU, interpreter, one rank)."""

import pytest
import torch

from fusedlis.comm import Topology
from fusedlis.comm.allreduce import AllReduce, choose_algorithm, workspace_bytes
from fusedlis.comm.device import DeviceAllReduce
from fusedlis.comm.symmetric import SymmetricWorkspace


def test_choose_algorithm():
    one, two = Topology(2, 2), Topology(4, 2)
    assert choose_algorithm(8 << 10, one, "auto", 8 << 20, 256 << 10) == "one_shot"
    assert choose_algorithm(1 << 20, one, "auto", 8 << 20, 256 << 10) == "two_shot"
    assert choose_algorithm(1 << 20, two, "auto", 8 << 20, 256 << 10) == "nvrar"
    assert choose_algorithm(16 << 20, two, "auto", 8 << 20, 256 << 10) == "nccl"
    assert choose_algorithm(8 << 10, one, "two_shot", 8 << 20, 256 << 10) == "two_shot"
    assert choose_algorithm(8 << 10, one, "auto", 8 << 20, 256 << 10, device_ready=False) == "nccl"
    # the LL protocol up to ll_max_bytes, inside one node only
    assert choose_algorithm(8 << 10, one, "auto", 8 << 20, 256 << 10, ll_max_bytes=1 << 20) == "one_shot_ll"
    assert choose_algorithm(1 << 20, one, "auto", 8 << 20, 256 << 10, ll_max_bytes=1 << 20) == "two_shot_ll"
    assert choose_algorithm(2 << 20, one, "auto", 8 << 20, 256 << 10, ll_max_bytes=1 << 20) == "two_shot"
    assert choose_algorithm(8 << 10, two, "auto", 8 << 20, 256 << 10, ll_max_bytes=1 << 20) == "nvrar_ll"
    assert choose_algorithm(8 << 10, two, "nvrar", 8 << 20, 256 << 10, ll_max_bytes=1 << 20) == "nvrar_ll"
    assert choose_algorithm(8 << 10, one, "two_shot", 8 << 20, 256 << 10, ll_max_bytes=0) == "two_shot"
    assert choose_algorithm(2 << 20, two, "auto", 8 << 20, 256 << 10, ll_max_bytes=1 << 20) == "nvrar"


def test_bad_backend_and_single_rank_identity():
    with pytest.raises(ValueError, match="backend"):
        AllReduce(backend="ring")
    ar = AllReduce(dtype=torch.float32)  # no process group: one rank, identity
    x = torch.randn(10)
    assert ar.all_reduce(x) is x
    y = ar(x)
    assert torch.equal(y, x) and y is not x


def _ws(world=1):
    nbytes, flags = 1 << 18, 4096
    shared = torch.zeros(SymmetricWorkspace.shared_size(world, nbytes, flags), dtype=torch.uint8)
    return SymmetricWorkspace.from_shared(shared, 0, world, world, nbytes, flags)


@pytest.mark.parametrize("alg", ["one_shot", "two_shot", "nvrar"])
def test_device_single_rank_copies(alg):
    ws = _ws()
    ar = DeviceAllReduce(ws, 1000, torch.float32, block=64, max_blocks=4)
    x = torch.randn(999)
    out = torch.full_like(x, float("nan"))
    assert torch.equal(ar(x, out=out, algorithm=alg), x)
    assert int(ws.counters[ar.ch]) == 1  # the device sequence number advanced once


def test_device_input_checks():
    ws = _ws()
    ar = DeviceAllReduce(ws, 100, torch.float32, block=64)
    with pytest.raises(TypeError, match="dtype"):
        ar(torch.randn(10, dtype=torch.float64))
    with pytest.raises(ValueError, match="max_elems"):
        ar(torch.randn(101))
    with pytest.raises(ValueError, match="contiguous"):
        ar(torch.randn(10, 2).t())
    with pytest.raises(ValueError, match="algorithm"):
        ar(torch.randn(10), algorithm="ring")
    with pytest.raises(TypeError, match="dtype"):
        DeviceAllReduce(ws, 100, torch.int32)
    with pytest.raises(MemoryError):
        DeviceAllReduce(ws, 1 << 20, torch.float32)


def test_workspace_bytes_covers_allocations():
    for topo in (Topology(2, 2), Topology(2, 1), Topology(8, 4), Topology(12, 4)):
        for ll in (None, 0, 1000):
            need = workspace_bytes(topo, 12345, 2, ll_max_elems=ll)
            world = topo.world_size
            shared = torch.zeros(SymmetricWorkspace.shared_size(world, need, 8192), dtype=torch.uint8)
            ws = SymmetricWorkspace.from_shared(shared, 0, world, topo.gpus_per_node, need, 8192)
            DeviceAllReduce(ws, 12345, torch.bfloat16, topo, max_blocks=16, ll_max_elems=ll)  # must fit


def test_auto_follows_tuned_allreduce_choice(monkeypatch):
    """A tuned entry for this size/topology overrides the built-in crossover; other sizes keep the default."""
    import fusedlis.tuning as tuning
    from fusedlis.comm import AllReduce, Topology

    ar = AllReduce.__new__(AllReduce)
    ar.backend, ar.device_ar, ar.max_bytes, ar.one_shot_max_bytes = "auto", object(), 8 << 20, 256 << 10
    ar.topology, ar.world_size, ar.dtype, ar.ll_max_bytes = Topology(2, 2), 2, torch.bfloat16, 0
    seen = []

    def fake_lookup(op, key):
        seen.append((op, key))
        return {"algorithm": "two_shot"} if key["nbytes"] == 4096 else None

    monkeypatch.setattr(tuning, "lookup", fake_lookup)
    assert ar.algorithm_for(4096) == "two_shot"
    assert ar.algorithm_for(8192) == "one_shot"
    assert seen[0] == ("allreduce", {"nbytes": 4096, "dtype": torch.bfloat16, "world_size": 2, "topology": "1x2"})

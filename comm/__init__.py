"""Communication for tensor-parallel decode: plans, CPU executor, torch.distributed and NVSHMEM backends."""

from fusedlis.comm.allreduce import AllReduce
from fusedlis.comm.dist_backend import TorchDistBackend
from fusedlis.comm.gloo_driver import gloo_all_reduce
from fusedlis.comm.plan import Plan, RankPlan, Step, build_plan
from fusedlis.comm.simulate import simulate_all_reduce
from fusedlis.comm.symmetric import CommTimeoutError, SymmetricWorkspace
from fusedlis.comm.topology import Topology

__all__ = [
    "AllReduce", "CommTimeoutError", "Plan", "RankPlan", "Step", "SymmetricWorkspace", "Topology",
    "TorchDistBackend", "build_plan", "gloo_all_reduce", "simulate_all_reduce",
]

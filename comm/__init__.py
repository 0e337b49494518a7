"""Communication for tensor-parallel decode: plans, CPU executor, torch.distributed and NVSHMEM backends."""

from fusedlis.comm.dist_backend import TorchDistBackend
from fusedlis.comm.plan import Plan, RankPlan, Step, build_plan
from fusedlis.comm.simulate import simulate_all_reduce
from fusedlis.comm.topology import Topology

__all__ = ["TorchDistBackend", "Topology", "Plan", "RankPlan", "Step", "build_plan", "simulate_all_reduce"]

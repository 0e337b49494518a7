"""Communication for tensor-parallel decode: plans, CPU executor, torch.distributed and NVSHMEM backends."""

from fusedlis.comm.dist_backend import TorchDistBackend

__all__ = ["TorchDistBackend"]

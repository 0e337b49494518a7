"""`fusedlis info`: versions, GPUs, NVSHMEM availability and the (logical) node topology."""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("info", help="print versions, GPUs, NVSHMEM status and topology",
                       description="Print what fusedlis sees: versions, GPUs, whether NVSHMEM is usable, and "
                                   "the node topology (WORLD_SIZE, LOCAL_WORLD_SIZE, FUSEDLIS_GPUS_PER_NODE).")
    p.set_defaults(func=run)
    return p


def nvshmem_status() -> tuple[bool, str]:
    """(usable, why) for the NVSHMEM GPU backend, without initialising it."""
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA device"
    if importlib.util.find_spec("nvshmem") is None:
        return False, "nvshmem4py not installed (pip install 'fusedlis[gpu]'); all-reduce falls back to NCCL"
    if importlib.util.find_spec("cuda") is None:
        return False, "cuda-python not installed; all-reduce falls back to NCCL"
    return True, "nvshmem4py and cuda-python importable"


def run(args: argparse.Namespace) -> int:
    import torch
    import triton

    import fusedlis

    print(f"fusedlis {fusedlis.__version__}  python {platform.python_version()}  torch {torch.__version__}  "
          f"triton {triton.__version__}")
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        print(f"CUDA {torch.version.cuda}, {n} GPU(s):")
        for i in range(n):
            pr = torch.cuda.get_device_properties(i)
            print(f"  [{i}] {pr.name}, {pr.total_memory / 2**30:.0f} GiB, {pr.multi_processor_count} SMs, "
                  f"sm_{pr.major}{pr.minor}")
        if n > 1:
            peers = all(torch.cuda.can_device_access_peer(0, j) for j in range(1, n))
            print(f"  peer access from GPU 0 to all others: {peers}")
    else:
        print("CUDA: not available (CPU reference path; Triton kernels run only with TRITON_INTERPRET=1)")
    ok, why = nvshmem_status()
    print(f"NVSHMEM: {'usable' if ok else 'not usable'} ({why})")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = os.environ.get("LOCAL_WORLD_SIZE")
    gpn = os.environ.get("FUSEDLIS_GPUS_PER_NODE") or local or str(world)
    gpn_i = max(1, int(gpn))
    print(f"topology: world_size={world}, gpus_per_node={gpn_i}"
          f"{' (FUSEDLIS_GPUS_PER_NODE)' if os.environ.get('FUSEDLIS_GPUS_PER_NODE') else ''}, "
          f"nodes={-(-world // gpn_i)}")
    return 0

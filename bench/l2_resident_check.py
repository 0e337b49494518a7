"""Does a decode GEMM at M=1 run faster when its weight already sits in L2? `linear` and cuBLAS on one weight
called again and again (L2-warm) vs weights rotated through 512 MB (cold), median µs of CUDA-graph replays.

    python3 bench/l2_resident_check.py      # one GPU, seconds; prints one line per shape

The answer bounds what any L2 prefetch of weights could gain (bench/l2_prefetch.py): H200, 2026-11-22,
bench/results/l2_resident_check_NVIDIA-H200_2026-11-22.txt.
"""
import sys, torch
sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__file__), ".."))
from fusedlis.perfmodel.timing import time_graph
from fusedlis.triton_kernels import linear
dev = "cuda"
import triton
print(torch.cuda.get_device_name(0), "torch", torch.__version__, "triton", triton.__version__)
for name, N, K in (("8b-qkv", 3072, 4096), ("8b-o", 4096, 2048), ("8b-down-half", 4096, 3584)):
    x = torch.randn(1, K, dtype=torch.bfloat16, device=dev)
    y = torch.empty(1, N, dtype=torch.bfloat16, device=dev)
    ws = [torch.randn(N, K, dtype=torch.bfloat16, device=dev) for _ in range(max(4, 512 * 2**20 // (N * K * 2)))]
    it = iter(range(1 << 30))
    rot = time_graph(lambda: linear(x, ws[next(it) % len(ws)], out=y), 40, 20) * 1e6
    same = time_graph(lambda: linear(x, ws[0], out=y), 40, 20) * 1e6
    same_torch = time_graph(lambda: torch.matmul(x, ws[0].T, out=y), 40, 20) * 1e6
    rot_torch = time_graph(lambda: torch.matmul(x, ws[next(it) % len(ws)].T, out=y), 40, 20) * 1e6
    print(f"{name} {N*K*2/2**20:.0f} MB: linear rotated {rot:.2f} us, same weight (L2-warm) {same:.2f} us; "
          f"cuBLAS rotated {rot_torch:.2f}, same {same_torch:.2f}", flush=True)

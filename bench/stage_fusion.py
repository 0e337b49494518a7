"""What does a kernel boundary between two dependent decode GEMMs cost, and how much of it does one launch recover?

The measurement behind the "one launch per layer" design of docs/engine.md. Two GEMV stages at M=1,
y1 = W1 x and y2 = W2 y1, timed in CUDA graphs with weights rotated through more memory than L2 holds:

- `lib`: fusedlis `linear` twice (the engine's kernels and measured configs), for scale;
- `two`: this file's stage kernel launched twice (stage A, then stage B);
- `one`: the same code in one launch: stage-A programs first, then stage-B programs, each waiting (bounded) for
  the flags of the stage-A tiles that cover its K range;
- `one_pre`: `one`, with each stage-B program loading its first weight tile before it waits;
- `A`, `B`: each stage alone.

    python3 bench/stage_fusion.py --out bench/results        # one GPU, well under a minute

Writes stage_fusion_<device>_<date>.csv and .png (µs per pair, and the saving of each variant against `two`).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from fusedlis.comm.kernels import uses_gpu_clock, wait_budget  # noqa: E402
from fusedlis.perfmodel.timing import time_graph  # noqa: E402
from fusedlis.triton_kernels import linear  # noqa: E402
from fusedlis.triton_kernels.linear_allreduce import _wait_flags  # noqa: E402

# (name, N1, K1, N2): stage A is N1 x K1, stage B is N2 x N1 (its K is stage A's output)
PAIRS = (("8b-mlp-like", 7168, 4096, 4096), ("8b-attn-like", 2048, 4096, 4096))
BN1, BN2, BK, SPLIT2 = 32, 64, 128, 4


@triton.jit
def _stage_kernel(x_ptr, w1_ptr, y1_ptr, w2_ptr, y2_ptr, flag_ptr, seq_ptr, cnt_ptr, err_ptr,
                  N1, K1, N2, KPS2, n_a, n_b, budget,
                  BN1: tl.constexpr, BN2: tl.constexpr, BK: tl.constexpr, TILES_P2: tl.constexpr,
                  DO_A: tl.constexpr, DO_B: tl.constexpr, WAIT: tl.constexpr, PRELOAD: tl.constexpr,
                  GPU: tl.constexpr):
    pid = tl.program_id(0)
    seq = tl.load(seq_ptr)
    offs_k = tl.arange(0, BK)
    if DO_A:
        if pid < n_a:
            rows = pid * BN1 + tl.arange(0, BN1)
            acc = tl.zeros([BN1], dtype=tl.float32)
            for k in range(0, K1, BK):
                xk = tl.load(x_ptr + k + offs_k).to(tl.float32)
                w = tl.load(w1_ptr + rows[:, None].to(tl.int64) * K1 + (k + offs_k)[None, :]).to(tl.float32)
                acc += tl.sum(w * xk[None, :], axis=1)
            tl.store(y1_ptr + rows, acc.to(y1_ptr.dtype.element_ty))
            if WAIT:
                tl.debug_barrier()  # every thread's stores before the release
                tl.atomic_xchg(flag_ptr + pid, seq, sem="release", scope="gpu")
    bpid = pid - n_a if DO_A else pid
    if DO_B:
        if bpid >= 0:
            nt2 = tl.cdiv(N2, BN2)
            ks = bpid // nt2
            rows2 = (bpid % nt2) * BN2 + tl.arange(0, BN2)
            k_lo = ks * KPS2
            w_ptrs = w2_ptr + rows2[:, None].to(tl.int64) * N1 + (k_lo + offs_k)[None, :]
            if PRELOAD:
                w_first = tl.load(w_ptrs)  # independent of stage A: in flight while we wait
            if WAIT:
                t = tl.arange(0, TILES_P2)
                _wait_flags(flag_ptr + k_lo // BN1 + t, t < KPS2 // BN1, seq, budget, err_ptr, 0, GPU)
            x0 = tl.load(y1_ptr + k_lo + offs_k, cache_modifier=".cg").to(tl.float32)
            if PRELOAD:
                acc2 = tl.sum(w_first.to(tl.float32) * x0[None, :], axis=1)
            else:
                acc2 = tl.sum(tl.load(w_ptrs).to(tl.float32) * x0[None, :], axis=1)
            for k in range(BK, KPS2, BK):
                xk = tl.load(y1_ptr + k_lo + k + offs_k, cache_modifier=".cg").to(tl.float32)
                acc2 += tl.sum(tl.load(w_ptrs + k).to(tl.float32) * xk[None, :], axis=1)
            tl.store(y2_ptr + ks * N2 + rows2, acc2)
            if WAIT:
                # the last stage-B program advances the step for the next call (all programs have read it)
                tl.debug_barrier()
                if tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu") == n_b - 1:
                    tl.store(cnt_ptr, 0)
                    tl.store(seq_ptr, seq + 1)


class Pair:
    """Buffers and launchers of one (stage A, stage B) pair on `device`, with `copies` weight copies."""

    def __init__(self, N1: int, K1: int, N2: int, device, dtype=torch.bfloat16, copies: int = 1) -> None:
        K2 = N1
        self.kps2 = K2 // SPLIT2
        if N1 % BN1 or K1 % BK or N2 % BN2 or self.kps2 % BK or self.kps2 % BN1:
            raise ValueError(f"shapes must be whole tiles: N1={N1} K1={K1} N2={N2}")
        self.N1, self.K1, self.N2 = N1, K1, N2
        self.n_a, self.n_b = N1 // BN1, (N2 // BN2) * SPLIT2
        self.w1s = [torch.randn(N1, K1, device=device).to(dtype) * K1 ** -0.5 for _ in range(copies)]
        self.w2s = [torch.randn(N2, K2, device=device).to(dtype) * K2 ** -0.5 for _ in range(copies)]
        self.x = torch.randn(K1, device=device).to(dtype)
        self.y1 = torch.empty(N1, device=device, dtype=dtype)
        self.y2 = torch.empty(SPLIT2, N2, device=device, dtype=torch.float32)
        self.flags = torch.zeros(self.n_a, device=device, dtype=torch.int32)
        self.seq = torch.ones(1, device=device, dtype=torch.int32)
        self.cnt = torch.zeros(1, device=device, dtype=torch.int32)
        self.err = torch.zeros(4, device=device, dtype=torch.int32)
        self.gpu = uses_gpu_clock(torch.device(device))
        self.budget = wait_budget(self.gpu, 100_000)
        self.common = dict(BN1=BN1, BN2=BN2, BK=BK, TILES_P2=triton.next_power_of_2(self.kps2 // BN1), GPU=self.gpu)

    def launch(self, i: int, variant: str) -> None:
        """Run `variant` ("A", "B", "two", "one", "one_pre", "lib") on weight copy `i`."""
        w1, w2 = self.w1s[i], self.w2s[i]
        if variant == "lib":
            linear(linear(self.x.view(1, -1), w1), w2)
            return
        stages = {"A": [(True, False)], "B": [(False, True)], "two": [(True, False), (False, True)],
                  "one": [(True, True)], "one_pre": [(True, True)]}[variant]
        for do_a, do_b in stages:
            grid = (self.n_a if do_a else 0) + (self.n_b if do_b else 0)
            _stage_kernel[(grid,)](self.x, w1, self.y1, w2, self.y2, self.flags, self.seq, self.cnt, self.err,
                                   self.N1, self.K1, self.N2, self.kps2, self.n_a, self.n_b, self.budget,
                                   DO_A=do_a, DO_B=do_b, WAIT=do_a and do_b, PRELOAD=variant == "one_pre",
                                   **self.common)

    def check(self, variant: str, i: int = 0) -> float:
        """Relative error of stage B's output after `variant` against fp32 torch (y1 rounded as the kernel
        stores it); NaN-poisons the outputs first. Raises if a wait timed out."""
        self.y1.fill_(float("nan"))
        self.y2.fill_(float("nan"))
        self.launch(i, variant)
        if int(self.err[0]):
            raise RuntimeError(f"stage B timed out waiting for stage A: {self.err.tolist()}")
        w1, w2 = self.w1s[i].double(), self.w2s[i].double()
        ref = w2 @ (w1 @ self.x.double()).to(self.y1.dtype).double()
        got = self.y2.double().sum(0)
        return ((got - ref).norm() / ref.norm()).item()


VARIANTS = ("A", "B", "two", "one", "one_pre", "lib")


def run(args) -> list[dict]:
    dev = torch.device("cuda")
    rows = []
    for name, N1, K1, N2 in PAIRS:
        bytes_pair = (N1 * K1 + N2 * N1) * 2
        pair = Pair(N1, K1, N2, dev, copies=max(4, -(-args.rotate_mb * 2**20 // bytes_pair)))
        for v in ("two", "one", "one_pre"):
            rel = pair.check(v)
            if not rel < 1e-2:
                raise SystemExit(f"{name} {v}: rel err {rel:.2e}")
        res = {}
        for v in VARIANTS:
            it = iter(range(1 << 30))
            res[v] = time_graph(lambda v=v: pair.launch(next(it) % len(pair.w1s), v), len(pair.w1s) * 4,
                                args.reps) * 1e6
        if int(pair.err[0]):
            raise SystemExit(f"{name}: a wait timed out during timing: {pair.err.tolist()}")
        for v, us in res.items():
            rows.append(dict(pair=name, N1=N1, K1=K1, N2=N2, weight_mb=round(bytes_pair / 2**20, 1), variant=v,
                             us=round(us, 2), saved_vs_two_us=round(res["two"] - us, 2) if v.startswith("one")
                             else ""))
            print(rows[-1], flush=True)
        del pair
        torch.cuda.empty_cache()
    return rows


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = list(dict.fromkeys(r["pair"] for r in rows))
    fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 3.5), squeeze=False)
    for ax, p in zip(axes[0], pairs):
        rs = [r for r in rows if r["pair"] == p]
        ax.bar([r["variant"] for r in rs], [r["us"] for r in rs], color="tab:blue")
        ax.set_title(p, fontsize=9)
        ax.set_ylabel("µs per call (CUDA graph median)")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench/results")
    p.add_argument("--rotate-mb", type=int, default=1024, help="weight copies cycled through (>> L2)")
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    name = torch.cuda.get_device_name(0)
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    rows = run(args)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"stage_fusion_{name.replace(' ', '-')}_{date}")
    meta = f"# device: {name}; torch {torch.__version__}; triton {triton.__version__}; date {date}\n"
    with open(stem + ".csv", "w", newline="") as f:
        f.write(meta)
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot(rows, stem + ".png", meta[2:].strip())
    print("wrote", stem + ".csv")


if __name__ == "__main__":
    main()

"""What does a kernel boundary between two dependent decode GEMMs cost, and how much of it does one launch recover?

The measurement behind the "one launch per layer" design of docs/engine.md. Two GEMV stages at M=1,
y1 = W1 x and y2 = W2 y1, timed in CUDA graphs with weights rotated through more memory than L2 holds:

- `lib`: fusedlis `linear` twice (the engine's kernels and measured configs), for scale;
- `two`: this file's stage kernel launched twice (stage A, then stage B);
- `one`: the same code in one launch: stage-A programs first, then stage-B programs, each waiting (bounded) for
  the flags of the stage-A tiles that cover its K range;
- `one_pre`: `one`, with each stage-B program loading its first weight tile before it waits;
- `persist`, `persist_pre`: one launch of a fixed grid (2 programs per SM) whose programs take the items in order,
  so that no waiting stage-B program holds a slot a stage-A item still needs;
- `A`, `B`: each stage alone.

    python3 bench/stage_fusion.py --out bench/results        # one GPU, well under a minute

Writes stage_fusion_<device>_<date>.csv and .png (µs per pair, and the saving of each variant against `two`).
(bench/results/stage_fusion_v1_* is an earlier run of the same tile code before the persistent variants were
added; its other variants agree with the final run within 0.5 µs.)
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from fusedlis.comm.kernels import uses_gpu_clock, wait_budget  # noqa: E402
from _results import write_result_csv  # noqa: E402
from fusedlis.perfmodel.timing import time_graph  # noqa: E402
from fusedlis.triton_kernels import linear  # noqa: E402
from fusedlis.triton_kernels.linear_allreduce import _wait_flags  # noqa: E402

# (name, N1, K1, N2): stage A is N1 x K1, stage B is N2 x N1 (its K is stage A's output)
PAIRS = (("8b-mlp-like", 7168, 4096, 4096), ("8b-attn-like", 2048, 4096, 4096))
# tiles as fusedlis `linear` uses at M=1 (tl.dot on 16 padded rows), split-K in both stages
BN1, BN2, BK, SPLIT1, SPLIT2 = 32, 64, 128, 2, 4


@triton.jit
def _gemv_tile(x_ptr, x_stride_s, NSX: tl.constexpr, w_ptr, ldw, rows, k_lo, KPS,
               BN: tl.constexpr, BK: tl.constexpr, W_FIRST, PRELOADED: tl.constexpr, X_CG: tl.constexpr):
    """fp32 [BN] = W[rows, k_lo:k_lo+KPS] @ x[k_lo:...], x being the sum of NSX fp32/bf16 partial rows of
    stride x_stride_s; tl.dot on 16 rows of which row 0 is x. W_FIRST: the first weight tile, when PRELOADED."""
    offs_k = tl.arange(0, BK)
    row16 = tl.arange(0, 16)
    acc = tl.zeros([16, BN], dtype=tl.float32)
    w_ptrs = w_ptr + rows[:, None].to(tl.int64) * ldw + (k_lo + offs_k)[None, :]
    for k in range(0, KPS, BK):
        xs = tl.zeros([16, BK], dtype=tl.float32)
        for s in tl.static_range(NSX):
            if X_CG:
                xs += tl.load(x_ptr + s * x_stride_s + k_lo + k + offs_k[None, :] + row16[:, None] * 0,
                              mask=(row16 == 0)[:, None], other=0.0, cache_modifier=".cg").to(tl.float32)
            else:
                xs += tl.load(x_ptr + s * x_stride_s + k_lo + k + offs_k[None, :] + row16[:, None] * 0,
                              mask=(row16 == 0)[:, None], other=0.0).to(tl.float32)
        if PRELOADED:
            later = (tl.zeros([BN, BK], dtype=tl.int32) + k) > 0
            w = tl.where(later, tl.load(w_ptrs + k, mask=later), W_FIRST)
        else:
            w = tl.load(w_ptrs + k)
        acc = tl.dot(xs.to(w.dtype), tl.trans(w), acc)
    return tl.sum(acc, axis=0)  # rows 1-15 are zero


@triton.jit
def _stage_a_item(item, seq, x_ptr, w1_ptr, y1_ptr, flag_ptr, N1, K1, KPS1,
                  BN1: tl.constexpr, BK: tl.constexpr, WAIT: tl.constexpr):
    nt1 = N1 // BN1
    ks1 = item // nt1
    rows = (item % nt1) * BN1 + tl.arange(0, BN1)
    y = _gemv_tile(x_ptr, 0, 1, w1_ptr, K1, rows, ks1 * KPS1, KPS1, BN1, BK, 0.0, False, False)
    tl.store(y1_ptr + ks1 * N1 + rows, y)
    if WAIT:
        tl.debug_barrier()  # every thread's stores before the release
        tl.atomic_xchg(flag_ptr + item, seq, sem="release", scope="gpu")


@triton.jit
def _stage_b_item(item, seq, y1_ptr, w2_ptr, y2_ptr, flag_ptr, cnt_ptr, seq_ptr, err_ptr, N1, N2, KPS2, n_b,
                  budget, BN1: tl.constexpr, BN2: tl.constexpr, BK: tl.constexpr, SPLIT1: tl.constexpr,
                  TILES_P2: tl.constexpr, WAIT: tl.constexpr, PRELOAD: tl.constexpr, GPU: tl.constexpr):
    nt2 = N2 // BN2
    ks = item // nt2
    rows2 = (item % nt2) * BN2 + tl.arange(0, BN2)
    k_lo = ks * KPS2
    w_first = tl.zeros([BN2, BK], dtype=w2_ptr.dtype.element_ty)
    if PRELOAD:  # independent of stage A: in flight while this program waits
        w_first = tl.load(w2_ptr + rows2[:, None].to(tl.int64) * N1 + (k_lo + tl.arange(0, BK))[None, :])
    if WAIT:
        # the stage-A tiles of every split that cover [k_lo, k_lo + KPS2)
        j = tl.arange(0, TILES_P2)
        per = KPS2 // BN1
        tiles = (j // per) * (N1 // BN1) + k_lo // BN1 + j % per
        _wait_flags(flag_ptr + tiles, j < per * SPLIT1, seq, budget, err_ptr, 0, GPU)
    y2 = _gemv_tile(y1_ptr, N1, SPLIT1, w2_ptr, N1, rows2, k_lo, KPS2, BN2, BK, w_first, PRELOAD, True)
    tl.store(y2_ptr + ks * N2 + rows2, y2)
    if WAIT:
        # the last stage-B item advances the step for the next call (every program has read it by then)
        tl.debug_barrier()
        if tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu") == n_b - 1:
            tl.store(cnt_ptr, 0)
            tl.store(seq_ptr, seq + 1)


@triton.jit
def _stage_kernel(x_ptr, w1_ptr, y1_ptr, w2_ptr, y2_ptr, flag_ptr, seq_ptr, cnt_ptr, err_ptr,
                  N1, K1, N2, KPS1, KPS2, n_a, n_b, budget,
                  BN1: tl.constexpr, BN2: tl.constexpr, BK: tl.constexpr, SPLIT1: tl.constexpr,
                  TILES_P2: tl.constexpr, DO_A: tl.constexpr, DO_B: tl.constexpr, WAIT: tl.constexpr,
                  PRELOAD: tl.constexpr, GPU: tl.constexpr, PERSIST: tl.constexpr = False):
    # Stage A writes unsummed split-K partials y1[SPLIT1, N1] (fp32); stage B sums them as it reads its x.
    # One program per item; PERSIST: a fixed grid whose programs take items pid, pid + grid, ... in order, so
    # a program reaches a stage-B item only when no stage-A item is left to start.
    pid = tl.program_id(0)
    seq = tl.load(seq_ptr)
    if PERSIST:
        for item in range(pid, n_a + n_b, tl.num_programs(0)):
            if item < n_a:
                _stage_a_item(item, seq, x_ptr, w1_ptr, y1_ptr, flag_ptr, N1, K1, KPS1, BN1, BK, WAIT)
            else:
                _stage_b_item(item - n_a, seq, y1_ptr, w2_ptr, y2_ptr, flag_ptr, cnt_ptr, seq_ptr, err_ptr, N1,
                              N2, KPS2, n_b, budget, BN1, BN2, BK, SPLIT1, TILES_P2, WAIT, PRELOAD, GPU)
    else:
        if DO_A:
            if pid < n_a:
                _stage_a_item(pid, seq, x_ptr, w1_ptr, y1_ptr, flag_ptr, N1, K1, KPS1, BN1, BK, WAIT)
        bpid = pid - n_a if DO_A else pid
        if DO_B:
            if bpid >= 0:
                _stage_b_item(bpid, seq, y1_ptr, w2_ptr, y2_ptr, flag_ptr, cnt_ptr, seq_ptr, err_ptr, N1, N2,
                              KPS2, n_b, budget, BN1, BN2, BK, SPLIT1, TILES_P2, WAIT, PRELOAD, GPU)


class Pair:
    """Buffers and launchers of one (stage A, stage B) pair on `device`, with `copies` weight copies."""

    def __init__(self, N1: int, K1: int, N2: int, device, dtype=torch.bfloat16, copies: int = 1) -> None:
        K2 = N1
        self.kps1, self.kps2 = K1 // SPLIT1, K2 // SPLIT2
        if (N1 % BN1 or N2 % BN2 or K1 % (SPLIT1 * BK) or K2 % (SPLIT2 * BK) or self.kps2 % BN1):
            raise ValueError(f"shapes must be whole tiles: N1={N1} K1={K1} N2={N2}")
        self.N1, self.K1, self.N2 = N1, K1, N2
        self.n_a, self.n_b = (N1 // BN1) * SPLIT1, (N2 // BN2) * SPLIT2
        self.w1s = [torch.randn(N1, K1, device=device).to(dtype) * K1 ** -0.5 for _ in range(copies)]
        self.w2s = [torch.randn(N2, K2, device=device).to(dtype) * K2 ** -0.5 for _ in range(copies)]
        self.x = torch.randn(K1, device=device).to(dtype)
        self.y1 = torch.empty(SPLIT1, N1, device=device, dtype=torch.float32)
        self.y2 = torch.empty(SPLIT2, N2, device=device, dtype=torch.float32)
        self.flags = torch.zeros(self.n_a, device=device, dtype=torch.int32)
        self.seq = torch.ones(1, device=device, dtype=torch.int32)
        self.cnt = torch.zeros(1, device=device, dtype=torch.int32)
        self.err = torch.zeros(4, device=device, dtype=torch.int32)
        self.gpu = uses_gpu_clock(torch.device(device))
        # programs resident at once (2 per SM with these tiles); the interpreter runs programs one after the
        # other, so there only a single program can take items in order without waiting on a later one
        self.persist_grid = 2 * torch.cuda.get_device_properties(device).multi_processor_count if self.gpu else 1
        self.budget = wait_budget(self.gpu, 2_000)
        self.common = dict(BN1=BN1, BN2=BN2, BK=BK, SPLIT1=SPLIT1,
                           TILES_P2=triton.next_power_of_2(SPLIT1 * self.kps2 // BN1), GPU=self.gpu)

    def launch(self, i: int, variant: str) -> None:
        """Run `variant` (one of VARIANTS) on weight copy `i`."""
        w1, w2 = self.w1s[i], self.w2s[i]
        if variant == "lib":
            linear(linear(self.x.view(1, -1), w1), w2)
            return
        stages = {"A": [(True, False)], "B": [(False, True)], "two": [(True, False), (False, True)]}.get(
            variant, [(True, True)])
        persist = variant.startswith("persist")
        for do_a, do_b in stages:
            grid = (self.n_a if do_a else 0) + (self.n_b if do_b else 0)
            if persist:
                grid = min(grid, self.persist_grid)
            _stage_kernel[(grid,)](self.x, w1, self.y1, w2, self.y2, self.flags, self.seq, self.cnt, self.err,
                                   self.N1, self.K1, self.N2, self.kps1, self.kps2, self.n_a, self.n_b,
                                   self.budget, DO_A=do_a, DO_B=do_b, WAIT=do_a and do_b,
                                   PRELOAD=variant.endswith("_pre"), PERSIST=persist, **self.common,
                                   num_warps=4, num_stages=3)

    def check(self, variant: str, i: int = 0) -> float:
        """Relative error of stage B's output after `variant` against fp32 torch (y1 rounded as the kernel
        stores it); NaN-poisons the outputs first. Raises if a wait timed out."""
        self.y1.fill_(float("nan"))
        self.y2.fill_(float("nan"))
        self.launch(i, variant)
        if int(self.err[0]):
            raise RuntimeError(f"stage B timed out waiting for stage A: {self.err.tolist()}")
        w1, w2 = self.w1s[i].double(), self.w2s[i].double()
        ref = w2 @ (w1 @ self.x.double()).to(self.x.dtype).double()
        got = self.y2.double().sum(0)
        return ((got - ref).norm() / ref.norm()).item()


VARIANTS = ("A", "B", "two", "one", "one_pre", "persist", "persist_pre", "lib")


def run(args) -> list[dict]:
    dev = torch.device("cuda")
    rows = []
    for name, N1, K1, N2 in PAIRS:
        bytes_pair = (N1 * K1 + N2 * N1) * 2
        pair = Pair(N1, K1, N2, dev, copies=max(4, -(-args.rotate_mb * 2**20 // bytes_pair)))
        for v in ("two", "one", "one_pre", "persist", "persist_pre"):
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
            fused = v.startswith(("one", "persist"))
            rows.append(dict(pair=name, N1=N1, K1=K1, N2=N2, weight_mb=round(bytes_pair / 2**20, 1), variant=v,
                             us=round(us, 2), saved_vs_two_us=round(res["two"] - us, 2) if fused else ""))
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
    rows = run(args)
    stem, meta = write_result_csv(args.out, "stage_fusion", rows, "")
    plot(rows, stem + ".png", meta)
    print("wrote", stem + ".csv")


if __name__ == "__main__":
    main()

"""Decode GEMM `y = x @ w.T` for small M, with split-K and fused epilogues (residual add, SwiGLU).

Decode GEMMs (M <= 256 rows of activations against a [N, K] weight) are bound by reading the weight
from HBM once. The kernel tiles N and splits K across programs so that enough programs are in flight to
saturate HBM even when N is small; each program streams its [BLOCK_N, BLOCK_K] weight tiles with
16-byte vector loads along K and accumulates in fp32. Two inner products are offered:

* ``USE_DOT=False`` (GEMV style): elementwise multiply-accumulate into a [BLOCK_M, BLOCK_N, BLOCK_K]
  fp32 register tile, reduced over K once at the end; best for M of 1-4.
* ``USE_DOT=True``: ``tl.dot`` on [BLOCK_M>=16, BLOCK_K] x [BLOCK_K, BLOCK_N] tiles (tensor cores).

With SPLIT_K > 1, each program writes its fp32 partial tile to a workspace and bumps a per-tile
arrival counter; the last program to arrive sums the partials in split order (deterministic), applies
the epilogue and resets the counter, so the whole op is one launch (no memset, no second kernel).
The workspace is per device and shared: do not run two split-K launches concurrently on different
streams of one device.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fusedlis import tuning
from fusedlis._env import env_flag
from fusedlis.triton_kernels._pdl import pdl_launch, pdl_launch_dependents, pdl_wait, prefetch_weight_lines

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _linear_kernel(
    x_ptr, w_ptr, y_ptr, res_ptr, ws_ptr, cnt_ptr,
    M, N, K, K_PER_SPLIT,
    stride_xm, stride_wn, stride_ym, stride_rm,
    SPLIT_K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_SPLIT: tl.constexpr, USE_DOT: tl.constexpr, EVEN_K: tl.constexpr,
    SWIGLU: tl.constexpr, HAS_RES: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr = False,
    PF_LINES: tl.constexpr = 0, LAUNCH_AT=-1, EVICT_W: tl.constexpr = False,
):
    # M-tiles vary fastest so that programs sharing a weight tile run together (weight read once via L2).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_lo = pid_k * K_PER_SPLIT

    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + (k_lo + offs_k)[None, :]
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + (k_lo + offs_k)[None, :]
    if SWIGLU:
        u_ptrs = w_ptr + (offs_n + N)[:, None].to(tl.int64) * stride_wn + (k_lo + offs_k)[None, :]

    if PF_LINES > 0:
        # The weights do not depend on the previous kernel: start pulling this program's first tiles into L2
        # while that kernel drains (PDL), one prefetch per 128-byte line.
        pf_n = tl.minimum(offs_n, N - 1).to(tl.int64)
        prefetch_weight_lines(w_ptr, pf_n, k_lo, K, stride_wn, PF_LINES)
        if SWIGLU:
            prefetch_weight_lines(w_ptr, pf_n + N, k_lo, K, stride_wn, PF_LINES)
    # LAUNCH_AT >= 0: let the next kernel launch only at that K step of this program, not right after the wait
    pdl_wait(PDL, LAUNCH_AT < 0)
    W_EVICT: tl.constexpr = "evict_first" if EVICT_W else ""  # weights are read once: keep L2 for activations

    if USE_DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if SWIGLU:
            acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc3 = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
        if SWIGLU:
            acc3_u = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)

    for kk in range(0, K_PER_SPLIT, BLOCK_K):
        if PDL:
            if kk == LAUNCH_AT * BLOCK_K:
                pdl_launch_dependents(PDL)
        if EVEN_K:
            x = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=mask_n[:, None], other=0.0, eviction_policy=W_EVICT)
            if SWIGLU:
                u = tl.load(u_ptrs, mask=mask_n[:, None], other=0.0, eviction_policy=W_EVICT)
        else:
            mask_k = (k_lo + kk + offs_k) < K
            x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0, eviction_policy=W_EVICT)
            if SWIGLU:
                u = tl.load(u_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0, eviction_policy=W_EVICT)
        if USE_DOT:
            if IEEE:
                acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
                if SWIGLU:
                    acc_u = tl.dot(x, tl.trans(u), acc_u, input_precision="ieee")
            else:
                acc = tl.dot(x.to(w.dtype), tl.trans(w), acc)
                if SWIGLU:
                    acc_u = tl.dot(x.to(u.dtype), tl.trans(u), acc_u)
        else:
            xf = x.to(tl.float32)[:, None, :]
            acc3 += xf * w.to(tl.float32)[None, :, :]
            if SWIGLU:
                acc3_u += xf * u.to(tl.float32)[None, :, :]
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
        if SWIGLU:
            u_ptrs += BLOCK_K

    if not USE_DOT:
        acc = tl.sum(acc3, axis=2)
        if SWIGLU:
            acc_u = tl.sum(acc3_u, axis=2)

    mask_mn = mask_m[:, None] & mask_n[None, :]
    if HAS_SPLIT:
        # Partials: [SPLIT_K, M, N] (gate) then, for SwiGLU, [SPLIT_K, M, N] (up) after it.
        MN = M * N
        ws_off = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        tl.store(ws_ptr + pid_k * MN + ws_off, acc, mask=mask_mn)
        if SWIGLU:
            tl.store(ws_ptr + (SPLIT_K + pid_k) * MN + ws_off, acc_u, mask=mask_mn)
        # All threads' partial stores must be issued before the (single-thread) release atomic.
        tl.debug_barrier()
        tile = pid_n * tl.num_programs(0) + pid_m
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(SPLIT_K):
                acc += tl.load(ws_ptr + s * MN + ws_off, mask=mask_mn, other=0.0, cache_modifier=".cg")
            if SWIGLU:
                acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for s in range(SPLIT_K):
                    acc_u += tl.load(ws_ptr + (SPLIT_K + s) * MN + ws_off, mask=mask_mn, other=0.0,
                                     cache_modifier=".cg")
            _linear_epilogue(acc, acc_u if SWIGLU else acc, y_ptr, res_ptr, offs_m, offs_n, mask_mn,
                             stride_ym, stride_rm, SWIGLU, HAS_RES)
            tl.atomic_xchg(cnt_ptr + tile, 0)
    else:
        _linear_epilogue(acc, acc_u if SWIGLU else acc, y_ptr, res_ptr, offs_m, offs_n, mask_mn,
                         stride_ym, stride_rm, SWIGLU, HAS_RES)


@triton.jit
def _linear_epilogue(acc, acc_u, y_ptr, res_ptr, offs_m, offs_n, mask_mn, stride_ym, stride_rm,
                     SWIGLU: tl.constexpr, HAS_RES: tl.constexpr):
    if SWIGLU:
        acc = acc / (1.0 + tl.exp(-acc)) * acc_u
    if HAS_RES:
        r = tl.load(res_ptr + offs_m[:, None].to(tl.int64) * stride_rm + offs_n[None, :], mask=mask_mn)
        acc += r.to(tl.float32)
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_mn)


@triton.jit
def _linear_rows_kernel(x_ptr, w_ptr, y_ptr, res_ptr, N, K, stride_wn, R: tl.constexpr, BK: tl.constexpr,
                        SWIGLU: tl.constexpr, HAS_RES: tl.constexpr):
    """M = 1: program p owns R whole output rows and streams their weight rows front to back (with SwiGLU also
    the R matching up rows), so the weight stream is as flat as a plain read: in a decode step's chain of 129
    GEMVs on H200 this took 2.049 ms where the tiled kernel took 2.194 (bench/launch_floor.py)."""
    rows = tl.program_id(0) * R + tl.arange(0, R)
    rmask = rows < N
    w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_wn
    acc = tl.zeros([R, BK], dtype=tl.float32)
    if SWIGLU:
        u_rows = w_ptr + (rows + N)[:, None].to(tl.int64) * stride_wn
        acc_u = tl.zeros([R, BK], dtype=tl.float32)
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        cmask = cols < K
        x = tl.load(x_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        m2 = rmask[:, None] & cmask[None, :]
        acc += tl.load(w_rows + cols[None, :], mask=m2, other=0.0).to(tl.float32) * x
        if SWIGLU:
            acc_u += tl.load(u_rows + cols[None, :], mask=m2, other=0.0).to(tl.float32) * x
    y = tl.sum(acc, axis=1)
    if SWIGLU:
        y = y / (1.0 + tl.exp(-y)) * tl.sum(acc_u, axis=1)
    if HAS_RES:
        y += tl.load(res_ptr + rows, mask=rmask).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=rmask)


def rows_config(K: int, activation: str | None = None) -> dict:
    """The flat-row GEMV config `linear` uses at M = 1 on GPUs (picks of bench/launch_floor.py on H200: 2 rows of
    2048-column steps with 8 warps up to K = 4096, 4096-column steps with 4 warps above; SwiGLU streams the
    gate and the up row of each output, so 1 output row per program)."""
    bk, warps = (2048, 8) if K <= 4096 else (4096, 4)
    return {"backend": "rows", "ROWS": 1 if activation == "swiglu" else 2, "BLOCK_K": bk, "num_warps": warps}


def _rows_enabled(x: torch.Tensor) -> bool:
    return x.shape[0] == 1 and x.device.type == "cuda" and env_flag("FUSEDLIS_LINEAR_ROWS", True)


# ----------------------------------------------------------------------------------------------------
# Configs

def _num_sms(device: torch.device | None = None) -> int:
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def linear_key(M: int, N: int, K: int, dtype: torch.dtype, activation: str | None, residual: bool) -> dict:
    """Shape key passed to `fusedlis.tuning.lookup("linear", key)`. N is the weight's row count."""
    return {"M": M, "N": N, "K": K, "dtype": dtype, "activation": activation or "none",
            "residual": bool(residual)}


def _pick_split(tiles: int, K: int, block_k: int, M: int, N: int, sms: int) -> int:
    max_split = max(1, K // (2 * block_k))  # keep >= 2 K-iterations per program
    split = 1
    # ~1.2 programs per SM: on H200 the fastest measured configs ran 160-450 programs; more splits
    # only added partial-tile traffic (bench/results/kernels_linear_NVIDIA-H200_2026-11-22.csv).
    while split * 2 <= max_split and tiles * split < 1.2 * sms:
        split *= 2
    # Partials cost 8 * SPLIT_K * M * N bytes (write + read); keep them small next to the weight bytes.
    while split > 1 and 8 * split * M * N > 0.25 * N * K * 2:
        split //= 2
    return split


def linear_default_config(key: dict) -> dict:
    """Heuristic config for `key` (see `linear_key`), used when neither the tuner nor the measured table
    has an entry.

    Tensor-core tiles for every M: their weight loads are software-pipelined through shared memory
    (cp.async), which the GEMV tiles are not. Tile shapes follow the fastest configs measured on H200
    (16 KB weight stages: 64x128 with 4 stages, or 32x256 with 3 stages for K >= 8192).
    """
    M, N, K = int(key["M"]), int(key["N"]), int(key["K"])
    n_cols = N // 2 if key.get("activation") == "swiglu" else N
    sms = int(key.get("sms", 132))
    bm = min(64, max(16, _pow2(M)))
    if bm >= 64:
        cfg = {"USE_DOT": True, "BLOCK_M": bm, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4}
    elif K >= 8192 or bm == 32:
        cfg = {"USE_DOT": True, "BLOCK_M": bm, "BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 4, "num_stages": 3}
    else:
        cfg = {"USE_DOT": True, "BLOCK_M": bm, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4}
    if key.get("activation") == "swiglu" and cfg["BLOCK_N"] > 16:
        cfg["BLOCK_N"] //= 2  # each program streams gate AND up rows: keep the bytes per stage
    tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(n_cols, cfg["BLOCK_N"])
    cfg["SPLIT_K"] = _pick_split(tiles, K, cfg["BLOCK_K"], M, N, sms)
    return cfg


_MEASURED: dict | None = None


def measured_config(M: int, N: int, K: int, dtype: torch.dtype, activation: str | None,
                    device: torch.device) -> dict | None:
    """Config measured fastest on this GPU model for (N, K) at the smallest measured M >= `M`, from
    `linear_measured.json` (bench/kernels.py output; `{"backend": "torch"}` where cuBLAS won).

    Only bf16 on a CUDA device whose name is in the table; None otherwise. SwiGLU uses its own entries
    (`activation=swiglu`, measured with the epilogue; `{"backend": "torch"}` = cuBLAS then silu * up) where the
    table has them, else the plain GEMM's entry for the merged weight with BLOCK_N halved (a program streams
    gate and up rows, so the bytes per stage stay the same), never cuBLAS.
    """
    global _MEASURED
    if device.type != "cuda" or dtype != torch.bfloat16 or activation not in (None, "swiglu"):
        return None
    if _MEASURED is None:
        from fusedlis.triton_kernels._measured import read_measured

        _MEASURED = {}
        for dev, f, cfg in read_measured("linear_measured.json"):
            if f.get("activation") in ("none", "swiglu") and f.get("dtype") == "bfloat16":
                _MEASURED.setdefault((dev, int(f["N"]), int(f["K"]), f["activation"]), []).append(
                    (int(f["M"]), cfg))
        for v in _MEASURED.values():
            v.sort(key=lambda mc: mc[0])
    name = torch.cuda.get_device_name(device)
    if activation == "swiglu":  # an entry measured with the SwiGLU epilogue itself wins (cuBLAS allowed)
        for m, cfg in _MEASURED.get((name, N, K, "swiglu"), ()):
            if m >= M:
                return dict(cfg)
    entries = _MEASURED.get((name, N, K, "none"))
    if not entries:
        return None
    for m, cfg in entries:
        if m >= M:
            cfg = dict(cfg)
            if activation == "swiglu":
                if cfg.get("backend") == "torch" or cfg["BLOCK_N"] < 32:
                    return None
                cfg["BLOCK_N"] //= 2
            return cfg
    return None


def linear_configs(key: dict) -> list[dict]:
    """The search space the tuner sweeps for `key` (always contains the default).

    Tile shapes x {half, default, double} split-K. GEMV tiles only for M <= 4 (their fp32 register
    tile grows with BLOCK_M); tensor-core tiles with BLOCK_M = next power of two >= M (16..128).
    """
    M, N, K = int(key["M"]), int(key["N"]), int(key["K"])
    n_cols = N // 2 if key.get("activation") == "swiglu" else N
    sms = int(key.get("sms", 132))
    shapes = []
    if M <= 4:
        bm = _pow2(M)
        for bn, bk, nw in ((32, 256, 4), (16, 512, 4), (64, 256, 8), (32, 512, 8)):
            shapes.append((False, bm, bn // bm if bm > 1 else bn, bk, nw, 2))
    bm = min(128, max(16, _pow2(M)))
    for bn, bk, nw, ns in ((64, 128, 4, 4), (32, 256, 4, 3), (128, 128, 8, 3), (64, 256, 4, 3)):
        if bm >= 64 and bk > 128:
            continue
        shapes.append((True, bm, bn, bk, nw, ns))
    out: list[dict] = []
    for dot, bm, bn, bk, nw, ns in shapes:
        tiles = triton.cdiv(M, bm) * triton.cdiv(n_cols, bn)
        base = _pick_split(tiles, K, bk, M, N, sms)
        for split in sorted({max(1, base // 2), base, base * 2}):
            if split > 1 and K // split < bk:
                continue
            out.append({"USE_DOT": dot, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split,
                        "num_warps": nw, "num_stages": ns})
    default = linear_default_config(key)
    if default not in out:
        out.insert(0, default)
    return out


# ----------------------------------------------------------------------------------------------------
# Launcher

_WORKSPACE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _workspace(device: torch.device, n_floats: int, n_tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    key = (device.type, device.index)
    ws, cnt = _WORKSPACE.get(key, (None, None))
    if ws is None or ws.numel() < n_floats:
        ws = torch.empty(max(n_floats, 1 << 20), dtype=torch.float32, device=device)
    if cnt is None or cnt.numel() < n_tiles:
        # Counters are zero at rest: the last program of each tile resets its own.
        cnt = torch.zeros(max(n_tiles, 1 << 14), dtype=torch.int32, device=device)
    _WORKSPACE[key] = (ws, cnt)
    return ws, cnt


def _check_linear(x, w, residual, activation, out_dtype):
    if not isinstance(x, torch.Tensor) or not isinstance(w, torch.Tensor):
        raise TypeError("linear: x and w must be torch.Tensor")
    if x.dim() != 2 or w.dim() != 2:
        raise ValueError(f"linear: x must be [M, K] and w [N, K], got x{tuple(x.shape)} w{tuple(w.shape)}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"linear: x has K={x.shape[1]} but w has K={w.shape[1]}")
    if x.shape[1] == 0:
        raise ValueError("linear: K must be >= 1")
    if x.dtype not in _DTYPES or w.dtype not in _DTYPES:
        raise TypeError(f"linear: x/w dtype must be fp16/bf16/fp32, got {x.dtype}/{w.dtype}")
    if x.dtype != w.dtype:
        raise TypeError(f"linear: x dtype {x.dtype} != w dtype {w.dtype}")
    if x.device != w.device:
        raise ValueError(f"linear: x on {x.device} but w on {w.device}")
    if x.stride(1) != 1 or not w.is_contiguous():
        raise ValueError("linear: x must have unit stride along K and w must be contiguous")
    if activation not in (None, "swiglu"):
        raise ValueError(f"linear: activation must be None or 'swiglu', got {activation!r}")
    if activation == "swiglu":
        if w.shape[0] % 2:
            raise ValueError(f"linear: swiglu needs an even number of weight rows, got {w.shape[0]}")
        if residual is not None:
            raise ValueError("linear: residual is not supported with activation='swiglu'")
    n_out = w.shape[0] // 2 if activation == "swiglu" else w.shape[0]
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError("linear: residual must be a tensor or None")
        if residual.shape != (x.shape[0], n_out):
            raise ValueError(f"linear: residual must be [{x.shape[0]}, {n_out}], got {tuple(residual.shape)}")
        if residual.stride(1) != 1 or residual.device != x.device:
            raise ValueError("linear: residual must have unit stride along N and sit on x's device")
    if out_dtype is not None and out_dtype not in _DTYPES:
        raise TypeError(f"linear: out_dtype must be fp16/bf16/fp32 or None, got {out_dtype}")
    return n_out


def linear(x: torch.Tensor, w: torch.Tensor, *, residual: torch.Tensor | None = None,
           activation: str | None = None, out_dtype: torch.dtype | None = None,
           config: dict | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """`y = x @ w.T (+ residual)`, or `silu(x @ gate.T) * (x @ up.T)` for a merged `[gate; up]` weight.

    For decode (M <= 256); any M works but large M is better served by cuBLAS. `config` overrides the
    config, which is looked up in order: `fusedlis.tuning.lookup`, the table measured on this GPU model
    (`measured_config`), `linear_default_config`. Config keys are those of `linear_default_config`;
    ``{"backend": "torch"}`` dispatches to torch.matmul (the measured table does so only where cuBLAS
    measured faster). At M = 1 on a GPU the flat-row GEMV (`rows_config`, ``{"backend": "rows"}``) runs first,
    before any lookup; FUSEDLIS_LINEAR_ROWS=0 turns that off. `out` (optional, [M, N_out], unit stride along N)
    receives the result.
    """
    n_out = _check_linear(x, w, residual, activation, out_dtype)
    M, K = x.shape
    N = w.shape[0]
    out_dtype = out_dtype or x.dtype
    if config is None and _rows_enabled(x):
        config = rows_config(K, activation)
    if config is None:
        key = linear_key(M, N, K, x.dtype, activation, residual is not None)
        config = tuning.lookup("linear", key)
        if config is None:
            config = measured_config(M, N, K, x.dtype, activation, x.device)
        if config is None:
            key["sms"] = _num_sms(x.device)
            config = linear_default_config(key)
    if out is not None and (out.shape != (M, n_out) or out.stride(1) != 1 or out.dtype != out_dtype):
        raise ValueError(f"linear: out must be [{M}, {n_out}] {out_dtype} with unit stride along N")
    if config.get("backend") == "torch":
        return _linear_torch(x, w, residual, activation, out_dtype, out)
    if out is None:
        out = torch.empty((M, n_out), dtype=out_dtype, device=x.device)
    if M == 0 or n_out == 0:
        return out
    if config.get("backend") == "rows":
        if M != 1 or out.stride(1) != 1:
            raise ValueError("linear: the 'rows' backend is for M = 1")
        r = int(config.get("ROWS", 2))
        res = residual if residual is not None else out
        _linear_rows_kernel[(triton.cdiv(n_out, r),)](
            x, w, out, res, n_out, K, w.stride(0), R=r, BK=int(config.get("BLOCK_K", 2048)),
            SWIGLU=activation == "swiglu", HAS_RES=residual is not None, num_warps=config.get("num_warps", 4))
        return out
    bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    split = max(1, int(config.get("SPLIT_K", 1)))
    use_dot = bool(config.get("USE_DOT", bm >= 16))
    if use_dot and bm < 16:
        raise ValueError("linear: USE_DOT needs BLOCK_M >= 16")
    # Each split covers a whole number of BLOCK_K steps; splits past K do no loads.
    k_per_split = triton.cdiv(triton.cdiv(K, split), bk) * bk
    split = triton.cdiv(K, k_per_split)
    grid = (triton.cdiv(M, bm), triton.cdiv(n_out, bn), split)
    if split > 1:
        ws, cnt = _workspace(x.device, split * M * N, grid[0] * grid[1])
    else:
        ws, cnt = out, out  # unused
    res = residual if residual is not None else out
    # PDL is opt-in here (config "PDL": True, or FUSEDLIS_LINEAR_PDL for an end-to-end A/B): on H200 it made chains
    # of these GEMMs 5-25% slower, prefetch or not, with the successor launched right after the wait
    # (bench/results/kernels_linear_pdl_NVIDIA-H200_2026-11-22.csv). PDL_LAUNCH_FRAC delays that signal to a
    # fraction of the K steps; EVICT_W loads weights evict-first (both opt-in: no gain in the engine on 2xH200).
    exp = _linear_pdl_experiment()
    if exp:
        config = {**config, **exp}
    pdl = pdl_launch(x.device) if config.get("PDL", False) else {"PDL": False}
    frac = float(config.get("PDL_LAUNCH_FRAC", 0.0))
    launch_at = int(frac * triton.cdiv(k_per_split, bk)) if frac > 0 else -1
    # two BLOCK_K steps of 128-byte lines (the pipeline's first stages); 0 = no prefetch
    pf = min(triton.cdiv(k_per_split, bk), 2) * bk * w.element_size() // 128 if pdl["PDL"] else 0
    pf = int(config.get("PF_LINES", pf))
    pf = 1 << (pf.bit_length() - 1) if pf > 0 else 0
    _linear_kernel[grid](
        x, w, out, res, ws, cnt,
        M, n_out, K, k_per_split,
        x.stride(0), w.stride(0), out.stride(0), res.stride(0),
        split, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, HAS_SPLIT=split > 1, USE_DOT=use_dot,
        EVEN_K=(K % k_per_split == 0), SWIGLU=(activation == "swiglu"), HAS_RES=residual is not None,
        IEEE=(x.dtype == torch.float32), PF_LINES=pf, LAUNCH_AT=launch_at, EVICT_W=bool(config.get("EVICT_W", False)),
        num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages", 3), **pdl,
    )
    return out


def _linear_pdl_experiment() -> dict:
    """FUSEDLIS_LINEAR_PDL="<launch fraction>[,evict][,pf=<lines>]": turn PDL on for every `linear` call with
    the successor launched after that fraction of each program's K steps (0: right after the wait), weights
    evict-first with "evict", and `pf` L2 prefetch lines; for decode A/B runs. Unset: {}."""
    raw = os.environ.get("FUSEDLIS_LINEAR_PDL", "").strip()
    if not raw:
        return {}
    out: dict = {"PDL": True}
    for i, part in enumerate(p.strip() for p in raw.split(",")):
        try:
            if i == 0:
                out["PDL_LAUNCH_FRAC"] = float(part)
            elif part == "evict":
                out["EVICT_W"] = True
            elif part.startswith("pf="):
                out["PF_LINES"] = int(part[3:])
            else:
                raise ValueError(part)
        except ValueError:
            raise ValueError(f"FUSEDLIS_LINEAR_PDL={raw!r}: expected '<launch fraction>[,evict][,pf=<lines>]'") from None
    if not 0.0 <= out["PDL_LAUNCH_FRAC"] <= 1.0:
        raise ValueError(f"FUSEDLIS_LINEAR_PDL={raw!r}: the launch fraction must be in [0, 1]")
    return out


def _linear_torch(x, w, residual, activation, out_dtype, out):
    if activation is None and out_dtype == x.dtype and (residual is None or residual.dtype == x.dtype):
        # One cuBLAS call (residual through the GEMM epilogue), written straight into `out`.
        if residual is None:
            return torch.mm(x, w.t(), out=out) if out is not None else torch.mm(x, w.t())
        return torch.addmm(residual, x, w.t(), out=out) if out is not None else torch.addmm(residual, x, w.t())
    y = torch.matmul(x, w.t())
    if activation == "swiglu":
        g, u = y.chunk(2, dim=-1)
        y = torch.nn.functional.silu(g) * u
    if residual is not None:
        y = y + residual
    y = y.to(out_dtype)
    if out is not None:
        out.copy_(y)
        return out
    return y


def linear_ref(x: torch.Tensor, w: torch.Tensor, *, residual: torch.Tensor | None = None,
               activation: str | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Plain-torch reference of `linear` (fp32 math, or float64 for float64 inputs)."""
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(ct) @ w.to(ct).t()
    if activation == "swiglu":
        g, u = y.chunk(2, dim=-1)
        y = g * torch.sigmoid(g) * u
    if residual is not None:
        y = y + residual.to(ct)
    return y.to(out_dtype or x.dtype)

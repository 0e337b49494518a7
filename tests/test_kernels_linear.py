"""linear: split-K decode GEMM with residual / SwiGLU epilogues vs a float64 reference."""

import importlib
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fusedlis.triton_kernels import linear, linear_configs, linear_default_config, linear_key, linear_ref

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(y, ref):
    assert not torch.isnan(y).any(), "output has NaN (unwritten elements?)"
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


def run_case(M, N, K, dtype, activation, residual, cfg, device=DEV, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    w = (torch.randn(N, K, generator=g, dtype=torch.float64) / math.sqrt(K)).to(device=device, dtype=dtype)
    n_out = N // 2 if activation == "swiglu" else N
    r = torch.randn(M, n_out, generator=g, dtype=torch.float64).to(device=device, dtype=dtype) if residual else None
    out = torch.full((M, n_out), float("nan"), device=device, dtype=dtype)
    y = linear(x, w, residual=r, activation=activation, config=cfg, out=out)
    assert y is out
    ref = linear_ref(x.double(), w.double(), residual=None if r is None else r.double(), activation=activation)
    return rel_err(y, ref)


@st.composite
def cases(draw):
    dot = draw(st.booleans())
    bm = draw(st.sampled_from([16, 32])) if dot else draw(st.sampled_from([1, 2, 4]))
    cfg = {"USE_DOT": dot, "BLOCK_M": bm, "BLOCK_N": draw(st.sampled_from([16, 32])),
           "BLOCK_K": draw(st.sampled_from([16, 32, 64])), "SPLIT_K": draw(st.integers(1, 4)),
           "num_warps": 4, "num_stages": 2}
    act = draw(st.sampled_from([None, "swiglu"]))
    N = draw(st.integers(1, 40)) * (2 if act else 1)
    return (draw(st.integers(1, 37)), N, draw(st.integers(1, 150)), draw(st.sampled_from([torch.float32, torch.float16])),
            act, act is None and draw(st.booleans()), cfg)


@given(cases())
def test_linear_matches_reference(case):
    M, N, K, dtype, act, res, cfg = case
    assert run_case(M, N, K, dtype, act, res, cfg) < TOL[dtype]


@pytest.mark.parametrize("M", [1, 3, 20])
def test_linear_default_config(M):
    # Default (tuner-free) path, incl. the split-K fixup with counters reused across calls.
    for seed in range(2):
        assert run_case(M, 96, 1100, torch.float32, None, False, None, seed=seed) < 1e-5


def test_linear_out_dtype_and_torch_backend():
    x = torch.randn(3, 40, device=DEV, dtype=torch.float16)
    w = torch.randn(24, 40, device=DEV, dtype=torch.float16)
    ref = linear_ref(x.double(), w.double())
    y = linear(x, w, out_dtype=torch.float32, config={"USE_DOT": False, "BLOCK_M": 4, "BLOCK_N": 16,
                                                      "BLOCK_K": 16, "SPLIT_K": 2})
    assert y.dtype == torch.float32 and rel_err(y, ref) < 2e-3
    y = linear(x, w, config={"backend": "torch"})
    assert y.dtype == torch.float16 and rel_err(y, ref) < 2e-3


def test_linear_configs_contain_default_and_are_valid():
    for M in (1, 8, 32, 64, 128):
        key = linear_key(M, 3072, 4096, torch.bfloat16, None, False)
        cfgs = linear_configs(key)
        assert linear_default_config(key) in cfgs
        for c in cfgs:
            assert c["SPLIT_K"] >= 1 and (not c["USE_DOT"] or c["BLOCK_M"] >= 16)


def test_linear_bad_inputs():
    x = torch.randn(2, 8)
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match="K="):
        linear(x, torch.randn(4, 9))
    with pytest.raises(TypeError, match="dtype"):
        linear(x.half(), w)
    with pytest.raises(TypeError, match="dtype"):
        linear(x.long(), w.long())
    with pytest.raises(ValueError, match="contiguous"):
        linear(x, torch.randn(8, 4).t())
    with pytest.raises(ValueError, match="activation"):
        linear(x, w, activation="gelu")
    with pytest.raises(ValueError, match="residual"):
        linear(x, w, residual=torch.randn(2, 5))
    with pytest.raises(ValueError, match="residual"):
        linear(x, w, residual=torch.randn(2, 2), activation="swiglu")
    with pytest.raises(ValueError, match="K must be"):
        linear(torch.randn(2, 0), torch.randn(4, 0))
    with pytest.raises(ValueError, match="even"):
        linear(x, torch.randn(5, 8), activation="swiglu")


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 8, 32, 64, 128])
@pytest.mark.parametrize("N,K", [(3072, 4096), (4096, 2048), (4100, 1000)])
def test_linear_gpu_bf16_all_configs(M, N, K):
    key = linear_key(M, N, K, torch.bfloat16, None, False)
    for cfg in linear_configs(key)[:6]:
        assert run_case(M, N, K, torch.bfloat16, None, False, cfg, device="cuda") < 1e-2, cfg


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 5, 32])
@pytest.mark.parametrize("act,res", [("swiglu", False), (None, True)])
def test_linear_gpu_bf16_epilogues(M, act, res):
    assert run_case(M, 2 * 1792, 4096, torch.bfloat16, act, res, None, device="cuda", seed=M) < 1e-2


def test_measured_table_lookup_and_configs_run(monkeypatch):
    lin = importlib.import_module("fusedlis.triton_kernels.linear")  # the package attr is the function
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    cuda = torch.device("cuda", 0)
    c1 = lin.measured_config(1, 4096, 7168, torch.bfloat16, None, cuda)
    assert c1 is not None and c1 == lin.measured_config(8, 4096, 7168, torch.bfloat16, None, cuda)  # M bucket
    assert lin.measured_config(65, 4096, 7168, torch.bfloat16, None, cuda) is None  # beyond measured M
    assert lin.measured_config(1, 4096, 7168, torch.float16, None, cuda) is None  # only bf16 was measured
    sw = lin.measured_config(1, 4096, 7168, torch.bfloat16, "swiglu", cuda)  # merged gate_up reuse
    assert sw is not None and sw["BLOCK_N"] * 2 == c1["BLOCK_N"] and sw["SPLIT_K"] == c1["SPLIT_K"]
    assert lin.measured_config(64, 4096, 7168, torch.bfloat16, "swiglu", cuda) is None  # cuBLAS entry
    assert lin.measured_config(1, 4096, 7168, torch.bfloat16, None, torch.device("cpu")) is None
    assert lin.measured_config(1, 123, 7168, torch.bfloat16, None, cuda) is None
    # Every distinct Triton config in the table is valid for the launcher (run on a small fp32 problem).
    cfgs = {tuple(sorted(c.items())) for v in lin._MEASURED.values() for _, c in v}
    assert any(dict(c).get("backend") == "torch" for c in cfgs)
    for c in cfgs:
        c = dict(c)
        if c.get("backend") != "torch":
            c["SPLIT_K"] = min(c["SPLIT_K"], 2)
            assert run_case(min(c["BLOCK_M"], 5), 40, 600, torch.float32, None, False, c) < 1e-5, c


@pytest.mark.parametrize("res", [False, True])
def test_linear_torch_backend_out_and_residual(res):
    x = torch.randn(3, 40, dtype=torch.float32)
    w = torch.randn(24, 40, dtype=torch.float32)
    r = torch.randn(3, 24) if res else None
    out = torch.full((3, 24), float("nan"))
    y = linear(x, w, residual=r, config={"backend": "torch"}, out=out)
    assert y is out
    assert rel_err(y, linear_ref(x.double(), w.double(), residual=None if r is None else r.double())) < 1e-5


def test_split_k_counters_reset_after_each_call():
    # The last-arriving program of every tile must zero its counter, or the next call would skip the
    # fixup (wrong result) on the next launch: check the invariant directly, twice.
    lin = importlib.import_module("fusedlis.triton_kernels.linear")
    cfg = {"USE_DOT": False, "BLOCK_M": 2, "BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": 3}
    for seed in range(2):
        assert run_case(3, 50, 100, torch.float32, None, False, cfg, seed=seed) < 1e-5
        assert lin._WORKSPACE
        for _, cnt in lin._WORKSPACE.values():
            assert int(cnt.abs().sum()) == 0


def test_measured_swiglu_entry_wins_over_halved_plain_entry(monkeypatch):
    lin = importlib.import_module("fusedlis.triton_kernels.linear")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU X")
    plain = {"USE_DOT": True, "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 1}
    monkeypatch.setattr(lin, "_MEASURED", {("GPU X", 512, 256, "none"): [(8, plain), (32, plain)],
                                           ("GPU X", 512, 256, "swiglu"): [(32, {"backend": "torch"})]})
    cuda = torch.device("cuda", 0)
    assert lin.measured_config(16, 512, 256, torch.bfloat16, "swiglu", cuda) == {"backend": "torch"}
    assert lin.measured_config(64, 512, 256, torch.bfloat16, "swiglu", cuda) is None  # beyond both tables
    assert lin.measured_config(16, 512, 256, torch.bfloat16, None, cuda) == plain


def test_linear_torch_backend_swiglu_matches_reference():
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    x = torch.randn(5, 48, generator=g)
    w = torch.randn(2 * 40, 48, generator=g)
    out = torch.full((5, 40), float("nan"))
    y = linear(x, w, activation="swiglu", config={"backend": "torch"}, out=out)
    ref = linear_ref(x.double(), w.double(), activation="swiglu")
    assert y is out and ((y.double() - ref).norm() / ref.norm()).item() < 1e-5


def test_linear_pdl_experiment_knob(monkeypatch):
    """FUSEDLIS_LINEAR_PDL parses into the launch config (PDL on, launch fraction, evict-first weights, prefetch
    lines), rejects malformed values, and results stay exact with it set (on a CPU PDL itself is off)."""
    mod = importlib.import_module("fusedlis.triton_kernels.linear")
    monkeypatch.delenv("FUSEDLIS_LINEAR_PDL", raising=False)
    assert mod._linear_pdl_experiment() == {}
    monkeypatch.setenv("FUSEDLIS_LINEAR_PDL", "0.5,evict,pf=8")
    assert mod._linear_pdl_experiment() == {"PDL": True, "PDL_LAUNCH_FRAC": 0.5, "EVICT_W": True, "PF_LINES": 8}
    for bad in ("x", "1.5", "0.5,bogus"):
        monkeypatch.setenv("FUSEDLIS_LINEAR_PDL", bad)
        with pytest.raises(ValueError, match="FUSEDLIS_LINEAR_PDL"):
            mod._linear_pdl_experiment()
    monkeypatch.setenv("FUSEDLIS_LINEAR_PDL", "0.5,evict")
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(3, 96, generator=g), torch.randn(40, 96, generator=g)
    cfg = {"USE_DOT": True, "BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 1}
    y = linear(x, w, config=cfg)
    ref = linear_ref(x.double(), w.double())
    assert float((y.double() - ref).norm() / ref.norm()) <= 1e-5


@given(N=st.integers(1, 40), K=st.integers(1, 300), dtype=st.sampled_from([torch.float32, torch.float16]),
       act=st.sampled_from([None, "swiglu"]), res=st.booleans(), rows=st.sampled_from([1, 2, 4]),
       bk=st.sampled_from([16, 64, 256]), seed=st.integers(0, 2**16))
def test_linear_rows_backend(N, K, dtype, act, res, rows, bk, seed):
    """The flat-row GEMV (M = 1): ragged row blocks and K steps, SwiGLU and residual epilogues."""
    cfg = {"backend": "rows", "ROWS": rows, "BLOCK_K": bk, "num_warps": 2}
    N = 2 * N if act else N
    assert run_case(1, N, K, dtype, act, res and act is None, cfg, device="cpu", seed=seed) < TOL[dtype]


def test_linear_rows_dispatch(monkeypatch):
    """GPU M = 1 takes the rows config first (FUSEDLIS_LINEAR_ROWS=0: the lookup); other M and CPU never do."""
    from fusedlis.triton_kernels import linear as lin_mod

    lin = importlib.import_module("fusedlis.triton_kernels.linear")
    x1 = torch.empty(1, 64)
    assert not lin._rows_enabled(x1)  # CPU
    fake = type("T", (), {"shape": (1, 64), "device": torch.device("cuda", 0)})()
    assert lin._rows_enabled(fake)
    monkeypatch.setenv("FUSEDLIS_LINEAR_ROWS", "0")
    assert not lin._rows_enabled(fake)
    fake.shape = (2, 64)
    monkeypatch.delenv("FUSEDLIS_LINEAR_ROWS")
    assert not lin._rows_enabled(fake)
    assert lin.rows_config(4096) == {"backend": "rows", "ROWS": 2, "BLOCK_K": 2048, "num_warps": 8}
    assert lin.rows_config(7168)["BLOCK_K"] == 4096 and lin.rows_config(4096, "swiglu")["ROWS"] == 1
    del lin_mod
    with pytest.raises(ValueError, match="M = 1"):
        linear(torch.randn(2, 8), torch.randn(4, 8), config={"backend": "rows"})


@pytest.mark.gpu
@pytest.mark.parametrize("N,K", [(3072, 4096), (4096, 2048), (4096, 7168), (14336, 4096), (4100, 1000)])
def test_linear_gpu_bf16_rows_m1(N, K):
    """M = 1 on a GPU runs the flat-row GEMV by default (the decode step's shapes and a ragged one)."""
    assert run_case(1, N, K, torch.bfloat16, None, False, None, device="cuda", seed=N) < 1e-2
    assert run_case(1, N, K, torch.bfloat16, "swiglu", False, None, device="cuda", seed=K) < 1e-2

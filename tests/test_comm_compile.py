"""Compile-only check (no GPU needed): the NVSHMEM-linked Triton all-reduce kernels build for sm_90.

Runs in a subprocess because the test session's kernels are interpreted (TRITON_INTERPRET=1)."""

import json
import os
import subprocess
import sys

import pytest

from fusedlis.comm.symmetric import nvshmem_device_library

_SCRIPT = r'''
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fusedlis.comm import kernels as K
from fusedlis.comm.symmetric import nvshmem_device_library
PTRS = {"x_ptr": "*{t}", "out_ptr": "*{t}", "buf_ptr": "*u8", "flag_ptr": "*i64", "peer_ptrs": "*i64",
        "peer_flag_ptrs": "*i64", "ctr_ptr": "*i64", "err_ptr": "*i64", "steps_ptr": "*i32",
        "res_ptr": "*{t}", "w_ptr": "*{t}", "y_ptr": "*{t}", "h_ptr": "*{t}", "eps": "fp32",
        "part_ptr": "*i64", "budget": "i64"}
name, dtype, const, extern = json.loads(sys.argv[1])
fn = getattr(K, name)
names = fn.arg_names
const = dict(const, GPU=True)  # waits bounded by %globaltimer nanoseconds (budget i64: 20 s > 2**31 ns)
sig = {n: (PTRS[n].format(t=dtype) if n in PTRS else "constexpr" if n in const else "i32") for n in names}
src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in const.items()})
opts = {"num_warps": 4}
if extern:
    opts["extern_libs"] = {"libnvshmem_device": nvshmem_device_library()}
ck = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
print(json.dumps({"ptx": ck.asm["ptx"], "cubin_bytes": len(ck.asm["cubin"])}))
'''


def _compile(name: str, dtype: str, const: dict, extern: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps([name, dtype, const, extern])],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(nvshmem_device_library() is None,
                    reason="libnvshmem_device.bc not found: pip install nvidia-nvshmem-cu13==3.4.5")
def test_nvrar_put_kernel_compiles_for_sm90():
    res = _compile("_hier_kernel", "bf16", dict(G=2, NSTEPS=3, NSLOT=4, BLOCK=1024, USE_PUT=True), extern=True)
    ptx = res["ptx"]
    assert "nvshmemx_putmem_signal_block" in ptx
    assert "sys.release.exch" in ptx and "acquire.sys" in ptx
    assert "%globaltimer" in ptx  # waits bounded by time, not by a poll count
    assert res["cubin_bytes"] > 0
    res = _compile("_one_shot_kernel", "fp16", dict(G=4, BLOCK=4096, USE_PUT=True), extern=True)
    assert "nvshmemx_putmem_signal_block" in res["ptx"] and "%globaltimer" in res["ptx"]


def test_peer_store_kernels_compile_for_sm90():
    res = _compile("_one_shot_kernel", "fp32", dict(G=4, BLOCK=512, USE_PUT=False), extern=False)
    assert "sys.release.exch" in res["ptx"] and "%globaltimer" in res["ptx"] and res["cubin_bytes"] > 0
    res = _compile("_hier_kernel", "fp16", dict(G=2, NSTEPS=0, NSLOT=1, BLOCK=1024, USE_PUT=False), extern=False)
    assert "nvshmem" not in res["ptx"] and "%globaltimer" in res["ptx"] and res["cubin_bytes"] > 0


@pytest.mark.parametrize("name,dtype,const", [
    ("_ll_one_shot_kernel", "bf16", dict(G=2, BLOCK=1024)),
    ("_ll_hier_kernel", "fp32", dict(G=2, NSTEPS=0, NSLOT=1, BLOCK=1024)),
    ("_ll_hier_kernel", "bf16", dict(G=2, NSTEPS=3, NSLOT=4, BLOCK=1024)),
    ("_ll_one_shot_norm_kernel", "bf16", dict(G=2, TILE=8192, TP2=1)),
    ("_ll_one_shot_norm_kernel", "bf16", dict(G=2, TILE=1024, TP2=8))])
def test_ll_kernels_compile_for_sm90(name, dtype, const):
    """The LL protocol polls with volatile loads and needs no flag, fence or NVSHMEM call; its waits (and the
    norm kernel's wait for its row's partial sums of squares) are bounded by %globaltimer."""
    res = _compile(name, dtype, const, extern=False)
    ptx = res["ptx"]
    assert "ld.volatile.global" in ptx and "%globaltimer" in ptx
    assert "release" not in ptx and "nvshmem" not in ptx and res["cubin_bytes"] > 0

"""bench/stage_fusion.py's stage kernel in the interpreter: two dependent GEMVs, launched as two kernels or as one
in which stage-B programs wait for the flags of the stage-A tiles they read, give the fp64 result."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import stage_fusion as sf  # noqa: E402


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_one_launch_matches_two_launches_and_fp64(dtype, tol):
    torch.manual_seed(0)
    pair = sf.Pair(sf.SPLIT2 * sf.BK, 2 * sf.SPLIT1 * sf.BK, 2 * sf.BN2, "cpu", dtype=dtype)
    for v in ("two", "one", "one_pre", "one", "persist", "persist_pre"):  # the step number must advance
        assert pair.check(v) < tol, v
    assert int(pair.seq[0]) == 6 and int(pair.cnt[0]) == 0


def test_bad_shapes_refused():
    with pytest.raises(ValueError, match="whole tiles"):
        sf.Pair(100, sf.BK, sf.BN2, "cpu")

"""Persistent tuning cache: key normalisation, lookup, warnings on bad files, concurrent writers."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fusedlis.tuning as tuning
from fusedlis.tuning import _lookup, cache, fingerprint
from fusedlis.tuning.keys import key_string, normalize_key

FP = {"gpu": "NVIDIA H200", "sm_count": 132, "driver": "580.95.05", "cuda": "13.0", "triton": "3.6.0",
      "torch": "2.11.0+cu130"}


@pytest.fixture
def env(tmp_path, monkeypatch):
    """Isolated cache dir, a fixed fingerprint for 'this device', and a fresh lookup index."""
    monkeypatch.setenv("FUSEDLIS_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FUSEDLIS_TUNING_FILE", raising=False)
    monkeypatch.delenv("FUSEDLIS_TUNING", raising=False)
    monkeypatch.setattr(fingerprint, "current", lambda device=None: dict(FP))
    _lookup.invalidate(reset_warning=True)
    yield tmp_path
    _lookup.invalidate(reset_warning=True)


def lin(m, cfg_tag, **extra):
    key = {"M": m, "N": 3072, "K": 4096, "dtype": torch.bfloat16, **extra}
    return cache.make_entry("linear", key, {"BLOCK_N": cfg_tag, "num_warps": 4}, time_us=float(cfg_tag))


# --- key normalisation -------------------------------------------------------------------------

@given(m=st.integers(1, 4096), dt=st.sampled_from([torch.bfloat16, "bf16", "bfloat16", "torch.bfloat16", "BF16"]),
       act=st.sampled_from([None, "swiglu", "SwiGLU "]))
def test_key_forms_normalise_equal(m, dt, act):
    a = {"M": m, "K": 4096, "N": 3072, "dtype": dt, "activation": act}
    b = {"activation": None if act is None else "swiglu", "dtype": torch.bfloat16, "N": 3072.0, "K": 4096, "M": m}
    assert normalize_key(a) == normalize_key(b)
    assert key_string(a) == key_string(b)
    assert key_string(a) == f"K=4096,M={m},N=3072," + ("activation=swiglu," if act else "") + "dtype=bfloat16"


def test_key_string_is_sorted_and_drops_none():
    assert key_string({"N": 2, "M": 1, "dtype": torch.float16, "residual": None, "fuse": True}) == \
        "M=1,N=2,dtype=float16,fuse=true"


@pytest.mark.parametrize("bad", [{"M": object()}, {"M": float("nan")}, {"a=b": 1}, {"x": "a,b"}, {3: 1}])
def test_bad_keys_raise_in_normalise_but_not_in_lookup(env, bad):
    with pytest.raises((TypeError, ValueError)):
        normalize_key(bad)
    assert tuning.lookup("linear", bad) is None
    assert tuning.lookup("linear", None) is None  # type: ignore[arg-type]


# --- paths ---------------------------------------------------------------------------------------

def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("FUSEDLIS_CACHE_DIR", raising=False)
    monkeypatch.delenv("FUSEDLIS_TUNING_FILE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "xdg" / "fusedlis"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_dir() == tmp_path / "home" / ".cache" / "fusedlis"
    monkeypatch.setenv("FUSEDLIS_CACHE_DIR", str(tmp_path / "mine"))
    assert cache.default_path() == tmp_path / "mine" / "tuning.json"
    monkeypatch.setenv("FUSEDLIS_TUNING_FILE", str(tmp_path / "x.json"))
    assert cache.default_path() == tmp_path / "x.json"


# --- write, lookup, buckets ----------------------------------------------------------------------

def test_roundtrip_and_buckets(env):
    path = cache.merge_entries([lin(m, 16 * i + 16) for i, m in enumerate([1, 8, 32, 64])], fp=FP)
    assert path == env / "tuning.json"
    key = {"N": 3072, "K": 4096, "dtype": "bf16"}
    assert tuning.lookup("linear", {**key, "M": 8}) == {"BLOCK_N": 32, "num_warps": 4}
    assert tuning.lookup("linear", {**key, "M": 5}) == {"BLOCK_N": 32, "num_warps": 4}  # next tuned M up
    assert tuning.lookup("linear", {**key, "M": 2}) == {"BLOCK_N": 32, "num_warps": 4}
    assert tuning.lookup("linear", {**key, "M": 1}) == {"BLOCK_N": 16, "num_warps": 4}
    assert tuning.lookup("linear", {**key, "M": 100}) == {"BLOCK_N": 64, "num_warps": 4}  # largest below
    assert tuning.lookup("linear", {**key, "M": 8, "dtype": "float16"}) is None  # exact fields must match
    assert tuning.lookup("linear", {**key, "M": 8, "activation": "swiglu"}) is None
    assert tuning.lookup("attention", {**key, "M": 8}) is None
    # returned dicts are copies: a caller mutating one cannot poison the index
    tuning.lookup("linear", {**key, "M": 8})["BLOCK_N"] = 999
    assert tuning.lookup("linear", {**key, "M": 8})["BLOCK_N"] == 32


def test_lookup_is_in_memory_after_first_load(env, monkeypatch):
    cache.merge_entries([lin(8, 64)], fp=FP)
    assert tuning.lookup("linear", {"M": 8, "N": 3072, "K": 4096, "dtype": "bfloat16"})
    reads = []
    real = cache.read
    monkeypatch.setattr(cache, "read", lambda p: (reads.append(p), real(p))[1])
    for m in range(1, 50):
        tuning.lookup("linear", {"M": m, "N": 3072, "K": 4096, "dtype": "bfloat16"})
    assert reads == []
    tuning.invalidate()
    tuning.lookup("linear", {"M": 8, "N": 3072, "K": 4096, "dtype": "bfloat16"})
    assert len(reads) == 1


def test_newer_entry_replaces_older_and_other_devices_are_kept(env):
    other = {**FP, "gpu": "NVIDIA H100 80GB HBM3", "sm_count": 132}
    cache.merge_entries([lin(8, 32)], fp=other)
    cache.merge_entries([lin(8, 32)], fp=FP)
    key = {"M": 8, "N": 3072, "K": 4096, "dtype": "bfloat16"}
    assert tuning.lookup("linear", key)["BLOCK_N"] == 32  # now memoised in this process
    cache.merge_entries([lin(8, 128)], fp=FP)  # a write in this process drops the memo
    assert tuning.lookup("linear", key)["BLOCK_N"] == 128
    data = cache.read(env / "tuning.json")
    assert len(data["devices"]) == 2
    assert tuning.lookup("linear", {"M": 8, "N": 3072, "K": 4096, "dtype": "bfloat16"})["BLOCK_N"] == 128


def test_disable_switch(env, monkeypatch):
    cache.merge_entries([lin(8, 64)], fp=FP)
    monkeypatch.setenv("FUSEDLIS_TUNING", "0")
    tuning.invalidate()
    assert tuning.lookup("linear", {"M": 8, "N": 3072, "K": 4096, "dtype": "bfloat16"}) is None


def test_explicit_file_via_env(env, monkeypatch, tmp_path):
    out = tmp_path / "sub" / "my.json"
    cache.merge_entries([lin(8, 64)], path=out, fp=FP)
    assert not (env / "tuning.json").exists()
    monkeypatch.setenv("FUSEDLIS_TUNING_FILE", str(out))
    tuning.invalidate()
    assert tuning.lookup("linear", {"M": 8, "N": 3072, "K": 4096, "dtype": "bfloat16"})["BLOCK_N"] == 64


def test_missing_file_is_silent(env):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tuning.lookup("linear", {"M": 8}) is None


# --- bad files: one warning, defaults, never a crash ----------------------------------------------

def _count_warnings(fn, n=20):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        results = [fn() for _ in range(n)]
    return results, [x for x in w if issubclass(x.category, tuning.TuningCacheWarning)]


@pytest.mark.parametrize("content", [
    b"{not json", b"\xff\xfe\x00garbage", b"[]", b'{"format": "fusedlis-tuning", "version": 99, "devices": {}}',
    b'{"format": "fusedlis-tuning", "version": 1, "devices": {"x": {"fingerprint": {}, "entries": {"linear": 3}}}}',
    b"",
])
def test_corrupt_cache_one_warning(env, content):
    (env / "tuning.json").write_bytes(content)
    res, ws = _count_warnings(lambda: tuning.lookup("linear", {"M": 8, "N": 3072, "K": 4096}))
    assert res == [None] * 20
    assert len(ws) == 1 and "corrupt" in str(ws[0].message)


def test_stale_cache_one_warning(env):
    cache.merge_entries([lin(8, 64)], fp={**FP, "triton": "3.5.1"})
    res, ws = _count_warnings(lambda: tuning.lookup("linear", {"M": 8, "N": 3072, "K": 4096, "dtype": "bfloat16"}))
    assert res == [None] * 20
    assert len(ws) == 1 and "stale" in str(ws[0].message) and "3.5.1" in str(ws[0].message)


def test_foreign_cache_one_warning(env):
    cache.merge_entries([lin(8, 64)], fp={**FP, "gpu": "NVIDIA A100-SXM4-80GB", "sm_count": 108})
    res, ws = _count_warnings(lambda: tuning.lookup("linear", {"M": 8, "N": 3072, "K": 4096, "dtype": "bfloat16"}))
    assert res == [None] * 20
    assert len(ws) == 1 and "A100" in str(ws[0].message)


def test_malformed_entry_skipped_others_used(env):
    cache.merge_entries([lin(8, 64)], fp=FP)
    p = env / "tuning.json"
    data = json.loads(p.read_text())
    sec = next(iter(data["devices"].values()))
    sec["entries"]["linear"]["junk"] = {"key": {"M": [1, 2]}, "config": {}}
    p.write_text(json.dumps(data))
    tuning.invalidate()
    res, ws = _count_warnings(lambda: tuning.lookup("linear", {"M": 8, "N": 3072, "K": 4096, "dtype": "bfloat16"}))
    assert res[0] == {"BLOCK_N": 64, "num_warps": 4}
    assert len(ws) == 1 and "malformed" in str(ws[0].message)


def test_writer_replaces_corrupt_file_and_keeps_a_copy(env):
    p = env / "tuning.json"
    p.write_text("{oops")
    with pytest.warns(tuning.TuningCacheWarning, match="unusable"):
        cache.merge_entries([lin(8, 64)], fp=FP)
    assert (env / "tuning.json.corrupt").read_text() == "{oops"
    assert len(list(cache.iter_entries(cache.read(p)))) == 1


# --- concurrency -----------------------------------------------------------------------------------

def _writer(path: str, rank: int, rounds: int) -> None:
    for r in range(rounds):
        e = cache.make_entry("linear", {"M": 1 + r, "N": 1000 + rank, "K": 64, "dtype": "float16"},
                             {"BLOCK_N": 32, "rank": rank, "round": r})
        cache.merge_entries([e], path=path, fp=FP)


def _reader(path: str, stop, errors) -> None:
    n = 0
    while not stop.is_set() or n == 0:
        try:
            cache.read(path)
            n += 1
        except Exception as e:  # noqa: BLE001 - reported back to the test
            errors.put(repr(e))
            return


def test_concurrent_writer_processes_never_corrupt_or_lose_entries(tmp_path):
    path = str(tmp_path / "tuning.json")
    ctx = mp.get_context("fork")
    ranks, rounds = 4, 12
    stop, errors = ctx.Event(), ctx.Queue()
    reader = ctx.Process(target=_reader, args=(path, stop, errors))
    reader.start()
    writers = [ctx.Process(target=_writer, args=(path, r, rounds)) for r in range(ranks)]
    for w in writers:
        w.start()
    for w in writers:
        w.join(60)
        assert w.exitcode == 0
    stop.set()
    reader.join(60)
    assert errors.empty(), errors.get()
    entries = list(cache.iter_entries(cache.read(path)))
    assert len(entries) == ranks * rounds
    assert {(e["config"]["rank"], e["config"]["round"]) for *_, e in entries} == \
        {(r, i) for r in range(ranks) for i in range(rounds)}
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]  # no temp files left behind
    assert Path(path + ".lock").exists()

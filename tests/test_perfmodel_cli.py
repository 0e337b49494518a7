"""Performance model: CLI, profile files, calibration fitting, validation script."""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from fusedlis.perfmodel import collectives as coll
from fusedlis.perfmodel.calibrate import (fit_gemm, fit_link, fit_overlap, linear_coefficients,
                                          profile_from_measurements, read_raw_csv, write_raw_csv)
from fusedlis.perfmodel.cli import add_calibrate_parser, add_predict_parser, parse_size
from fusedlis.perfmodel.hardware import (BUILTIN, Link, ProfileError, get_hardware, load_profile, save_profile)

ROOT = Path(__file__).resolve().parents[1]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fusedlis")
    sub = p.add_subparsers(dest="command")
    assert add_predict_parser(sub).prog.endswith("predict")
    assert add_calibrate_parser(sub).prog.endswith("calibrate")
    return p


def _run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return args.func(args)


def test_predict_cli_issue_example(tmp_path, capsys):
    png, js = tmp_path / "p.png", tmp_path / "p.json"
    rc = _run(["predict", "--model", "llama-3.1-405b", "--gpus", "32", "--gpus-per-node", "4", "--hardware",
               "a100-slingshot", "--batch", "1,16,64", "--prompt", "1024", "--gen", "128", "--layouts",
               "tp,pp,hybrid", "--allreduce", "nccl,nvrar", "--plot", str(png), "--json", str(js)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "Recommendation" in out and "batch 64: use" in out
    for lay in ("tp32", "pp32", "tp4pp8"):
        assert lay in out
    rows = json.loads(js.read_text())["rows"]
    assert len(rows) == (2 + 1 + 2) * 3
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # NVRAR beats a flat NCCL model for TP across 8 nodes at batch 1 (fewer network latency steps)
    tp = {r["allreduce"]: r for r in rows if r["layout"] == "tp32" and r["batch"] == 1}
    assert tp["nvrar"]["token_ms"] < tp["nccl"]["token_ms"]


def test_predict_cli_errors(tmp_path):
    with pytest.raises(ProfileError, match="unknown hardware"):
        _run(["predict", "--model", "llama-3.1-8b", "--gpus", "2", "--hardware", "tpu-v9"])
    with pytest.raises(ValueError, match="multiple of --gpus-per-node"):
        _run(["predict", "--model", "llama-3.1-8b", "--gpus", "6", "--gpus-per-node", "4"])
    with pytest.raises(ValueError, match="--batch"):
        _run(["predict", "--model", "llama-3.1-8b", "--gpus", "2", "--batch", "1,x"])
    with pytest.raises(ValueError, match="unknown model"):
        _run(["predict", "--model", "llama-9", "--gpus", "2"])
    with pytest.raises(ValueError, match="unknown all-reduce"):
        _run(["predict", "--model", "llama-3.1-8b", "--gpus", "2", "--allreduce", "magic"])


def test_predict_through_main_cli(capsys):
    from fusedlis.cli import main

    assert main(["predict", "--model", "tiny", "--gpus", "2", "--hardware", "h200", "--batch", "1"]) == 0
    assert "tp2" in capsys.readouterr().out


def test_profile_file_errors(tmp_path):
    good = BUILTIN["h100-ndr"].to_json()
    f = tmp_path / "c.json"
    f.write_text(json.dumps(good))
    assert load_profile(f).hbm_bw == BUILTIN["h100-ndr"].hbm_bw
    bad = dict(good, intra={"alpha_us": 1.0})
    f.write_text(json.dumps(bad))
    with pytest.raises(ProfileError, match=r"c\.json: field 'intra': missing field 'bandwidth_GBps'"):
        load_profile(f)
    f.write_text(json.dumps(dict(good, hbm_GBps=-3)))
    with pytest.raises(ProfileError, match=r"c\.json.*'hbm_GBps' must be > 0"):
        load_profile(f)
    f.write_text(json.dumps(dict(good, gpus_per_node="eight")))
    with pytest.raises(ProfileError, match="gpus_per_node"):
        load_profile(f)
    f.write_text("{not json")
    with pytest.raises(ProfileError, match="not valid JSON"):
        load_profile(f)
    with pytest.raises(ProfileError, match="does not exist"):
        get_hardware(str(tmp_path / "missing.json"))


def test_yaml_profile(tmp_path):
    yaml = pytest.importorskip("yaml")
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(BUILTIN["gh200-ndr"].to_json()))
    assert get_hardware(str(f)).gpus_per_node == 1


def test_parse_size():
    assert parse_size("8K") == 8192 and parse_size("4M") == 4 << 20 and parse_size("100") == 100
    with pytest.raises(ValueError, match="bad size"):
        parse_size("lots")


@pytest.mark.parametrize("algo,p", [("ring", 2), ("ring", 4), ("oneshot", 2), ("twoshot", 8), ("rd", 4)])
def test_fit_link_recovers_parameters(algo, p):
    alpha, beta, gamma = 4.2e-6, 1 / 300e9, 1 / 1400e9
    ca, cb, cg = linear_coefficients(algo, 1, p)
    sizes = [8192 << i for i in range(10)]
    samples = [(algo, p, m, ca * alpha + m * (cb * beta + cg * gamma)) for m in sizes]
    a, b = fit_link(samples, gamma)
    assert a == pytest.approx(alpha, rel=1e-6) and b == pytest.approx(beta, rel=1e-6)


def test_fit_gemm_and_profile_from_raw_rows(tmp_path):
    ov, bw = 7e-6, 3.9e12
    rows = [{"kind": "device", "name": "Fake GPU", "gpus": 2, "date": "2026-11-22"},
            {"kind": "copy", "bytes": 1 << 31, "us": 500.0, "GBps": 4300.0}]
    for k, n in [(4096, 3072), (4096, 14336), (8192, 28672)]:
        b = k * n * 2
        rows.append({"kind": "gemm", "M": 1, "K": k, "N": n, "bytes": b, "us": (ov + b / bw) * 1e6})
    gamma = 3 / 4300e9
    for m in [8192 << i for i in range(6)]:
        rows.append({"kind": "allreduce", "impl": "nccl", "algo": "ring", "gpus": 2, "bytes": m,
                     "us": (2 * 6e-6 + m * (1 / 150e9 + 0.5 * gamma)) * 1e6})
        rows.append({"kind": "allreduce", "impl": "fusedlis", "algo": "oneshot", "gpus": 2, "bytes": m,
                     "us": (3e-6 + m * (1 / 400e9 + gamma)) * 1e6})
    raw = tmp_path / "raw.csv"
    write_raw_csv(rows, raw)
    hw = profile_from_measurements(read_raw_csv(raw), get_hardware("h200-ndr"))
    assert hw.kernel_overhead == pytest.approx(ov, rel=1e-4) and hw.hbm_bw == pytest.approx(bw, rel=1e-4)
    assert hw.intra.nccl_alpha == pytest.approx(6e-6, rel=1e-4)
    assert 1 / hw.intra.nccl_beta == pytest.approx(150e9, rel=1e-4)
    assert hw.intra.alpha == pytest.approx(3e-6, rel=1e-4)
    assert 1 / hw.intra.beta == pytest.approx(400e9, rel=1e-4)
    assert hw.intra.params("oneshot") == pytest.approx((3e-6, 1 / 400e9), rel=1e-4)
    assert hw.inter == get_hardware("h200-ndr").inter
    save_profile(hw, tmp_path / "p.json")
    assert load_profile(tmp_path / "p.json").intra.alpha == pytest.approx(3e-6, rel=1e-6)
    assert fit_gemm([(1e6, 1e-5), (2e6, 1.5e-5)]) == pytest.approx((5e-6, 2e11))
    # measured = serial - h * latency with h = 0.6
    samples = [(s - 0.6 * lat, s, lat) for s, lat in [(20e-6, 6e-6), (30e-6, 7e-6), (45e-6, 12e-6)]]
    assert fit_overlap(samples) == pytest.approx(0.6)
    assert fit_overlap([(10e-6, 9e-6, 3e-6)]) == 0.0  # slower than serial: clamped


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_calibrate_without_cuda_says_so(tmp_path):
    with pytest.raises(RuntimeError, match="needs CUDA"):
        _run(["calibrate", "--out", str(tmp_path / "p.json"), "--sizes", "8K,16K"])


def test_validate_script_on_synthetic_measurements(tmp_path):
    spec = importlib.util.spec_from_file_location("validate_perfmodel", ROOT / "bench" / "validate_perfmodel.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    hw = get_hardware("h200-ndr").with_(intra=Link.make(3.0, 250.0, 6.0, 150.0))
    prof = tmp_path / "prof.json"
    save_profile(hw, prof)
    csv_path = tmp_path / "allreduce_fake.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["impl", "world_size", "size_bytes", "median_us"])
        for m in [8192 << i for i in range(8)]:
            w.writerow(["nccl", 2, m, coll.allreduce("nccl", hw, 1, 2, m).total * 1e6 * 1.1])
            w.writerow(["one_shot", 2, m, coll.allreduce("oneshot", hw, 1, 2, m).total * 1e6])
    prefix = str(tmp_path / "val")
    assert mod.main(["--profile", str(prof), "--allreduce", str(csv_path), "--out-prefix", prefix]) == 0
    with open(prefix + ".csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 16
    errs = {r["impl"]: float(r["rel_err"]) for r in rows}
    assert errs["one_shot"] == pytest.approx(0.0, abs=1e-3)
    assert errs["nccl"] == pytest.approx(1 / 1.1 - 1, abs=1e-3)
    assert Path(prefix + ".md").read_text().count("| allreduce |") == 16
    # the same data fitted per implementation: held-out sizes predicted from the fit sizes
    assert mod.main(["--fit-from", str(csv_path), "--out-prefix", prefix, "--reduce-GBps",
                     str(1e-9 / hw.gamma)]) == 0
    with open(prefix + ".csv") as f:
        rows = list(csv.DictReader(f))
    held = [r for r in rows if r["role"] == "held-out"]
    assert held and all(abs(float(r["rel_err"])) < 1e-3 for r in held)


def test_per_algorithm_link_override(tmp_path):
    d = BUILTIN["h200-ndr"].to_json()
    d["intra"]["algorithms"] = {"oneshot": {"alpha_us": 9.0, "bandwidth_GBps": 100.0}}
    f = tmp_path / "p.json"
    f.write_text(json.dumps(d))
    hw = load_profile(f)
    m = 1 << 20
    assert coll.allreduce("oneshot", hw, 1, 2, m).total == pytest.approx(9e-6 + m / 100e9 + m * hw.gamma)
    base = BUILTIN["h200-ndr"]
    assert coll.allreduce("twoshot", hw, 1, 2, m).total == coll.allreduce("twoshot", base, 1, 2, m).total
    assert load_profile(f).to_json()["intra"]["algorithms"]["oneshot"]["alpha_us"] == pytest.approx(9.0)
    d["intra"]["algorithms"] = {"warp": {"alpha_us": 1.0, "bandwidth_GBps": 1.0}}
    f.write_text(json.dumps(d))
    with pytest.raises(ProfileError, match=r"p\.json: field 'intra': field 'algorithms': unknown algorithm"):
        load_profile(f)
    d["intra"]["algorithms"] = {"oneshot": {"alpha_us": 1.0}}
    f.write_text(json.dumps(d))
    with pytest.raises(ProfileError, match="algorithms.oneshot.*bandwidth_GBps"):
        load_profile(f)


def test_validate_reads_bench_formats_and_fits_layer_hiding(tmp_path):
    spec = importlib.util.spec_from_file_location("validate_perfmodel", ROOT / "bench" / "validate_perfmodel.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    hw = get_hardware("h200-ndr").with_(ar_latency_hidden=0.0)
    # bench/allreduce.py columns
    ar_csv = tmp_path / "allreduce_2xH200.csv"
    with open(ar_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["device", "bytes", "variant", "us_median", "rel_err", "algorithm"])
        for m in [8192 << i for i in range(6)]:
            w.writerow(["2xH200", m, "fusedlis_two_shot", coll.allreduce("twoshot", hw, 1, 2, m).total * 1e6, 0, ""])
            w.writerow(["2xH200", m, "fusedlis_nvrar_2x1_put", coll.allreduce("rd", hw, 1, 2, m).total * 1e6, 0, ""])
    # bench/fused.py columns, generated with 0.5 of the latency hidden
    fused = tmp_path / "fused.csv"
    lines = ["# device=fake", "shape,K,N,M,variant,us"]
    for k, n in [(2048, 4096), (7168, 4096)]:
        for m in (1, 8, 32):
            g = hw.kernel_overhead + (k * n + m * (k + n)) * 2 / hw.hbm_bw
            c = coll.allreduce("twoshot", hw, 1, 2, m * n * 2).hiding_latency(0.5)
            lines.append(f"s,{k},{n},{m},cublas+symm_two_shot,{(g + c.total) * 1e6}")
    fused.write_text("\n".join(lines) + "\n")
    prof = tmp_path / "p.json"
    save_profile(hw, prof)
    prefix = str(tmp_path / "v")
    assert mod.main(["--profile", str(prof), "--fit-from", str(ar_csv), "--layer", str(fused),
                     "--out-prefix", prefix, "--reduce-GBps", str(1e-9 / hw.gamma)]) == 0
    with open(prefix + ".csv") as f:
        rows = list(csv.DictReader(f))
    models = {r["impl"]: r["model"] for r in rows}
    # NVRAR on 2 logical nodes of 1 GPU: the same cost form as one recursive-doubling step on NVLink
    assert models["fusedlis_nvrar_2x1_put"] == "nvrar" and models["fusedlis_two_shot"] == "twoshot"
    lay = [r for r in rows if r["what"] == "layer"]
    assert len(lay) == 6 and {r["role"] for r in lay} == {"fit", "held-out"}
    assert all(abs(float(r["rel_err"])) < 0.02 for r in lay)
    assert load_profile(prefix + "_profile.json").ar_latency_hidden == pytest.approx(0.5, abs=0.02)


def test_validate_ll_variants(tmp_path):
    """LL variants of bench/allreduce.py map to the LL models, each fitted on its own; an auto variant that
    switched algorithm for one size borrows the terms of the plain variant of that algorithm."""
    spec = importlib.util.spec_from_file_location("validate_perfmodel", ROOT / "bench" / "validate_perfmodel.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    link = Link.make(5.0, 300.0, algorithms={"oneshot": (6.0, 250.0), "oneshot_ll": (3.0, 250.0),
                                             "twoshot_ll": (4.0, 350.0)})
    hw = get_hardware("h200-ndr").with_(intra=link, inter=link)
    sizes = [8192 << i for i in range(10)]  # 8K .. 4M
    ar_csv = tmp_path / "allreduce_2xH200.csv"
    with open(ar_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["device", "bytes", "variant", "us_median", "rel_err", "algorithm"])
        t = lambda a, m, n=1: coll.allreduce(a, hw, n, 2 // n, m).total * 1e6  # noqa: E731
        for m in sizes:
            w.writerow(["2xH200", m, "fusedlis_one_shot", t("oneshot", m), 0, ""])
            w.writerow(["2xH200", m, "fusedlis_one_shot_ll_t1k", t("oneshot_ll", m), 0, ""])
            w.writerow(["2xH200", m, "fusedlis_two_shot_ll", t("twoshot_ll", m), 0, ""])
            w.writerow(["2xH200", m, "fusedlis_nvrar_2x1_ll", t("nvrar_ll", m, 2), 0, ""])
            a = "one_shot_ll" if m <= 2 << 20 else "two_shot_ll"
            w.writerow(["2xH200", m, "fusedlis_auto", t(a, m), 0, a])
    prefix = str(tmp_path / "v")
    assert mod.main(["--fit-from", str(ar_csv), "--out-prefix", prefix, "--reduce-GBps",
                     str(1e-9 / hw.gamma)]) == 0
    with open(prefix + ".csv") as f:
        rows = list(csv.DictReader(f))
    models = {r["impl"]: r["model"] for r in rows}
    assert models == {"fusedlis_one_shot": "oneshot", "fusedlis_one_shot_ll_t1k": "oneshot_ll",
                      "fusedlis_two_shot_ll": "twoshot_ll", "fusedlis_nvrar_2x1_ll": "nvrar_ll",
                      "fusedlis_auto_oneshot_ll": "oneshot_ll", "fusedlis_auto_twoshot_ll": "twoshot_ll"}
    assert all(abs(float(r["rel_err"])) < 1e-3 for r in rows)
    alpha = {r["impl"]: float(r["alpha_us"]) for r in rows}
    assert alpha["fusedlis_one_shot_ll_t1k"] == pytest.approx(3.0, rel=1e-3)
    assert alpha["fusedlis_one_shot"] == pytest.approx(6.0, rel=1e-3)
    assert alpha["fusedlis_auto_twoshot_ll"] == pytest.approx(4.0, rel=1e-3)  # borrowed from two_shot_ll
    assert [r["role"] for r in rows if r["impl"] == "fusedlis_auto_twoshot_ll"] == ["fit"]  # 4M: a fit size


def test_validate_decode_rows(tmp_path):
    from fusedlis.perfmodel.step import step_time
    from fusedlis.perfmodel.volume import Layout, model_shape

    spec = importlib.util.spec_from_file_location("validate_perfmodel", ROOT / "bench" / "validate_perfmodel.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    hw = get_hardware("h200-ndr")
    shape = model_shape("llama-3.1-8b")
    f = tmp_path / "decode_tp2.csv"
    lines = ["# device=fake", "model,tp,system,batch,context,ms_per_token,floor_ms,ratio_to_floor"]
    # no dated header: the flag protocol and an engine with 2 seq_lens kernels per layer; fused -> one-shot
    # (flag); the engine gathers logits through NCCL
    # and (no fuse_rope column, no "-rope" suffix) a rope kernel of its own
    from fusedlis.perfmodel.step import ROPE_KERNELS_PER_LAYER, SEQ_LENS_KERNELS_PER_LAYER

    for system, algo in (("fusedlis-nccl", "nccl"), ("fusedlis-fused", "oneshot"), ("torch-eager-nccl", "nccl")):
        for b in (1, 32):
            t = step_time(shape, Layout(2, 1), hw.with_(gpus_per_node=2), batch=b, context=512, prefill=False,
                          allreduce=algo, allgather="nccl",
                          extra_layer_kernels=SEQ_LENS_KERNELS_PER_LAYER + ROPE_KERNELS_PER_LAYER).total
            lines.append(f"llama-3.1-8b,2,{system},{b},512,{t * 1e3 * 1.25},1,1")
    f.write_text("\n".join(lines) + "\n")
    prefix = str(tmp_path / "d")
    assert mod.main(["--decode", str(f), "--out-prefix", prefix]) == 0
    with open(prefix + ".csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["impl"] for r in rows} == {"fusedlis-nccl", "fusedlis-fused"}  # eager torch is not modelled
    assert all(float(r["rel_err"]) == pytest.approx(1 / 1.25 - 1, abs=1e-3) for r in rows)


def _load_validate():
    spec = importlib.util.spec_from_file_location("validate_perfmodel", ROOT / "bench" / "validate_perfmodel.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_decode_seq_lens_kernels_by_file_date():
    from fusedlis.perfmodel.step import SEQ_LENS_KERNELS_PER_LAYER, kernels_per_step

    mod = _load_validate()
    assert mod._file_seq_lens_kernels(["# device=x date=2026-11-22T05:45"]) == 0
    assert mod._file_seq_lens_kernels(["# device=x date=2026-11-22T04:46"]) == SEQ_LENS_KERNELS_PER_LAYER
    assert mod._file_seq_lens_kernels(["# device=x date=2026-11-22"]) == SEQ_LENS_KERNELS_PER_LAYER
    assert kernels_per_step(32, extra_layer_kernels=2) == kernels_per_step(32) + 64
    assert mod._file_build(["# fusedlis_commit=161ef69 date=x"]) == "161ef69"
    assert mod._file_build(["# fusedlis_commit=f3790f7+dirty date=x"]) == ""


def test_decode_fit_system_borrows_same_build_terms(tmp_path):
    """A file with too few NCCL rows takes the compute terms fitted on the same clean build's NCCL rows of
    another file of the same model; its own rows stay held out."""
    from fusedlis.perfmodel.step import step_time
    from fusedlis.perfmodel.volume import Layout, model_shape

    mod = _load_validate()
    hw = get_hardware("h200-ndr").with_(kernel_overhead=5e-6)
    shape = model_shape("llama-3.1-8b")
    head = "# device=x fusedlis_commit=abc1234 date=2026-11-22T05:50"
    cols = "model,tp,system,batch,context,ms_per_token,fuse_norm"

    def t(b, algo):
        return step_time(shape, Layout(2, 1), hw.with_(gpus_per_node=2), batch=b, context=512, prefill=False,
                         allreduce=algo, allgather="nccl").total * 1e3

    big = [head, cols] + [f"llama-3.1-8b,2,fusedlis-nccl,{b},512,{t(b, 'nccl')},0" for b in (1, 8, 32, 64)]
    small = [head, cols, f"llama-3.1-8b,2,fusedlis-nccl,1,512,{t(1, 'nccl')},0",
             f"llama-3.1-8b,2,fusedlis-auto,1,512,{t(1, 'oneshot_ll')},0"]
    (tmp_path / "a.csv").write_text("\n".join(big) + "\n")
    (tmp_path / "b.csv").write_text("\n".join(small) + "\n")
    rows, _ = mod.validate_decode(get_hardware("h200-ndr"), [str(tmp_path / "a.csv"), str(tmp_path / "b.csv")],
                                  None, "fusedlis-nccl")
    small_rows = rows[4:]
    assert [r["role"] for r in rows[:4]] == ["fit"] * 4
    assert [r["role"] for r in small_rows] == ["held-out", "held-out"]
    assert all(abs(r["rel_err"]) < 1e-3 for r in small_rows)  # the terms of `hw` recovered from file a


def test_gpufacts_allreduce_held_out_sizes_within_15_percent():
    """Each measured 2xH200 implementation, fitted on 4 sizes, predicts the other 4 (NCCL's protocol switch
    at 2 MB is the known exception, see docs/perfmodel.md)."""
    spec = importlib.util.spec_from_file_location("validate_perfmodel", ROOT / "bench" / "validate_perfmodel.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ar, _ = mod.read_rows([str(ROOT / "bench" / "results" / "perfmodel_gpufacts_allreduce.csv")])
    hw = get_hardware("h200-ndr").with_(gamma=1 / 1433e9)
    rows = mod.validate_allreduce(hw, ar, {8192, 131072, 1 << 20, 4 << 20})
    held = [r for r in rows if r["role"] == "held-out"]
    assert len(held) == 16
    bad = [(r["impl"], r["case"]) for r in held if abs(r["rel_err"]) > 0.15]
    assert bad in ([], [("nccl", "2097152")])


def test_validate_decode_fit_on_tp1_predicts_tp2(tmp_path):
    from fusedlis.perfmodel.step import step_time
    from fusedlis.perfmodel.volume import Layout, model_shape

    spec = importlib.util.spec_from_file_location("validate_perfmodel", ROOT / "bench" / "validate_perfmodel.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    base = get_hardware("h200-ndr").with_(peak_flops=1e30)
    truth = base.with_(kernel_overhead=7e-6, hbm_bw=4.0e12, gemm_flop_rate=0.0, gemm_row_latency=0.2e-6)
    shape = model_shape("llama-3.1-8b")
    lines = ["# fake date=2026-11-22T06:00", "model,tp,system,batch,context,ms_per_token,fuse_rope"]
    for tp in (1, 2):
        for b in (1, 8, 64):
            for ctx in (512, 4096):
                t = step_time(shape, Layout(tp, 1), truth.with_(gpus_per_node=tp), batch=b, context=ctx,
                              prefill=False, allreduce="nccl").total
                lines.append(f"llama-3.1-8b,{tp},fusedlis-nccl,{b},{ctx},{t * 1e3},1")
    f = tmp_path / "decode_tp.csv"
    f.write_text("\n".join(lines) + "\n")
    prof = tmp_path / "p.json"
    save_profile(base, prof)
    prefix = str(tmp_path / "d")
    assert mod.main(["--profile", str(prof), "--decode", str(f), "--decode-fit-tp", "1", "--out-prefix", prefix]) == 0
    fitted = load_profile(prefix + "_profile.json")
    assert fitted.kernel_overhead == pytest.approx(7e-6, rel=1e-3)
    assert fitted.hbm_bw == pytest.approx(4.0e12, rel=1e-3)
    assert fitted.gemm_row_latency == pytest.approx(0.2e-6, rel=1e-3)
    assert fitted.gemm_flop_rate == 0.0
    with open(prefix + ".csv") as fh:
        rows = list(csv.DictReader(fh))
    held = [r for r in rows if r["role"] == "held-out"]
    assert len(held) == 6 and all(abs(float(r["rel_err"])) < 1e-3 for r in held)


def test_validate_decode_tp_fit_takes_the_newest_file(tmp_path):
    """Two builds of the engine at tp=1: the compute terms come from the newer file alone (the older, slower
    build is held out and mispredicted), not from a blend of both."""
    from fusedlis.perfmodel.step import step_time
    from fusedlis.perfmodel.volume import Layout, model_shape

    spec = importlib.util.spec_from_file_location("validate_perfmodel", ROOT / "bench" / "validate_perfmodel.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    base = get_hardware("h200-ndr").with_(peak_flops=1e30)
    shape = model_shape("llama-3.1-8b")
    paths = []
    for name, date, ovh in (("old", "2026-11-22T04:00", 20e-6), ("new", "2026-11-22T09:00", 7e-6)):
        truth = base.with_(kernel_overhead=ovh, hbm_bw=4.0e12, gemm_flop_rate=0.0, gemm_row_latency=0.2e-6)
        lines = [f"# fake date={date}", "model,tp,system,batch,context,ms_per_token,fuse_rope"]
        for b in (1, 8, 64):
            for ctx in (512, 4096):
                t = step_time(shape, Layout(1, 1), truth.with_(gpus_per_node=1), batch=b, context=ctx,
                              prefill=False, allreduce="nccl").total
                lines.append(f"llama-3.1-8b,1,fusedlis-nccl,{b},{ctx},{t * 1e3},1")
        f = tmp_path / f"decode_tp1_{name}.csv"
        f.write_text("\n".join(lines) + "\n")
        paths.append(str(f))
    rows, hw = mod.validate_decode(base, paths, fit_tp=1)
    assert hw.kernel_overhead == pytest.approx(7e-6, rel=1e-3)
    new = [r for r in rows if "new" in r["source"]]
    old = [r for r in rows if "old" in r["source"]]
    assert {r["role"] for r in new} == {"fit"} and {r["role"] for r in old} == {"held-out"}
    assert all(abs(r["rel_err"]) < 1e-3 for r in new) and all(r["rel_err"] < -0.01 for r in old)


def test_reduce_row_sets_gamma():
    rows = [{"kind": "reduce", "bytes": 1 << 30, "us": 750.0, "GBps": 0.0},
            {"kind": "copy", "bytes": 1 << 31, "us": 792.0, "GBps": 2711.0}]  # reduce wins over copy
    hw = profile_from_measurements(rows, get_hardware("h200-ndr"))
    assert hw.gamma == pytest.approx(750e-6 / (1 << 30))
    assert "fitted from measurement files" in hw.sources[0]


def _synthetic_raw(regimes_nccl, oneshot, sizes):
    """Raw calibrate rows whose times follow exact alpha-beta lines (per size regime) on 2 GPUs."""
    from fusedlis.perfmodel import collectives as coll
    from fusedlis.perfmodel.hardware import Link

    gamma = 1 / 1400e9
    link = Link(oneshot[0], oneshot[1], 0, 1).with_algo("oneshot", *oneshot).with_regimes("nccl", regimes_nccl)
    hw = get_hardware("h200-ndr").with_(intra=link, gamma=gamma)
    rows = [{"kind": "device", "name": "Fake GPU", "gpus": 2, "date": "2026-01-01"},
            {"kind": "reduce", "bytes": 1 << 30, "us": (1 << 30) * gamma * 1e6}]
    for m in sizes:
        rows.append({"kind": "allreduce", "impl": "nccl", "algo": "ring", "gpus": 2, "bytes": m,
                     "us": coll.allreduce("nccl", hw, 1, 2, m).total * 1e6})
        rows.append({"kind": "allreduce", "impl": "fusedlis", "algo": "oneshot", "gpus": 2, "bytes": m,
                     "us": coll.allreduce("oneshot", hw, 1, 2, m).total * 1e6})
    for k, n in ((4096, 3072), (2048, 4096), (4096, 14336), (7168, 4096)):
        b = 2 * (k * n + k + n)
        rows.append({"kind": "gemm", "M": 1, "K": k, "N": n, "bytes": b, "us": 4.0 + b / 4.2e12 * 1e6})
    return rows


def test_calibrate_fits_protocol_regimes_from_synthetic_timings(tmp_path):
    from fusedlis.perfmodel.calibrate import read_raw_csv, write_raw_csv

    sizes = [8192 << i for i in range(10)] + [3 << 20, 6 << 20]
    ll, simple = (3 << 19, 5e-6, 1 / 150e9), (float("inf"), 12e-6, 1 / 500e9)
    rows = _synthetic_raw([ll, simple], (6e-6, 1 / 400e9), sizes)
    write_raw_csv(rows, tmp_path / "raw.csv")
    hw = profile_from_measurements(read_raw_csv(tmp_path / "raw.csv"), get_hardware("h200-ndr"))
    regs = hw.intra.regimes("nccl")
    assert len(regs) == 2
    assert 1 << 20 < regs[0][0] < 2 << 20  # the switch lies between the measured 1M and 2M
    assert regs[0][1:] == pytest.approx(ll[1:], rel=1e-6) and regs[1][1:] == pytest.approx(simple[1:], rel=1e-6)
    assert hw.intra.params("nccl", 4096) == pytest.approx(ll[1:], rel=1e-6)
    assert hw.intra.params("oneshot", 4 << 20) == pytest.approx((6e-6, 1 / 400e9), rel=1e-6)
    assert len(hw.intra.regimes("oneshot")) == 1  # a straight line stays one regime
    assert hw.kernel_overhead == pytest.approx(4e-6, rel=1e-6) and hw.hbm_bw == pytest.approx(4.2e12, rel=1e-6)
    # the regimes survive the profile file
    save_profile(hw, tmp_path / "p.json")
    back = load_profile(tmp_path / "p.json")
    back_regs = back.intra.regimes("nccl")  # pytest >= 9.2: approx() takes no nested sequences
    assert len(back_regs) == len(regs)
    assert all(b == pytest.approx(r, rel=1e-9) for b, r in zip(back_regs, regs))
    # too few sizes above the switch for min_regime_points: one regime
    one = profile_from_measurements(rows, get_hardware("h200-ndr"), min_regime_points=6)
    assert len(one.intra.regimes("nccl")) == 1


def test_fit_regimes_hand_case():
    from fusedlis.perfmodel.calibrate import fit_regimes

    # one-shot on 2 GPUs: t = alpha + m (beta + gamma); gamma = 0 here
    pts = [(8192, 5e-6 + 8192e-12), (16384, 5e-6 + 16384e-12), (32768, 5e-6 + 32768e-12),
           (1 << 20, 7e-6 + (1 << 20) * 3e-12), (2 << 20, 7e-6 + (2 << 20) * 3e-12), (4 << 20, 7e-6 + (4 << 20) * 3e-12)]
    regs = fit_regimes([("oneshot", 2, m, t) for m, t in pts], 0.0)
    assert regs[0][0] == pytest.approx((32768 * (1 << 20)) ** 0.5)
    assert regs[0][1:] == pytest.approx((5e-6, 1e-12), rel=1e-6)
    assert regs[1] == pytest.approx((float("inf"), 7e-6, 3e-12), rel=1e-6)


def test_profile_regime_errors(tmp_path):
    d = get_hardware("h200-ndr").to_json()
    d["intra"]["algorithms"] = {"nccl": {"alpha_us": 1.0, "bandwidth_GBps": 10.0}}
    f = tmp_path / "p.json"
    f.write_text(json.dumps(d))
    with pytest.raises(ProfileError, match="nccl takes only 'regimes'"):
        load_profile(f)
    d["intra"]["algorithms"] = {"oneshot": {"regimes": [{"max_bytes": 0, "alpha_us": 1, "bandwidth_GBps": 1}]}}
    f.write_text(json.dumps(d))
    with pytest.raises(ProfileError, match=r"algorithms.oneshot'.regimes\[0\]: field 'max_bytes' must be > 0"):
        load_profile(f)


def test_model_shape_checks_are_llama_configs():
    from fusedlis.model import LlamaConfig
    from fusedlis.model.config import ConfigError
    from fusedlis.perfmodel.volume import ModelShape, model_shape

    with pytest.raises(ConfigError, match="model 'bad': num_attention_heads"):
        ModelShape("bad", 10, 8, 16, 1, 3, 2, 4)
    with pytest.raises(ConfigError, match="head_dim must be even"):
        ModelShape("odd", 10, 8, 16, 1, 2, 2, 3)
    cfg = LlamaConfig.preset("llama-3.1-8b")
    assert ModelShape.from_config(cfg, "x").llama_config().num_parameters() == cfg.num_parameters()
    assert model_shape("llama-3.1-8b") == ModelShape.from_config(cfg, "llama-3.1-8b")


def _validate_module():
    spec = importlib.util.spec_from_file_location("validate_perfmodel", ROOT / "bench" / "validate_perfmodel.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_validate_decode_rope_rows_count_one_kernel_fewer(tmp_path):
    """Rope inside decode attention (the fuse_rope column; in older files, bench/decode.py's '<mode>-rope'
    systems) is modelled as the mode with one kernel launch fewer per layer than the rope kernel's builds."""
    mod = _validate_module()
    hw = get_hardware("h200-ndr").with_(kernel_overhead=3e-6)
    f = tmp_path / "decode_tp2.csv"
    f.write_text("# device=fake date=2026-11-23T10:00\nmodel,tp,system,batch,context,ms_per_token,fuse_norm\n"
                 "llama-3.1-8b,2,fusedlis-nccl,1,512,3.3,0\nllama-3.1-8b,2,fusedlis-nccl-rope,1,512,3.2,0\n"
                 "llama-3.1-8b,2,fusedlis-nccl-rope-lpdl,1,512,3.1,0\n")
    cases = {c[0]["system"]: c for c in mod._decode_cases(hw, [str(f)])}
    assert set(cases) == {"fusedlis-nccl", "fusedlis-nccl-rope", "fusedlis-nccl-rope-lpdl"}
    assert cases["fusedlis-nccl-rope"][1] == "nccl" and cases["fusedlis-nccl-rope-lpdl"][0]["_seqk"] == "0"
    assert cases["fusedlis-nccl"][0]["_seqk"] == "1"
    rows, _ = mod.validate_decode(hw, [str(f)])
    pred = {r["impl"]: r["predicted_us"] for r in rows}
    layers = 32
    assert pred["fusedlis-nccl"] - pred["fusedlis-nccl-rope"] == pytest.approx(layers * 3.0, rel=1e-6)
    # files with the column: it decides, whatever the suffix
    f.write_text("# device=fake date=2026-11-23T10:00\nmodel,tp,system,batch,context,ms_per_token,fuse_norm,"
                 "fuse_rope\nllama-3.1-8b,2,fusedlis-nccl,1,512,3.3,0,1\n"
                 "llama-3.1-8b,2,fusedlis-nccl-norope,1,512,3.2,0,0\n")
    cases = {c[0]["system"]: c for c in mod._decode_cases(hw, [str(f)])}
    assert cases["fusedlis-nccl"][0]["_seqk"] == "0" and cases["fusedlis-nccl-norope"][0]["_seqk"] == "1"


def test_validate_decode_uses_ll_algorithm_and_fuse_norm_column(tmp_path):
    """LL-era files (a fuse_norm column, or a dated header after LL_SINCE): auto -> oneshot_ll at decode sizes,
    nvrar-2node -> nvrar_ll; fuse_norm=1 rows are predicted with 2 RMSNorm kernels fewer per layer."""
    from fusedlis.perfmodel.step import step_time
    from fusedlis.perfmodel.volume import Layout, model_shape

    mod = _validate_module()
    hw = get_hardware("h200-ndr").with_(intra=get_hardware("h200-ndr").intra.with_algo("oneshot_ll", 2e-6, 1 / 400e9))
    shape = model_shape("llama-3.1-8b")
    f = tmp_path / "decode_tp2.csv"
    lines = ["# device=fake date=2026-11-23T10:00", "model,tp,system,batch,context,ms_per_token,fuse_norm,fuse_rope"]
    for system, fuse in (("fusedlis-auto", 1), ("fusedlis-auto-unfusednorm", 0), ("fusedlis-nccl", 0)):
        lines.append(f"llama-3.1-8b,2,{system},8,512,5.0,{fuse},1")
    lines.append("llama-3.1-8b,2,fusedlis-nvrar-2node,8,512,5.0,0,1")
    f.write_text("\n".join(lines) + "\n")
    cases = mod._decode_cases(hw, [str(f)])
    algos = {c[0]["system"]: c[1] for c in cases}
    assert algos == {"fusedlis-auto": "oneshot_ll", "fusedlis-auto-unfusednorm": "oneshot_ll",
                     "fusedlis-nccl": "nccl", "fusedlis-nvrar-2node": "nvrar_ll"}
    assert {c[0]["system"]: c[0]["_fuse"] for c in cases}["fusedlis-auto"] == "1"
    rows, _ = mod.validate_decode(hw, [str(f)])
    pred = {r["impl"]: r["predicted_us"] for r in rows}
    h2 = hw.with_(gpus_per_node=2)
    on = step_time(shape, Layout(2, 1), h2, batch=8, context=512, prefill=False, allreduce="oneshot_ll",
                   fuse_norm=True, allgather="nccl").total
    off = step_time(shape, Layout(2, 1), h2, batch=8, context=512, prefill=False, allreduce="oneshot_ll",
                    allgather="nccl").total
    assert pred["fusedlis-auto +norm"] == pytest.approx(on * 1e6)
    assert pred["fusedlis-auto-unfusednorm"] == pytest.approx(off * 1e6)
    assert on < off
    # the same rows in a flag-era file (dated before the LL kernels) run the flag kernels
    f.write_text("\n".join(["# date=2026-11-22T02:50", lines[1].replace(",fuse_norm,fuse_rope", "")]
                           + [ln.rsplit(",", 2)[0] for ln in lines[2:]]) + "\n")
    assert {c[0]["system"]: c[1] for c in mod._decode_cases(hw, [str(f)])}["fusedlis-auto"] == "oneshot"


def test_validate_decode_fit_per_file_system(tmp_path):
    """--decode-fit-system: a file's NCCL rows fit its compute terms, its other rows are held out."""
    mod = _validate_module()
    hw = get_hardware("h200-ndr")
    f = tmp_path / "decode_tp2.csv"
    lines = ["model,tp,system,batch,context,ms_per_token"]
    for b in (1, 8, 32, 64):
        lines += [f"llama-3.1-8b,2,fusedlis-nccl,{b},512,{3 + 0.05 * b}", f"llama-3.1-8b,2,fusedlis-auto,{b},512,{3 + 0.04 * b}"]
    f.write_text("\n".join(lines) + "\n")
    rows, _ = mod.validate_decode(hw, [str(f)], fit_system="fusedlis-nccl")
    assert {r["role"] for r in rows if r["impl"] == "fusedlis-nccl"} == {"fit"}
    assert {r["role"] for r in rows if r["impl"] == "fusedlis-auto"} == {"held-out"}


def test_validate_flags_profiled_decode_files_and_pairs_runs_by_time(tmp_path):
    """A decode file with a `decode_breakdown_` twin was timed after the profiler (flagged in `source`); a
    calibration tagged `_runHHMM` is paired with the newest all-reduce run at or before it."""
    spec = importlib.util.spec_from_file_location("validate_perfmodel", ROOT / "bench" / "validate_perfmodel.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    body = "model,tp,system,batch,context,ms_per_token\n" + "".join(
        f"llama-3.1-8b,1,fusedlis-nccl,{b},512,{3 + b / 32}\n" for b in (1, 8, 32))
    (tmp_path / "decode_tp1_x.csv").write_text(body)
    (tmp_path / "decode_tp1_y.csv").write_text(body)
    (tmp_path / "decode_breakdown_tp1_y.csv").write_text("")
    rows, _ = mod.validate_decode(get_hardware("h200-ndr"), [str(tmp_path / "decode_tp1_x.csv"),
                                                            str(tmp_path / "decode_tp1_y.csv")])
    assert {r["source"] for r in rows} == {"decode_tp1_x", "decode_tp1_y [profiled]"}
    lines = mod.summary_lines(rows, 0.15)
    assert any(ln.startswith("- decode profile, decode_tp1_y [profiled]: ") for ln in lines)
    assert mod._profile_time(Path("calibrated_2xH200_2026-11-22_run0614.json")) == "20261122-0614"
    assert mod._profile_time(Path("calibrated_2xH200_2026-11-22.json")) is None
    assert mod._allreduce_time(Path("allreduce_2xH200_20261122-0234_v0.csv")) == "20261122-0234"


def test_validate_reads_4_gpu_allreduce_runs(tmp_path):
    """bench/allreduce.py names one GPU per node '2x1' at any world size and two nodes '2x<world/2>': on 4 GPUs
    nvrar_2x1 is 4 nodes of 1 (one link class, fitted); 2 nodes x 2 GPUs and an auto front end without its
    per-size algorithm are left out, not guessed."""
    mod = _validate_module()
    assert mod._logical_nodes("fusedlis_nvrar_2x1_ll", 2) == 2
    assert mod._logical_nodes("fusedlis_nvrar_2x1_ll", 4) == 4
    assert mod._logical_nodes("fusedlis_nvrar_2x2_ll", 4) == 2
    assert mod._logical_nodes("fusedlis_one_shot_ll", 4) == 1
    f = tmp_path / "allreduce_4xH200_x.csv"
    rows = ["device,bytes,variant,us,algorithm"]
    for b, us in ((8192, 5.0), (131072, 6.0), (1048576, 12.0)):
        rows += [f"4xH200,{b},nccl,{4 * us}", f"4xH200,{b},fusedlis_nvrar_2x1_ll,{us}",
                 f"4xH200,{b},fusedlis_nvrar_2x2_ll,{us}", f"4xH200,{b},fusedlis_auto_2x2,{us}",
                 f"4xH200,{b},fusedlis_auto,{us},one_shot_ll"]
    f.write_text("\n".join(rows) + "\n")
    ars, _ = mod.read_rows([str(f)])
    got = {(a["impl"], a["algo"], a["nodes"], a["gpus"]) for a in ars}
    assert got == {("nccl", "nccl", 1, 4), ("fusedlis_nvrar_2x1_ll", "nvrar_ll", 4, 4),
                   ("fusedlis_auto", "oneshot_ll", 1, 4)}

"""Performance model: formulas against hand-computed cases."""

from __future__ import annotations

import math

import pytest

from fusedlis.perfmodel import collectives as coll
from fusedlis.perfmodel.hardware import Hardware, Link
from fusedlis.perfmodel.step import memory_per_gpu, predict, recommend, step_time
from fusedlis.perfmodel.volume import Layout, ModelShape, model_shape, parse_layout, step_volume

LLAMA_8B = ModelShape("llama-3.1-8b", 128256, 4096, 14336, 32, 32, 8, 128)

A_I, BW_I, A_E, BW_E, RED = 2e-6, 100e9, 7e-6, 20e9, 500e9


def hw(gpn: int = 8, **kw) -> Hardware:
    base = Hardware("t", "t", gpn, 2e12, 500e12, 80e9, 3e-6, 1 / RED,
                    Link(A_I, 1 / BW_I, 2 * A_I, 2 / BW_I), Link(A_E, 1 / BW_E, 2 * A_E, 2 / BW_E))
    return base.with_(**kw)


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-15)


def test_llama8b_tp2_decode_bytes_per_token():
    # 2 all-reduces per layer x 32 layers + 1 after the embedding, each [1, 4096] bf16 = 8192 B;
    # logits all-gather [1, 128256] bf16 = 256512 B.
    v = step_volume(LLAMA_8B, Layout(2, 1), tokens=1, rows=1)
    assert v.allreduce_count == 65
    assert v.allreduce_bytes == 8192
    assert v.allgather_bytes == 256512
    assert v.total == 65 * 8192 + 256512 == 788992
    # per-GPU wire bytes of one ring all-reduce on 2 GPUs: 2 (p-1)/p m = m
    assert coll.bytes_sent("ring", 1, 2, 8192) == 8192


def test_preset_matches_hand_shape():
    assert model_shape("llama-3.1-8b") == LLAMA_8B
    assert model_shape("llama-3.1-8b").num_params() == 8_030_261_248


def test_pp_volume_hand():
    # 3 boundaries x (hidden + residual) x [16, 4096] bf16, plus 16 int64 ids back to stage 0
    v = step_volume(LLAMA_8B, Layout(1, 4), tokens=16, rows=16)
    assert v.allreduce_count == 0 and v.allgather_bytes == 0
    assert v.p2p_bytes == 3 * 2 * 16 * 4096 * 2 + 16 * 8
    hyb = step_volume(LLAMA_8B, Layout(2, 2), tokens=1, rows=1)
    assert hyb.total == 65 * 8192 + 256512 + 2 * 8192 + 8


def test_ring_one_node_hand():
    m = 1 << 20
    c = coll.ring(hw(), 1, 4, m)
    assert close(c.latency, 6 * A_I)
    assert close(c.bandwidth, 1.5 * m / BW_I)
    assert close(c.reduction, 0.75 * m / RED)
    assert c.inter == 0


def test_ring_multinode_charged_at_network():
    m = 1 << 20
    c = coll.ring(hw(4), 2, 4, m)
    assert close(c.total, 14 * A_E + 14 / 8 * m / BW_E + 7 / 8 * m / RED)
    assert close(c.inter, c.latency + c.bandwidth)


def test_oneshot_twoshot_hand():
    m = 65536
    o = coll.oneshot(hw(), 1, 4, m)
    assert close(o.total, A_I + 3 * m / BW_I + 3 * m / RED)
    t = coll.twoshot(hw(), 1, 4, m)
    assert close(t.total, 2 * A_I + 1.5 * m / BW_I + 0.75 * m / RED)


def test_recursive_doubling_and_rabenseifner_hand():
    m = 4096
    assert close(coll.recursive_doubling(hw(), 1, 8, m).total, 3 * (A_I + m / BW_I + m / RED))
    # 6 ranks: fold 2 in and back out (2 alpha, 2 m beta, m gamma) + 2 doubling steps among 4
    assert close(coll.recursive_doubling(hw(), 1, 6, m).total,
                 2 * A_I + 2 * m / BW_I + m / RED + 2 * (A_I + m / BW_I + m / RED))
    assert close(coll.rabenseifner(hw(), 1, 8, m).total, 6 * A_I + 1.75 * m / BW_I + 0.875 * m / RED)
    # 2 nodes x 2 GPUs: distance 1 inside a node, distance 2 across
    c = coll.recursive_doubling(hw(2), 2, 2, m)
    assert close(c.total, (A_I + m / BW_I + m / RED) + (A_E + m / BW_E + m / RED))
    assert close(c.inter, A_E + m / BW_E)


def test_nvrar_hand():
    m = 1 << 20
    c = coll.nvrar(hw(4), 2, 4, m)
    rs = A_I + 0.75 * m / BW_I + 0.75 * m / RED
    rd = A_E + m / 4 / BW_E + m / 4 / RED
    ag = A_I + 0.75 * m / BW_I
    assert close(c.total, rs + rd + ag)
    assert close(c.inter, A_E + m / 4 / BW_E)
    # 8 nodes of 1 GPU: pure recursive doubling over the network
    assert close(coll.nvrar(hw(1), 8, 1, m).total, 3 * (A_E + m / BW_E + m / RED))


def test_nccl_uses_nccl_link_and_min_of_ring_tree():
    m = 1 << 16
    h = hw()
    c = coll.allreduce("nccl", h, 1, 8, m)
    ring = 14 * 2 * A_I + 1.75 * m * 2 / BW_I + 0.875 * m / RED
    tree = 6 * 2 * A_I + 2 * m * 2 / BW_I + m / RED
    assert close(c.total, min(ring, tree))


def test_tiny_decode_step_hand():
    # 1 layer, hidden 8, inter 16, 2 heads of 4, 1 kv head, vocab 16; TP=1, batch 1, context 10.
    s = ModelShape("t", 16, 8, 16, 1, 2, 1, 4)
    h = hw(peak_flops=1e30, kernel_overhead=0.0)
    st = step_time(s, Layout(1, 1), h, batch=1, context=10, prefill=False)
    b = 2
    gemms = (8 * 16 + 8 + 16) + (8 * 8 + 8 + 8) + (8 * 32 + 8 + 32) + (16 * 8 + 16 + 8)  # qkv, o, gate_up, down
    attn = 10 * 2 * 4 + 2 * 2 * 4  # KV read + q in / o out
    norms = 2 * 2 * 8
    rope = 16 * 2
    per_step = 2 * 8 + (16 * 8 + 8 + 16) + 2 * 8  # embedding, lm_head, final norm (elements of bf16)
    sample_bytes = 16 * 4
    expected = (gemms + attn + norms + rope + per_step) * b + sample_bytes
    assert close(st.compute * h.hbm_bw, expected)
    assert st.comm == 0 and st.overhead == 0


def test_decode_weight_bytes_dominate_8b():
    # Llama-3.1-8B TP=1 batch 1: compute ~ weights / HBM bandwidth (KV at context 1 is tiny)
    h = hw(peak_flops=1e30, kernel_overhead=0.0)
    st = step_time(LLAMA_8B, Layout(1, 1), h, batch=1, context=1, prefill=False)
    weights = 2 * (32 * sum(LLAMA_8B.layer_linear_params().values()) + 128256 * 4096)
    assert weights / h.hbm_bw <= st.compute <= 1.001 * weights / h.hbm_bw


def test_memory_per_gpu_hand():
    mem = memory_per_gpu(LLAMA_8B, Layout(1, 1), batch=1, max_len=1)
    norms = 2 * 32 * 4096 + 4096
    kv = 32 * 2 * 8 * 128 * 2
    assert mem == 2 * (LLAMA_8B.num_params() - norms) + kv


def test_pp_decode_not_faster_than_single_stage_compute():
    h = hw()
    one = step_time(LLAMA_8B, Layout(1, 1), h, batch=4, context=100, prefill=False)
    pp = step_time(LLAMA_8B, Layout(1, 4), h, batch=4, context=100, prefill=False)
    assert pp.total >= one.total
    tp = step_time(LLAMA_8B, Layout(4, 1), h, batch=4, context=100, prefill=False)
    assert tp.compute < one.compute / 3


def test_layout_parsing_and_errors():
    assert parse_layout("hybrid", 32, 4) == Layout(4, 8)
    assert parse_layout("tp", 8, 8) == Layout(8, 1)
    assert parse_layout("pp", 8, 8) == Layout(1, 8)
    assert parse_layout("tp4pp2", 8, 8) == Layout(4, 2)
    with pytest.raises(ValueError, match="uses 6 GPUs"):
        parse_layout("tp3pp2", 8, 8)
    with pytest.raises(ValueError, match="unknown layout"):
        parse_layout("zigzag", 8, 8)
    with pytest.raises(ValueError, match="heads"):
        Layout(3, 1).check(LLAMA_8B, 8)
    with pytest.raises(ValueError, match="exceeds"):
        Layout(1, 64).check(LLAMA_8B, 8)
    with pytest.raises(ValueError, match="unknown all-reduce"):
        coll.resolve("butterfly")
    with pytest.raises(ValueError, match="nodes"):
        coll.ring(hw(), 0, 4, 10)


def test_predict_and_recommend():
    preds = predict(LLAMA_8B, hw(4), [Layout(8, 1), Layout(1, 8), Layout(4, 2)], ["nccl", "nvrar"], [1, 8],
                    prompt=128, gen=32)
    assert len(preds) == (2 + 1 + 2) * 2
    lines = recommend(preds)
    assert len(lines) == 2 and all("use" in ln for ln in lines)
    best1 = min((p for p in preds if p.batch == 1), key=lambda p: p.token_latency)
    assert best1.layout.name in lines[0]


def test_network_bytes_hand():
    m = 1000
    # NVRAR, 8 nodes x 4: each of 4 rails does 3 doubling steps among 8 GPUs on m/4
    assert coll.network_bytes("nvrar", 8, 4, m) == 4 * 3 * 8 * m / 4
    # flat recursive doubling over 32 ranks: distances 4, 8, 16 cross nodes, all 32 ranks send m each
    assert coll.network_bytes("rd", 8, 4, m) == 3 * 32 * m
    assert coll.network_bytes("ring", 2, 2, m) == 2 * 2 * 3 / 4 * m
    assert coll.network_bytes("twoshot", 2, 2, m) == 2 * 2 * m
    for algo in coll.ALGORITHMS:
        assert coll.network_bytes(algo, 1, 8, m) == 0
    # PP across 2 nodes of 4 with tp=4: one boundary crosses, each of 4 TP ranks sends hidden + residual
    st = step_time(LLAMA_8B, Layout(4, 2), hw(4), batch=2, context=10, prefill=False, allreduce="nvrar")
    assert st.net_bytes == 4 * 2 * 2 * 4096 * 2 + 2 * 8


def test_decode_hides_nvlink_latency_prefill_does_not():
    base = hw(8)
    full = base.with_(ar_latency_hidden=1.0)
    assert full.latency_hidden("nccl") == 0.0 and full.latency_hidden("twoshot") == 1.0
    m = 4096 * 2
    ar = coll.allreduce("twoshot", base, 1, 2, m)
    d0 = step_time(LLAMA_8B, Layout(2, 1), base, batch=1, context=10, prefill=False, allreduce="twoshot")
    d1 = step_time(LLAMA_8B, Layout(2, 1), full, batch=1, context=10, prefill=False, allreduce="twoshot")
    assert close(d0.comm - d1.comm, 65 * ar.latency)
    p0 = step_time(LLAMA_8B, Layout(2, 1), base, batch=1, context=10, prefill=True, allreduce="twoshot")
    p1 = step_time(LLAMA_8B, Layout(2, 1), full, batch=1, context=10, prefill=True, allreduce="twoshot")
    assert p0.comm == p1.comm


def test_auto_matches_comm_crossover():
    from fusedlis.comm.allreduce import ONE_SHOT_MAX_BYTES, ONE_SHOT_MAX_BYTES_DEFAULT

    assert coll.AUTO_ONE_SHOT_MAX_BYTES == ONE_SHOT_MAX_BYTES
    assert coll.AUTO_ONE_SHOT_MAX_BYTES_DEFAULT == ONE_SHOT_MAX_BYTES_DEFAULT
    h = hw()
    small, big = ONE_SHOT_MAX_BYTES_DEFAULT, ONE_SHOT_MAX_BYTES_DEFAULT + 2
    assert coll.allreduce("auto", h, 1, 4, small).total == coll.allreduce("oneshot", h, 1, 4, small).total
    assert coll.allreduce("auto", h, 1, 4, big).total == coll.allreduce("twoshot", h, 1, 4, big).total
    assert coll.allreduce("auto", h, 2, 4, big).total == coll.allreduce("nvrar", h, 2, 4, big).total


def test_auto_matches_comm_choice_with_ll():
    """The perfmodel's auto picks what fusedlis.comm.allreduce.choose_algorithm picks (LL included)."""
    from fusedlis.comm.allreduce import LL_MAX_BYTES, ONE_SHOT_MAX_BYTES, ONE_SHOT_MAX_BYTES_DEFAULT, choose_algorithm
    from fusedlis.comm.topology import Topology

    assert coll.AUTO_LL_MAX_BYTES == LL_MAX_BYTES
    for nodes, gpn in ((1, 2), (1, 4), (1, 8), (2, 1), (2, 4)):
        topo = Topology(nodes * gpn, gpus_per_node=gpn)
        osm = ONE_SHOT_MAX_BYTES.get(gpn, ONE_SHOT_MAX_BYTES_DEFAULT)
        for reachable in (True, False):
            ll_max = LL_MAX_BYTES if (nodes == 1 or reachable) else 0
            for m in (8192, osm, osm + 2, LL_MAX_BYTES, LL_MAX_BYTES + 2, 8 << 20):
                want = coll.resolve(choose_algorithm(m, topo, "auto", 16 << 20, osm, True, ll_max))
                assert coll.auto_algorithm(nodes, gpn, m, reachable) == want, (nodes, gpn, m, reachable)
                h = hw(gpn, inter_load_store=reachable)
                assert coll.allreduce("auto", h, nodes, gpn, m).total == coll.allreduce(want, h, nodes, gpn, m).total
                assert coll.bytes_sent("auto", nodes, gpn, m) == coll.bytes_sent(want, nodes, gpn, m)


def test_ll_names_resolve():
    for name, want in (("one_shot_ll", "oneshot_ll"), ("two_shot_ll", "twoshot_ll"), ("nvrar_ll", "nvrar_ll"),
                       ("oneshot_ll", "oneshot_ll"), ("One-Shot-LL", "oneshot_ll"), (" twoshot-ll ", "twoshot_ll")):
        assert coll.resolve(name) == want
        assert coll.flag_variant(name) == want[:-3]
    from fusedlis.comm.device import DEVICE_ALGORITHMS

    for name in DEVICE_ALGORITHMS:  # every device algorithm of fusedlis.comm has a model
        assert coll.resolve(name) in coll.ALGORITHMS
    for bad in ("ring_ll", "auto_ll", "nccl_ll", "_ll", "ll"):
        with pytest.raises(ValueError, match="unknown all-reduce algorithm"):
            coll.resolve(bad)


def test_ll_hand_computed():
    # 2 GPUs, m = 1 MiB; oneshot_ll with its own terms alpha 3 us, 200 GB/s; flag one-shot 6 us, 200 GB/s.
    m = 1 << 20
    link = Link.make(A_I * 1e6, BW_I / 1e9, algorithms={"oneshot": (6.0, 200.0), "oneshot_ll": (3.0, 200.0)})
    h = hw(2, intra=link)
    ll, flag = coll.allreduce("one_shot_ll", h, 1, 2, m), coll.allreduce("oneshot", h, 1, 2, m)
    assert close(ll.latency, 3e-6) and close(flag.latency, 6e-6)
    assert close(ll.bandwidth, m / 200e9) and close(ll.bandwidth, flag.bandwidth)
    assert close(ll.reduction, m / RED) and close(ll.total, flag.total - 3e-6)
    # twoshot_ll without terms of its own: twoshot's (an upper bound); twoshot without: the custom link
    t = coll.allreduce("twoshot_ll", h, 1, 2, m)
    assert close(t.total, 2 * A_I + m / BW_I + 0.5 * m / RED)
    assert close(t.total, coll.allreduce("twoshot", h, 1, 2, m).total)
    # nvrar_ll on 2 nodes x 4: RS + AG on NVLink (custom terms), one RD step on m/4 over the network
    h4 = hw(4)
    c = coll.allreduce("nvrar_ll", h4, 2, 4, m)
    assert close(c.total, 2 * A_I + 2 * 0.75 * m / BW_I + 0.75 * m / RED + A_E + m / 4 / BW_E + m / 4 / RED)
    assert coll.bytes_sent("nvrar_ll", 2, 4, m) == coll.bytes_sent("nvrar", 2, 4, m)
    assert coll.network_bytes("oneshot_ll", 2, 4, m) == coll.network_bytes("oneshot", 2, 4, m)


def test_ll_profile_roundtrip():
    from fusedlis.perfmodel.hardware import profile_from_dict

    d = hw(2, inter_load_store=True, intra=Link.make(2.0, 100.0, algorithms={"nvrar_ll": (1.5, 90.0)})).to_json()
    assert d["inter_load_store"] is True and "nvrar_ll" in d["intra"]["algorithms"]
    h = profile_from_dict(d)
    assert h.inter_load_store and close(h.intra.params("nvrar_ll")[0], 1.5e-6)
    assert "inter_load_store" not in hw(2).to_json()


def test_ll_terms_and_fused_norm_roundtrip():
    """A profile with LL terms (size regimes included) and the fused-norm row term survives JSON."""
    from fusedlis.perfmodel.hardware import profile_from_dict

    link = Link.make(2.0, 100.0, algorithms={"oneshot_ll": [(32768, 3.0, 150.0), (math.inf, 3.8, 262.0)],
                                             "twoshot_ll": (2.6, 300.0), "nvrar_ll": (4.0, 200.0)})
    h = hw(2, intra=link).with_(ar_norm_row_latency=25e-9)
    back = profile_from_dict(h.to_json())
    assert close(back.ar_norm_row_latency, 25e-9)
    for algo, m, (a, bw) in (("oneshot_ll", 8192, (3.0, 150.0)), ("oneshot_ll", 1 << 20, (3.8, 262.0)),
                             ("twoshot_ll", 1 << 20, (2.6, 300.0)), ("nvrar_ll", 1 << 20, (4.0, 200.0))):
        got = back.intra.params(algo, m)
        assert close(got[0], a * 1e-6) and close(got[1], 1 / (bw * 1e9)), algo
    assert profile_from_dict(hw(2).to_json()).ar_norm_row_latency == 0.0


def test_decode_kernel_count_with_fused_norm():
    """fuse_norm: one RMSNorm kernel fewer per fused all-reduce (2 per layer); the fused kernel costs the
    all-reduce plus ar_norm_row_latency per row; TP=1 ignores it."""
    from fusedlis.perfmodel.step import KERNELS_PER_LAYER, KERNELS_PER_STEP, kernels_per_step

    L = LLAMA_8B.num_hidden_layers
    assert kernels_per_step(L) == L * KERNELS_PER_LAYER + KERNELS_PER_STEP
    assert kernels_per_step(L, fuse_norm=True) == L * (KERNELS_PER_LAYER - 2) + KERNELS_PER_STEP
    h = hw(2).with_(kernel_overhead=5e-6)
    kw = dict(batch=8, context=100, prefill=False, allreduce="oneshot_ll")
    off = step_time(LLAMA_8B, Layout(2, 1), h, **kw)
    on = step_time(LLAMA_8B, Layout(2, 1), h, fuse_norm=True, **kw)
    assert close(off.overhead - on.overhead, 2 * L * 5e-6)
    norm_bytes = 2 * 8 * LLAMA_8B.hidden_size * 2  # read + write of [8, hidden] bf16
    assert close(off.compute - on.compute, 2 * L * norm_bytes / h.hbm_bw)
    assert close(on.comm, off.comm)  # ar_norm_row_latency = 0: the fused kernel costs the all-reduce
    on2 = step_time(LLAMA_8B, Layout(2, 1), h.with_(ar_norm_row_latency=1e-7), fuse_norm=True, **kw)
    assert close(on2.comm - on.comm, 2 * L * 8 * 1e-7)
    one = step_time(LLAMA_8B, Layout(1, 1), h, **kw)
    assert close(step_time(LLAMA_8B, Layout(1, 1), h, fuse_norm=True, **kw).total, one.total)


def test_engine_algorithm_per_mode():
    """What each fusedlis.Engine all-reduce mode runs (choose_algorithm), LL and flag protocol."""
    from fusedlis.comm.allreduce import LL_MAX_BYTES, choose_algorithm
    from fusedlis.comm.topology import Topology

    for m in (8192, 1 << 20, 2 << 20, 4 << 20, 6 << 20):
        for nodes, gpn in ((1, 2), (2, 1)):
            topo = Topology(2, gpus_per_node=gpn)
            for mode in ("auto", "nvrar") + (("one_shot", "two_shot") if nodes == 1 else ()):
                for ll in (True, False):
                    want = coll.resolve(choose_algorithm(m, topo, mode, 16 << 20, 2 << 20, True,
                                                         LL_MAX_BYTES if ll else 0))
                    assert coll.engine_algorithm(mode, nodes, gpn, m, ll) == want, (mode, nodes, m, ll)
    assert coll.engine_algorithm("nccl", 1, 2, 8192) == "nccl"
    assert coll.engine_algorithm("fused", 1, 2, 8192) == "oneshot"
    assert coll.engine_algorithm("fused", 1, 2, 3 << 20) == "twoshot"
    with pytest.raises(ValueError, match="unknown"):
        coll.engine_algorithm("ring", 1, 2, 8192)


def test_calibrate_fits_ll_variants_and_fused_norm():
    """profile_from_measurements: each LL variant gets its own terms (nvrar_ll with the model of its 2 x 1
    logical-node topology) and the fused norm's per-row cost comes from all_reduce_norm rows (synthetic times)."""
    from fusedlis.perfmodel.calibrate import profile_from_measurements
    from fusedlis.perfmodel.hardware import get_hardware

    base = get_hardware("h200-ndr")
    truth = {"oneshot": (5e-6, 1 / 350e9), "oneshot_ll": (3e-6, 1 / 260e9), "twoshot_ll": (2.5e-6, 1 / 300e9),
             "nvrar_ll": (4e-6, 1 / 200e9)}
    rows = []
    for algo, (a, b) in truth.items():
        nodes = 2 if algo == "nvrar_ll" else 1
        link = Link(a, b, a, b)
        h = base.with_(intra=link, inter=link, gpus_per_node=2 // nodes)
        for m in (8192 << i for i in range(10)):
            t = coll.allreduce(algo, h, nodes, 2 // nodes, m).total
            rows.append({"kind": "allreduce", "impl": "fusedlis", "algo": algo, "gpus": 2, "nodes": nodes,
                         "bytes": m, "us": t * 1e6})
    rows += [{"kind": "allreduce_norm", "impl": "fusedlis", "algo": "oneshot_ll", "gpus": 2, "M": m, "N": 4096,
              "bytes": m * 8192, "us": 10.0 + 0.03 * m, "base_us": 10.0} for m in (1, 8, 32, 64)]
    prof = profile_from_measurements(rows, base, min_regime_points=100)
    for algo, (a, b) in truth.items():
        got = prof.intra.params(algo, 1 << 20)
        assert got[0] == pytest.approx(a, rel=1e-6) and got[1] == pytest.approx(b, rel=1e-6), algo
    assert prof.ar_norm_row_latency == pytest.approx(0.03e-6)


def test_regimes_are_chosen_by_size_bound_not_by_alpha():
    """The small-message regime applies below its bound even when the unbounded regime has the smaller alpha."""
    from fusedlis.perfmodel.hardware import Link

    link = Link.make(5.0, 300.0, algorithms={"oneshot_ll": [(1 << 20, 3.5, 250.0), (float("inf"), 2.8, 270.0)]})
    a_small, _ = link.params("oneshot_ll", 8192)
    a_big, _ = link.params("oneshot_ll", 4 << 20)
    assert a_small == pytest.approx(3.5e-6) and a_big == pytest.approx(2.8e-6)
    assert [r[0] for r in link.regimes("oneshot_ll")] == [1 << 20, float("inf")]

"""Performance model: hypothesis properties of the cost models and the step model."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from fusedlis.perfmodel import collectives as coll
from fusedlis.perfmodel.hardware import BUILTIN, Hardware, Link, profile_from_dict
from fusedlis.perfmodel.step import step_time
from fusedlis.perfmodel.volume import Layout, ModelShape, step_volume

ALGOS = sorted(coll.ALGORITHMS)
SHAPE = ModelShape("small", 1000, 512, 1536, 8, 8, 4, 64)


@st.composite
def hardware(draw) -> Hardware:
    gbps = st.floats(1.0, 2000.0)
    us = st.floats(0.0, 50.0)

    def link() -> Link:
        algos = draw(st.lists(st.sampled_from(["oneshot", "twoshot", "nvrar", "ring", "rd"]), unique=True,
                              max_size=2))
        return Link.make(draw(us), draw(gbps), draw(us), draw(gbps), {a: (draw(us), draw(gbps)) for a in algos})

    return Hardware("h", "h", draw(st.sampled_from([1, 2, 4, 8])), draw(st.floats(100.0, 5000.0)) * 1e9,
                    draw(st.floats(10.0, 2000.0)) * 1e12, 80e9, draw(us) * 1e-6,
                    1.0 / (draw(st.floats(50.0, 5000.0)) * 1e9), link(), link())


def _faster(h: Hardware, k: float, which: str) -> Hardware:
    return h.with_(**{which: getattr(h, which).scaled(k)})


nodes_s = st.sampled_from([1, 2, 3, 4, 8, 16])
gpn_s = st.sampled_from([1, 2, 3, 4, 8])
bytes_s = st.integers(0, 1 << 26)


@given(hardware(), st.sampled_from(ALGOS), nodes_s, gpn_s, bytes_s, st.floats(1.0, 100.0),
       st.sampled_from(["intra", "inter"]))
def test_more_bandwidth_never_slower(h, algo, nodes, gpn, m, k, which):
    slow = coll.allreduce(algo, h, nodes, gpn, m).total
    fast = coll.allreduce(algo, _faster(h, k, which), nodes, gpn, m).total
    assert fast <= slow * (1 + 1e-12)


@given(hardware(), st.sampled_from(ALGOS), gpn_s, bytes_s)
def test_one_node_has_no_inter_node_term(h, algo, gpn, m):
    c = coll.allreduce(algo, h, 1, gpn, m)
    assert c.inter == 0
    # changing the network changes nothing on one node
    other = h.with_(inter=Link.make(1e3, 0.001, 1e3, 0.001))
    assert coll.allreduce(algo, other, 1, gpn, m).total == c.total


@given(hardware(), bytes_s, gpn_s)
def test_recursive_doubling_with_one_node_costs_nothing(h, m, gpn):
    assert coll.recursive_doubling(h, 1, 1, m).total == 0
    # NVRAR on one node is its intra-node reduce-scatter + all-gather only: no inter-node term
    c = coll.nvrar(h, 1, gpn, m)
    assert c.inter == 0
    if gpn == 1:
        assert c.total == 0


@given(hardware(), st.sampled_from(ALGOS), nodes_s, gpn_s, bytes_s, bytes_s)
def test_cost_monotone_in_bytes_and_nonnegative(h, algo, nodes, gpn, m1, m2):
    a, b = sorted((m1, m2))
    ca, cb = coll.allreduce(algo, h, nodes, gpn, a), coll.allreduce(algo, h, nodes, gpn, b)
    assert 0 <= ca.total <= cb.total * (1 + 1e-12)
    assert 0 <= ca.inter <= ca.latency + ca.bandwidth + 1e-18


@given(hardware(), st.sampled_from(ALGOS), st.sampled_from([2, 4, 8]), gpn_s, bytes_s)
def test_inter_term_appears_across_nodes(h, algo, nodes, gpn, m):
    lk = h.inter
    h = h.with_(inter=Link(lk.alpha + 1e-7, lk.beta, lk.nccl_alpha + 1e-7, lk.nccl_beta))
    c = coll.allreduce(algo, h, nodes, gpn, m)
    assert c.inter > 0


@given(hardware(), st.sampled_from(["tp", "pp"]), st.sampled_from([1, 8, 64]), st.floats(1.5, 10.0),
       st.sampled_from(ALGOS))
def test_step_more_hbm_bandwidth_never_slower(h, kind, batch, k, algo):
    lay = Layout(h.gpus_per_node, 1) if kind == "tp" else Layout(1, min(h.gpus_per_node * 2, 8))
    if lay.tp > 8:
        return
    a = step_time(SHAPE, lay, h, batch=batch, context=256, prefill=False, allreduce=algo).total
    b = step_time(SHAPE, lay, h.with_(hbm_bw=h.hbm_bw * k), batch=batch, context=256, prefill=False,
                  allreduce=algo).total
    assert b <= a * (1 + 1e-12)


@given(hardware(), st.sampled_from([1, 2, 4, 8]), st.sampled_from([1, 16]), st.booleans(), st.sampled_from(ALGOS))
def test_step_within_one_node_has_no_inter_node_time(h, tp, batch, prefill, algo):
    h = h.with_(gpus_per_node=8)
    s = step_time(SHAPE, Layout(tp, 8 // tp), h, batch=batch, context=64, prefill=prefill, allreduce=algo)
    assert s.comm_inter == 0
    assert 0 <= s.comm_share < 1


@given(st.sampled_from([2, 4, 8]), st.integers(1, 256))
def test_tp_moves_more_than_pp(g, tokens):
    tp = step_volume(SHAPE, Layout(g, 1), tokens, tokens)
    pp = step_volume(SHAPE, Layout(1, g), tokens, tokens)
    assert tp.total > pp.total > 0


@given(st.sampled_from(sorted(BUILTIN)))
def test_profile_json_round_trip(name):
    h = BUILTIN[name]
    back = profile_from_dict(h.to_json(), "roundtrip")
    for f in ("gpus_per_node", "hbm_bw", "peak_flops", "kernel_overhead", "gamma", "ar_latency_hidden",
              "nccl_latency_hidden"):
        assert abs(getattr(back, f) - getattr(h, f)) <= 1e-9 * abs(getattr(h, f))
    for lk in ("intra", "inter"):
        x, y = getattr(back, lk), getattr(h, lk)
        for f in ("alpha", "beta", "nccl_alpha", "nccl_beta"):
            assert abs(getattr(x, f) - getattr(y, f)) <= 1e-9 * abs(getattr(y, f))
        assert [n for n, *_ in x.per_algo] == [n for n, *_ in y.per_algo]


@given(hardware(), st.sampled_from(ALGOS), st.sampled_from([1, 2, 4]), gpn_s, bytes_s, st.floats(0.0, 1.0))
def test_hidden_latency_only_touches_nvlink_latency(h, algo, nodes, gpn, m, frac):
    c = coll.allreduce(algo, h, nodes, gpn, m)
    d = c.hiding_latency(frac)
    assert d.bandwidth == c.bandwidth and d.reduction == c.reduction
    assert d.latency >= c.inter_latency - 1e-18
    assert abs((c.latency - d.latency) - frac * (c.latency - c.inter_latency)) <= 1e-12 * max(c.latency, 1e-9)


@given(hardware(), nodes_s, gpn_s, bytes_s, st.sampled_from(["oneshot", "twoshot", "nvrar"]),
       st.floats(0.0, 1.0), st.booleans())
def test_ll_never_slower_than_flag_with_lower_alpha(h, nodes, gpn, m, algo, frac, inter):
    """Same beta, alpha_LL <= alpha_flag (on the link class drawn): the LL variant is never slower."""
    which = "inter" if inter else "intra"
    link = getattr(h, which)
    a, b = link.params(algo, m)
    h = h.with_(**{which: link.with_algo(algo, a, b).with_algo(algo + "_ll", a * frac, b)})
    ll = coll.allreduce(algo + "_ll", h, nodes, gpn, m).total
    flag = coll.allreduce(algo, h, nodes, gpn, m).total
    assert ll <= flag * (1 + 1e-12) + 1e-18


@given(hardware(), st.sampled_from(["oneshot_ll", "twoshot_ll", "nvrar_ll", "auto"]), st.sampled_from([1, 2]),
       st.integers(1, 64), st.floats(1.0, 100.0), st.booleans())
def test_decode_step_more_bandwidth_never_slower_with_ll_and_fused_norm(h, algo, nodes, batch, k, fuse):
    """A decode step (LL all-reduce, norm fused or not) is never slower with more NVLink bandwidth."""
    h = h.with_(gpus_per_node=2 // nodes, intra=h.intra.with_algo(algo if algo != "auto" else "oneshot_ll",
                                                                  3e-6, 1 / 300e9))
    kw = dict(batch=batch, context=64, prefill=False, allreduce=algo, fuse_norm=fuse)
    slow = step_time(SHAPE, Layout(2, 1), h, **kw).total
    fast = step_time(SHAPE, Layout(2, 1), _faster(h, k, "intra"), **kw).total
    assert fast <= slow * (1 + 1e-12)


@given(hardware(), st.integers(1, 64))
def test_fused_norm_saves_norm_kernels(h, batch):
    """With no per-row cost, fusing the norm never slows a TP=2 decode step."""
    h = h.with_(gpus_per_node=2, ar_norm_row_latency=0.0)
    kw = dict(batch=batch, context=64, prefill=False, allreduce="oneshot_ll")
    assert step_time(SHAPE, Layout(2, 1), h, fuse_norm=True, **kw).total <= \
        step_time(SHAPE, Layout(2, 1), h, **kw).total * (1 + 1e-12)

"""think (ThinK query-driven key-channel pruning, kept channels as KV state): the cache against
an independent masked-attention oracle, keep-all exactness, real storage = accounting, RoPE pair
handling and the score on a planted channel pair, bad input, artifact round trip and the pass
manager's KV verification."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from mcomp.compiler import ir
from mcomp.compiler.manager import PassManager
from mcomp.compiler.spec import KVSpec, RopeSpec
from mcomp.errors import ConfigError
from mcomp.passes.assign_kv import AssignKV, AssignKVConfig, kv_passes
from mcomp.runtime.kv import KV_KINDS, bytes_held, parse_kv
from mcomp.runtime.kv.think import ThinKParams, think_cache
from mcomp.runtime.kvcache import AttentionState, KVBinding
from tests.helpers import kv_map_reference, kv_state_round_trip, small_ctx, tiny_gm, tiny_spec
from tests.runtime.test_xquant import run_cached

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(0))


def think_gm(text, spec=None, gm=None, seed=0):
    gm = gm if gm is not None else tiny_gm(spec, seed=seed)
    stats = [p.run(gm, small_ctx()).stats for p in kv_passes(text)]
    return gm, stats[-1]


def keeps(gm):
    return [KVBinding(gm, i).state()["keep"] for i in range(ir.get_spec(gm).n_layers)]


def masked_reference(gm, ids, keep_per_layer, monkeypatch):
    """The no-cache forward with keys zeroed outside the kept channels (so q·k sums over kept
    channels only, the model's scale kept), times the full V."""
    maps = []
    for ls, keep in zip(ir.get_spec(gm).layers, keep_per_layer):
        m = torch.zeros(ls.n_kv_heads, ls.head_dim).scatter_(1, keep, 1.0)
        maps.append(lambda k, v, m=m: (k * m[None, :, None, :], v))
    return kv_map_reference(gm, ids, maps, monkeypatch)


def oracle_scores(gm):
    """Per layer, ThinK's channel score (Hkv, D) computed independently: hooks on the attention
    modules of the plain forward over the calibration windows, norms by explicit loops."""
    spec = ir.get_spec(gm)
    seen = {i: ([], []) for i in range(spec.n_layers)}
    hooks = []
    for i in range(spec.n_layers):
        def pre(mod, args, i=i):
            seen[i][0].append(args[0])
            seen[i][1].append(args[1])
        hooks.append(gm.get_submodule(f"layers.{i}.attn").register_forward_pre_hook(pre))
    try:
        with torch.inference_mode():
            for ids in small_ctx().calibration_batches():
                gm(ids, torch.arange(ids.shape[1]).expand(ids.shape[0], -1), None)
    finally:
        for h in hooks:
            h.remove()
    out = []
    for i, ls in enumerate(spec.layers):
        Q = torch.cat(seen[i][0], 0).double()          # (N, Hq, T, D)
        K = torch.cat(seen[i][1], 0).double()          # (N, Hkv, T, D)
        g = ls.n_heads // ls.n_kv_heads
        s = torch.zeros(ls.n_kv_heads, ls.head_dim, dtype=torch.float64)
        for kv in range(ls.n_kv_heads):
            for c in range(ls.head_dim):
                kn = torch.linalg.vector_norm(K[:, kv, :, c])
                for h in range(kv * g, (kv + 1) * g):
                    s[kv, c] += torch.linalg.vector_norm(Q[:, h, :, c]) * kn
        out.append(s)
    return out


def test_decode_equals_masked_oracle_and_drops_lowest_pairs(monkeypatch):
    """think:0.125 on D=16 drops one RoPE pair per KV head: it must be the pair of lowest score
    (independent oracle), and streamed decode must equal attention over the kept channels only."""
    gm, st = think_gm("think:0.125")
    assert st["key_channels_kept"] == [14, 14]
    D, half = 16, 8
    for keep, s in zip(keeps(gm), oracle_scores(gm)):
        pair = (s[:, :half].pow(2) + s[:, half:].pow(2)).sqrt()
        low = pair.argmin(1)
        for kv in range(keep.shape[0]):
            want = sorted(set(range(D)) - {int(low[kv]), int(low[kv]) + half})
            assert keep[kv].tolist() == want
    ref = masked_reference(gm, IDS, keeps(gm), monkeypatch)
    plain, got, _ = run_cached(gm, IDS)
    assert (plain - ref).abs().max() > 1e-2           # the dropped pair really matters
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5 * ref.abs().max().item())


def test_hand_set_keep_through_set_layer_kv_equals_oracle(monkeypatch):
    """Any valid `keep` set by ir.set_layer_kv (here: different pairs per head and layer) is
    what the cache attends over."""
    gm = tiny_gm()
    params = parse_kv("think:0.25").spec.params
    hand = [torch.tensor([[1, 2, 4, 5, 6, 7, 9, 10, 12, 13, 14, 15],
                          [0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13]]),
            torch.tensor([[0, 2, 3, 4, 6, 7, 8, 10, 11, 12, 14, 15],
                          [1, 2, 3, 4, 5, 7, 9, 10, 11, 12, 13, 15]])]
    for i, k in enumerate(hand):
        ir.set_layer_kv(gm, i, KVSpec("think", params), {"keep": k})
    ref = masked_reference(gm, IDS, hand, monkeypatch)
    _, got, _ = run_cached(gm, IDS)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5 * ref.abs().max().item())


class _AllChannels(KVBinding):
    """A binding whose `keep` is every channel (no ratio in (0, 1) declares that shape)."""

    def state(self):
        ls = ir.get_spec(self.model).layers[self.layer]
        return {"keep": torch.arange(ls.head_dim).expand(ls.n_kv_heads, -1).clone()}


@pytest.mark.parametrize("spec_kw", [{}, {"qk_norm": True, "qkv_bias": True}])
def test_keep_all_equals_no_cache(spec_kw):
    spec = tiny_spec(n_layers=2)
    if spec_kw:
        spec = dataclasses.replace(spec, layers=tuple(dataclasses.replace(l, **spec_kw)
                                                      for l in spec.layers))
    gm, _ = think_gm("think:0.125", spec)
    spec = ir.get_spec(gm)
    ids = IDS[:, :8 + 16]
    T = ids.shape[1]
    pos = torch.arange(T)[None]
    with torch.inference_mode():
        ref = gm(ids, pos)
        st = AttentionState(spec, 1, model=gm)
        st.caches = [think_cache(l, 1, _AllChannels(gm, i)) for i, l in enumerate(spec.layers)]
        st.begin(pos[:, :8])
        outs = [gm(ids[:, :8], pos[:, :8], st)]
        for t in range(8, T):
            st.begin(pos[:, t:t + 1])
            outs.append(gm(ids[:, t:t + 1], pos[:, t:t + 1], st))
    got = torch.cat(outs, 1)
    assert all(c.Uk.shape[-1] == 16 for c in st.caches)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("text,width", [("think:0.25", 4), ("think:0.5:fp16", 2),
                                        ("think:0.75:bf16", 2)])
def test_storage_equals_accounting_and_is_below_dense(text, width):
    """What the cache really holds over its used extent (past a buffer doubling: 100 tokens)
    is exactly the kind's accounting, a row really H·(D_kept + D) wide, and below dense."""
    gm, _ = think_gm(text)
    spec = ir.get_spec(gm)
    ratio = float(text.split(":")[1])
    ids = torch.randint(3, 128, (1, 100), generator=torch.Generator().manual_seed(2))
    _, _, st = run_cached(gm, ids)
    for c, ls in zip(st.caches, spec.layers):
        dk = round(16 * (1 - ratio))
        assert c.Uk.shape[-1] == dk and c.sink is None and c.nb == 0
        assert c.res.shape == (1, 100, ls.n_kv_heads * (dk + 16)) and c._res_buf.shape[1] >= 128
        assert c.res.element_size() == width
        real = c.res.numel() * c.res.element_size()
        assert real == c.nbytes() == bytes_held(ls, 100)
        assert real == 100 * ls.n_kv_heads * (dk + 16) * width
        dense = KV_KINDS.get("dense")
        assert real < dense.bytes_held(dense.Params({4: "float32", 2: "float16"}[width]), ls, 100)


def test_load_stores_what_attend_stores():
    gm, _ = think_gm("think:0.5")
    spec = ir.get_spec(gm)
    g = torch.Generator().manual_seed(4)
    k, v = torch.randn(1, 2, 9, 16, generator=g), torch.randn(1, 2, 9, 16, generator=g)
    a, b = (think_cache(spec.layers[0], 1, KVBinding(gm, 0)) for _ in range(2))
    a.load(k, v)
    b.attend(torch.randn(1, 4, 9, 16, generator=g), k, v, 0.25, None)
    assert torch.equal(a.res, b.res) and a.res.shape[1] == 9
    keep = keeps(gm)[0]
    held_k, held_v = a.keys(a.latent()), a.latent()[..., a.v_cols].unflatten(-1, (2, 16))
    for h in range(2):
        assert torch.equal(held_k[0, h], k[0, h][:, keep[h]])
        assert torch.equal(held_v[0, :, h], v[0, h])


def test_keep_comes_in_rope_pairs_and_keeps_a_planted_pair():
    gm, _ = think_gm("think:0.5")
    for keep in keeps(gm):
        for row in keep.tolist():
            assert len(row) == 8 and set(row) == {(j + 8) % 16 for j in row}
    # plant a large-magnitude pair in layer 0's keys: pair 3 of KV head 0, pair 6 of KV head 1
    gm = tiny_gm()
    w = gm.get_submodule("layers.0.k_proj").weight
    with torch.no_grad():
        for row in (3, 11, 16 + 6, 16 + 14):
            w[row] *= 10
    gm, _ = think_gm("think:0.875", gm=gm)             # keeps one pair of 8 per KV head
    keep = keeps(gm)[0]
    assert keep.tolist() == [[3, 11], [6, 14]]


def test_layer_without_rope_prunes_channels_independently():
    spec = tiny_spec()
    spec = dataclasses.replace(spec, layers=tuple(dataclasses.replace(l, rope=None)
                                                  for l in spec.layers))
    with pytest.raises(ConfigError, match="odd count"):
        think_gm("think:0.0625")                        # RoPE model: half a pair
    gm, st = think_gm("think:0.0625", spec)             # one channel of 16
    assert st["key_channels_kept"] == [15, 15]
    for keep, s in zip(keeps(gm), oracle_scores(gm)):
        low = s.argmin(1)
        for kv in range(2):
            assert keep[kv].tolist() == sorted(set(range(16)) - {int(low[kv])})


@pytest.mark.parametrize("text,msg", [
    ("think", "expected think:RATIO"),
    ("think:x", "expected think:RATIO"),
    ("think2:0.5", "expected think:RATIO"),
    ("think:0", r"ratio must be in \(0, 1\)"),
    ("think:1", r"ratio must be in \(0, 1\)"),
    ("think:1.5", r"ratio must be in \(0, 1\)"),
    ("think:0.5:zz", "unknown option 'zz'"),
    ("think:0.5:fp16:bf16", "at most one dtype"),
])
def test_bad_shorthands(text, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        parse_kv(text)
    assert "\n" not in str(e.value)


def test_ratios_that_do_not_fit_the_layer():
    with pytest.raises(ConfigError, match="odd count") as e:
        think_gm("think:0.3")                           # 4.8 → 5 of 16 channels: half a pair
    assert "\n" not in str(e.value) and "use ratio 0.25 or 0.375" in str(e.value)
    gm = tiny_gm()
    with pytest.raises(ConfigError, match="odd count"):
        ir.set_layer_kv(gm, 0, parse_kv("think:0.3").spec, {"keep": torch.zeros(2, 11).long()})
    for ratio in ("0.01", "0.99"):                      # rounds to none removed / none kept
        with pytest.raises(ConfigError, match="at least one"):
            ThinKParams(float(ratio)).check_layer(tiny_spec().layers[0])


def test_ratio_rounds_to_the_nearest_channel():
    # think:0.4 (the ratio the ThinK paper reports) at D=16: 6.4 → 6 channels, 3 whole pairs
    layer = tiny_spec().layers[0]
    assert ThinKParams(0.4).removed(layer) == 6 and ThinKParams(0.4).kept(layer) == 10
    gm, st = think_gm("think:0.4")
    assert st["key_channels_kept"] == [10, 10]
    for keep in keeps(gm):
        for row in keep.tolist():
            assert set(row) == {(j + 8) % 16 for j in row}          # whole RoPE pairs
    partial = tiny_spec()
    partial = dataclasses.replace(partial, layers=tuple(
        dataclasses.replace(l, rope=RopeSpec(theta=10000.0, dim=8)) for l in partial.layers))
    with pytest.raises(ConfigError, match="partial rotary") as e:
        ThinKParams(0.25).check_layer(partial.layers[0])
    assert "\n" not in str(e.value)


def test_assign_kv_refuses_and_a_cache_without_keep_is_refused():
    with pytest.raises(ConfigError, match="its own pass"):
        AssignKV(AssignKVConfig(kv="think:0.5")).run(tiny_gm(), None)
    gm = tiny_gm()
    ir.set_spec(gm, ir.get_spec(gm).with_layer(0, kv=parse_kv("think:0.5").spec))
    with pytest.raises(ConfigError, match="no kept-channel"):
        AttentionState(ir.get_spec(gm), 1, model=gm)
    with pytest.raises(ConfigError, match="strictly increasing"):     # a never-filled state
        think_cache(ir.get_spec(gm).layers[0], 1, type("B", (), {
            "layer": 0, "state": lambda self: {"keep": torch.zeros(2, 8, dtype=torch.long)}})())


def test_kind_accounting_and_state_shapes():
    kind = KV_KINDS.get("think")
    ls = tiny_spec().layers[0]                          # 4 q heads, 2 KV heads, D = 16
    p = parse_kv("think:0.25:fp16").spec.params
    assert p == ThinKParams(0.25, "float16") and p.label() == "think-0.25-float16"
    assert kind.state_shapes(p, ls, 64) == {"keep": ((2, 12), "int64")}
    assert kind.bytes_per_token(p, ls) == (2 * 12 + 2 * 16) * 2
    assert kind.bytes_held(p, ls, 10) == 10 * (2 * 12 + 2 * 16) * 2
    assert kind.cost(p, ls, 100).flops == 2 * 4 * 100 * (12 + 16)
    assert not kind.lossless(p) and kind.verify_steps(p) == 4
    assert ThinKParams.from_dict(p.to_dict()) == p


def test_artifact_round_trip_keeps_keep(tmp_path):
    gm, _ = think_gm("think:0.5:bf16")
    a, b = kv_state_round_trip(gm, tmp_path, ["keep"], lambda m: run_cached(m, IDS)[1])
    assert gm.state_dict()["layers.0.kv_state.keep"].dtype == torch.int64
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_verified_by_the_pass_manager():
    gm, report = PassManager(kv_passes("think:0.25")).run(tiny_gm(), small_ctx(), "tiny")
    rec = report.passes[-1]
    assert rec.name == "think" and rec.kv_drift is not None
    assert rec.kv_drift["bytes_ok"] and rec.kv_drift["kld"] > 0
    # 2 layers × (2 KV heads × 12 kept key channels + 2 × 16 value channels) × fp32
    assert math.isclose(rec.stats["kv_bytes_per_token_after"], 2 * (2 * 12 + 2 * 16) * 4)

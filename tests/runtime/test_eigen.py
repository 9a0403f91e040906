"""eigen (Eigen Attention: per-KV-head low-rank bases of the post-RoPE keys and of the values,
as KV state) and the quantized ThinK that shares its cache: full rank is exact, decode equals an
independent projected-attention oracle, the pass's ranks and bases against an independent SVD,
real storage = accounting, the quantized projected store against the KIVI cache, bad input,
artifact round trip and the pass manager's KV verification."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from mcomp.compiler import ir
from mcomp.compiler.manager import PassManager
from mcomp.errors import ConfigError
from mcomp.passes.assign_kv import AssignKV, AssignKVConfig, kv_passes
from mcomp.runtime.kv import KV_KINDS, bytes_held, parse_kv
from mcomp.runtime.kv.eigen import EigenParams, ProjectedKVCache
from mcomp.runtime.kv.kivi import KIVICache, KIVIParams
from mcomp.runtime.kvcache import AttentionState, KVBinding
from tests.helpers import kv_map_reference, kv_state_round_trip, small_ctx, tiny_gm, tiny_spec
from tests.runtime.test_think import _AllChannels
from tests.runtime.test_xquant import run_cached

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(0))


def eigen_gm(text, spec=None, seed=0):
    gm = tiny_gm(spec, seed=seed)
    stats = [p.run(gm, small_ctx()).stats for p in kv_passes(text)]
    return gm, stats[-1]


def bases(gm):
    return [KVBinding(gm, i).state() for i in range(ir.get_spec(gm).n_layers)]


def calibration_qkv(gm):
    """Per layer (Q, K, V): the post-RoPE queries and keys and the values the attention modules
    receive over the calibration windows, collected by hooks on the plain forward, float64,
    Q (Hq, N, D), K and V (Hkv, N, D)."""
    spec = ir.get_spec(gm)
    seen = {i: ([], [], []) for i in range(spec.n_layers)}
    hooks = []
    for i in range(spec.n_layers):
        def pre(mod, args, i=i):
            for j in range(3):
                seen[i][j].append(args[j])
        hooks.append(gm.get_submodule(f"layers.{i}.attn").register_forward_pre_hook(pre))
    try:
        with torch.inference_mode():
            for ids in small_ctx().calibration_batches():
                gm(ids, torch.arange(ids.shape[1]).expand(ids.shape[0], -1), None)
    finally:
        for h in hooks:
            h.remove()
    return [tuple(torch.cat(x, 0).double().transpose(0, 1).flatten(1, 2) for x in seen[i])
            for i in range(spec.n_layers)]


def projected_reference(gm, ids, state, monkeypatch):
    """The no-cache forward with k → k·Uk·Uqᵀ and v → v·Uv·Uoᵀ per KV head
    (q·(k Uk Uqᵀ)ᵀ = (q Uq)·(k Uk)ᵀ is what the cache computes)."""
    maps = []
    for st in state:
        Pk = st["Uk"] @ st["Uq"].transpose(1, 2)                     # (Hkv, D, D)
        Pv = st["Uv"] @ st["Uo"].transpose(1, 2)
        maps.append(lambda k, v, Pk=Pk, Pv=Pv: (torch.einsum("bhtd,hde->bhte", k, Pk),
                                                torch.einsum("bhtd,hde->bhte", v, Pv)))
    return kv_map_reference(gm, ids, maps, monkeypatch)


@pytest.mark.parametrize("spec_kw", [{}, {"qk_norm": True, "qkv_bias": True}])
def test_full_rank_equals_no_cache(spec_kw):
    """eigen:16 on head_dim 16: orthonormal full bases (U Uᵀ = I), so streaming decode through
    the cache must reproduce the no-cache forward up to fp32 rounding of the two basis GEMMs."""
    spec = tiny_spec(n_layers=2)
    if spec_kw:
        spec = dataclasses.replace(spec, layers=tuple(dataclasses.replace(l, **spec_kw)
                                                      for l in spec.layers))
    gm, st = eigen_gm("eigen:16", spec)
    assert st["ranks_kv"] == [[16, 16], [16, 16]]
    ref, got, state = run_cached(gm, IDS[:, :24])
    assert all(c.keys(c.latent()).shape[-1] == 16 for c in state.caches)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("text", ["eigen:0.3", "eigen:5", "eigen:0.2:fp16", "eigen:0.3:pca"])
def test_decode_equals_projected_oracle(text, monkeypatch):
    gm, st = eigen_gm(text)
    assert all(r < 16 for rr in st["ranks_kv"] for r in rr)
    ref = projected_reference(gm, IDS, bases(gm), monkeypatch)
    plain, got, _ = run_cached(gm, IDS)
    assert (plain - ref).abs().max() > 1e-1          # the truncation really matters
    tol = (3e-3 if "fp16" in text else 1e-5) * ref.abs().max().item()
    torch.testing.assert_close(got, ref, rtol=0, atol=tol)


def _sqrtm(g):
    lam, u = torch.linalg.eigh(g)
    return (u * lam.clamp(min=0).sqrt()) @ u.T


def _tail(x, r):
    """Relative Frobenius error of the best rank-r approximation of x (Eckart–Young), by SVD."""
    s = torch.linalg.svdvals(x)
    return float((s[r:].pow(2).sum() / s.pow(2).sum()).sqrt())


@pytest.mark.parametrize("basis", ["aware", "pca"])
def test_bases_reach_the_eckart_young_optimum_at_the_smallest_rank(basis):
    """Independent oracle: the calibration activations X of each head, collected by hooks, and the
    metric g (pca: I; aware: keys in the group's query second moment QᵀQ, values in o_proj's
    W_o,h W_o,hᵀ over the group). The pass's rank-r map must achieve the best possible rank-r
    error of X g^{1/2} (its SVD tail), that error must be ≤ ERR in every head, and rank r − 1
    must exceed ERR in some head (the rank is the smallest)."""
    err = 0.35
    gm, st = eigen_gm(f"eigen:{err}:{basis}")
    spec = ir.get_spec(gm)
    for i, ((Q, K, V), state, (rk, rv)) in enumerate(zip(calibration_qkv(gm), bases(gm),
                                                          st["ranks_kv"])):
        ls = spec.layers[i]
        H, D, grp = ls.n_kv_heads, ls.head_dim, ls.n_heads // ls.n_kv_heads
        wo = gm.get_submodule(f"layers.{i}.o_proj").weight.detach().double()   # (hidden, Hq·D)
        for X, enc, dec, r, name in ((K, "Uk", "Uq", rk, "k"), (V, "Uv", "Uo", rv, "v")):
            worst_below = 0.0
            for h in range(H):
                if basis == "pca":
                    g = torch.eye(D, dtype=torch.float64)
                elif name == "k":
                    Qh = Q[h * grp:(h + 1) * grp].reshape(-1, D)
                    g = Qh.T @ Qh
                else:
                    g = sum(wo[:, j * D:(j + 1) * D].T @ wo[:, j * D:(j + 1) * D]
                            for j in range(h * grp, (h + 1) * grp))
                Y = X[h] @ _sqrtm(g)
                M = state[enc][h].double() @ state[dec][h].double().T
                got = float(torch.linalg.matrix_norm(Y - X[h] @ M @ _sqrtm(g))
                            / torch.linalg.matrix_norm(Y))
                assert got == pytest.approx(_tail(Y, r), rel=1e-3, abs=1e-6), (i, name, h)
                assert got <= err + 1e-6
                worst_below = max(worst_below, _tail(Y, r - 1))
            assert worst_below > err, f"layer {i} {name}: rank {r} is not the smallest"


@pytest.mark.parametrize("text,per_token", [
    ("eigen:6", 2 * 2 * 6 * 4),                               # fp32: 2 heads × (6 + 6) × 4
    ("eigen:6:fp16", 2 * 2 * 6 * 2),
    # kivi2, G 8, one head's V rank 8 per group: codes (16+16)·2/8, K scale/min 2·2·16/8,
    # V scale/min 2·2·(16/8)
    ("eigen:8:kivi2:g8:r8", 8 + 8 + 8),
    ("eigen:8:kivi4:g8:r8:s2", 16 + 8 + 8),
])
def test_storage_equals_accounting_and_is_below_dense(text, per_token):
    gm, _ = eigen_gm(text)
    spec = ir.get_spec(gm)
    ids = torch.randint(3, 128, (1, 100), generator=torch.Generator().manual_seed(2))
    _, _, st = run_cached(gm, ids)
    dense = KV_KINDS.get("dense")
    for c, ls in zip(st.caches, spec.layers):
        real = sum(t.numel() * t.element_size() for t in (c.sink, c.res) if t is not None)
        real += sum(t.numel() * t.element_size() for t in c.store.values())
        assert real == c.nbytes() == bytes_held(ls, 100)
        assert KV_KINDS.get("eigen").bytes_per_token(ls.kv.params, ls) == per_token
        assert real < dense.bytes_held(dense.Params("float32"), ls, 100)
        if "kivi" in text:
            assert c.nb > 0 and c.store["codes"].dtype == torch.uint8


@pytest.mark.parametrize("bits,G,R,S", [(2, 8, 8, 2), (4, 16, 0, 0)])
def test_quantized_projected_store_with_identity_bases_equals_kivi(bits, G, R, S):
    """With U_k = U_v = I the projected store holds raw K/V: it must then be the KIVI cache
    (keys per channel over G tokens, values per token in groups, same flush schedule), so this
    pins its quantized path to an independently tested cache. Reached the way ThinK + KIVI
    builds it (a keep-all `keep`)."""
    spec = tiny_spec(n_layers=1)
    think = parse_kv(f"think:0.5:kivi{bits}:g{G}:r{R}" + (f":s{S}" if S else "")).spec
    kivi = parse_kv(f"kivi{bits}:g{G}:r{R}" + (f":s{S}" if S else "")).spec
    ls_t = dataclasses.replace(spec.layers[0], kv=think)
    ls_k = dataclasses.replace(spec.layers[0], kv=kivi)
    gm = tiny_gm(spec)
    a = KV_KINDS.get("think").cache(ls_t, 1, _AllChannels(gm, 0))
    assert isinstance(a, ProjectedKVCache)
    b = KIVICache(ls_k, 1, None)
    g = torch.Generator().manual_seed(5)
    for t in range(70):
        T = 6 if t == 0 else 1
        q = torch.randn(1, 4, T, 16, generator=g)
        k, v = torch.randn(1, 2, T, 16, generator=g), torch.randn(1, 2, T, 16, generator=g)
        S_ = a.length + T
        mask = torch.ones(T, S_, dtype=torch.bool).tril(S_ - T)[None, None]
        oa = a.attend(q, k, v, 0.25, mask, positions=torch.arange(a.length, S_)[None])
        ob = b.attend(q, k, v, 0.25, mask)
        torch.testing.assert_close(oa, ob, rtol=0, atol=2e-5, msg=f"step {t}")
    assert a.nb * G == b.n_q > 0 and a.nbytes() == b.nbytes()
    assert isinstance(b.kv, KIVIParams)


def test_think_kivi_through_the_pass_is_smaller_and_accounted():
    gm, _ = eigen_gm("think:0.25:kivi2:g8:r8")
    spec = ir.get_spec(gm)
    ids = torch.randint(3, 128, (1, 100), generator=torch.Generator().manual_seed(3))
    plain, got, st = run_cached(gm, ids)
    for c, ls in zip(st.caches, spec.layers):
        assert isinstance(c, ProjectedKVCache) and c.nb > 0
        assert c.nbytes() == bytes_held(ls, 100)
        # 2 heads × (12 + 16) channels at 2 bits + K scales 2·2·24/8 + V scales 2·2·(32/8)
        assert KV_KINDS.get("think").bytes_per_token(ls.kv.params, ls) == 14 + 12 + 16
    assert (plain - got).abs().max() > 0


def test_load_stores_what_attend_stores():
    gm, _ = eigen_gm("eigen:0.3:kivi4:g8:r4")
    ls = ir.get_spec(gm).layers[0]
    g = torch.Generator().manual_seed(4)
    k, v = torch.randn(1, 2, 30, 16, generator=g), torch.randn(1, 2, 30, 16, generator=g)
    a, b = (KV_KINDS.get("eigen").cache(ls, 1, KVBinding(gm, 0)) for _ in range(2))
    a.load(k, v)
    b.attend(torch.randn(1, 4, 30, 16, generator=g), k, v, 0.25, None,
             positions=torch.arange(30)[None])
    torch.testing.assert_close(a.latent(), b.latent(), rtol=0, atol=0)
    assert a.nb > 0 and a.nbytes() == b.nbytes()


@pytest.mark.parametrize("text,msg", [
    ("eigen", "expected eigen:ERR"),
    ("eigen:abc", "expected eigen:ERR"),
    ("eigen:0", "rank must be >= 1"),
    ("eigen:1.0", r"error threshold must be in \(0, 1\)"),
    ("eigen:-0.2", r"error threshold must be in \(0, 1\)"),
    ("eigen:0.1:zz", "unknown option 'zz'"),
    ("eigen:0.1:g8", "add :kivi2"),
    ("eigen:0.1:kivi3", "bits=3 not supported"),
    ("eigen:0.1:fp16:bf16", "at most one dtype"),
    ("eigen:0.1:svd", "unknown option 'svd'"),
    ("think:0.5:r8", "add :kivi2"),
])
def test_bad_shorthands(text, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        parse_kv(text)
    assert "\n" not in str(e.value)


def test_rank_above_head_dim_and_missing_state_are_refused():
    with pytest.raises(ConfigError, match="exceeds head_dim 16"):
        eigen_gm("eigen:17")
    with pytest.raises(ConfigError, match="its own pass"):
        AssignKV(AssignKVConfig(kv="eigen:0.1")).run(tiny_gm(), None)
    gm = tiny_gm()
    ir.set_spec(gm, ir.get_spec(gm).with_layer(0, kv=parse_kv("eigen:0.1").spec))
    with pytest.raises(ConfigError, match="has no bases"):
        AttentionState(ir.get_spec(gm), 1, model=gm)


def test_params_round_trip_and_state_shapes():
    kind = KV_KINDS.get("eigen")
    ls = tiny_spec().layers[0]
    p = dataclasses.replace(parse_kv("eigen:0.1:kivi2:s4").spec.params, k_rank=8, v_rank=16)
    assert p.label() == "eigen-e0.1-k8v16-kivi2-g32-r128-s4"
    assert EigenParams.from_dict(p.to_dict()) == p
    assert kind.state_shapes(p, ls, 64) == {"Uk": ((2, 16, 8), "float32"),
                                           "Uq": ((2, 16, 8), "float32"),
                                           "Uv": ((2, 16, 16), "float32"),
                                           "Uo": ((2, 16, 16), "float32")}
    assert kind.verify_steps(p) == 128 + 64 and not kind.lossless(p)
    c = kind.cost(p, ls, 100)                  # 4 q heads: basis GEMMs + attention at widths 8, 16
    assert c.flops == 2 * 4 * 100 * 24 + 2 * 4 * 16 * 24


def test_artifact_round_trip_keeps_the_bases(tmp_path):
    gm, _ = eigen_gm("eigen:0.3:kivi2:g8:r8")
    a, b = kv_state_round_trip(gm, tmp_path, ["Uk", "Uq", "Uv", "Uo"],
                               lambda m: run_cached(m, IDS)[1])
    # fp32 rounding of logits, a few ulps of their magnitude
    torch.testing.assert_close(a, b, rtol=0, atol=4e-6 * a.abs().max().item())


def test_verified_by_the_pass_manager():
    gm, report = PassManager(kv_passes("eigen:0.3")).run(tiny_gm(), small_ctx(), "tiny")
    rec = report.passes[-1]
    assert rec.name == "eigen" and rec.kv_drift is not None
    assert rec.kv_drift["bytes_ok"] and rec.kv_drift["kld"] > 0
    ranks = rec.stats["ranks_kv"]
    assert rec.stats["kv_bytes_per_token_after"] == sum(2 * (rk + rv) * 4 for rk, rv in ranks)

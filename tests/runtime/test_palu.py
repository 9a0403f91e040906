"""palu (low-rank latent KV, calibrated factors as KV state): exactness at full rank, whitened
SVD optimality against an independent oracle, the allocation against brute force, the kernel
against the reference, real storage = accounting, artifact round trip and bad input."""
from __future__ import annotations

import copy
import dataclasses
import itertools

import pytest
import torch

from mcomp.codegen import load_artifact
from mcomp.compiler import ir
from mcomp.compiler.manager import PassManager
from mcomp.errors import ArtifactError, ConfigError
from mcomp.passes.assign_kv import AssignKV, AssignKVConfig, kv_passes
from mcomp.passes.fuse_qkv import FuseQKV
from mcomp.passes.palu import _cholesky, allocate, gram_matrices, whitened_svd
from mcomp.runtime import kernels
from mcomp.runtime.kernels import xquant_attention
from mcomp.runtime.kv import KV_KINDS, bytes_held, parse_kv
from mcomp.runtime.kv.xquant import kv_weights
from mcomp.runtime.kvcache import AttentionState, KVBinding
from tests.helpers import kv_state_round_trip, small_ctx, tiny_gm, tiny_spec
from tests.runtime.test_xquant import run_cached

pytestmark = pytest.mark.usefixtures("one_thread")


def palu_gm(text, spec=None, fused=False, seed=0):
    gm = tiny_gm(spec, seed=seed)
    if fused:
        gm = FuseQKV().run(gm, None).gm
    ctx = small_ctx()
    stats = [p.run(gm, ctx).stats for p in kv_passes(text)]
    return gm, stats[-1]


IDS = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("spec_kw", [{}, {"qk_norm": True, "qkv_bias": True}, {"fused": True}])
def test_full_rank_streaming_equals_no_cache(spec_kw):
    """`palu:0.01:uniform` keeps every channel (ranks round up to the full group width): the
    latent cache must reproduce the no-cache forward, prefill and token-by-token decode
    (llama, qwen3-style qk_norm + bias, fused qkv)."""
    fused = spec_kw.pop("fused", False)
    spec = tiny_spec(n_layers=2)
    if spec_kw:
        spec = dataclasses.replace(spec, layers=tuple(dataclasses.replace(l, **spec_kw)
                                                      for l in spec.layers))
    gm, stats = palu_gm("palu:0.01:uniform", spec, fused)
    assert stats["ranks_kv"] == [[32, 32], [32, 32]]          # group width 2 heads × 16
    ref, got, _ = run_cached(gm, IDS)
    # fp32 accumulation over ≤ 64-wide products of O(1) values: 1e-5 of the logit scale
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5 * ref.abs().max().item())


def test_truncated_rank_is_lossy_and_fisher_differs_from_uniform():
    gm, st = palu_gm("palu:0.5")
    ref, got, _ = run_cached(gm, IDS)
    assert (got - ref).abs().max() > 1e-2             # really truncated
    assert st["channels_kept"] == st["channels_total"] // 2
    gm_u, st_u = palu_gm("palu:0.5:uniform")
    assert st_u["ranks_kv"] == [[16, 16], [16, 16]]
    assert st_u["channels_kept"] == st["channels_kept"]


def test_whitened_svd_is_the_output_optimal_truncation():
    """Oracle: for calibration inputs X, ‖X Wᵀ − X W_rᵀ‖² of the whitened factorization equals
    the tail Σ_{i>r} σ_i², is below plain SVD truncation's output error, and the latent X·A has
    identity covariance."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(600, 24, generator=g, dtype=torch.float64) @ torch.randn(24, 24, generator=g,
                                                                            dtype=torch.float64)
    W = torch.randn(16, 24, generator=g, dtype=torch.float64)
    chol = _cholesky(X.T @ X, 1e-12)
    U, s, A = whitened_svd(W, chol)
    r = 6
    Wr = (U[:, :r] * s[:r]) @ A[:, :r].T
    err = (X @ (W - Wr).T).pow(2).sum()
    torch.testing.assert_close(err, s[r:].pow(2).sum(), rtol=1e-6, atol=0)
    u0, s0, vh0 = torch.linalg.svd(W)
    W0 = (u0[:, :r] * s0[:r]) @ vh0[:r]
    assert err < (X @ (W - W0).T).pow(2).sum()
    lat = X @ A[:, :r]
    torch.testing.assert_close(lat.T @ lat, torch.eye(r, dtype=torch.float64), atol=1e-8, rtol=0)


def test_greedy_allocation_is_optimal_against_brute_force():
    g = torch.Generator().manual_seed(3)
    units = [(0, "k"), (0, "v"), (1, "k"), (1, "v")]
    energies = {u: sorted(torch.rand(4, generator=g).tolist(), reverse=True) for u in units}
    fisher = {u: float(torch.rand(1, generator=g)) + 0.1 for u in units}
    costs = {u: 8 for u in units}
    max_steps = {u: 4 for u in units}
    for budget in (32, 56, 96, 128):
        steps = allocate(energies, fisher, costs, max_steps, budget, None)
        assert sum(steps[u] * costs[u] for u in units) <= budget

        def kept(st):
            return sum(fisher[u] * sum(energies[u][:st[u]]) for u in units)
        best = max(kept(dict(zip(units, c))) for c in itertools.product(range(1, 5), repeat=4)
                   if sum(c) * 8 <= budget)
        assert kept(steps) == pytest.approx(best)
    with pytest.raises(ConfigError, match="fewer than the minimum"):
        allocate(energies, fisher, costs, max_steps, 31, None)


def test_factors_reconstruct_the_whitened_truncation():
    """The state tensors are the pass's factorization: B_k Aᵀ per group is the rank-r whitened
    truncation of W_k (checked with an independent Cholesky + SVD), Hadamard folded or not."""
    gm0 = tiny_gm()
    ctx = small_ctx()
    grams, n = gram_matrices(copy.deepcopy(gm0), ctx)
    for text in ("palu:0.5:uniform", "palu:0.5:uniform:kivi4"):
        gm, st = palu_gm(text)
        ls = ir.get_spec(gm).layers[0]
        wk, _, _, _ = kv_weights(KVBinding(gm, 0), ls)
        state = KVBinding(gm, 0).state()
        rk = st["ranks_kv"][0][0]
        L = torch.linalg.cholesky(grams[0])
        u, s, vh = torch.linalg.svd(wk.double() @ L, full_matrices=False)
        Wr = (u[:, :rk] * s[:rk]) @ vh[:rk] @ torch.linalg.inv(L)
        got = state["Bk"][0].double() @ state["A"][:, :rk].double().T
        torch.testing.assert_close(got, Wr, atol=1e-4 * Wr.abs().max().item(), rtol=0)


def test_latent_scaling_white_or_principal_components():
    """`:white` gives the latent identity covariance on the calibration tokens (Palu as written);
    `:pca` (the quantized default) gives channel i the output energy σ_i²/N of the i-th
    principal component; σ from an independent Cholesky + SVD of the whitened weight."""
    gm0 = tiny_gm()
    grams, n = gram_matrices(copy.deepcopy(gm0), small_ctx())
    G = grams[0]
    L = torch.linalg.cholesky(G)
    for text, want in (("palu:0.5:uniform:kivi4:nh:white", "white"),
                       ("palu:0.5:uniform:kivi4:nh", "pca"), ("palu:0.5:uniform", "white")):
        gm, st = palu_gm(text)
        assert st["latent"] == want
        ls = ir.get_spec(gm).layers[0]
        wk, _, _, _ = kv_weights(KVBinding(gm, 0), ls)
        rk = st["ranks_kv"][0][0]
        A = KVBinding(gm, 0).state()["A"][:, :rk].double()
        cov = A.T @ G @ A / n                                # second moments per token
        if want == "white":
            torch.testing.assert_close(cov, torch.eye(rk, dtype=cov.dtype), atol=2e-3, rtol=0)
        else:
            sigma = torch.linalg.svdvals(wk.double() @ L)[:rk]
            torch.testing.assert_close(cov, torch.diag(sigma ** 2 / n),
                                       atol=2e-3 * float(sigma[0] ** 2 / n), rtol=0)
    with pytest.raises(ConfigError, match="unknown option 'grey'"):
        parse_kv("palu:0.5:kivi2:grey")


def test_kernel_equals_reference_on_the_quantized_latent():
    if not xquant_attention.available():
        pytest.skip("no C++ toolchain: the kernel cannot build here")
    gm, _ = palu_gm("palu:0.5:kivi4:g8:r8:s2")
    ids = torch.randint(3, 128, (1, 60), generator=torch.Generator().manual_seed(5))
    _, fast, st = run_cached(gm, ids)
    assert {c.last_path for c in st.caches} == {"kernel"}
    kernels._FORCE_REFERENCE = True
    try:
        _, slow, st2 = run_cached(gm, ids)
    finally:
        kernels._FORCE_REFERENCE = False
    assert {c.last_path for c in st2.caches} == {"reference"}
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("text", ["palu:0.5", "palu:0.5:kivi2:g8:r8:s2", "palu:0.25:kivi4:g8:r8:ts"])
def test_storage_equals_accounting_and_is_below_dense(text):
    """What the cache really holds (every tensor, used extent) is what the kind accounts, so no
    zero-filled channels hide in it, and it is below a dense fp16 cache of the same tokens."""
    gm, _ = palu_gm(text)
    spec = ir.get_spec(gm)
    ids = torch.randint(3, 128, (1, 57), generator=torch.Generator().manual_seed(2))
    _, _, st = run_cached(gm, ids)
    for c, ls in zip(st.caches, spec.layers):
        assert c.nbytes() == bytes_held(ls, 57)
        assert c.nbytes() < 57 * 2 * ls.kv_dim * 2 * (2 if "kivi" not in text else 1)


def test_artifact_round_trip_keeps_the_factors(tmp_path):
    gm, _ = palu_gm("palu:0.5:kivi4:g8:r8")
    a, b = kv_state_round_trip(gm, tmp_path, ["A", "Bk", "Bv"], lambda m: run_cached(m, IDS)[1])
    path = tmp_path / "art"
    # same tensors; only GEMM blocking over differently laid out copies may differ
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # a manifest whose palu ranks disagree with the stored factors is refused before loading
    import json
    from mcomp.codegen.manifest import DIGEST_KEY, manifest_digest
    m = json.loads((path / "manifest.json").read_text())
    m["model"]["layers"][0]["kv"]["params"]["k_rank"] = 8
    m[DIGEST_KEY] = manifest_digest(m)
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="kv_state"):
        load_artifact(path)


def test_verified_by_the_pass_manager():
    passes = kv_passes("palu:0.5:kivi4")
    gm, report = PassManager(passes).run(tiny_gm(), small_ctx(), "tiny")
    rec = report.passes[-1]
    assert rec.name == "palu" and rec.kv_drift is not None
    assert rec.kv_drift["kld"] > 0


def test_assign_kv_refuses_a_calibrated_kind():
    gm = tiny_gm()
    with pytest.raises(ConfigError, match="its own pass"):
        AssignKV(AssignKVConfig(kv="palu:0.5")).run(gm, None)


def test_a_cache_without_factors_is_refused():
    gm = tiny_gm()
    spec = ir.get_spec(gm)
    pspec = parse_kv("palu:0.5").spec
    ir.set_spec(gm, spec.with_layer(0, kv=pspec))        # spec says palu, no state attached
    with pytest.raises(ConfigError, match="no palu factors"):
        AttentionState(ir.get_spec(gm), 1, model=gm)


@pytest.mark.parametrize("text,msg", [
    ("palu", "expected palu:RATIO"),
    ("palu:x", "expected palu:RATIO"),
    ("palu:0", r"ratio must be in \(0, 1\)"),
    ("palu:1", r"ratio must be in \(0, 1\)"),
    ("palu:1.5", r"ratio must be in \(0, 1\)"),
    ("palu:0.5:kivi3", "bits=3"),
    ("palu:0.5:g64", "add :kivi2"),
    ("palu:0.5:zz", "unknown option 'zz'"),
])
def test_bad_shorthands(text, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        parse_kv(text)
    assert "\n" not in str(e.value)


def test_bad_layer_fits():
    with pytest.raises(ConfigError, match="do not divide"):
        palu_gm("palu:0.5:hg3")                             # 2 KV heads
    with pytest.raises(ConfigError, match="fewer than the minimum"):
        palu_gm("palu:0.9")                                 # < 8 channels per projection
    spec = ir.get_spec(tiny_gm())
    p = dataclasses.replace(parse_kv("palu:0.5").spec.params, k_rank=40)
    with pytest.raises(ConfigError, match="exceeds the group's head_dim·heads = 32"):
        p.check_layer(spec.layers[0])


def test_kind_is_registered_with_state_shapes():
    kind = KV_KINDS.get("palu")
    ls = tiny_spec().layers[0]
    p = dataclasses.replace(parse_kv("palu:0.5:hg1").spec.params, k_rank=8, v_rank=16)
    assert kind.state_shapes(p, ls, 64) == {"A": ((64, 2 * 8 + 2 * 16), "float32"),
                                            "Bk": ((2, 16, 8), "float32"),
                                            "Bv": ((2, 16, 16), "float32")}


def test_calibrates_an_int4_model():
    """The Fisher backward runs through quantized linears (the fast int kernels have no
    derivative: the pass uses the reference linear) and the factors come from the dequantized
    k/v weights; full rank then still reproduces the quantized model's no-cache forward."""
    from mcomp.quant.rtn import QuantizeWeightsRTN, RTNConfig
    gm = tiny_gm()
    ctx = small_ctx()
    gm = QuantizeWeightsRTN(RTNConfig(bits=4, group_size=16)).run(gm, ctx).gm
    st = [p.run(gm, ctx).stats for p in kv_passes("palu:0.5")][-1]
    assert st["channels_kept"] == st["channels_total"] // 2
    gm2 = QuantizeWeightsRTN(RTNConfig(bits=4, group_size=16)).run(tiny_gm(), ctx).gm
    for p in kv_passes("palu:0.01:uniform"):
        p.run(gm2, ctx)
    ref, got, _ = run_cached(gm2, IDS)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4 * ref.abs().max().item())

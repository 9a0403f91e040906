"""xquant (KV rematerialization from a quantized latent of the attention input): exactness in
full precision, the cache against a pure-torch oracle, the 8-bit error against a bound derived
from the quantizer, byte accounting, shorthand and bad input."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from mcomp.compiler import ir
from mcomp.compiler.model import apply_rope
from mcomp.compiler.spec import KVSpec, LayerSpec
from mcomp.errors import ConfigError
from mcomp.passes.assign_kv import apply_kv_flag
from mcomp.passes.fuse_qkv import FuseQKV
from mcomp.runtime.kv import KV_KINDS, bytes_per_token, parse_kv
from mcomp.runtime.kv.kivi import quantize_minmax
from mcomp.runtime.kv.xquant import XQuantCache, XQuantParams
from mcomp.runtime.kvcache import AttentionState
from tests.helpers import tiny_gm, tiny_spec

pytestmark = pytest.mark.usefixtures("one_thread")


def run_cached(gm, ids, prefill=8, quantize_before_attend=False):
    """(no-cache logits, streamed logits: prefill then token by token), (1, T, V) each."""
    T = ids.shape[1]
    pos = torch.arange(T)[None]
    with torch.inference_mode():
        ref = gm(ids, pos, None)
        st = AttentionState(ir.get_spec(gm), 1, model=gm)
        st.begin(pos[:, :prefill])
        outs = [gm(ids[:, :prefill], pos[:, :prefill], st)]
        for t in range(prefill, T):
            st.begin(pos[:, t:t + 1])
            outs.append(gm(ids[:, t:t + 1], pos[:, t:t + 1], st))
    return ref, torch.cat(outs, 1), st


@pytest.mark.parametrize("spec_kw", [{}, {"qk_norm": True, "qkv_bias": True}, {"fused": True}])
def test_full_rank_fp_streaming_equals_no_cache(spec_kw):
    """Residual window longer than the text: everything stays fp, so rematerializing K and
    folding V must reproduce the no-cache forward (llama, qwen3-style qk_norm + bias, fused qkv)."""
    fused = spec_kw.pop("fused", False)
    spec = tiny_spec(n_layers=2)
    if spec_kw:
        spec = dataclasses.replace(spec, layers=tuple(dataclasses.replace(l, **spec_kw)
                                                      for l in spec.layers))
    gm = tiny_gm(spec)
    if fused:
        gm = FuseQKV().run(gm, None).gm
    apply_kv_flag(gm, "xquant:8:res1000")
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    ref, got, _ = run_cached(gm, ids)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5 * ref.abs().max().item())


def layer_and_cache(bits=8, rank=0, residual=0, G=4, basis="split"):
    """A one-layer model whose layer-0 cache we drive directly, plus random inputs."""
    gm = tiny_gm(tiny_spec(n_layers=1))
    apply_kv_flag(gm, f"xquant:{bits}:res{residual}:g{G}:{basis}" + (f":r{rank}" if rank else ""))
    st = AttentionState(ir.get_spec(gm), 1, model=gm)
    return gm, st.caches[0]


def oracle(cache: XQuantCache, gm, h, q, positions, scale, latent):
    """Pure torch: K/V rematerialized from `latent` with the layer's own k/v projections'
    factors, RoPE at the positions, then SDPA."""
    B, S, _ = latent.shape
    H, D = cache.H, cache.D
    k = (latent[..., cache.k_cols] @ cache.Bk.T + cache.bk).view(B, S, H, D).transpose(1, 2)
    v = (latent[..., cache.v_cols] @ cache.Bv.T + cache.bv).view(B, S, H, D).transpose(1, 2)
    cos, sin = gm.get_submodule("rope.0")(positions)
    k = apply_rope(k, cos, sin)
    return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)


@pytest.mark.parametrize("basis", ["split", "stacked", "split:ts"])
@pytest.mark.parametrize("rank", [0, 48])
def test_decode_matches_oracle_on_the_dequantized_latent(basis, rank):
    gm, c = layer_and_cache(bits=2, G=4, residual=4, basis=basis, rank=rank)
    g = torch.Generator().manual_seed(1)
    S, scale = 27, 0.25
    h = torch.randn(1, S, 64, generator=g)
    pos = torch.arange(S)[None]
    q = torch.randn(1, 4, 1, 16, generator=g)
    c.attend(torch.zeros(1, 4, S - 1, 16), None, None, scale, None, h=h[:, :-1], positions=pos[:, :-1])
    out = c.attend(q, None, None, scale, torch.ones(1, 1, 1, S, dtype=torch.bool), h=h[:, -1:],
                   positions=pos[:, -1:])
    assert c.n_q == 20 and c.nbytes() == KV_KINDS.get("xquant").bytes_held(c.p, c.layer, S)
    want = oracle(c, gm, h, q, pos, scale, c.latent())
    torch.testing.assert_close(out, want, rtol=0, atol=1e-5)


def _bound_and_error(bits):
    """xquant:BITS (stacked basis: every latent channel quantized per channel) vs the exact (fp
    latent) attention. The only error is the latent's rounding,
    |δL_sc| ≤ e_c = max_b s_bc / 2 (half the fp16 scale of channel c). Per KV head h, RoPE is
    orthogonal, so |q·δk_s| ≤ ‖q‖·Σ_c e_c‖B_k,h[:, c]‖ =: δz/scale; the softmax weights move by
    ‖δp‖₁ ≤ e^{2δz} − 1; and output coordinate d by ‖δp‖₁·max|V| + Σ_c |B_v[d, c]|·e_c."""
    gm, c = layer_and_cache(bits=bits, G=4, residual=0, basis="stacked")
    g = torch.Generator().manual_seed(2)
    S, scale = 32, 0.25
    h = torch.randn(1, S, 64, generator=g)
    pos = torch.arange(S)[None]
    q = 0.1 * torch.randn(1, 4, 1, 16, generator=g)   # logits O(0.1): a bound that can bite
    c.attend(torch.zeros(1, 4, S - 1, 16), None, None, scale, None, h=h[:, :-1], positions=pos[:, :-1])
    out = c.attend(q, None, None, scale, torch.ones(1, 1, 1, S, dtype=torch.bool), h=h[:, -1:],
                   positions=pos[:, -1:])
    lat = h @ c.A                                                          # fp latent
    _, sc, _ = quantize_minmax(lat.view(1, S // 4, 4, -1), 2, bits)        # (1, S/4, 1, r)
    e = sc.float().amax(dim=(0, 1, 2)) / 2                                 # (r,)
    Bk = c.Bk.view(c.H, c.D, -1)                                           # (H, D, r)
    dk = (Bk.norm(dim=1) * e).sum(-1)                                      # (H,) max ‖δk‖
    qn = q.view(c.H, -1, c.D).norm(dim=-1).amax(-1)                        # (H,)
    dz = scale * (qn * dk).max().item()
    vmax = (lat @ c.Bv.T + c.bv).abs().max().item()
    bound = (math.exp(2 * dz) - 1) * vmax + (c.Bv.abs() * e).sum(-1).max().item()
    return (out - oracle(c, gm, h, q, pos, scale, lat)).abs().max().item(), bound


def test_8bit_full_rank_error_within_the_quantizer_bound():
    err8, bound8 = _bound_and_error(8)
    assert 0 < err8 <= bound8, (err8, bound8)
    err2, bound2 = _bound_and_error(2)
    assert err2 <= bound2 and err8 < err2 / 10      # and the error follows the code width


def test_quantize_before_attend_equals_streaming():
    gm = tiny_gm(tiny_spec(n_layers=2))
    apply_kv_flag(gm, "xquant:2:g4:res4:s1")
    ids = torch.randint(3, 128, (1, 30), generator=torch.Generator().manual_seed(3))
    _, streamed, _ = run_cached(gm, ids, prefill=1)
    pos = torch.arange(30)[None]
    st = AttentionState(ir.get_spec(gm), 1, quantize_before_attend=True, model=gm)
    with torch.inference_mode():
        st.begin(pos)
        qba = gm(ids, pos, st)
    torch.testing.assert_close(qba, streamed, rtol=0, atol=1e-4 * streamed.abs().max().item())
    ref, _, _ = run_cached(gm, ids)
    assert (qba - ref).abs().max() > 1e-2              # and the quantization is seen


def test_bytes_shorthand_and_smollm2_accounting():
    p = parse_kv("xquant:2").spec.params
    assert p == XQuantParams(bits=2) and p.basis == "split"
    smol = LayerSpec(n_heads=9, n_kv_heads=3, head_dim=64, ffn_dim=8, kv=KVSpec("xquant", p))
    # full rank 2·192 = 384: 2-bit codes 96 B; K latent 192 ch.: fp16 scale/min per channel per
    # 32 tokens 24 B; V latent: per token, 6 groups of 32 channels, 24 B
    assert bytes_per_token(dataclasses.replace(smol, kv=parse_kv("xquant:2:stacked").spec)) == 144
    assert bytes_per_token(smol) == 144 == bytes_per_token(
        dataclasses.replace(smol, kv=parse_kv("kivi2").spec))
    r = parse_kv("xquant:4:r128:g64:res32:s4").spec.params
    assert (r.bits, r.rank, r.group_size, r.residual, r.sink) == (4, 128, 64, 32, 4)
    assert parse_kv("xquant:4:r128:g64:res32:s4").spec.label() == "xquant-x4-r128-g64-res32-s4"


@pytest.mark.parametrize("text,msg", [
    ("xquant:3", "bits=3 not supported"), ("xquant", "expected xquant:BITS"),
    ("xquant2", "expected xquant:BITS"), ("xquant:2:z1", "unknown option 'z1'"),
    ("xquant:2:stack", "unknown option 'stack'")])
def test_bad_shorthands(text, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_kv(text)


def test_rank_above_the_layer_is_refused():
    with pytest.raises(ConfigError, match="rank 96 exceeds the layer's stacked K/V rank 2·kv_dim = 64"):
        apply_kv_flag(tiny_gm(), "xquant:4:r96")


def test_a_basis_wider_than_the_layer_input_is_refused():
    """kv_dim 4 × 32 = 128 > hidden 96: W_k has rank ≤ 96, so a 128-channel K basis does not
    exist (this crashed in the store's reshape before the check)."""
    gm = tiny_gm(tiny_spec(n_layers=1, heads=8, kv_heads=4, head_dim=32, hidden=96))
    apply_kv_flag(gm, "xquant:4")
    with pytest.raises(ConfigError, match="128 channels per basis exceeds the layer input width 96"):
        AttentionState(ir.get_spec(gm), 1, model=gm)
    apply_kv_flag(gm, "xquant:4:r192")    # 96 + 96: fits
    assert AttentionState(ir.get_spec(gm), 1, model=gm).caches[0].r == 192


def test_xquant_on_a_layer_whose_input_is_not_the_kv_input_is_refused():
    gm = tiny_gm(tiny_spec(n_layers=1))
    attn = next(ir.nodes_by_role(gm, "attn"))
    norm = next(ir.nodes_by_role(gm, "attn_norm"))
    args = list(attn.args)
    args[3] = norm.args[0]                       # hand the cache the residual stream instead
    attn.args = tuple(args)
    gm.recompile()
    with pytest.raises(ConfigError, match="not what the layer's K/V projections read"):
        apply_kv_flag(gm, "xquant:4")


def test_needs_the_model_binding():
    gm = tiny_gm()
    apply_kv_flag(gm, "xquant:4")
    with pytest.raises(ConfigError, match="model=gm"):
        AttentionState(ir.get_spec(gm), 1)


def test_token_scale_is_on_for_qk_norm_layers_and_verified():
    """qwen3/gemma3-style k_norm: each token's K latent is divided by its RMS (fp16, 2 B per
    token) before per-channel quantization; the verifier's byte check covers the extra scale."""
    from mcomp.compiler.manager import PassManager
    from mcomp.passes.assign_kv import kv_passes
    from tests.helpers import tiny_ctx
    spec = tiny_spec(n_layers=2)
    spec = dataclasses.replace(spec, layers=tuple(dataclasses.replace(l, qk_norm=True)
                                                  for l in spec.layers))
    gm, rep = PassManager(kv_passes("xquant:2:g4:res4")).run(tiny_gm(spec), tiny_ctx())
    l0 = ir.get_spec(gm).layers[0]
    assert l0.kv.params.token_scaled(l0) and rep.passes[-1].kv_drift["bytes_ok"]
    plain = dataclasses.replace(l0, qk_norm=False)
    assert bytes_per_token(l0) == bytes_per_token(plain) + 2
    assert parse_kv("xquant:2:nots").spec.params.token_scaled(l0) is False

"""The C++ xquant decode kernel against the pure-torch reference (`XQuantCache._attend` on the
dequantized latent), over the shapes and options the kind accepts, and end to end; in its
projected mode (eigen, ThinK: per-head coordinates read without rematerialization) and over fp
latents (palu, eigen and ThinK without quantization) too."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from mcomp.compiler import ir
from mcomp.passes.assign_kv import apply_kv_flag, kv_passes
from mcomp.runtime import kernels
from mcomp.runtime.kernels import xquant_attention as xa
from mcomp.runtime.kvcache import AttentionState
from tests.helpers import small_ctx, tiny_gm, tiny_spec

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not xa.available(), reason="xquant kernel not built")]


def model(kv: str, qk_norm=False, n_layers=1, heads=4, kv_heads=2, head_dim=16, hidden=64):
    spec = tiny_spec(n_layers=n_layers, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                     hidden=hidden)
    if qk_norm:
        spec = dataclasses.replace(spec, layers=tuple(
            dataclasses.replace(l, qk_norm=True, qkv_bias=True) for l in spec.layers))
    gm = tiny_gm(spec)
    if kv.startswith("xquant"):
        apply_kv_flag(gm, kv)       # factors from the weights: no calibration
    else:
        for p in kv_passes(kv):     # the kind's pass fits its factors / bases / kept channels
            p.run(gm, small_ctx())
    return gm


def drive(gm, B, prefill, steps, scale=0.25, seed=0, mask_fn=None):
    """Prefill then decode `steps` tokens straight through layer 0's cache; at every step the
    kernel's output and the reference's on the same stored state. Yields (kernel, reference)."""
    spec = ir.get_spec(gm)
    st = AttentionState(spec, B, model=gm)
    c = st.caches[0]
    g = torch.Generator().manual_seed(seed)
    L0 = spec.layers[0]
    hidden, Hq, H, D = spec.hidden_size, L0.n_heads, L0.n_kv_heads, L0.head_dim

    def new(T):       # q, k, v, h of T tokens (a latent kind stores h's latent, a projected k, v's)
        return (torch.randn(B, Hq, T, D, generator=g), torch.randn(B, H, T, D, generator=g),
                torch.randn(B, H, T, D, generator=g), torch.randn(B, T, hidden, generator=g))

    S0 = prefill
    q, k, v, h = new(S0)
    c.attend(q, k, v, scale, None, h=h, positions=torch.arange(S0)[None].expand(B, -1))
    for t in range(steps):
        S = S0 + t + 1
        q, k, v, h = new(1)
        mask = torch.ones(B, 1, 1, S, dtype=torch.bool) if mask_fn is None else mask_fn(B, S)
        out = c.attend(q, k, v, scale, mask, h=h, positions=torch.full((B, 1), S - 1))
        assert c.last_path == "kernel"
        yield out, c._attend(q, scale, mask, c.latent(), None, None)


def _padded(B, S):
    """Row 1 left-padded by 6 tokens."""
    m = torch.ones(B, 1, 1, S, dtype=torch.bool)
    m[1, ..., :6] = False
    return m


def assert_matches(pairs):
    n = 0
    for got, want in pairs:
        # fp32 throughout; both sum the same ≤ 8k-term products in different orders, so a few
        # ulps of the output's own scale (the softmax-weighted values), not an absolute guess
        torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6 * want.abs().max().item())
        n += 1
    assert n


@pytest.mark.parametrize("kv", ["xquant:2:g4:res4", "xquant:4:g8:res8:s3", "xquant:8:g32:res16",
                                "xquant:2:g4:res4:stacked", "xquant:2:g4:res4:r24",
                                "xquant:4:g4:res0:ts", "xquant:2:g16:res0:s1:stacked:r40"])
def test_kernel_equals_reference(kv):
    assert_matches(drive(model(kv), B=1, prefill=45, steps=12))


@pytest.mark.parametrize("kv", ["eigen:0.3", "eigen:8:kivi2:g4:r4", "eigen:0.2:kivi4:g8:r0:s2",
                                "eigen:8:kivi8:g16:r8:fp16", "think:0.5:kivi2:g4:r4:s1",
                                "think:0.25:kivi4:g8:r0", "palu:0.5", "palu:0.25:uniform:hg1"])
def test_projected_and_fp_latents_equal_reference(kv):
    """eigen / ThinK + KIVI run the projected mode (q in the key basis, per-head V); an fp latent
    (palu, eigen without :kiviN) is all fp rows, no quantized block."""
    gm = model(kv)
    assert AttentionState(ir.get_spec(gm), 1, model=gm).caches[0].projected == \
        (not kv.startswith("palu"))
    assert_matches(drive(gm, B=1, prefill=45, steps=12))


def test_projected_batch_mask_and_gqa():
    gm = model("eigen:8:kivi2:g4:r4:s1", heads=6, kv_heads=2)
    assert_matches(drive(gm, B=2, prefill=37, steps=6, mask_fn=_padded))


def test_blocks_longer_than_the_fp_tile():
    """G = 64 > the 32-row fp tile: a block is one tile of G rows."""
    gm = model("xquant:2:g64:res0:s2")
    pairs = list(drive(gm, B=1, prefill=150, steps=3))
    assert AttentionState(ir.get_spec(gm), 1, model=gm).caches[0].G == 64
    assert_matches(pairs)


def test_qk_norm_and_bias_layers():
    """k_norm (RMSNorm with weight) and a k bias enter before RoPE; token scale is on."""
    gm = model("xquant:2:g4:res4:s2", qk_norm=True)
    c = AttentionState(ir.get_spec(gm), 1, model=gm).caches[0]
    assert c.has_knorm and c.tok_scale
    assert_matches(drive(gm, B=1, prefill=37, steps=10))


def test_batch_and_padding_mask():
    """Left padding (masked columns in a quantized block and in the sink) per batch row."""
    assert_matches(drive(model("xquant:4:g4:res4:s2"), B=2, prefill=30, steps=6, mask_fn=_padded))


def test_sliding_window_skips_whole_tiles():
    def mask_fn(B, S):
        m = torch.zeros(B, 1, 1, S, dtype=torch.bool)
        m[..., -20:] = True
        return m
    assert_matches(drive(model("xquant:2:g4:res4"), B=1, prefill=90, steps=5, mask_fn=mask_fn))


def test_wide_heads_use_the_vector_micro_kernel():
    """kv_dim = 4 × 32 = 128 (multiple of 32: the AVX-512 path) and 3 query heads per KV head."""
    gm = model("xquant:2:g32:res32:s4", heads=12, kv_heads=4, head_dim=32, hidden=256)
    assert_matches(drive(gm, B=1, prefill=200, steps=4))


def test_streaming_logits_and_greedy_tokens_equal_the_reference_path():
    gm = model("xquant:2:g4:res4:s2", n_layers=2)
    spec = ir.get_spec(gm)

    def stream(ids, n_new):
        st = AttentionState(spec, 1, model=gm)
        pos = torch.arange(ids.shape[1])[None]
        st.begin(pos)
        logits = [gm(ids, pos, st)[:, -1]]
        toks = []
        for t in range(n_new):
            nxt = logits[-1].argmax(-1, keepdim=True)
            toks.append(int(nxt))
            p = torch.tensor([[ids.shape[1] + t]])
            st.begin(p)
            logits.append(gm(nxt, p, st)[:, -1])
        return torch.stack(logits, 1), toks, st

    ids = torch.randint(3, 128, (1, 25), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        fast, fast_toks, st = stream(ids, 20)
        with kernels.reference_mode():
            ref, ref_toks, st_ref = stream(ids, 20)
    assert st.caches[0].last_path == "kernel" and st_ref.caches[0].last_path == "reference"
    assert fast_toks == ref_toks
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    # one RoPE table for both layers (same positions), not one per layer
    shared = st.caches[0].binding.shared
    assert shared is st.caches[1].binding.shared
    assert len([k for k in shared if isinstance(k, tuple) and k[0] == "xquant-rope"]) == 1


def test_a_wrong_scale_is_caught():
    """The comparison can fail: the kernel fed a corrupted fp16 scale disagrees."""
    gm = model("xquant:2:g4:res4")
    c = AttentionState(ir.get_spec(gm), 1, model=gm).caches[0]
    g = torch.Generator().manual_seed(5)
    c.attend(torch.randn(1, 4, 30, 16), None, None, 0.25, None, h=torch.randn(1, 30, 64, generator=g),
             positions=torch.arange(30)[None])
    q = torch.randn(1, 4, 1, 16, generator=g)
    mask = torch.ones(1, 1, 1, 31, dtype=torch.bool)
    c.append_latent(c.project(torch.randn(1, 1, 64, generator=g)), torch.tensor([[30]]))
    want = c._attend(q, 0.25, mask, c.latent(), None, None)
    c.store["scales"][0, 0, 0] *= 4
    got = xa.decode(c, q, 0.25, mask)
    assert not torch.allclose(got, want, rtol=1e-5, atol=2e-6 * want.abs().max().item())

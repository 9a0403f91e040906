"""cskv (CSKV's bi-branch cache: exact recent window + palu latent for older tokens): a window
covering the text is exact, decode equals an independent bi-branch oracle, quantize-before-attend
equals token-by-token streaming (fp and quantized store), real storage = accounting at every
length, bad input, artifact round trip and the pass manager's KV verification."""
from __future__ import annotations

import pytest
import torch

from mcomp.compiler import ir
from mcomp.compiler.manager import PassManager
from mcomp.compiler.model import apply_rope
from mcomp.errors import ConfigError
from mcomp.passes.assign_kv import kv_passes
from mcomp.runtime import kernels
from mcomp.runtime.kernels import xquant_attention
from mcomp.runtime.kv import KV_KINDS, bytes_held, parse_kv
from mcomp.runtime.kv.cskv import CSKVCache
from mcomp.runtime.kv.xquant import kv_weights
from mcomp.runtime.kvcache import AttentionState, KVBinding
from tests.helpers import kv_state_round_trip, small_ctx, tiny_gm
from tests.runtime.test_palu import palu_gm
from tests.runtime.test_xquant import run_cached

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.randint(3, 128, (1, 48), generator=torch.Generator().manual_seed(0))


def bi_branch_reference(gm, ids, window, monkeypatch):
    """No-cache logits with every layer's attention replaced by a pure-torch oracle: query c sees
    key/value j exactly when c − j < window, else palu's reconstruction from the layer's factors
    (K = rope(h·A_k·B_kᵀ + b_k), V = h·A_v·B_vᵀ + b_v, block-diagonal over groups)."""
    spec = ir.get_spec(gm)
    T = ids.shape[1]
    pos = torch.arange(T)[None]
    for i, ls in enumerate(spec.layers):
        mod = gm.get_submodule(f"layers.{i}.attn")
        b = KVBinding(gm, i)
        st = b.state()
        _, _, bk, bv = kv_weights(b, ls)
        rk = st["Bk"].shape[0] * st["Bk"].shape[2]
        Ak, Av = st["A"][:, :rk], st["A"][:, rk:]
        Bk, Bv = torch.block_diag(*st["Bk"].unbind(0)), torch.block_diag(*st["Bv"].unbind(0))
        cos, sin = b.rotary(pos)

        def fwd(q, k, v, h, state=None, Ak=Ak, Av=Av, Bk=Bk, Bv=Bv, bk=bk, bv=bv, cos=cos,
                sin=sin, scale=mod.scale, H=ls.n_kv_heads, D=ls.head_dim):
            g = q.shape[1] // H
            kl = (h @ Ak @ Bk.T + bk).view(1, T, H, D).transpose(1, 2)
            kl = apply_rope(kl, cos, sin)
            vl = (h @ Av @ Bv.T + bv).view(1, T, H, D).transpose(1, 2)
            c = torch.arange(T)[:, None]
            j = torch.arange(T)[None, :]
            exact = (c - j < window)
            ke, ve = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
            kl, vl = kl.repeat_interleave(g, 1), vl.repeat_interleave(g, 1)
            s = torch.where(exact, q @ ke.transpose(-1, -2), q @ kl.transpose(-1, -2)) * scale
            s = s.masked_fill(~(j <= c), float("-inf"))
            p = s.softmax(-1)
            out = (p * exact) @ ve + (p * ~exact) @ vl
            return out.transpose(1, 2).flatten(2)
        monkeypatch.setattr(mod, "forward", fwd)
    try:
        with torch.inference_mode():
            return gm(ids, pos, None)
    finally:
        monkeypatch.undo()


def test_window_covering_the_text_is_exact():
    gm, _ = palu_gm("cskv:0.5:w64")
    plain, got, st = run_cached(gm, IDS)
    assert all(c.n_win == IDS.shape[1] and c.latent().shape[1] == 0 for c in st.caches)
    torch.testing.assert_close(got, plain, rtol=0, atol=1e-4)


@pytest.mark.parametrize("text,window", [("cskv:0.5:w8", 8), ("cskv:0.5:w16:hg1", 16)])
def test_decode_equals_bi_branch_oracle(text, window, monkeypatch):
    gm, _ = palu_gm(text)
    ref = bi_branch_reference(gm, IDS, window, monkeypatch)
    plain, got, _ = run_cached(gm, IDS)
    assert (plain - ref).abs().max() > 1e-1           # the latent branch really differs
    torch.testing.assert_close(got, ref, rtol=0, atol=2e-5 * ref.abs().max().item())


@pytest.mark.skipif(not xquant_attention.available(), reason="xquant kernel not built")
@pytest.mark.parametrize("text", ["cskv:0.5:w8", "cskv:0.5:w8:kivi2:g8:s2", "cskv:0.25:w4:kivi4:g4:r4"])
def test_kernel_decode_equals_reference_decode(text):
    """The kernel step (store through the xquant kernel, window in torch, merged by log-sum-exp)
    against the reference's single softmax over both branches. Two caches fed the same tokens
    hold the same state (what a cache stores does not depend on attention outputs), so every
    step compares the two paths on one state, to fp32 rounding."""
    gm, _ = palu_gm(text)
    spec = ir.get_spec(gm)
    ls = spec.layers[0]
    a, b = (CSKVCache(ls, 2, KVBinding(gm, 0)) for _ in range(2))
    g = torch.Generator().manual_seed(7)
    S = 0
    for t in range(40):
        T = 9 if t == 0 else 1
        q = torch.randn(2, ls.n_heads, T, 16, generator=g)
        k, v = (torch.randn(2, ls.n_kv_heads, T, 16, generator=g) for _ in range(2))
        h = torch.randn(2, T, spec.hidden_size, generator=g)
        pos = torch.arange(S, S + T)[None].expand(2, -1)
        S += T
        mask = torch.ones(2, 1, T, S, dtype=torch.bool).tril(S - T)
        mask[1, ..., :3] = False                                # row 1 left-padded
        out_a = a.attend(q, k, v, 0.25, mask, h=h, positions=pos)
        with kernels.reference_mode():
            out_b = b.attend(q, k, v, 0.25, mask, h=h, positions=pos)
        if T == 1:
            assert a.last_path == "kernel" and b.last_path == "reference"
            torch.testing.assert_close(out_a, out_b, rtol=1e-5, atol=2e-6 * out_b.abs().max().item())
    assert a.n_held - a.n_win > 0 and (a.nb > 0) == (a.p.bits > 0)      # both branches read


@pytest.mark.parametrize("text", ["cskv:0.5:w8", "cskv:0.5:w8:kivi2:g8", "cskv:0.5:w4:kivi4:g8:r8:s2"])
def test_quantize_before_attend_equals_streaming(text):
    """One forward in quantize-before-attend mode must give every query what token-by-token
    streaming showed it: exact within the window, the latent beyond, quantized where flushed."""
    gm, _ = palu_gm(text)
    _, streamed, _ = run_cached(gm, IDS, prefill=4)
    T = IDS.shape[1]
    pos = torch.arange(T)[None]
    with torch.inference_mode():
        st = AttentionState(ir.get_spec(gm), 1, model=gm, quantize_before_attend=True)
        st.begin(pos)
        qba = gm(IDS, pos, st)
    torch.testing.assert_close(qba, streamed, rtol=0, atol=2e-5 * streamed.abs().max().item())


@pytest.mark.parametrize("text", ["cskv:0.5:w8", "cskv:0.5:w8:kivi2:g8:s2", "cskv:0.5:w8:fp16"])
def test_storage_equals_accounting_at_every_length(text):
    gm, _ = palu_gm(text)
    spec = ir.get_spec(gm)
    T = IDS.shape[1]
    pos = torch.arange(T)[None]
    st = AttentionState(spec, 1, model=gm)
    with torch.inference_mode():
        for t in range(T):
            st.begin(pos[:, t:t + 1])
            gm(IDS[:, t:t + 1], pos[:, t:t + 1], st)
            for c, ls in zip(st.caches, spec.layers):
                assert c.nbytes() == bytes_held(ls, t + 1), (t, c.nbytes())
    c = st.caches[0]
    assert c.n_win == 8 and c.latent().shape[1] == T - 8
    if "kivi" in text:
        assert c.nb > 0
    dense = KV_KINDS.get("dense")
    assert c.nbytes() < dense.bytes_held(dense.Params("float32"), spec.layers[0], T)


@pytest.mark.parametrize("text,msg", [
    ("cskv", "expected cskv:RATIO"),
    ("cskv:1.5", r"ratio must be in \(0, 1\)"),
    ("cskv:0.5:w0", "window must be an integer >= 1"),
    ("cskv:0.5:uniform", "uniformly by default"),
    ("cskv:0.5:zz", "unknown option 'zz'"),
])
def test_bad_shorthands(text, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        parse_kv(text)
    assert "\n" not in str(e.value) and "palu" not in str(e.value)


def test_params_label_and_defaults():
    p = parse_kv("cskv:0.5").spec.params
    assert (p.window, p.allocation, p.residual) == (32, "uniform", 0)
    assert p.label() == "cskv-0.5-w32"
    q = parse_kv("cskv:0.25:w16:fisher:kivi2:r16").spec.params
    assert (q.allocation, q.residual, q.bits) == ("fisher", 16, 2)
    assert q.label() == "cskv-0.25-kivi2-g32-r16-w16-fisher"
    assert type(q).from_dict(q.to_dict()) == q


def test_load_refused_and_verified_by_the_pass_manager():
    gm, _ = palu_gm("cskv:0.5:w8")
    c = CSKVCache(ir.get_spec(gm).layers[0], 1, KVBinding(gm, 0))
    with pytest.raises(ConfigError, match="cannot be filled"):
        c.load(torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16))
    gm, report = PassManager(kv_passes("cskv:0.5:w8")).run(tiny_gm(), small_ctx(), "tiny")
    rec = report.passes[-1]
    assert rec.name == "cskv" and rec.kv_drift["bytes_ok"] and rec.kv_drift["kld"] > 0


def test_artifact_round_trip(tmp_path):
    gm, _ = palu_gm("cskv:0.5:w8")
    a, b = kv_state_round_trip(gm, tmp_path, ["A", "Bk", "Bv"], lambda m: run_cached(m, IDS)[1])
    torch.testing.assert_close(a, b, rtol=0, atol=4e-6 * a.abs().max().item())

"""Fast decode attention over an xquant latent cache (one query token), reading the packed latent.

The C++ source is csrc/xquant_attention.cpp (its header comment gives the algorithm): per tile of
≤ 32 tokens the latent is dequantized once for all KV heads, K is rematerialized tile by tile
(K = L_k·B_kᵀ + b_k, k_norm, RoPE) and scored, and the softmax weights are applied to the V
latent; only at the end is each query head's P·L_v projected by B_v. Peak scratch per task is a
tile's latent and keys (max(32, G) × (r + kv_dim) floats): no K or V of the whole context exists.

The same kernel runs caches that store per-head coordinates of the keys and values instead
(`cache.projected`: eigen and ThinK, runtime/kv/eigen.py ProjectedKVCache): the query is
mapped into the key basis here, the scores read the coordinates without rematerializing anything,
and each query head mixes only its KV head's value coordinates before its decoder U_o.

Built with `torch.utils.cpp_extension.load` (JIT, cached in torch's extension dir; -O3
-march=native). If it cannot be built (no ninja or compiler), or MCOMP_NO_XQUANT_KERNEL=1,
`available()` is False and the cache runs its pure-torch reference (`XQuantCache._attend`), which
the tests compare this kernel against.

RoPE: the kernel reads cos/sin of the held positions from a half-width table (B, S, D/2) that is
grown by the new positions each step and shared by every layer of one AttentionState with the same
rotary table (positions are the same for all layers of a state), so its memory is one table per
RoPE kind, not per layer (SmolLM2 at 8k: 2 MB), and its values are the reference's bit for bit.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .jit import CFLAGS, LDFLAGS, JitExtension

_SRC = Path(__file__).with_name("csrc") / "xquant_attention.cpp"
_NAME = "mcomp_xquant_attention_v4"

KERNEL = JitExtension("xquant attention kernel", "MCOMP_NO_XQUANT_KERNEL", lambda ext: ext.load(
    name=_NAME, sources=[str(_SRC)], extra_cflags=CFLAGS, extra_ldflags=LDFLAGS, verbose=False))
load, available = KERNEL.load, KERNEL.available


def _rmsnorm_weight(cache):
    """(weight, eps) of the layer's k_norm if it is mcomp's RMSNorm, else None (the kernel only
    knows that norm; anything else keeps the reference path)."""
    from ...compiler.model import RMSNorm
    m = cache.binding.module("k_norm")
    return (m.weight.detach().float().contiguous(), float(m.eps)) if isinstance(m, RMSNorm) else None


def use_kernel(cache) -> bool:
    """Whether this cache's decode step can run the kernel."""
    from .. import kernels
    if kernels._FORCE_REFERENCE or cache.bits not in (2, 4, 8):
        return False
    if not cache.projected:
        if cache.has_knorm and _rmsnorm_weight(cache) is None:
            return False
        if cache.layer.rope is not None and cache.layer.rope.dim != cache.D:
            return False       # partial rotary: the kernel rotates whole heads
    return available()


def remat_factors(cache):
    """Kernel-layout factors of a cache that rematerializes K (xquant, palu): (BkT, bk, Bv, bv,
    k_norm weight, eps), derived once per cache (its B_k/B_v are fixed at build)."""
    f = getattr(cache, "_kernel_factors", None)
    if f is None:
        kn = _rmsnorm_weight(cache) if cache.has_knorm else None
        f = (cache.Bk.T.contiguous().float(), cache.bk.float().contiguous(),
             cache.Bv.float().contiguous(), cache.bv.float().contiguous(),
             torch.empty(0) if kn is None else kn[0], 1e-6 if kn is None else kn[1])
        cache._kernel_factors = f
    return f


def projected_factors(cache):
    """The same for a cache whose latent holds per-head key and value coordinates (eigen,
    ThinK): no B_k, B_v the per-head decoders stacked (H·D, r_v), no bias, norm or RoPE."""
    f = getattr(cache, "_kernel_factors", None)
    if f is None:
        e = torch.empty(0)
        f = (e, e, cache.Uo.reshape(-1, cache.Uo.shape[-1]).float().contiguous(),
             torch.zeros(cache.H * cache.D), e, 1e-6)
        cache._kernel_factors = f
    return f


def rope_halves(cache):
    """(cos, sin) (B, S, D/2) of the cache's held positions, or None without RoPE: a table in
    binding.shared, grown by the new positions and reused by every layer whose positions match."""
    b = cache.binding
    probe = b.rotary(cache.pos[:, :0])
    if probe is None:
        return None
    key = ("xquant-rope", b._rope)
    tab = b.shared.get(key)
    S, half = cache.pos.shape[1], cache.D // 2
    if tab is not None and tab["pos"].shape[1] >= S and torch.equal(tab["pos"][:, :S], cache.pos):
        return tab["cos"], tab["sin"]
    if tab is None or not (tab["pos"].shape[1] <= S
                           and torch.equal(cache.pos[:, :tab["pos"].shape[1]], tab["pos"])):
        tab = {"pos": cache.pos[:, :0], "cos": torch.empty(cache.batch, 0, half),
               "sin": torch.empty(cache.batch, 0, half)}
    n = tab["pos"].shape[1]
    cos, sin = b.rotary(cache.pos[:, n:])                      # (B, 1, T, D)
    tab = {"pos": cache.pos.clone(),
           "cos": torch.cat([tab["cos"], cos[:, 0, :, :half].float()], 1).contiguous(),
           "sin": torch.cat([tab["sin"], sin[:, 0, :, :half].float()], 1).contiguous()}
    b.shared[key] = tab
    return tab["cos"], tab["sin"]


def _nsplit(B: int, ntiles: int) -> int:
    """Token splits: about 4 tasks per thread (a multiple of the thread count when possible),
    never tiles shorter than 2 per split."""
    threads = torch.get_num_threads()
    most = max(1, ntiles // 2)
    n = max(1, min(-(-4 * threads // B), most))
    for m in range(n, min(2 * n, most) + 1):
        if (B * m) % threads == 0:
            return m
    return n


def decode(cache, q: torch.Tensor, scale: float, mask, with_lse: bool = False):
    """q (B, Hq, 1, D) over the cache's stored state → (B, Hq, 1, D) at q's dtype, and with
    `with_lse` each head's log-sum-exp of its scaled logits (B, Hq, 1, 1) fp32 as well."""
    mod = load()
    B, Hq, _, D = q.shape                         # D: the output's head_dim
    dtype = q.dtype
    f32, u8, f16 = torch.float32, torch.uint8, torch.float16
    r = cache.r

    def fp(t):
        return torch.empty(B, 0, r) if t is None else t.to(f32).contiguous()

    st = cache.store
    none8, none16 = torch.empty(0, dtype=u8), torch.empty(0, dtype=f16)
    codes = st.get("codes", none8)
    scales = st.get("scales", none16)
    nscales = st.get("nscales", none16)
    tcodes = st.get("tcodes", none8)
    tscales = st.get("tscales", none16)
    if cache.projected:
        BkT, bk, Bv, bv, knw, eps = projected_factors(cache)
        rope = None
        q = cache.queries(q)                      # (B, Hq, 1, r_k): attention runs in the basis
    else:
        BkT, bk, Bv, bv, knw, eps = remat_factors(cache)
        rope = rope_halves(cache)
    cos, sin = (torch.empty(0), torch.empty(0)) if rope is None else rope
    if mask is not None and bool(mask.all()):
        mask = None
    m = torch.empty(0, dtype=torch.bool) if mask is None else \
        mask.reshape(mask.shape[0], -1).expand(B, -1).contiguous()
    k_off = cache.k_cols.start
    v_off = cache.v_cols.start
    ns = 0 if cache.sink is None else cache.sink.shape[1]
    nr = 0 if cache.res is None else cache.res.shape[1]
    ntiles = -(-ns // 32) + cache.nb + -(-nr // 32)
    out, lse = mod.xquant_decode(q.reshape(B, Hq, -1).float().contiguous(), fp(cache.sink),
                            fp(cache.res), codes, scales, nscales, tcodes, tscales, BkT, bk, Bv,
                            bv, knw, cos, sin, m, cache.nb, cache.G, cache.rk, cache.rv, cache.gv,
                            cache.bits, bool(cache.tok_scale), k_off, v_off, cache.H, float(scale),
                            eps, _nsplit(B, ntiles), cache.projected)
    out = out.view(B, Hq, 1, D).to(dtype)
    return (out, lse.view(B, Hq, 1, 1)) if with_lse else out

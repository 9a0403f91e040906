"""KIVI quantized KV cache: keys per channel, values per token, an fp window of recent tokens.

Token order in the cache (= column order of AttentionState's masks, i.e. append order):

    [ sink (fp, first `sink` tokens) | quantized store (n_q tokens) | residual (fp) ]

Streaming (KIVI): new tokens enter the fp residual; whenever it holds ≥ residual + G tokens
(G = group_size), its oldest G-token blocks are quantized into the store, so between `residual`
and `residual + G − 1` recent tokens stay in full precision. Closed form used by the
quantize-before-attend path: the key in column j (j ≥ sink, block b = (j − sink) // G) is
quantized at the step of the query in column c iff (b + 1)·G + residual ≤ c + 1 − sink.

Quantization (asymmetric, min/scale form): x ≈ s·q + m with s = (max − min)/(2^bits − 1),
m = min, both stored as float16 and rounded *before* codes are computed, q = round((x − m)/s).
(The zero-point form s·(q − z) is the same grid with m = −s·z.)
- K, k_axis="channel": s, m per (batch, kv head, block of G tokens, channel): (B, H, n_q/G, D).
- K, k_axis="token" (ablation): s, m per (batch, kv head, token, group of gv = min(G, head_dim)
  channels): (B, H, n_q, D/gv).
- V: s, m per (token, group of gv channels) as well, stored group-major inside each block of G
  tokens, (B, H, n_q/G, D/gv, G): the kernel's per-group weights p_t·s_tg are then contiguous
  runs over tokens (no transposition per block).

Code layout ("planar" packing of whole blocks, chosen for the kernel): the store grows one
block of G tokens at a time, and each block's G·D codes form one row of n = G·D codes packed
into W = n·b/8 bytes; byte i holds codes i, i+W, i+2W, ... in bit fields [0,b), [b,2b), ...
Unpacking a block is then one long loop of `(p[i] >> j·b) & mask` over contiguous bytes, which
compilers vectorize at full width; 8-bit codes are stored as is.
kq, vq: (B, H, n_q/G, G·D·b/8) uint8. Code order inside a block row:
- K, channel axis: channel-major, code[d·G + t], so the kernel computes the block's G logits as
  qm + Σ_d (scale·q_d·s_d)·codes[d, :] with vectors over tokens (no horizontal sums).
- K, token axis (ablation), and V: token-major, code[t·D + d] (a weighted sum over tokens).

Key rotation (KVSpec.k_rotation="hadamard", QuaRot-style, post-RoPE): `attend` maps q and the
new k to q·R, k·R with R the orthonormal Hadamard matrix (D × D) before anything else, so
everything the cache holds and computes with (sink, store, residual, `full_kv`, the fast kernel)
is in the rotated basis, and `append` takes keys in that basis. Logits are unchanged in exact
arithmetic, q·kᵀ = q R Rᵀ kᵀ, and values/outputs are never rotated, so the kernels need no
change; what changes is what gets quantized: a key outlier channel is spread over the head.

Sliding-window layers (LayerSpec.window, Gemma 3's local layers): at each decode step the
leading store blocks that the step's mask shows invisible to every row are evicted (`evict`,
on by default). Positions only grow, so a key that fell out of the window stays out; what the
cache holds of a local layer is then bounded by sink + window + G + residual tokens instead of
growing with the context. The mask AttentionState builds still spans every column ever
appended; the cache maps it onto what it holds by dropping the evicted columns
(`n_evicted` of them, right after the sink). Prefill chunks never evict.

Shorthand: `kivi2` / `kivi4` / `kivi8` (K and V bits, group 32, residual 128) with options
`:gN` (group), `:rN` (fp residual), `:sN` (fp sink tokens), `:kt` (per-token keys, ablation),
`:kB` / `:vB` (K or V bits other than the head's, e.g. `kivi2:k4`),
`:hk` (online Hadamard key rotation, a params field) and `:hv` (Hadamard V rotation folded into
v_proj/o_proj: a weight rewrite, the rotate_v pass, so the choice carries it as a rewrite).

Byte accounting: `bytes_per_token` is the amortized cost of one token in the quantized
store (codes + its share of the fp16 scales/mins, all KV heads, K and V); the fp sink and
residual are a bounded overhead (≤ sink + residual + G − 1 tokens at `dtype`) it does not
include. `nbytes()` is exact for the current state: the bytes of every tensor the cache holds,
counted over their used extent (the store grows by doubling; `capacity_nbytes()` counts that).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn.functional as F

from ...compiler.hadamard import hadamard, hadamard_block
from ...compiler.spec import LayerSpec
from ...errors import ConfigError
from ..kvcache import DTYPES, KVCache
from . import KVChoice, KVCost, KVKind, KVParams, exact_number, register_kind, window_split

log = logging.getLogger("mcomp.runtime")

SCALE_DTYPE = torch.float16
_MIN_SCALE = 1e-5   # representable in fp16; keeps codes finite for constant groups


KV_BITS = (2, 4, 8)
K_ROTATIONS = ("none", "hadamard")


@dataclass(frozen=True)
class KIVIParams(KVParams):
    """KIVI-style asymmetric quantization (module docstring). Keys per channel (scale/min per
    (head, channel) over a block of `group_size` tokens) or, for ablations, per token
    (`k_axis="token"`); values per token over groups of `min(group_size, head_dim)` channels.
    The `residual` most recent tokens stay in `dtype` and are flushed into the quantized store
    `group_size` tokens at a time; the first `sink` tokens are never quantized.
    `k_rotation="hadamard"` rotates keys and queries online, after RoPE, by an orthonormal
    Hadamard matrix (QuaRot): RoPE sits between k_proj and the cache, so this rotation cannot
    be folded into weights; V rotation can (the rotate_v pass, `:hv`)."""

    k_bits: int = 4
    v_bits: int = 4
    group_size: int = 32
    residual: int = 128
    sink: int = 0
    k_axis: str = "channel"         # channel (KIVI) | token (ablation)
    k_rotation: str = "none"        # none | hadamard (online, post-RoPE, on keys and queries)
    dtype: str = "float32"          # the fp residual/sink storage

    def __post_init__(self):
        for name in ("k_bits", "v_bits"):
            if getattr(self, name) not in KV_BITS:
                raise ConfigError(f"kv kivi: {name}={getattr(self, name)} must be one of "
                                  f"{', '.join(map(str, KV_BITS))}")
        if type(self.group_size) is not int or self.group_size < 1:
            raise ConfigError(f"kv kivi: group_size must be a positive integer, got {self.group_size}")
        if type(self.residual) is not int or self.residual < 0:
            raise ConfigError(f"kv kivi: residual must be an integer >= 0, got {self.residual}")
        if type(self.sink) is not int or self.sink < 0:
            raise ConfigError(f"kv kivi: sink must be an integer >= 0, got {self.sink}")
        if self.k_axis not in ("channel", "token"):
            raise ConfigError(f"kv kivi: k_axis '{self.k_axis}' must be 'channel' or 'token'")
        if self.k_rotation not in K_ROTATIONS:
            raise ConfigError(f"kv kivi: k_rotation '{self.k_rotation}' not in {', '.join(K_ROTATIONS)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"kv kivi: dtype '{self.dtype}' not in {', '.join(DTYPES)}")

    def label(self) -> str:
        k = f"k{self.k_bits}" + ("t" if self.k_axis == "token" else "")
        return (f"kivi-{k}v{self.v_bits}-g{self.group_size}-r{self.residual}"
                + (f"-s{self.sink}" if self.sink else "")
                + ("-hk" if self.k_rotation == "hadamard" else ""))

    def check_layer(self, layer: LayerSpec) -> None:
        D = layer.head_dim
        gv = min(self.group_size, D)
        if D % gv:
            raise ConfigError(f"kv kivi: value channel group min(group_size={self.group_size}, "
                              f"head_dim={D}) must divide head_dim")
        if self.k_rotation == "hadamard":
            hadamard_block(D)  # ConfigError when head_dim has no usable Hadamard block
        for bits in (self.k_bits, self.v_bits):
            if D % (8 // bits):
                raise ConfigError(f"kv kivi: head_dim={D} must be a multiple of {8 // bits} to "
                                  f"pack {bits}-bit codes")


def _kivi_option(opt: str, opts: dict) -> bool:
    """Apply one shorthand option to `opts` (KIVIParams fields); False if not a KIVI option."""
    names = {"g": "group_size", "r": "residual", "s": "sink", "k": "k_bits", "v": "v_bits"}
    if opt == "kt":
        opts["k_axis"] = "token"
    elif opt == "hk":
        opts["k_rotation"] = "hadamard"
    elif opt[:1] in names and opt[1:].isdigit():
        opts[names[opt[0]]] = int(opt[1:])
    else:
        return False
    return True


# ----------------------------------------------------------------------------- packing

def pack_planar(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., D) uint8 codes < 2^bits → (..., D·bits/8) uint8, planar layout (module docstring)."""
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    per = 8 // bits
    D = codes.shape[-1]
    if D % per:
        raise ValueError(f"cannot planar-pack {D} codes of {bits} bits")
    c = codes.to(torch.uint8).view(*codes.shape[:-1], per, D // per)        # (..., per, W)
    out = c[..., 0, :].clone()
    for j in range(1, per):
        out |= c[..., j, :] << (j * bits)
    return out                                                                # (..., W)


def unpack_planar(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_planar: (..., W) uint8 → (..., W·8/bits) uint8 codes."""
    if bits == 8:
        return packed
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.uint8) * bits                     # (per,)
    q = (packed[..., None, :] >> shifts[:, None]) & (2 ** bits - 1)          # (..., per, W)
    return q.flatten(-2)


def quantize_minmax(x: torch.Tensor, dim: int, bits: int):
    """Asymmetric quantization of x reducing over `dim` → codes uint8 (like x), scale and min
    (fp16, size 1 along `dim`)."""
    x = x.float()
    mn, mx = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    qmax = 2 ** bits - 1
    s16 = ((mx - mn) / qmax).clamp(min=_MIN_SCALE).to(SCALE_DTYPE)
    m16 = mn.to(SCALE_DTYPE)
    q = ((x - m16.float()) / s16.float()).round_().clamp_(0, qmax).to(torch.uint8)
    return q, s16, m16


def _token_groups(x: torch.Tensor, gv: int) -> torch.Tensor:
    """(B, H, T, D) → (B, H, T, D/gv, gv)."""
    B, H, T, D = x.shape
    return x.reshape(B, H, T, D // gv, gv)


def quantized_at(key_cols: torch.Tensor, query_cols: torch.Tensor, group: int, residual: int,
                 sink: int) -> torch.Tensor:
    """(T, S) bool: whether the key in column j is quantized when the query in column c attends
    (streaming semantics, module docstring)."""
    j = key_cols[None, :]                                                     # (1, S)
    c = query_cols[:, None]                                                   # (T, 1)
    blk = torch.div(j - sink, group, rounding_mode="floor")
    return (j >= sink) & ((blk + 1) * group + residual <= c + 1 - sink)


# ----------------------------------------------------------------------------- cache

class KIVICache(KVCache):
    """KIVI streaming cache for one layer (see module docstring for layout and accounting)."""

    def __init__(self, layer: LayerSpec, batch: int, binding=None):
        super().__init__(layer, batch, binding)
        kv = layer.kv.params
        self.kv = kv
        self.G, self.R, self.n_sink = kv.group_size, kv.residual, kv.sink
        self.H, self.D = layer.n_kv_heads, layer.head_dim
        self.gv = min(kv.group_size, layer.head_dim)
        self.k_channel = kv.k_axis == "channel"
        self.fp_dtype = DTYPES[kv.dtype]
        # (D, D) orthonormal key/query rotation, or None (module docstring)
        self.k_rot = hadamard(self.D) if kv.k_rotation == "hadamard" else None
        self.sink_k = self.sink_v = None     # (B, H, ns, D)
        self.res_k = self.res_v = None       # (B, H, nr, D)
        self.n_q = 0                         # tokens in the quantized store (multiple of G)
        self.kq = self.vq = None             # (B, H, cap/G, G·D·bits/8) uint8
        self.ks = self.km = None             # channel: (B, H, cap/G, D); token: (B, H, cap, D/gv)
        self.vs = self.vm = None             # (B, H, cap/G, D/gv, G) fp16
        self.last_path = None                # "kernel" | "reference" | "prefill": for tests

    # ------------------------------------------------------------------ accounting

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the cache holds, over its used extent."""
        out = {}
        nb = self.n_q // self.G if self.k_channel else self.n_q
        for name, t, n in (("sink_k", self.sink_k, None), ("sink_v", self.sink_v, None),
                           ("res_k", self.res_k, None), ("res_v", self.res_v, None),
                           ("kq", self.kq, self.n_q // self.G), ("vq", self.vq, self.n_q // self.G),
                           ("k_scale", self.ks, nb), ("k_min", self.km, nb),
                           ("v_scale", self.vs, self.n_q // self.G),
                           ("v_min", self.vm, self.n_q // self.G)):
            if t is not None:
                out[name] = t if n is None else t[:, :, :n]
        return out

    def quantized_span(self):
        return self.n_sink_held, self.n_sink_held + self.n_q

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def capacity_nbytes(self) -> int:
        ts = (self.sink_k, self.sink_v, self.res_k, self.res_v, self.kq, self.vq, self.ks,
              self.km, self.vs, self.vm)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    @property
    def n_res(self) -> int:
        return 0 if self.res_k is None else self.res_k.shape[2]

    @property
    def n_sink_held(self) -> int:
        return 0 if self.sink_k is None else self.sink_k.shape[2]

    # ------------------------------------------------------------------ append

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: (B, H, T, D). Fill the sink, then the residual; flush full blocks."""
        T = k.shape[2]
        self.length += T
        k, v = k.to(self.fp_dtype), v.to(self.fp_dtype)
        take = min(self.n_sink - self.n_sink_held, T)
        if take > 0:
            sk, sv = k[:, :, :take], v[:, :, :take]
            self.sink_k = sk if self.sink_k is None else torch.cat([self.sink_k, sk], 2)
            self.sink_v = sv if self.sink_v is None else torch.cat([self.sink_v, sv], 2)
            k, v = k[:, :, take:], v[:, :, take:]
        if k.shape[2] == 0:
            return
        self.res_k = k if self.res_k is None else torch.cat([self.res_k, k], 2)
        self.res_v = v if self.res_v is None else torch.cat([self.res_v, v], 2)
        nblk = max(0, (self.n_res - self.R) // self.G)
        if nblk:
            n = nblk * self.G
            self._store(self.res_k[:, :, :n], self.res_v[:, :, :n])
            self.res_k = self.res_k[:, :, n:].clone()
            self.res_v = self.res_v[:, :, n:].clone()

    def load(self, k: torch.Tensor, v: torch.Tensor, h=None) -> None:
        """KVCache.load: keys enter the rotated basis first, as in `attend`."""
        self.append(k if self.k_rot is None else k @ self.k_rot.to(k.dtype), v)

    def _reserve(self, need: int, like: torch.Tensor) -> None:
        cap = 0 if self.kq is None else self.kq.shape[2]
        if need <= cap:
            return
        G = self.G
        new_cap = max(need, 2 * cap, 4 * G)
        new_cap = -(-new_cap // G) * G
        B, H, D = like.shape[0], self.H, self.D
        ngv = D // self.gv
        kb, vb = self.kv.k_bits, self.kv.v_bits

        def grow(old, shape, dtype, used):
            t = torch.empty(shape, dtype=dtype)
            if old is not None and used:
                t[:, :, :used] = old[:, :, :used]
            return t

        nb_used = self.n_q // G if self.k_channel else self.n_q
        kshape = (B, H, new_cap // G, D) if self.k_channel else (B, H, new_cap, ngv)
        self.kq = grow(self.kq, (B, H, new_cap // G, G * D * kb // 8), torch.uint8, self.n_q // G)
        self.vq = grow(self.vq, (B, H, new_cap // G, G * D * vb // 8), torch.uint8, self.n_q // G)
        self.ks = grow(self.ks, kshape, SCALE_DTYPE, nb_used)
        self.km = grow(self.km, kshape, SCALE_DTYPE, nb_used)
        self.vs = grow(self.vs, (B, H, new_cap // G, ngv, G), SCALE_DTYPE, self.n_q // G)
        self.vm = grow(self.vm, (B, H, new_cap // G, ngv, G), SCALE_DTYPE, self.n_q // G)

    def _store(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize n (a multiple of G) tokens k, v (B, H, n, D) into the store."""
        B, H, n, D = k.shape
        G, kb, vb = self.G, self.kv.k_bits, self.kv.v_bits
        self._reserve(self.n_q + n, k)
        a = self.n_q
        if self.k_channel:
            qk, sk, mk = quantize_minmax(k.reshape(B, H, n // G, G, D), 3, kb)  # s: (B,H,n/G,1,D)
            sk, mk = sk.squeeze(3), mk.squeeze(3)                               # (B, H, n/G, D)
            self.ks[:, :, a // G:(a + n) // G] = sk
            self.km[:, :, a // G:(a + n) // G] = mk
            # (B, H, n/G, G, D) → channel-major block rows (B, H, n/G, D·G) → packed
            self.kq[:, :, a // G:(a + n) // G] = pack_planar(qk.transpose(3, 4).reshape(B, H, n // G, D * G), kb)
        else:
            qk, sk, mk = quantize_minmax(_token_groups(k, self.gv), 4, kb)       # (B,H,n,ng,1)
            self.ks[:, :, a:a + n] = sk.squeeze(-1)
            self.km[:, :, a:a + n] = mk.squeeze(-1)
            self.kq[:, :, a // G:(a + n) // G] = pack_planar(qk.reshape(B, H, n // G, G * D), kb)
        qv, sv, mv = quantize_minmax(_token_groups(v, self.gv), 4, vb)
        ng = D // self.gv                    # (B, H, n, ng, 1) → (B, H, n/G, ng, G)
        self.vs[:, :, a // G:(a + n) // G] = sv.view(B, H, n // G, G, ng).transpose(3, 4)
        self.vm[:, :, a // G:(a + n) // G] = mv.view(B, H, n // G, G, ng).transpose(3, 4)
        self.vq[:, :, a // G:(a + n) // G] = pack_planar(qv.reshape(B, H, n // G, G * D), vb)
        self.n_q += n

    # ------------------------------------------------------------------ dequantize

    def dequantize_store(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The quantized store as fp32 (B, H, n_q, D) K and V (reference path only)."""
        B, H, D, G, n = self.batch, self.H, self.D, self.G, self.n_q
        if n == 0:
            e = torch.empty(B, H, 0, D)
            return e, e
        t = self.tensors()
        qk = unpack_planar(t["kq"], self.kv.k_bits).float()                   # (B, H, n/G, G·D)
        if self.k_channel:                                  # (B, H, n/G, D, G) → (B, H, n/G, G, D)
            qk = qk.view(B, H, n // G, D, G)
            k = (qk.transpose(3, 4) * t["k_scale"].float()[:, :, :, None]
                 + t["k_min"].float()[:, :, :, None]).reshape(B, H, n, D)
        else:                                               # (B, H, n, D)
            qk = qk.view(B, H, n, D)
            k = (_token_groups(qk, self.gv) * t["k_scale"].float()[..., None]
                 + t["k_min"].float()[..., None]).view(B, H, n, D)
        qv = unpack_planar(t["vq"], self.kv.v_bits).float().view(B, H, n, D)
        vs, vm = (t[name].float().transpose(3, 4).reshape(B, H, n, D // self.gv)
                  for name in ("v_scale", "v_min"))                     # token-major again
        v = (_token_groups(qv, self.gv) * vs[..., None] + vm[..., None]).view(B, H, n, D)
        return k, v

    def full_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Everything held, in column order, as fp32 (B, H, S, D): [sink | dequantized | residual]."""
        kd, vd = self.dequantize_store()
        ks = [t.float() for t in (self.sink_k, kd, self.res_k) if t is not None]
        vs = [t.float() for t in (self.sink_v, vd, self.res_v) if t is not None]
        return torch.cat(ks, 2), torch.cat(vs, 2)

    # ------------------------------------------------------------------ attend

    def attend(self, q, k, v, scale, mask, h=None, positions=None):
        """Append, then attend. Decode steps (T == 1) attend over the stored state: the fast
        kernel when available, else the reference. Multi-token chunks attend to their own
        tokens in full precision ("prefill attends in full precision, then stores quantized"),
        unless `quantize_before_attend` is set: then each query sees exactly the state
        token-by-token decode would have had at its step. With a key rotation, q and k enter
        the rotated basis here, the cache's only model-facing entry point."""
        if self.k_rot is not None:
            q, k = q @ self.k_rot.to(q.dtype), k @ self.k_rot.to(k.dtype)   # (B, H*, T, D)
        L = self.length - self.n_evicted                          # physical column of the chunk
        self.append(k, v)
        mask = self._drop_columns(mask, self.n_evicted)
        B, Hq, T, D = q.shape
        if T == 1:
            mask = self._evict(mask)
            from ..kernels import kivi_attention as ka
            if ka.use_kernel(self):
                self.last_path = "kernel"
                return ka.decode(self, q, scale, mask)
            self.last_path = "reference"
            return reference_decode(self, q, scale, mask)
        self.last_path = "prefill"
        return self._attend_chunk(q, k, v, scale, mask, L)

    # ------------------------------------------------------------------ sliding window

    evict = True   # class-level switch (tests compare against a cache that keeps everything)

    def _drop_columns(self, mask, n: int):
        """The mask without n store columns right after the sink (already evicted)."""
        if mask is None or not n:
            return mask
        ns = self.n_sink_held
        return torch.cat([mask[..., :ns], mask[..., ns + n:]], -1)

    def _evict(self, mask):
        """Drop the leading store blocks this decode step's mask hides from every row (local
        layers only); returns the mask over what is left."""
        if not self.evict or self.layer.window is None or mask is None or not self.n_q:
            return mask
        ns, G, nblk = self.n_sink_held, self.G, self.n_q // self.G
        seen = mask[..., ns:ns + self.n_q].reshape(mask.shape[0], nblk, G).any(-1).any(0)  # (nblk,)
        nb = int(seen.float().argmax()) if bool(seen.any()) else nblk
        if not nb:
            return mask
        keep = nblk - nb
        for t in (self.kq, self.vq, self.vs, self.vm) + ((self.ks, self.km) if self.k_channel else ()):
            t[:, :, :keep] = t[:, :, nb:nblk].clone()
        if not self.k_channel:                        # per-token key scales: shift by tokens
            for t in (self.ks, self.km):
                t[:, :, :keep * G] = t[:, :, nb * G:nblk * G].clone()
        self.n_q -= nb * G
        self.n_evicted += nb * G
        return self._drop_columns(mask, nb * G)

    def _attend_chunk(self, q, k, v, scale, mask, L):
        B, Hq, T, D = q.shape
        S = self.length - self.n_evicted
        KA, VA = self.full_kv()                                  # stored state, (B, H, S, D)
        KB, VB = KA.clone(), VA.clone()                          # the chunk's own tokens in fp
        KB[:, :, L:L + T] = k.float()
        VB[:, :, L:L + T] = v.float()
        if mask is None:  # empty cache, plain causal over the chunk
            mask = torch.ones(T, S, dtype=torch.bool).tril(S - T)[None, None]   # (1, 1, T, S)
        if self.quantize_before_attend:
            assert not self.n_evicted, "quantize-before-attend runs on whole windows, no eviction"
            sel = quantized_at(torch.arange(S), torch.arange(L, L + T), self.G, self.R,
                               self.n_sink)                      # (T, S)
        else:
            sel = None
        if sel is None or not bool(sel.any()):
            return F.scaled_dot_product_attention(q.float(), KB, VB, attn_mask=mask, scale=scale,
                                                  enable_gqa=Hq != self.H).to(q.dtype)
        return mixed_attention(q, KA, VA, KB, VB, sel, mask, scale).to(q.dtype)


def mixed_attention(q, KA, VA, KB, VB, sel, mask, scale):
    """Attention where query t sees key j as (KA, VA)[j] if sel[t, j] else (KB, VB)[j], in one
    softmax. q (B, Hq, T, D); K*/V* (B, H, S, D); sel (T, S); mask (B|1, 1, T, S) bool."""
    B, Hq, T, D = q.shape
    H = KA.shape[1]
    rep = Hq // H
    qg = q.float().view(B, H, rep, T, D)                                        # (B, H, r, T, D)
    la = torch.einsum("bhrtd,bhsd->bhrts", qg, KA) * scale                      # (B, H, r, T, S)
    lb = torch.einsum("bhrtd,bhsd->bhrts", qg, KB) * scale
    logits = torch.where(sel, la, lb).masked_fill(~mask[:, :, None], float("-inf"))
    p = torch.softmax(logits, dim=-1)
    pa = p * sel
    out = (torch.einsum("bhrts,bhsd->bhrtd", pa, VA)
           + torch.einsum("bhrts,bhsd->bhrtd", p - pa, VB))
    return out.reshape(B, Hq, T, D)


def reference_decode(cache: KIVICache, q: torch.Tensor, scale: float, mask) -> torch.Tensor:
    """Reference attention over the stored state: dequantize everything, then SDPA."""
    K, V = cache.full_kv()                                                      # (B, H, S, D)
    return F.scaled_dot_product_attention(
        q.float(), K, V, attn_mask=mask, is_causal=False, scale=scale,
        enable_gqa=q.shape[1] != K.shape[1]).to(q.dtype)


# ----------------------------------------------------------------------------- the kind

@register_kind
class KIVI(KVKind):
    name = "kivi"
    Params = KIVIParams
    syntax = "kivi2|kivi4|kivi8[:gN:rN:sN:kB:vB:kt:hk:hv]"

    def parse(self, arg, options, text):
        from ...compiler.spec import KVSpec
        if not arg or int(arg) not in KV_BITS:
            raise ConfigError(f"--kv '{text}': expected kivi2, kivi4 or kivi8 "
                              "(options :gGROUP :rRESIDUAL :sSINK :kBITS :vBITS :kt :hk :hv)")
        opts: dict = {"k_bits": int(arg), "v_bits": int(arg)}
        rewrites: list[str] = []
        for o in options:
            if o == "hv":
                rewrites.append("rotate_v")
            elif not _kivi_option(o, opts):
                raise ConfigError(f"--kv '{text}': unknown option '{o}' (use gN, rN, sN, kB, vB, "
                                  "kt, hk, hv)")
        text_spec = ":".join([f"kivi{arg}", *(o for o in options if o != "hv")])
        return KVChoice(KVSpec("kivi", KIVIParams(**opts)), text_spec, tuple(rewrites))

    def cache(self, layer, batch, binding):
        return KIVICache(layer, batch, binding)

    @staticmethod
    def _store_per_token(p: KIVIParams, layer: LayerSpec) -> Fraction:
        H, D = layer.n_kv_heads, layer.head_dim
        G, gv, sb = p.group_size, min(p.group_size, D), SCALE_DTYPE.itemsize
        k_meta = Fraction(2 * sb * D, G) if p.k_axis == "channel" else Fraction(2 * sb * (D // gv))
        return H * (Fraction(D * p.k_bits, 8) + k_meta + Fraction(D * p.v_bits, 8)
                    + 2 * sb * (D // gv))

    def bytes_per_token(self, params, layer):
        """Amortized bytes per token of the quantized store (K and V codes, fp16 scales and
        mins, all KV heads). An int when exact, else a float (G not dividing the scale count)."""
        return exact_number(self._store_per_token(params, layer))

    def held_split(self, params: KIVIParams, n_tokens: int) -> tuple[int, int, int]:
        """(sink, store, residual) token counts after n tokens streamed in (no eviction)."""
        return window_split(n_tokens, params.sink, params.residual, params.group_size)

    def bytes_held(self, params, layer, n_tokens):
        ns, nq, nr = self.held_split(params, n_tokens)
        fp = 2 * layer.kv_dim * DTYPES[params.dtype].itemsize
        return int((ns + nr) * fp + nq * self._store_per_token(params, layer))

    def cost(self, params, layer, context):
        ns, nq, nr = self.held_split(params, context)
        fp = 2 * layer.kv_dim * DTYPES[params.dtype].itemsize
        read = (ns + nr) * fp + nq * float(self._store_per_token(params, layer))
        # logits and weighted sum: 2 MACs per (query head, token, channel), plus one dequantize
        # FMA per code and KV head (the kernel unpacks each code once per GQA group)
        flops = (2 * 2 * layer.n_heads * layer.head_dim * context
                 + 2 * 2 * layer.n_kv_heads * layer.head_dim * nq)
        return KVCost(bytes_read=read, flops=flops)

    def verify_steps(self, params):
        return params.residual + 2 * params.group_size

"""eigen: attention in a calibrated low-rank basis per KV head (Eigen Attention, arXiv 2408.05646).

Eigen Attention observes that the keys and values a head produces span a subspace much smaller
than head_dim, finds it by an SVD of calibration activations, and attends in it. Here, per layer
and KV head, the eigen pass (mcomp/passes/eigen.py) computes rank-r bases

    key encoder U_k, query map U_q (D × r_k),     value encoder U_v, value decoder U_o (D × r_v)

and the cache stores, per token, the coordinates k·U_k and v·U_v (r_k + r_v numbers per KV head
instead of 2·D). Attending:

- logits: every query is mapped once, q̃ = q·U_q, and q̃·(k U_k)ᵀ = q·(k U_k U_qᵀ)ᵀ: q·kᵀ with k
  replaced by its rank-r_k approximation k·M_k, M_k = U_k U_qᵀ (exact at full rank, M_k = I).
  The scale stays the model's 1/√D. The attention runs at width r_k: nothing of the context is
  reconstructed to head_dim.
- values: P·(V U_v) is computed in the basis and mapped back once per query, (P V U_v)·U_oᵀ; this
  is the fold of U_oᵀ into W_o (one small GEMM per query head instead of a weight rewrite, so the
  no-cache forward and the artifact's weights are untouched).

With `basis="pca"` the maps are Eigen Attention's orthonormal principal directions of the keys
and values (U_q = U_k, U_o = U_v, M an orthogonal projector). The default `"aware"` fits M_k for
the logits, weighting key errors by the queries' second moment, and M_v for the attention output,
weighting value errors by o_proj: on SmolLM2 at the same 10% error threshold "aware" saves 2.5×
the bytes PCA saves (36204 vs 42168 B/token, dense 46080) at a KL lower on prose (0.37 vs 0.42)
and higher on code (0.82 vs 0.73) (docs/benchmarks.md).

RoPE: the bases act after RoPE, on the keys the cache receives, as this issue's design asks;
Eigen Attention's own code for RoPE models (its Fig. 6) instead projects the pre-RoPE key and
reconstructs it to D before applying RoPE at attention time, which costs a D-wide
reconstruction of every cached key at every step. Post-RoPE bases constrain nothing: any rotary
layout, partial rotary, layers without RoPE.

Storage: `bits=0` keeps the coordinates in fp (`dtype`); 2/4/8 quantizes them with KIVI's
quantizer through the latent store of xquant (runtime/kv/xquant.py): the key coordinates per
channel over blocks of G tokens (a basis channel has one scale across tokens, the natural axis),
the value coordinates per token in groups (whole groups inside a head), an fp residual window
and fp sinks. `ProjectedKVCache` is that machinery for any per-head bases, shared with ThinK's
quantized form (a one-hot U_k = U_q of the kept channels, U_v = U_o = I).

The bases are the layer's KV state `Uk`, `Uq` (n_kv_heads, D, r_k), `Uv`, `Uo` (n_kv_heads, D,
r_v) (`state_shapes`), stored in the artifact with the weights; the per-layer ranks are the
params' `k_rank` / `v_rank`.

Shorthand: `eigen:ERR` (0 < ERR < 1: per layer, the smallest ranks whose relative error, of the
logits for K and of the attention output for V on the calibration text, is ≤ ERR in every KV
head) or `eigen:RANK` (an integer: that rank per KV head for K and V in every layer), with
`:kivi2` / `:kivi4` / `:kivi8` (quantized coordinates; ERR-chosen ranks rounded up to a multiple
of 8), `:gN` (group), `:rN` (fp residual window), `:sN` (fp sinks), `:fp16` / `:bf16` (fp
storage), `:pca` / `:aware` (the bases).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...compiler.spec import LayerSpec
from ...errors import ConfigError
from ..kvcache import DTYPES, KVCache
from . import KVChoice, KVCost, KVKind, KVParams, exact_number, register_kind
from .xquant import XQuantCache, latent_bytes_held, latent_store_bytes

EIGEN_BITS = (0, 2, 4, 8)
BASES = ("aware", "pca")
#: quantized coordinates get ranks in multiples of this many channels per head, so the value
#: coordinates of a head split into whole per-token groups (an odd rank would force groups of 1)
RANK_STEP = 8
_DTYPE_OPTS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def v_group(rv: int, group_size: int) -> int:
    """Channels per scale/min of the per-token value coordinates: the largest divisor of one
    head's rank rv that is ≤ group_size (groups never straddle two heads)."""
    return max(d for d in range(1, min(group_size, rv) + 1) if rv % d == 0)


def store_options(o: str, opts: dict) -> bool:
    """The latent-store options shared by eigen and think: kiviB, gN, rN, sN, fp16/bf16/fp32.
    Updates opts; False when `o` is none of them."""
    if o.startswith("kivi") and o[4:].isdigit():
        key, value = "bits", int(o[4:])
    elif o in _DTYPE_OPTS:
        key, value = "dtype", _DTYPE_OPTS[o]
    elif o[:1] in ("g", "r", "s") and o[1:].isdigit():
        key, value = {"g": "group_size", "r": "residual", "s": "sink"}[o[0]], int(o[1:])
    else:
        return False
    if key in opts:
        raise ConfigError(f"takes at most one {'dtype' if key == 'dtype' else key} option")
    opts[key] = value
    return True


def check_store_options(opts: dict, text: str) -> None:
    if not opts.get("bits") and any(k in opts for k in ("group_size", "residual", "sink")):
        raise ConfigError(f"--kv '{text}': :gN, :rN and :sN configure the quantized store; add "
                          ":kivi2, :kivi4 or :kivi8")


def check_store(p, kind: str) -> None:
    """Validate the storage fields of a projected cache's params (eigen, think): `bits` (0 = fp at
    `dtype`, else KIVI-quantized coordinates), `group_size`, `residual`, `sink`, `dtype`."""
    if p.bits not in EIGEN_BITS:
        raise ConfigError(f"kv {kind}: bits={p.bits} not supported; choose 0 (fp), 2, 4 or 8")
    for name, lo in (("group_size", 1), ("residual", 0), ("sink", 0)):
        v = getattr(p, name)
        if type(v) is not int or v < lo:
            raise ConfigError(f"kv {kind}: {name} must be an integer >= {lo}, got {v!r}")
    if p.dtype not in DTYPES:
        raise ConfigError(f"kv {kind}: dtype '{p.dtype}' not in {', '.join(DTYPES)}")


def store_label(p) -> str:
    q = f"-kivi{p.bits}-g{p.group_size}-r{p.residual}" if p.bits else ""
    return q + (f"-s{p.sink}" if p.sink else "") + ("" if p.dtype == "float32" else f"-{p.dtype}")


@dataclass(frozen=True)
class StoreParams(KVParams):
    """The storage fields of a projected cache: fp (`bits=0`, at `dtype`) or KIVI-quantized
    coordinates with its group, fp residual window and sinks."""

    bits: int = 0
    group_size: int = 32
    residual: int = 128
    sink: int = 0
    dtype: str = "float32"


@dataclass(frozen=True)
class EigenParams(StoreParams):
    err: float = 0.0              # per-layer relative reconstruction error threshold (0: fixed rank)
    rank: int = 0                 # fixed rank per KV head for K and V (0: chosen from err)
    k_rank: int = 0               # this layer's ranks per KV head, set by the pass (0 = head_dim)
    v_rank: int = 0
    #: how the pass fits the bases (mcomp/passes/eigen.py): "aware" minimizes the error of the
    #: logits (keys weighted by the queries) and of the attention output (values weighted by
    #: o_proj); "pca" is Eigen Attention's orthonormal PCA of the keys and values themselves
    basis: str = "aware"

    def __post_init__(self):
        check_store(self, "eigen")
        if isinstance(self.err, bool) or not isinstance(self.err, (int, float)):
            raise ConfigError(f"kv eigen: err must be a number, got {self.err!r}")
        for name in ("rank", "k_rank", "v_rank"):
            v = getattr(self, name)
            if type(v) is not int or v < 0:
                raise ConfigError(f"kv eigen: {name} must be an integer >= 0, got {v!r}")
        if bool(self.rank) == bool(self.err):
            raise ConfigError("kv eigen: give either an error threshold ERR in (0, 1) or a rank "
                              "(eigen:0.1 or eigen:32)")
        if self.err and not 0 < self.err < 1:
            raise ConfigError(f"kv eigen: error threshold must be in (0, 1), got {self.err!r}")
        if self.basis not in BASES:
            raise ConfigError(f"kv eigen: basis '{self.basis}' not in {', '.join(BASES)}")

    def ranks(self, layer: LayerSpec) -> tuple[int, int]:
        """(K rank, V rank) per KV head of `layer`."""
        D = layer.head_dim
        return self.k_rank or self.rank or D, self.v_rank or self.rank or D

    def label(self) -> str:
        head = f"eigen-e{self.err:g}" if self.err else f"eigen-r{self.rank}"
        return (head + (f"-k{self.k_rank}v{self.v_rank}" if self.k_rank or self.v_rank else "")
                + store_label(self) + ("" if self.basis == "aware" else f"-{self.basis}"))

    def check_layer(self, layer: LayerSpec) -> None:
        D = layer.head_dim
        for name in ("rank", "k_rank", "v_rank"):
            if getattr(self, name) > D:
                raise ConfigError(f"kv eigen: {name}={getattr(self, name)} exceeds head_dim {D} "
                                  "(the rank is per KV head)")


class ProjectedKVCache(XQuantCache):
    """The latent store of xquant over per-KV-head projections of the post-RoPE K and V: a
    token's latent is [k_h·Ek_h for every head h | v_h·Ev_h for every head h]; queries are
    projected by their KV head's Eq (default Ek), outputs mapped back by Dvᵀ (default Ev), so
    logits are q·Eq·Ekᵀ·kᵀ and outputs P·V·Ev·Dvᵀ (module docstring). Bases (H, D, r) each."""

    projected = True            # decode steps run the xquant kernel in its projected mode

    def __init__(self, layer: LayerSpec, batch: int, binding, Ek: torch.Tensor, Ev: torch.Tensor,
                 Eq: torch.Tensor | None = None, Dv: torch.Tensor | None = None):
        KVCache.__init__(self, layer, batch, binding)
        p = layer.kv.params
        H, D = layer.n_kv_heads, layer.head_dim
        Eq = Ek if Eq is None else Eq
        Dv = Ev if Dv is None else Dv
        if (any(t.shape[:2] != (H, D) for t in (Ek, Ev, Eq, Dv))
                or Eq.shape != Ek.shape or Dv.shape != Ev.shape):
            raise ConfigError(f"{layer.kv.kind}: bases must be ({H}, {D}, r) with the query basis "
                              f"shaped as the key basis and the value decoder as the encoder, got "
                              f"{[tuple(t.shape) for t in (Ek, Eq, Ev, Dv)]}")
        self.Uk, self.Uv = Ek.float(), Ev.float()                    # (H, D, rk), (H, D, rv)
        rk, rv = Ek.shape[2], Ev.shape[2]
        # query head h reads KV head h // group
        self.Uq = Eq.float().repeat_interleave(layer.n_heads // H, 0)  # (Hq, D, rk)
        self.Uo = Dv.float()                                           # (H, D, rv)
        self._init_store(p, p.bits or 8, H * (rk + rv), H * rk, H * rv, v_group(rv, p.group_size),
                         False, split=True)
        if not p.bits:          # fp coordinates: everything stays in the fp window
            self.R = 1 << 62

    def encode(self, k, v, h, positions):
        lk = torch.einsum("bhtd,hdr->bthr", k.float(), self.Uk).flatten(2)
        lv = torch.einsum("bhtd,hdr->bthr", v.float(), self.Uv).flatten(2)
        return torch.cat([lk, lv], -1)                                 # (B, T, H·(rk + rv))

    def keys(self, lat: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        """The held keys in the basis, (B, H, S, rk): nothing is rematerialized."""
        return lat[..., self.k_cols].unflatten(-1, (self.H, -1)).transpose(1, 2)

    def queries(self, q: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bhtd,hdr->bhtr", q.float(), self.Uq)

    def values(self, lat):
        """V (B, H, S, D) for the prefill path: each head's coordinates through its own U_o."""
        return torch.einsum("bshc,hdc->bhsd", lat[..., self.v_cols].unflatten(-1, (self.H, -1)),
                            self.Uo)

    def mix_values(self, p, v_lat):
        """Each query head reads only its own KV head's value coordinates (B, S, H·rv)."""
        return torch.einsum("bhrts,bshc->bhrtc", p, v_lat.unflatten(-1, (self.H, -1)))

    def values_out(self, pl):
        return torch.einsum("bhrtc,hdc->bhrtd", pl, self.Uo)

    def load(self, k, v, h=None):
        B, _, T, _ = k.shape
        self.append_latent(self.encode(k, v, h, None),
                           torch.arange(self.length, self.length + T).expand(B, T))


def projected_bytes_per_token(p: StoreParams, layer: LayerSpec, rk: int, rv: int):
    """Amortized bytes per token of a ProjectedKVCache with per-head ranks rk, rv."""
    H = layer.n_kv_heads
    if not p.bits:
        return H * (rk + rv) * DTYPES[p.dtype].itemsize
    return exact_number(latent_store_bytes(p.bits, H * rk, H * rv, p.group_size,
                                           v_group(rv, p.group_size), False))


def projected_bytes_held(p: StoreParams, layer: LayerSpec, rk: int, rv: int, n_tokens: int) -> int:
    H = layer.n_kv_heads
    return latent_bytes_held(p, H * rk, H * rv, v_group(rv, p.group_size), False, n_tokens)


def projected_cost(p: StoreParams, layer: LayerSpec, rk: int, rv: int, context: int,
                   bases: bool) -> KVCost:
    """One decode step: q projected into the key basis (if `bases`), logits and P·V at the
    basis widths, the output mapped back by Uvᵀ (if `bases`); reads the held store + bases."""
    Hq, D = layer.n_heads, layer.head_dim
    read = projected_bytes_held(p, layer, rk, rv, context)
    flops = 2 * Hq * context * (rk + rv)
    if bases:
        read += layer.n_kv_heads * D * (rk + rv) * 4
        flops += 2 * Hq * D * (rk + rv)
    return KVCost(bytes_read=read, flops=flops)


class ProjectedKind(KVKind):
    """A kind whose cache is a ProjectedKVCache: its accounting and verification follow from the
    per-head ranks (`head_ranks`) and whether queries and outputs go through dense bases
    (`dense_bases`; ThinK's one-hot columns are a gather, no GEMM)."""

    dense_bases = True

    def head_ranks(self, params, layer) -> tuple[int, int]:
        raise NotImplementedError

    def bytes_per_token(self, params, layer):
        return projected_bytes_per_token(params, layer, *self.head_ranks(params, layer))

    def bytes_held(self, params, layer, n_tokens):
        return projected_bytes_held(params, layer, *self.head_ranks(params, layer), n_tokens)

    def cost(self, params, layer, context):
        return projected_cost(params, layer, *self.head_ranks(params, layer), context,
                              bases=self.dense_bases)

    def verify_steps(self, params):
        # quantized: past the residual window and two flushed blocks; fp: a few decode steps
        return (params.residual + 2 * params.group_size) if params.bits else 4

    def lossless(self, params):
        return False


@register_kind
class Eigen(ProjectedKind):
    name = "eigen"
    Params = EigenParams
    syntax = "eigen:ERR|RANK[:kivi2|:kivi4|:kivi8:gN:rN:sN][:fp16|:bf16][:aware|:pca]"
    needs_binding = True          # the cache reads its bases from the layer's KV state
    loads_kv = True               # its latent is a function of K and V alone

    def parse(self, arg, options, text):
        from ...compiler.spec import KVSpec
        head = options[0] if not arg and options else ""
        opts: dict = {}
        try:
            if head.isdigit():
                opts["rank"] = int(head)
            else:
                opts["err"] = float(head)
        except ValueError:
            head = ""
        if not head:
            raise ConfigError(f"--kv '{text}': expected eigen:ERR (relative reconstruction error "
                              "in (0, 1)) or eigen:RANK (per KV head), options :kivi2/:kivi4/"
                              ":kivi8 :gN :rN :sN :fp16 :bf16")
        if opts.get("rank") == 0:
            raise ConfigError(f"--kv '{text}': rank must be >= 1")
        for o in options[1:]:
            if o in BASES:
                opts["basis"] = o
            elif not store_options(o, opts):
                raise ConfigError(f"--kv '{text}': unknown option '{o}' (use kivi2, kivi4, kivi8, "
                                  "gN, rN, sN, fp16, bf16, aware, pca)")
        check_store_options(opts, text)
        return KVChoice(KVSpec("eigen", EigenParams(**opts)), ":".join(["eigen", *options]),
                        assign="eigen")

    def cache(self, layer, batch, binding):
        st = binding.state() if binding is not None else {}
        if not {"Uk", "Uq", "Uv", "Uo"} <= set(st):
            raise ConfigError(f"eigen: layer {getattr(binding, 'layer', '?')} has no bases "
                              "(kv_state); set the kind with the eigen pass (--kv eigen:ERR)")
        return ProjectedKVCache(layer, batch, binding, st["Uk"], st["Uv"], st["Uq"], st["Uo"])

    def state_shapes(self, params, layer, hidden):
        H, D = layer.n_kv_heads, layer.head_dim
        rk, rv = params.ranks(layer)
        return {"Uk": ((H, D, rk), "float32"), "Uq": ((H, D, rk), "float32"),
                "Uv": ((H, D, rv), "float32"), "Uo": ((H, D, rv), "float32")}

    def head_ranks(self, params, layer):
        return params.ranks(layer)

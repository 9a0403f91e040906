"""The canonical decoder-only transformer that every frontend maps onto.

Written to be `torch.fx.symbolic_trace`-able: explicit tensor arguments, no data-dependent
Python control flow (branches depend only on the frozen spec, fixed at build time), attention
as a single leaf op. Head counts are never baked into the graph (`unflatten(-1, (-1, D))`), so
pruning heads only has to slice weights and update the spec.

Each module carries `mcomp_role` (and blocks' children `mcomp_layer`); the tracer copies them
into `node.meta["mcomp"]` so passes find nodes by role, not by parsing names.
"""
from __future__ import annotations

import math

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..registry import Registry
from .spec import LayerSpec, ModelSpec, RopeSpec

ACTIVATIONS: Registry = Registry("activation")
ACTIVATIONS.register("silu", F.silu)
ACTIVATIONS.register("gelu", F.gelu)
ACTIVATIONS.register("gelu_tanh", lambda x: F.gelu(x, approximate="tanh"))
ACTIVATIONS.register("relu", F.relu)


class LeafModule(nn.Module):
    """Marker: the fx tracer records a call to this module as one node instead of tracing into it."""


def _tag(mod: nn.Module, role: str, layer: int | None = None) -> nn.Module:
    mod.mcomp_role = role
    mod.mcomp_layer = layer
    return mod


class RMSNorm(LeafModule):
    """x / rms(x) * weight, computed in fp32. Gemma's (1 + w) is folded into `weight` at import."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


class LayerNorm(LeafModule):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


def make_norm(spec: ModelSpec, dim: int) -> nn.Module:
    if spec.norm == "rms":
        return RMSNorm(dim, spec.norm_eps)
    if spec.norm == "layer":
        return LayerNorm(dim, spec.norm_eps)
    raise ConfigError(f"unknown norm kind '{spec.norm}'; choose one of: layer, rms")


def rope_inv_freq(rope: RopeSpec) -> torch.Tensor:
    """Inverse frequencies, including llama3 / linear scaling (same formulas as transformers)."""
    inv = 1.0 / (rope.theta ** (torch.arange(0, rope.dim, 2, dtype=torch.int64).float() / rope.dim))
    if rope.scaling == "none":
        return inv
    if rope.scaling == "linear":
        return inv / rope.factor
    if rope.scaling == "llama3":
        low_wl = rope.original_max_positions / rope.low_freq_factor
        high_wl = rope.original_max_positions / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        out = torch.where(wavelen > low_wl, inv / rope.factor, inv)
        smooth = (rope.original_max_positions / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * out / rope.factor + smooth * out
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        return torch.where(medium, smoothed, out)
    raise ConfigError(f"unsupported rope scaling '{rope.scaling}'; choose one of: none, linear, llama3")


def rope_table_index(spec: ModelSpec) -> dict[RopeSpec, int]:
    """RoPE configuration → index of its table in `CausalLM.rope` (one table per distinct
    configuration; gemma3 has a local and a global one). Anything that needs a layer's table
    (the KV binding) asks here, so the order is defined once."""
    ropes = sorted({l.rope for l in spec.layers if l.rope is not None}, key=repr)
    return {r: j for j, r in enumerate(ropes)}


class RotaryTable(LeafModule):
    """positions (B, T) → (cos, sin), each (B, 1, T, dim) in the half-split (rotate_half) layout."""

    def __init__(self, rope: RopeSpec):
        super().__init__()
        self.rope = rope
        self.register_buffer("inv_freq", rope_inv_freq(rope), persistent=False)

    def forward(self, positions: torch.Tensor):
        freqs = positions[..., None].float() * self.inv_freq  # (B, T, dim/2)
        emb = torch.cat([freqs, freqs], dim=-1)               # (B, T, dim)
        return emb.cos()[:, None], emb.sin()[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """One IR node (fx.wrap): rotation passes find RoPE applications by role `rope_apply`."""
    # x: (B, H, T, D); cos/sin: (B, 1, T, D)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


torch.fx.wrap("apply_rope")


def select_logit_positions(x: torch.Tensor, state) -> torch.Tensor:
    """One IR node (fx.wrap): the final hidden states whose logits the caller wants.

    A generating caller sets `state.last_logits_only`: it samples from the last position only,
    and projecting every prompt position onto the vocabulary would waste a large share of the
    prefill (for SmolLM2 the 576×49152 head is ~20% of a 512-token prefill's FLOPs). This is
    what transformers does with `logits_to_keep=1`."""
    if state is not None and getattr(state, "last_logits_only", False):
        return x[:, -1:]
    return x


torch.fx.wrap("select_logit_positions")


class Attention(LeafModule):
    """Scaled dot-product attention over (post-RoPE) q, k, v as one IR node: the cache boundary.

    With `state=None` it is plain causal (optionally sliding-window) attention over the given
    tokens. With an AttentionState it hands the layer's cache the queries, the new K/V and the
    attention input `h` they were projected from (runtime/kvcache.py: the cache boundary), and
    the cache attends over everything it holds.
    q: (B, Hq, T, D), k/v: (B, Hkv, T, D), h: (B, T, hidden) → (B, T, Hq*D)
    """

    def __init__(self, layer: int, scale: float, window: int | None):
        super().__init__()
        self.layer = layer
        self.scale = scale
        self.window = window

    def forward(self, q, k, v, h, state=None):
        if state is None:
            out = causal_attention(q, k, v, self.scale, self.window)
        else:
            out = state.attend(self.layer, q, k, v, h, self.scale, self.window)
        return out.transpose(1, 2).flatten(2)


def causal_attention(q, k, v, scale: float, window: int | None) -> torch.Tensor:
    """Reference causal attention without a cache; GQA by head grouping."""
    T, S = q.shape[-2], k.shape[-2]
    if window is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    qi = torch.arange(S - T, S, device=q.device)[:, None]
    ki = torch.arange(S, device=q.device)[None, :]
    mask = (ki <= qi) & (qi - ki < window)  # (T, S)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


class KVState(LeafModule):
    """The calibrated tensors a layer's KV representation owns (runtime/kv: `state_shapes`),
    as persistent buffers: saved, loaded and checked with the weights. The forward never calls
    it; the layer's cache reads the buffers through its KVBinding."""

    def __init__(self, shapes: dict[str, tuple[tuple[int, ...], str]]):
        super().__init__()
        for name, (shape, dtype) in shapes.items():
            self.register_buffer(name, torch.zeros(shape, dtype=getattr(torch, dtype)))

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self._buffers)


def kv_state_module(ls: LayerSpec, hidden: int, tensors: dict[str, torch.Tensor] | None = None,
                    layer: int | None = None) -> "KVState | None":
    """A KVState for `ls`'s kind (None when the kind owns no tensors), filled from `tensors`,
    which must match the kind's declared names, shapes and dtypes exactly."""
    from ..runtime.kv import state_shapes
    shapes = state_shapes(ls, hidden)
    if not shapes:
        if tensors:
            raise ConfigError(f"kv kind '{ls.kv.kind}' owns no state tensors, got {sorted(tensors)}")
        return None
    mod = _tag(KVState(shapes), "kv_state", layer)
    if tensors is not None:
        if set(tensors) != set(shapes):
            raise ConfigError(f"kv kind '{ls.kv.kind}': state tensors {sorted(tensors)}, the "
                              f"kind declares {sorted(shapes)}")
        for name, t in tensors.items():
            buf = getattr(mod, name)
            if tuple(t.shape) != tuple(buf.shape) or t.dtype != buf.dtype:
                raise ConfigError(f"kv kind '{ls.kv.kind}': state '{name}' is {t.dtype} "
                                  f"{list(t.shape)}, the kind declares {buf.dtype} {list(buf.shape)}")
            setattr(mod, name, t.detach().clone().contiguous())
    return mod


class Block(nn.Module):
    def __init__(self, i: int, ls: LayerSpec, ms: ModelSpec):
        super().__init__()
        self.spec = ls
        H, D = ms.hidden_size, ls.head_dim
        self.attn_norm = _tag(make_norm(ms, H), "attn_norm", i)
        if ls.fused_qkv:
            self.qkv_proj = _tag(nn.Linear(H, ls.q_dim + 2 * ls.kv_dim, bias=ls.qkv_bias), "qkv_proj", i)
        else:
            self.q_proj = _tag(nn.Linear(H, ls.q_dim, bias=ls.qkv_bias), "q_proj", i)
            self.k_proj = _tag(nn.Linear(H, ls.kv_dim, bias=ls.qkv_bias), "k_proj", i)
            self.v_proj = _tag(nn.Linear(H, ls.kv_dim, bias=ls.qkv_bias), "v_proj", i)
        if ls.qk_norm:
            self.q_norm = _tag(RMSNorm(D, ms.norm_eps), "q_norm", i)
            self.k_norm = _tag(RMSNorm(D, ms.norm_eps), "k_norm", i)
        scale = ms.attn_scale if ms.attn_scale is not None else D ** -0.5
        self.attn = _tag(Attention(i, scale, ls.window), "attn", i)
        self.o_proj = _tag(nn.Linear(ls.q_dim, H, bias=ls.o_bias), "o_proj", i)
        if ls.sandwich_norm:
            self.post_attn_norm = _tag(make_norm(ms, H), "post_attn_norm", i)
            self.post_mlp_norm = _tag(make_norm(ms, H), "post_mlp_norm", i)
        self.mlp_norm = _tag(make_norm(ms, H), "mlp_norm", i)
        F_ = ls.ffn_dim
        if ms.gated_mlp and ls.fused_gate_up:
            self.gate_up_proj = _tag(nn.Linear(H, 2 * F_, bias=ls.mlp_bias), "gate_up_proj", i)
        elif ms.gated_mlp:
            self.gate_proj = _tag(nn.Linear(H, F_, bias=ls.mlp_bias), "gate_proj", i)
            self.up_proj = _tag(nn.Linear(H, F_, bias=ls.mlp_bias), "up_proj", i)
        else:
            self.up_proj = _tag(nn.Linear(H, F_, bias=ls.mlp_bias), "up_proj", i)
        self.down_proj = _tag(nn.Linear(F_, H, bias=ls.down_bias), "down_proj", i)
        self.act = ACTIVATIONS.get(ms.act)
        self.gated = ms.gated_mlp
        state = kv_state_module(ls, H, layer=i)
        if state is not None:      # a calibrated KV kind's tensors (e.g. a loaded Palu artifact)
            self.kv_state = state

    def forward(self, x, cos, sin, state):
        ls = self.spec
        D = ls.head_dim
        h = self.attn_norm(x)
        if ls.fused_qkv:
            q, k, v = self.qkv_proj(h).split([ls.q_dim, ls.kv_dim, ls.kv_dim], dim=-1)
        else:
            q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        q = q.unflatten(-1, (-1, D)).transpose(1, 2)  # (B, Hq, T, D)
        k = k.unflatten(-1, (-1, D)).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.unflatten(-1, (-1, D)).transpose(1, 2)  # (B, Hkv, T, D)
        if ls.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if ls.rope is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = self.o_proj(self.attn(q, k, v, h, state))  # (B, T, H)
        if ls.sandwich_norm:
            o = self.post_attn_norm(o)
        x = x + o
        h = self.mlp_norm(x)
        if self.gated and ls.fused_gate_up:
            g, u = self.gate_up_proj(h).chunk(2, dim=-1)
            m = self.down_proj(self.act(g) * u)
        elif self.gated:
            m = self.down_proj(self.act(self.gate_proj(h)) * self.up_proj(h))
        else:
            m = self.down_proj(self.act(self.up_proj(h)))
        if ls.sandwich_norm:
            m = self.post_mlp_norm(m)
        return x + m


class CausalLM(nn.Module):
    """forward(input_ids (B, T), positions (B, T), state=None) → logits (B, T, V) in fp32."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.embed = _tag(nn.Embedding(spec.vocab_size, spec.hidden_size), "embed")
        if spec.learned_positions:
            self.pos_embed = _tag(nn.Embedding(spec.learned_positions, spec.hidden_size), "pos_embed")
        # One rotary table per distinct rope configuration (gemma3: local and global bases).
        self.rope_index = rope_table_index(spec)
        self.rope = nn.ModuleList([_tag(RotaryTable(r), "rope") for r in self.rope_index])
        self.layers = nn.ModuleList([Block(i, l, spec) for i, l in enumerate(spec.layers)])
        self.norm = _tag(make_norm(spec, spec.hidden_size), "final_norm")
        self.lm_head = _tag(nn.Linear(spec.hidden_size, spec.vocab_size, bias=False), "lm_head")
        # gemma rounds sqrt(hidden) to the activation dtype (fp32 here) before multiplying
        self.register_buffer("embed_scale", torch.tensor(spec.embed_scale), persistent=False)
        if spec.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def init_derived_buffers(self) -> "CausalLM":
        """Recompute the non-persistent buffers (rotary frequencies, embedding scale) from the
        spec on the CPU: lets a loader build the model on the meta device and `assign` weights
        without ever allocating a random-initialized copy."""
        for table in self.rope:
            table.inv_freq = rope_inv_freq(table.rope)
        self.embed_scale = torch.tensor(self.spec.embed_scale)
        return self

    def forward(self, input_ids, positions, state=None):
        x = self.embed(input_ids)
        if self.spec.embed_scale != 1.0:
            x = x * self.embed_scale
        if self.spec.learned_positions:
            x = x + self.pos_embed(positions)
        # unpack (cos, sin) once, here: unpacking a traced tuple inside the layer loop would put
        # layer-less getitem nodes between layers and break the layer-by-layer graph layout
        tables = [(t[0], t[1]) for t in (r(positions) for r in self.rope)]
        for block in self.layers:
            rope = block.spec.rope
            cos, sin = tables[self.rope_index[rope]] if rope is not None else (None, None)
            x = block(x, cos, sin, state)
        x = select_logit_positions(x, state)
        logits = self.lm_head(self.norm(x)).float()
        if self.spec.final_logit_softcap is not None:
            c = self.spec.final_logit_softcap
            logits = torch.tanh(logits / c) * c
        return logits

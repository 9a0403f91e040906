"""Fast decode: the canonical model lowered to one C++ decode step (kernels/csrc/decode_step.cpp).

Running the IR graph for one token costs ~800 Python-dispatched ops; for a 135M model that is
most of a step. After prefill (which stays on the graph), `fast_decoder(gm, state)` lowers the
model to the engine when it can express it exactly, and each decode step is then one C++ call
that writes the new K/V into the dense caches' own buffers: the AttentionState stays the source
of truth (its lengths and positions are kept current), so nothing else needs to know which path
ran a step.

What the engine expresses, and is checked here before it is used (anything else: the graph,
with the reason logged at debug level):
  - the graph is exactly the canonical trace of its spec (no pass rewrote it; compared node by
    node), RMSNorm everywhere, RoPE over whole heads or none, no learned positions;
  - every linear is an fp32 nn.Linear or a QuantLinear that a fast CPU kernel (kernels/cpu_int.py)
    runs: the engine calls the same op on the same prepared operands;
  - batch 1, every layer's cache dense (fp32, fp16 or bf16: the engine reads the buffers in
    their dtype) holding positions 0..n-1 (the row index of a key is its position), the kernels
    not forced to reference mode.
"""
from __future__ import annotations

import functools
import logging
import os

import torch
from torch import fx, nn

from ..compiler import ir
from ..compiler.model import ACTIVATIONS, CausalLM, RMSNorm, rope_table_index
from ..compiler.spec import ModelSpec
from .kv.dense import DenseKVCache

log = logging.getLogger("mcomp.runtime")

_ACT = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}   # decode_step.cpp enum Act
_KV_DTYPES = (torch.float32, torch.float16, torch.bfloat16)   # dense caches the engine reads
_NORMS = ("attn_norm", "q_norm", "k_norm", "post_attn_norm", "mlp_norm", "post_mlp_norm")


class Unsupported(Exception):
    """The model or state cannot run on the engine; the message says why."""


# Node targets that are the same computation here: the fusion passes split a fused output with
# `split([F, F])` where the canonical trace has `chunk(2)`.
_SAME = {"chunk": "split"}


def _signature(graph: fx.Graph) -> tuple:
    """(op, target) per node: module paths for modules, names for functions and methods."""
    def target(n):
        t = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", repr(n.target))
        return _SAME.get(t, t)
    return tuple((n.op, target(n)) for n in graph.nodes)


@functools.lru_cache(maxsize=8)
def _canonical_signature(spec: ModelSpec) -> tuple:
    with torch.device("meta"):
        model = CausalLM(spec)
    return _signature(ir.Tracer().trace(model))


def _lin(ext, m: nn.Module, where: str):
    from ..quant.linear import QuantLinear
    from .kernels.cpu_int import prepared_operands
    lin = ext.Lin()
    if type(m) is nn.Linear:
        if m.weight.dtype != torch.float32:
            raise Unsupported(f"{where}: {m.weight.dtype} weight")
        lin.kind, lin.w = 0, m.weight.detach()
        lin.N, lin.K = m.weight.shape
        if m.bias is not None:
            lin.bias = m.bias.detach().float()
        return lin
    if type(m) is not QuantLinear:
        raise Unsupported(f"{where}: {type(m).__name__} is not a linear the engine knows")
    op = prepared_operands(m)
    if op is None:
        raise Unsupported(f"{where}: {m.scheme.label()} runs the reference kernel")
    kind, p = op
    lin.K, lin.Kp, lin.N, lin.Np = p.K, p.Kp, p.N, p.Np
    if kind == "int_dot":
        codes, s, z, g = p.tensors
        lin.kind, lin.w, lin.s, lin.z, lin.bits, lin.g = 3, codes, s, z, m.scheme.bits, g
        lin.G = s.shape[1]
    elif kind == "int4":
        packed, sz, go = p.tensors
        lin.kind, lin.w, lin.s, lin.go = 1, packed, sz, go
    else:
        w, s, corr = p.tensors
        lin.kind, lin.w, lin.s = 2, w, s
        if corr is not None:
            lin.corr = corr
    if m.bias is not None:
        lin.bias = m.bias.float().contiguous()
    return lin


def _norm(m: nn.Module, eps: float, where: str) -> torch.Tensor:
    if type(m) is not RMSNorm or m.eps != eps:
        raise Unsupported(f"{where}: {type(m).__name__} (eps {getattr(m, 'eps', '?')}) is not "
                          f"the RMSNorm (eps {eps}) the engine computes")
    return m.weight.detach().float().contiguous()


def build_engine(gm: fx.GraphModule):
    """The model lowered to a decode engine (without KV buffers); Unsupported says why not."""
    from .kernels import decode_step
    spec = ir.get_spec(gm)
    if spec.norm != "rms" or spec.learned_positions:
        raise Unsupported(f"{spec.family}: norm '{spec.norm}' / learned positions")
    if spec.act not in _ACT or ACTIVATIONS.get(spec.act) is None:
        raise Unsupported(f"activation '{spec.act}'")
    if _signature(gm.graph) != _canonical_signature(spec):
        raise Unsupported("the graph is not the canonical trace of its spec")
    ext = decode_step.load()
    eng = ext.Engine()
    eng.eps, eng.act_kind, eng.gated = float(spec.norm_eps), _ACT[spec.act], bool(spec.gated_mlp)
    eng.softcap = float(spec.final_logit_softcap or 0.0)
    index = rope_table_index(spec)            # the same table order as the graph's `rope.<j>`
    tables = [gm.get_submodule(f"rope.{j}") for j in range(len(index))]
    eng.inv_freq = [t.inv_freq.detach().float().contiguous() for t in tables]
    for i, ls in enumerate(spec.layers):
        blk = gm.get_submodule(f"layers.{i}")
        if ls.rope is not None and ls.rope.dim != ls.head_dim:
            raise Unsupported(f"layer {i}: partial rotary")
        L = ext.Layer()
        L.Hq, L.Hkv, L.D, L.F = ls.n_heads, ls.n_kv_heads, ls.head_dim, ls.ffn_dim
        L.window = int(ls.window or 0)
        L.rope = -1 if ls.rope is None else index[ls.rope]
        L.scale = float(blk.attn.scale)
        for name in _NORMS:
            if hasattr(blk, name):
                setattr(L, name, _norm(getattr(blk, name), spec.norm_eps, f"layer {i} {name}"))
        lin = lambda n: _lin(ext, getattr(blk, n), f"layer {i} {n}")  # noqa: E731
        L.qkv = [lin("qkv_proj")] if ls.fused_qkv else [lin("q_proj"), lin("k_proj"), lin("v_proj")]
        L.o = lin("o_proj")
        if not spec.gated_mlp:
            L.gate_up = [lin("up_proj")]
        else:
            L.gate_up = [lin("gate_up_proj")] if ls.fused_gate_up else [lin("gate_proj"), lin("up_proj")]
        L.down = lin("down_proj")
        eng.add_layer(L)
    eng.final_norm = _norm(gm.norm, spec.norm_eps, "final norm")
    eng.head = _lin(ext, gm.lm_head, "lm_head")
    return eng


class FastDecoder:
    """Decode steps of one sequence on the engine, over the AttentionState's dense caches."""

    def __init__(self, gm: fx.GraphModule, state, engine):
        self.gm, self.state, self.engine = gm, state, engine
        self.spec = ir.get_spec(gm)
        self.caches = state.caches
        self.cap = 0
        self._bind(self.caches[0].length + 1)

    def _bind(self, need: int) -> None:
        """Grow every cache to hold `need` tokens (doubling, unless the caller reserved the
        final length already) and hand the engine their buffers, which a growth replaces."""
        for i, c in enumerate(self.caches):
            if need > c.capacity:
                c.reserve(max(need, 2 * c.capacity))
            self.engine.set_kv(i, c.k, c.v)
        self.cap = min(c.capacity for c in self.caches)

    def step(self, tok: torch.Tensor) -> torch.Tensor:
        """tok (1, 1) long → logits (1, V) of the next token; the caches and state advance."""
        n = self.caches[0].length
        if n + 1 > self.cap:
            self._bind(n + 1)
        pos = torch.tensor([[n]])
        self.state.begin(pos)
        x = self.gm.embed(tok)                                  # (1, 1, H)
        if self.spec.embed_scale != 1.0:
            x = x * self.gm.embed_scale
        logits = self.engine.step(x.reshape(1, -1).float(), n)  # (1, V)
        for c in self.caches:
            c.length += 1
        return logits


def fast_decoder(gm: fx.GraphModule, state) -> FastDecoder | None:
    """A FastDecoder for this model and state after prefill, or None (the graph runs the steps)."""
    try:
        from .kernels import decode_step
        from . import kernels
        if kernels._FORCE_REFERENCE:
            raise Unsupported("kernels forced to reference mode")
        if os.environ.get("MCOMP_NO_FAST_DECODE"):
            raise Unsupported("disabled by MCOMP_NO_FAST_DECODE")
        if state.batch != 1:
            raise Unsupported(f"batch {state.batch}")
        n = state.length
        for i, c in enumerate(state.caches):
            if type(c) is not DenseKVCache or c.dtype not in _KV_DTYPES or c.k_dim is not None:
                raise Unsupported(f"layer {i}: a {c.layer.kv.label()} cache")
            if c.length != n or c.k is None or not c.k.is_contiguous():
                raise Unsupported(f"layer {i}: cache holds {c.length} of {n} tokens")
        if n == 0 or not bool(state.key_valid.all()) or not torch.equal(state.key_pos[0], torch.arange(n)):
            raise Unsupported("cached keys are not positions 0..n-1 of one unpadded sequence")
        if not decode_step.available():
            raise Unsupported(decode_step.KERNEL.error or "engine unavailable")
        return FastDecoder(gm, state, build_engine(gm))
    except Unsupported as e:
        log.debug("decode steps run the graph: %s", e)
        return None

"""IR verification, run by the PassManager after every pass (on by default).

1. structure: `graph.lint()`, every node annotated, every linear's shape equal to what the
   spec implies (a canonical model built from the spec on the meta device), one attention
   node per layer;
2. shapes: the probe batch runs through an fx Interpreter and the logits are (B, T, vocab);
3. numerics: max |Δlogit|, KL divergence and top-1 agreement against the IR before the pass.
   When an exact pass drifts, the first node (topological order) whose output moved beyond the
   tolerance is named, so the error points at the rewrite that broke things.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

from ..errors import PassError
from . import ir


@dataclass
class ProbeRun:
    logits: torch.Tensor
    outputs: dict[str, torch.Tensor]   # node name → output tensor, for localization


class _Recorder(fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.outputs: dict[str, torch.Tensor] = {}

    def run_node(self, n):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor) and n.op in ("call_module", "call_function", "call_method"):
            self.outputs[n.name] = out
        return out


def check_structure(gm: fx.GraphModule) -> None:
    """Raise ValueError (with the node) on a malformed IR."""
    gm.graph.lint()
    spec = ir.get_spec(gm)
    expected = ir.expected_linear_shapes(spec)
    attn_layers = []
    for node in gm.graph.nodes:
        info = node.meta.get("mcomp")
        if info is None:
            raise ValueError(f"node '{node.name}' has no mcomp metadata")
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        if info.role in ir.LINEAR_ROLES:
            want = expected.get(node.target)
            if want is None:
                raise ValueError(f"node '{node.name}': linear '{node.target}' does not exist in "
                                 "a model built from the spec")
            got = ir.linear_shape(mod)
            if got != want:
                raise ValueError(f"node '{node.name}': weight (out, in) = {got}, spec implies {want}")
        if info.role == "attn":
            attn_layers.append(info.layer)
    if attn_layers != list(range(spec.n_layers)):
        raise ValueError(f"attention nodes for layers {attn_layers}, spec has {spec.n_layers} layers")


@torch.inference_mode()
def probe(gm: fx.GraphModule, ids: torch.Tensor) -> ProbeRun:
    rec = _Recorder(gm)
    pos = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
    logits = rec.run(ids, pos, None)
    spec = ir.get_spec(gm)
    want = (ids.shape[0], ids.shape[1], spec.vocab_size)
    if tuple(logits.shape) != want:
        raise ValueError(f"probe logits have shape {tuple(logits.shape)}, expected {want}")
    return ProbeRun(logits=logits.float(), outputs=rec.outputs)


def drift(ref: torch.Tensor, new: torch.Tensor) -> dict:
    """max |Δlogit|, mean KL(ref ‖ new) per token, top-1 agreement."""
    ref, new = ref.float().flatten(0, -2), new.float().flatten(0, -2)   # (N, V)
    lp_ref, lp_new = F.log_softmax(ref, -1), F.log_softmax(new, -1)
    kld = (lp_ref.exp() * (lp_ref - lp_new)).sum(-1).mean().item()
    return {"max_abs_logit": (ref - new).abs().max().item(), "kld": max(kld, 0.0),
            "top1": (ref.argmax(-1) == new.argmax(-1)).float().mean().item()}


def first_divergence(before: ProbeRun, after: ProbeRun, gm_after: fx.GraphModule,
                     atol: float) -> str | None:
    """Name of the first node (in the new graph's order) whose output differs from the node of the
    same name before the pass by more than atol (relative to the output's scale)."""
    for node in gm_after.graph.nodes:
        a, b = after.outputs.get(node.name), before.outputs.get(node.name)
        if a is None or b is None or a.shape != b.shape or not a.is_floating_point():
            continue
        scale = max(b.abs().max().item(), 1.0)
        if (a.float() - b.float()).abs().max().item() > atol * scale:
            return node.name
    return None


def verify_pass(gm: fx.GraphModule, before: ProbeRun, ids: torch.Tensor, *, pass_name: str,
                previous: tuple[str, ...], exact: bool, exact_atol: float,
                max_kld: float | None) -> tuple[ProbeRun, dict]:
    try:
        check_structure(gm)
        after = probe(gm, ids)
    except Exception as e:  # any structural failure is the pass's fault; say which and where
        node = None
        msg = str(e)
        if "node '" in msg:
            node = msg.split("node '", 1)[1].split("'", 1)[0]
        raise PassError(f"left an invalid IR: {msg}", pass_name=pass_name, previous=previous,
                        node=node) from e
    d = drift(before.logits, after.logits)
    scale = max(before.logits.abs().max().item(), 1.0)
    if exact and d["max_abs_logit"] > exact_atol * scale:
        node = first_divergence(before, after, gm, exact_atol)
        raise PassError(f"is declared exact but changed the logits: max |Δlogit| = "
                        f"{d['max_abs_logit']:.3g} (tolerance {exact_atol * scale:.3g}), "
                        f"KL = {d['kld']:.3g}", pass_name=pass_name, previous=previous, node=node)
    if max_kld is not None and d["kld"] > max_kld:
        raise PassError(f"drifted beyond the allowed KL divergence: {d['kld']:.4g} > {max_kld}",
                        pass_name=pass_name, previous=previous)
    return after, d


# ----------------------------------------------------------------------------- through caches

def kv_specs(gm: fx.GraphModule) -> tuple:
    return tuple(l.kv for l in ir.get_spec(gm).layers)


def kv_probe_ids(stream: torch.Tensor, n: int, bos: int | None) -> torch.Tensor:
    """(1, n) tokens for the cache-aware check: BOS, then the end of the calibration stream
    (tiled when it is shorter), so the check does not reuse the first calibration windows."""
    body = n - (1 if bos is not None else 0)
    s = stream.flip(0)
    if s.numel() < body:
        s = s.repeat(-(-body // max(s.numel(), 1)))
    ids = s[:body]
    if bos is not None:
        ids = torch.cat([torch.tensor([bos], dtype=ids.dtype), ids])
    return ids[None]


@torch.inference_mode()
def verify_kv(gm: fx.GraphModule, stream: torch.Tensor, bos: int | None, *, pass_name: str,
              previous: tuple[str, ...], prefill: int = 16, exact_atol: float = 1e-4) -> dict:
    """Run the IR through its real caches: prefill `prefill` tokens, then decode one token at a
    time for as many steps as the most demanding layer's kind asks (KIVI: residual + 2 groups,
    so blocks are flushed into the quantized store and attended from it), and compare every
    logit with the no-cache forward of the same IR. Two checks can fail the pass:

    - bytes: each cache must hold exactly the bytes its kind's accounting says it holds after
      that many tokens (a cache that never flushes its fp window, or stores V at the wrong
      width, is caught here even when its logits look better than they should);
    - lossless kinds (dense fp32) must reproduce the no-cache logits to the exact tolerance.

    The drift (max |Δlogit|, KL, top-1 over the decoded positions) goes into the report."""
    from ..runtime.kv import KV_KINDS
    from ..runtime.kvcache import AttentionState

    spec = ir.get_spec(gm)
    kinds = [KV_KINDS.get(l.kv.kind) for l in spec.layers]
    steps = max(k.verify_steps(l.kv.params) for k, l in zip(kinds, spec.layers))
    ids = kv_probe_ids(stream, prefill + steps, bos)                      # (1, T)
    T = ids.shape[1]
    pos = torch.arange(T)[None]
    ref = gm(ids, pos, None).float()                                      # (1, T, V)
    state = AttentionState(spec, 1, model=gm)
    state.begin(pos[:, :prefill])
    outs = [gm(ids[:, :prefill], pos[:, :prefill], state).float()]
    for t in range(prefill, T):
        state.begin(pos[:, t:t + 1])
        outs.append(gm(ids[:, t:t + 1], pos[:, t:t + 1], state).float())
    got = torch.cat(outs, 1)                                              # (1, T, V)
    d = drift(ref[:, prefill:], got[:, prefill:])
    d.update(prefill=prefill, decode_steps=T - prefill)
    for i, (k, l, c) in enumerate(zip(kinds, spec.layers, state.caches)):
        want = k.bytes_held(l.kv.params, l, c.n_held)
        have = c.nbytes()
        if have != want:
            raise PassError(f"layer {i}: its '{l.kv.kind}' cache ({l.kv.label()}) holds {have} "
                            f"bytes after {c.n_held} tokens, its kind's accounting says {want}",
                            pass_name=pass_name, previous=previous)
    d["bytes_ok"] = True
    d["kv_bytes"] = state.nbytes()
    scale = max(ref.abs().max().item(), 1.0)
    lossless = [i for i, (k, l) in enumerate(zip(kinds, spec.layers)) if k.lossless(l.kv.params)]
    if len(lossless) == spec.n_layers and d["max_abs_logit"] > exact_atol * scale:
        raise PassError(f"lossless KV caches changed the logits: max |Δlogit| = "
                        f"{d['max_abs_logit']:.3g} over {T - prefill} decode steps (tolerance "
                        f"{exact_atol * scale:.3g})", pass_name=pass_name, previous=previous)
    return d

"""The IR: a torch.fx GraphModule traced from the canonical model, plus metadata.

- `gm.meta["mcomp.spec"]` holds the ModelSpec (the source of truth for structure).
- every node carries `node.meta["mcomp"]`: a NodeInfo with its role, layer and head/channel
  layout. Passes select nodes by role (`nodes_by_role`), never by parsing names.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import fx, nn

from .model import CausalLM, LeafModule, apply_rope, select_logit_positions
from .spec import LayerSpec, ModelSpec

LINEAR_ROLES = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj",
                "gate_proj", "up_proj", "gate_up_proj", "down_proj", "lm_head")


FUNCTION_ROLES = {apply_rope: "rope_apply", select_logit_positions: "logit_select"}


@dataclass(frozen=True)
class NodeInfo:
    role: str
    layer: int | None = None
    layout: tuple = field(default=())  # e.g. (("heads", 9), ("head_dim", 64))

    def get(self, key, default=None):
        return dict(self.layout).get(key, default)


def layout_for(role: str, ls: LayerSpec | None) -> tuple:
    """Head/channel layout of a role's output (projections) or input (o_proj, down_proj)."""
    if ls is None:
        return ()
    table = {
        "q_proj": (("heads", ls.n_heads), ("head_dim", ls.head_dim)),
        "k_proj": (("heads", ls.n_kv_heads), ("head_dim", ls.head_dim)),
        "v_proj": (("heads", ls.n_kv_heads), ("head_dim", ls.head_dim)),
        "qkv_proj": (("heads", ls.n_heads), ("kv_heads", ls.n_kv_heads), ("head_dim", ls.head_dim)),
        "o_proj": (("heads", ls.n_heads), ("head_dim", ls.head_dim)),
        "attn": (("heads", ls.n_heads), ("kv_heads", ls.n_kv_heads), ("head_dim", ls.head_dim),
                 ("window", ls.window), ("kv", ls.kv.kind)),
        "gate_proj": (("channels", ls.ffn_dim),),
        "up_proj": (("channels", ls.ffn_dim),),
        "gate_up_proj": (("channels", ls.ffn_dim),),
        "down_proj": (("channels", ls.ffn_dim),),
    }
    return table.get(role, ())


class Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, LeafModule) or super().is_leaf_module(m, qualname)


def _layer_from_stack(node: fx.Node) -> int | None:
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        parts = str(path).split(".")
        if len(parts) >= 2 and parts[0] == "layers" and parts[1].isdigit():
            return int(parts[1])
    return None


def annotate(gm: fx.GraphModule) -> None:
    """(Re)compute node.meta['mcomp'] from module tags and the current spec."""
    spec = get_spec(gm)
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            role = getattr(mod, "mcomp_role", type(mod).__name__.lower())
            layer = getattr(mod, "mcomp_layer", None)
        elif node.op in ("placeholder", "output", "get_attr"):
            role, layer = node.op, None
        else:
            role = FUNCTION_ROLES.get(node.target, "op")
            layer = _layer_from_stack(node)
        ls = spec.layers[layer] if layer is not None else None
        node.meta["mcomp"] = NodeInfo(role=role, layer=layer, layout=layout_for(role, ls))


def trace(model: CausalLM) -> fx.GraphModule:
    graph = Tracer().trace(model)
    gm = fx.GraphModule(model, graph, class_name="MCompModel")
    _keep_non_persistent(model, gm)
    for i, block in enumerate(model.layers):
        # KV state is read by the caches, not by the forward: fx would drop it
        if hasattr(block, "kv_state"):
            gm.get_submodule(f"layers.{i}").add_module("kv_state", block.kv_state)
    gm.meta["mcomp.spec"] = model.spec
    annotate(gm)
    return gm


def _keep_non_persistent(model: nn.Module, gm: fx.GraphModule) -> None:
    """fx copies buffers reached through get_attr (e.g. gemma's `embed_scale`) as persistent
    buffers; derived buffers must stay out of the state dict, the artifact and its checks."""
    for name, _ in model.named_buffers():
        path, _, attr = name.rpartition(".")
        owner = model.get_submodule(path) if path else model
        if attr not in owner._non_persistent_buffers_set:
            continue
        try:
            copy = gm.get_submodule(path) if path else gm
        except AttributeError:
            continue
        if attr in copy._buffers:
            copy._non_persistent_buffers_set.add(attr)


def build(spec: ModelSpec, state_dict: dict[str, torch.Tensor] | None = None) -> fx.GraphModule:
    """Canonical model from a spec (and fp weights) → traced IR."""
    model = CausalLM(spec)
    if state_dict is not None:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        # tied lm_head is the embedding; rotary tables are derived buffers
        missing = [k for k in missing if not (spec.tie_embeddings and k == "lm_head.weight")]
        if missing or unexpected:
            raise KeyError(f"state dict mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    model.eval()
    return trace(model)


def set_layer_kv(gm: fx.GraphModule, layer: int, kv, state: dict | None = None) -> None:
    """Give layer `layer` the KV spec `kv` and, for a kind that owns tensors, those tensors
    (exactly the kind's declared names and shapes); a previous kind's state is dropped."""
    from .model import kv_state_module
    spec = get_spec(gm)
    new = spec.with_layer(layer, kv=kv)                 # LayerSpec validates kv for the layer
    mod = kv_state_module(new.layers[layer], spec.hidden_size, state, layer)
    if mod is not None and state is None:
        from ..errors import ConfigError
        raise ConfigError(f"layer {layer}: kv kind '{kv.kind}' owns calibrated tensors; set it "
                          f"with its own pass (--kv {kv.kind}:...), not assign_kv")
    block = gm.get_submodule(f"layers.{layer}")
    if hasattr(block, "kv_state"):
        delattr(block, "kv_state")
    if mod is not None:
        block.add_module("kv_state", mod)
    set_spec(gm, new)


def get_spec(gm: fx.GraphModule) -> ModelSpec:
    return gm.meta["mcomp.spec"]


def set_spec(gm: fx.GraphModule, spec: ModelSpec) -> None:
    """Replace the spec and refresh every node's layout metadata."""
    gm.meta["mcomp.spec"] = spec
    annotate(gm)


def nodes_by_role(gm: fx.GraphModule, *roles: str) -> Iterator[fx.Node]:
    for node in gm.graph.nodes:
        info = node.meta.get("mcomp")
        if info is not None and info.role in roles:
            yield node


def expected_linear_shapes(spec: ModelSpec) -> dict[str, tuple[int, int]]:
    """(out, in) of every linear a canonical model with this spec has, built on the meta device."""
    with torch.device("meta"):
        model = CausalLM(spec)
    return {name: tuple(m.weight.shape) for name, m in model.named_modules()
            if isinstance(m, nn.Linear)}


def linear_shape(mod: nn.Module) -> tuple[int, int]:
    """Logical (out, in) of a float or quantized linear."""
    if isinstance(mod, nn.Linear):
        return tuple(mod.weight.shape)
    return (mod.out_features, mod.in_features)


DECODER_LINEAR_ROLES = tuple(r for r in LINEAR_ROLES if r != "lm_head")


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:  # tied weights count once
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def weight_bytes(gm: fx.GraphModule) -> int:
    """Bytes of everything the artifact stores (persistent params and buffers, ties counted once)."""
    return _tensor_bytes(gm.state_dict().values())


def module_bytes(mod: nn.Module) -> int:
    return _tensor_bytes(mod.state_dict().values())


def linear_weight_bytes(gm: fx.GraphModule) -> int:
    """Bytes of the decoder blocks' linears (q/k/v/o, gate/up/down), scales and zeros included."""
    return sum(module_bytes(gm.get_submodule(n.target))
               for n in nodes_by_role(gm, *DECODER_LINEAR_ROLES))


def replace_module(gm: fx.GraphModule, target: str, new: nn.Module) -> None:
    """Swap the submodule a call_module node points at; graph and metadata stay valid."""
    old = gm.get_submodule(target)
    for attr in ("mcomp_role", "mcomp_layer"):
        setattr(new, attr, getattr(old, attr, None))
    parent, _, name = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, new)

"""Pure functions that physically shrink a canonical state dict + spec.

Every function takes `(state_dict, spec, ...)` and returns a new `(state_dict, spec)`; the
input dict is not modified (tensors that do not change are shared). The pruning passes use
them on one layer at a time while they walk the model, and `ir.build(spec, state_dict)` turns
the result into a fresh IR; verification then checks every linear against the new spec.

Layout facts they rely on (canonical model, unfused projections):
  - q_proj rows / o_proj columns are grouped by query head: head h owns [h*D, (h+1)*D);
  - k_proj / v_proj rows by KV head; query head h reads KV head h // (n_heads / n_kv_heads);
  - q_norm / k_norm act per head_dim and are shared by all heads, so head pruning leaves them;
  - gate/up rows and down columns are the MLP channels.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from ..compiler.spec import LayerSpec, ModelSpec
from ..errors import ConfigError

StateDict = dict[str, torch.Tensor]

ATTN_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")


def _key(layer: int, name: str, what: str = "weight") -> str:
    return f"layers.{layer}.{name}.{what}"


def _check_unfused(sd: StateDict, spec: ModelSpec, layer: int) -> LayerSpec:
    if not 0 <= layer < spec.n_layers:
        raise ConfigError(f"layer {layer} out of range (model has {spec.n_layers} layers)")
    ls = spec.layers[layer]
    if ls.fused_qkv or ls.fused_gate_up:
        raise ConfigError(f"layer {layer}: pruning needs unfused projections; prune before fuse_* passes")
    return ls


def _channels(units: Sequence[int], width: int) -> torch.Tensor:
    """Channel indices of whole units of `width` channels (heads of head_dim channels)."""
    u = torch.as_tensor(list(units), dtype=torch.long)
    return (u[:, None] * width + torch.arange(width)).flatten()


def _rows(sd: StateDict, key_w: str, key_b: str, idx: torch.Tensor) -> None:
    sd[key_w] = sd[key_w].index_select(0, idx).contiguous()
    if key_b in sd:
        sd[key_b] = sd[key_b].index_select(0, idx).contiguous()


def _cols(sd: StateDict, key_w: str, idx: torch.Tensor) -> None:
    sd[key_w] = sd[key_w].index_select(1, idx).contiguous()


def keep_heads(sd: StateDict, spec: ModelSpec, layer: int, kv_groups: Sequence[int],
               q_in_group: Sequence[int] | Sequence[Sequence[int]] | None = None
               ) -> tuple[StateDict, ModelSpec]:
    """Keep the KV groups `kv_groups` of `layer` (each: its k/v head and the query heads that
    read it) and, inside each kept group, the query heads `q_in_group` (indices within the
    group, 0..g-1; one list for every group, or one list per kept group; all the same length so
    the layer stays a valid GQA layer). Default: all query heads of each kept group."""
    ls = _check_unfused(sd, spec, layer)
    g = ls.n_heads // ls.n_kv_heads
    D = ls.head_dim
    groups = sorted(set(int(j) for j in kv_groups))
    if not groups:
        raise ConfigError(f"layer {layer}: cannot remove every KV group")
    if groups[0] < 0 or groups[-1] >= ls.n_kv_heads:
        raise ConfigError(f"layer {layer}: KV group indices {groups} out of range 0..{ls.n_kv_heads - 1}")
    if q_in_group is None:
        per_group = [list(range(g))] * len(groups)
    elif len(q_in_group) and isinstance(q_in_group[0], (list, tuple)):
        per_group = [sorted(set(int(r) for r in rs)) for rs in q_in_group]  # type: ignore[union-attr]
        if len(per_group) != len(groups):
            raise ConfigError(f"layer {layer}: {len(per_group)} query-head lists for {len(groups)} KV groups")
    else:
        per_group = [sorted(set(int(r) for r in q_in_group))] * len(groups)  # type: ignore[arg-type]
    sizes = {len(rs) for rs in per_group}
    if len(sizes) != 1 or 0 in sizes:
        raise ConfigError(f"layer {layer}: every kept KV group must keep the same, non-zero "
                          f"number of query heads (got {sorted(len(r) for r in per_group)})")
    if any(r < 0 or r >= g for rs in per_group for r in rs):
        raise ConfigError(f"layer {layer}: query-head indices must lie in 0..{g - 1} within a group")
    # kept query heads in group order: new head h' reads new KV head h' // g'
    q_heads = [j * g + r for j, rs in zip(groups, per_group) for r in rs]
    q_idx, kv_idx = _channels(q_heads, D), _channels(groups, D)
    out = dict(sd)
    _rows(out, _key(layer, "q_proj"), _key(layer, "q_proj", "bias"), q_idx)
    for name in ("k_proj", "v_proj"):
        _rows(out, _key(layer, name), _key(layer, name, "bias"), kv_idx)
    _cols(out, _key(layer, "o_proj"), q_idx)
    new_spec = spec.with_layer(layer, n_heads=len(q_heads), n_kv_heads=len(groups))
    return out, new_spec


def keep_channels(sd: StateDict, spec: ModelSpec, layer: int, idx: Sequence[int]
                  ) -> tuple[StateDict, ModelSpec]:
    """Keep MLP channels `idx` of `layer`: gate/up rows (and their biases), down columns."""
    ls = _check_unfused(sd, spec, layer)
    keep = torch.as_tensor(sorted(set(int(c) for c in idx)), dtype=torch.long)
    if keep.numel() == 0:
        raise ConfigError(f"layer {layer}: cannot remove every MLP channel")
    if keep[0] < 0 or keep[-1] >= ls.ffn_dim:
        raise ConfigError(f"layer {layer}: MLP channel indices out of range 0..{ls.ffn_dim - 1}")
    out = dict(sd)
    for name in ("gate_proj", "up_proj"):
        if _key(layer, name) in out:
            _rows(out, _key(layer, name), _key(layer, name, "bias"), keep)
    _cols(out, _key(layer, "down_proj"), keep)
    return out, spec.with_layer(layer, ffn_dim=int(keep.numel()))


def drop_layers(sd: StateDict, spec: ModelSpec, indices: Sequence[int]) -> tuple[StateDict, ModelSpec]:
    """Remove whole blocks; later blocks are renumbered (their keys and their specs)."""
    drop = sorted(set(int(i) for i in indices))
    if any(i < 0 or i >= spec.n_layers for i in drop):
        raise ConfigError(f"layer indices {drop} out of range (model has {spec.n_layers} layers)")
    if len(drop) >= spec.n_layers:
        raise ConfigError(f"cannot remove {len(drop)} of {spec.n_layers} layers: at least one must stay")
    kept = [i for i in range(spec.n_layers) if i not in drop]
    new_index = {old: new for new, old in enumerate(kept)}
    out: StateDict = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] == "layers" and len(parts) > 2 and parts[1].isdigit():
            old = int(parts[1])
            if old in new_index:
                out[".".join(["layers", str(new_index[old]), *parts[2:]])] = v
        else:
            out[k] = v
    layers = tuple(spec.layers[i] for i in kept)
    return out, dataclasses.replace(spec, layers=layers)


def compensate_bias(sd: StateDict, spec: ModelSpec, layer: int, role: str,
                    pruned: Sequence[int], mean: torch.Tensor) -> tuple[StateDict, ModelSpec]:
    """FLAP bias compensation: add W[:, pruned] @ mean[pruned] to the bias of `role`
    (o_proj or down_proj), so the pruned input channels' average contribution stays.
    `mean` is the per-input-channel mean of that linear's input over calibration tokens.
    Call before slicing the columns away. The layer spec gains o_bias / down_bias."""
    ls = _check_unfused(sd, spec, layer)
    flag = {"o_proj": "o_bias", "down_proj": "down_bias"}.get(role)
    if flag is None:
        raise ConfigError(f"bias compensation applies to o_proj or down_proj, not '{role}'")
    w = sd[_key(layer, role)]
    if mean.shape != (w.shape[1],):
        raise ConfigError(f"layer {layer} {role}: mean has shape {tuple(mean.shape)}, "
                          f"expected ({w.shape[1]},)")
    out = dict(sd)
    bk = _key(layer, role, "bias")
    bias = out[bk].clone() if bk in out else torch.zeros(w.shape[0], dtype=w.dtype)
    idx = torch.as_tensor(list(pruned), dtype=torch.long)
    if idx.numel():
        delta = w.double().index_select(1, idx) @ mean.double().index_select(0, idx)  # (H,)
        bias = (bias.double() + delta).to(w.dtype)
    out[bk] = bias
    return out, (spec if getattr(ls, flag) else spec.with_layer(layer, **{flag: True}))


# ----------------------------------------------------------------------------- parameter counts

def block_params(ls: LayerSpec, ms: ModelSpec) -> dict[str, int]:
    """Parameters of one block by part (attn linears, mlp linears, norms), biases included."""
    H, D = ms.hidden_size, ls.head_dim
    q, kv = ls.n_heads * D, ls.n_kv_heads * D
    attn = H * (q + 2 * kv) + q * H + (q + 2 * kv if ls.qkv_bias else 0) + (H if ls.o_bias else 0)
    attn += 2 * D if ls.qk_norm else 0
    n_in = 2 if ms.gated_mlp else 1
    mlp = n_in * H * ls.ffn_dim + ls.ffn_dim * H + (n_in * ls.ffn_dim if ls.mlp_bias else 0)
    mlp += H if ls.down_bias else 0
    per_norm = H * (2 if ms.norm == "layer" else 1)
    norms = per_norm * (4 if ls.sandwich_norm else 2)
    return {"attn": attn, "mlp": mlp, "norms": norms, "total": attn + mlp + norms}


def non_embedding_params(spec: ModelSpec) -> int:
    """Every parameter except the token embedding, an untied lm_head and learned positions."""
    per_norm = spec.hidden_size * (2 if spec.norm == "layer" else 1)
    return sum(block_params(l, spec)["total"] for l in spec.layers) + per_norm


def embedding_params(spec: ModelSpec) -> int:
    n = spec.vocab_size * spec.hidden_size * (1 if spec.tie_embeddings else 2)
    return n + spec.learned_positions * spec.hidden_size

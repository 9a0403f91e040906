"""GPT-2: pre-LayerNorm (with bias), learned absolute positions, plain GELU MLP, biases everywhere.

HF stores GPT-2's projections as `Conv1D` with weights laid out (in, out); they are transposed
to nn.Linear's (out, in). The fused `c_attn` (q|k|v) is split into separate q/k/v projections
(the fuse_qkv pass can fuse them again).
"""
from __future__ import annotations

import torch

from ...errors import ModelImportError
from ..model import ACTIVATIONS
from ..spec import LayerSpec, ModelSpec
from .base import Frontend, register_frontend, require, token_ids
from .llama import _act

# GPT2LMHeadModel checkpoints (transformers) prefix `transformer.`; the original OpenAI
# checkpoints on the Hub (GPT2Model) have no prefix.
_PREFIXES = ("transformer.", "")


def _get(cfg: dict, *keys: str, default=None):
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


@register_frontend
class GPT2Frontend(Frontend):
    family = "gpt2"
    model_types = ("gpt2",)

    def spec(self, cfg: dict) -> ModelSpec:
        f = self.family
        H = int(_get(cfg, "n_embd", "hidden_size") or require(cfg, "n_embd", f))
        nh = int(_get(cfg, "n_head", "num_attention_heads") or require(cfg, "n_head", f))
        n = int(_get(cfg, "n_layer", "num_hidden_layers") or require(cfg, "n_layer", f))
        n_pos = int(_get(cfg, "n_positions", "max_position_embeddings", default=1024))
        if H % nh:
            raise ModelImportError(f"gpt2: n_embd={H} is not a multiple of n_head={nh}")
        if cfg.get("add_cross_attention"):
            raise ModelImportError("gpt2: cross-attention (add_cross_attention=true) is not supported")
        if cfg.get("scale_attn_by_inverse_layer_idx"):
            raise ModelImportError("gpt2: scale_attn_by_inverse_layer_idx=true (a per-layer "
                                   "attention scale) is not supported")
        act = _act(cfg.get("activation_function", "gelu_new"))
        if act not in ACTIVATIONS:
            raise ModelImportError(f"gpt2: activation '{cfg.get('activation_function')}' is not "
                                   f"supported; supported: {', '.join(ACTIVATIONS.names())}")
        hd = H // nh
        layers = tuple(
            LayerSpec(n_heads=nh, n_kv_heads=nh, head_dim=hd,
                      ffn_dim=int(cfg.get("n_inner") or 4 * H), window=None, rope=None,
                      qkv_bias=True, o_bias=True, mlp_bias=True, down_bias=True)
            for _ in range(n))
        return ModelSpec(family=f, vocab_size=int(require(cfg, "vocab_size", f)), hidden_size=H,
                         layers=layers, norm="layer",
                         norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)), act=act,
                         gated_mlp=False, learned_positions=n_pos,
                         attn_scale=None if cfg.get("scale_attn_weights", True) else 1.0,
                         tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
                         max_positions=n_pos, **token_ids(cfg))

    def convert(self, hf: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
        p = next((p for p in _PREFIXES if f"{p}wte.weight" in hf), None)
        if p is None:
            raise ModelImportError("gpt2: no token embedding ('transformer.wte.weight' or "
                                   "'wte.weight') in checkpoint")

        def get(name: str) -> torch.Tensor:
            if name not in hf:
                raise ModelImportError(f"gpt2: weight '{name}' missing from checkpoint")
            return hf[name].float()

        H = spec.hidden_size
        out = {"embed.weight": get(f"{p}wte.weight"), "pos_embed.weight": get(f"{p}wpe.weight"),
               "norm.weight": get(f"{p}ln_f.weight"), "norm.bias": get(f"{p}ln_f.bias")}
        if not spec.tie_embeddings:
            out["lm_head.weight"] = get("lm_head.weight")
        for i, ls in enumerate(spec.layers):
            hf_, us = f"{p}h.{i}", f"layers.{i}"
            for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
                out[f"{us}.{ours}.weight"] = get(f"{hf_}.{theirs}.weight")
                out[f"{us}.{ours}.bias"] = get(f"{hf_}.{theirs}.bias")
            # Conv1D: y = x @ W + b with W (in, out) → Linear weight W.T (out, in)
            w = get(f"{hf_}.attn.c_attn.weight").t()   # (3H, H): rows q | k | v
            b = get(f"{hf_}.attn.c_attn.bias")         # (3H,)
            if w.shape != (3 * H, H):
                raise ModelImportError(f"gpt2: {hf_}.attn.c_attn.weight has shape "
                                       f"{tuple(w.shape[::-1])}, expected ({H}, {3 * H})")
            for name, wi, bi in zip("qkv", w.split(H, dim=0), b.split(H, dim=0)):
                out[f"{us}.{name}_proj.weight"] = wi.contiguous()
                out[f"{us}.{name}_proj.bias"] = bi.contiguous()
            for ours, theirs in (("o_proj", "attn.c_proj"), ("up_proj", "mlp.c_fc"),
                                 ("down_proj", "mlp.c_proj")):
                out[f"{us}.{ours}.weight"] = get(f"{hf_}.{theirs}.weight").t().contiguous()
                out[f"{us}.{ours}.bias"] = get(f"{hf_}.{theirs}.bias")
        return out

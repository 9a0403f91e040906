"""Llama family: Llama 2/3, Mistral, SmolLM2. RMSNorm, SwiGLU, RoPE, GQA."""
from __future__ import annotations

from ..spec import LayerSpec, ModelSpec
from .base import Frontend, register_frontend, require, rope_spec, token_ids


def decoder_layer_names(i: int, ls: LayerSpec, prefix: str = "model.layers") -> dict[str, str]:
    """Canonical → HF names shared by the llama-like families (llama, mistral, qwen2/3, gemma3)."""
    hf, us = f"{prefix}.{i}", f"layers.{i}"
    names = {f"{us}.attn_norm.weight": f"{hf}.input_layernorm.weight"}
    for p in ("q", "k", "v", "o"):
        names[f"{us}.{p}_proj.weight"] = f"{hf}.self_attn.{p}_proj.weight"
    if ls.qkv_bias:
        for p in ("q", "k", "v"):
            names[f"{us}.{p}_proj.bias"] = f"{hf}.self_attn.{p}_proj.bias"
    if ls.o_bias:
        names[f"{us}.o_proj.bias"] = f"{hf}.self_attn.o_proj.bias"
    for p in ("gate", "up", "down"):
        names[f"{us}.{p}_proj.weight"] = f"{hf}.mlp.{p}_proj.weight"
    if ls.qk_norm:
        names[f"{us}.q_norm.weight"] = f"{hf}.self_attn.q_norm.weight"
        names[f"{us}.k_norm.weight"] = f"{hf}.self_attn.k_norm.weight"
    if ls.sandwich_norm:
        names[f"{us}.post_attn_norm.weight"] = f"{hf}.post_attention_layernorm.weight"
        names[f"{us}.mlp_norm.weight"] = f"{hf}.pre_feedforward_layernorm.weight"
        names[f"{us}.post_mlp_norm.weight"] = f"{hf}.post_feedforward_layernorm.weight"
    else:
        names[f"{us}.mlp_norm.weight"] = f"{hf}.post_attention_layernorm.weight"
    return names


def model_names(spec: ModelSpec) -> dict[str, str]:
    names = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    for i, ls in enumerate(spec.layers):
        names.update(decoder_layer_names(i, ls))
    if not spec.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    return names


def layer_windows(cfg: dict, n_layers: int) -> list[tuple[str, int | None]]:
    """(layer_type, window) per layer from `layer_types` / `sliding_window` (mistral, qwen2)."""
    types = cfg.get("layer_types") or ["full_attention"] * n_layers
    window = cfg.get("sliding_window")
    if cfg.get("use_sliding_window") is False:
        window = None
    out = []
    for t in types:
        out.append((t, window if (t == "sliding_attention" and window) else None))
    if not cfg.get("layer_types") and window and cfg.get("model_type") == "mistral":
        out = [("full_attention", window)] * n_layers  # mistral: every layer slides
    return out


@register_frontend
class LlamaFrontend(Frontend):
    family = "llama"
    model_types = ("llama", "mistral")

    def spec(self, cfg: dict) -> ModelSpec:
        H = require(cfg, "hidden_size", self.family)
        nh = require(cfg, "num_attention_heads", self.family)
        nkv = cfg.get("num_key_value_heads") or nh
        hd = cfg.get("head_dim") or H // nh
        n = require(cfg, "num_hidden_layers", self.family)
        bias = bool(cfg.get("attention_bias", False))
        layers = tuple(
            LayerSpec(n_heads=nh, n_kv_heads=nkv, head_dim=hd,
                      ffn_dim=require(cfg, "intermediate_size", self.family), window=w,
                      rope=rope_spec(cfg, hd, t), qkv_bias=bias, o_bias=bias,
                      mlp_bias=bool(cfg.get("mlp_bias", False)),
                      down_bias=bool(cfg.get("mlp_bias", False)))
            for t, w in layer_windows(cfg, n))
        return ModelSpec(family=self.family, vocab_size=cfg["vocab_size"], hidden_size=H,
                         layers=layers, norm="rms", norm_eps=cfg.get("rms_norm_eps", 1e-6),
                         act=_act(cfg.get("hidden_act", "silu")), gated_mlp=True,
                         tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                         max_positions=cfg.get("max_position_embeddings", 2048), **token_ids(cfg))

    def names(self, spec: ModelSpec) -> dict[str, str]:
        names = model_names(spec)
        for i, ls in enumerate(spec.layers):
            if ls.mlp_bias:
                for p in ("gate", "up", "down"):
                    names[f"layers.{i}.{p}_proj.bias"] = f"model.layers.{i}.mlp.{p}_proj.bias"
        return names


def _act(name: str) -> str:
    return {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
            "gelu_new": "gelu_tanh", "gelu_tanh": "gelu_tanh", "relu": "relu"}.get(name, name)

"""Qwen family: Qwen2 / Qwen2.5 (bias on q/k/v) and Qwen3 (per-head q/k RMSNorm, explicit head_dim).

Otherwise llama-shaped: RMSNorm, SwiGLU, RoPE, GQA, HF weight names of the llama family.
"""
from __future__ import annotations

from ..spec import LayerSpec, ModelSpec
from .base import Frontend, register_frontend, require, rope_spec, token_ids
from .llama import _act, model_names


def qwen_layer_windows(cfg: dict, n_layers: int) -> list[tuple[str, int | None]]:
    """(layer_type, window) per layer.

    transformers 5 configs carry `layer_types`; older ones say `use_sliding_window` and slide
    the layers from `max_window_layers` on (the rule of transformers' Qwen2/Qwen3 configs).
    """
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", False) else None
    types = cfg.get("layer_types")
    if not types:
        first = cfg.get("max_window_layers", 28)  # transformers default
        types = ["sliding_attention" if window is not None and i >= first else "full_attention"
                 for i in range(n_layers)]
    return [(t, window if t == "sliding_attention" and window else None) for t in types]


class _QwenBase(Frontend):
    qk_norm = False

    def biases(self, cfg: dict) -> tuple[bool, bool]:
        """(q/k/v bias, o bias)."""
        raise NotImplementedError

    def spec(self, cfg: dict) -> ModelSpec:
        f = self.family
        H = require(cfg, "hidden_size", f)
        nh = require(cfg, "num_attention_heads", f)
        nkv = cfg.get("num_key_value_heads") or nh
        hd = cfg.get("head_dim") or H // nh
        n = require(cfg, "num_hidden_layers", f)
        ffn = require(cfg, "intermediate_size", f)
        qkv_bias, o_bias = self.biases(cfg)
        layers = tuple(
            LayerSpec(n_heads=nh, n_kv_heads=nkv, head_dim=hd, ffn_dim=ffn, window=w,
                      rope=rope_spec(cfg, hd, t), qk_norm=self.qk_norm,
                      qkv_bias=qkv_bias, o_bias=o_bias)
            for t, w in qwen_layer_windows(cfg, n))
        return ModelSpec(family=f, vocab_size=require(cfg, "vocab_size", f), hidden_size=H,
                         layers=layers, norm="rms", norm_eps=cfg.get("rms_norm_eps", 1e-6),
                         act=_act(cfg.get("hidden_act", "silu")), gated_mlp=True,
                         tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                         max_positions=cfg.get("max_position_embeddings", 32768), **token_ids(cfg))

    def names(self, spec: ModelSpec) -> dict[str, str]:
        return model_names(spec)


@register_frontend
class Qwen2Frontend(_QwenBase):
    family = "qwen2"
    model_types = ("qwen2",)

    def biases(self, cfg: dict) -> tuple[bool, bool]:
        return True, False  # transformers' Qwen2Attention: q/k/v always biased, o never


@register_frontend
class Qwen3Frontend(_QwenBase):
    family = "qwen3"
    model_types = ("qwen3",)
    qk_norm = True

    def biases(self, cfg: dict) -> tuple[bool, bool]:
        b = bool(cfg.get("attention_bias", False))
        return b, b

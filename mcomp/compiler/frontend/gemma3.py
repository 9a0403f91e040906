"""Gemma 3 (text): RMSNorm with (1 + w), sandwich norms, q/k norms, GeGLU, scaled embeddings,
interleaved sliding-window (local) and global layers with their own RoPE bases.

Mapping onto the canonical model:
- every Gemma RMSNorm computes x̂ * (1 + w) in fp32; the canonical RMSNorm computes x̂ * w, so
  `1 + w` is folded into the canonical weight at import (exact in fp32);
- embeddings are multiplied by sqrt(hidden_size) (spec.embed_scale), attention scores by
  query_pre_attn_scalar ** -0.5 (spec.attn_scale);
- layer_types decides per layer: sliding → window=sliding_window and the `sliding_attention`
  rope; full → window=None and the `full_attention` rope.

Accepts `gemma3_text` checkpoints and multimodal `gemma3` checkpoints (the text model is read
from `text_config` and the language-model weights; the vision tower is ignored).
"""
from __future__ import annotations

import torch

from ...errors import ModelImportError
from ..spec import LayerSpec, ModelSpec
from .base import Frontend, register_frontend, rope_spec, token_ids
from .llama import _act, decoder_layer_names

# transformers' Gemma3TextConfig defaults, for configs (often a multimodal `text_config`) that
# only list the values differing from them.
TEXT_DEFAULTS = dict(
    vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256,
    hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131_072, rms_norm_eps=1e-6,
    pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True,
    attention_bias=False, query_pre_attn_scalar=256, sliding_window=4096,
    final_logit_softcapping=None, attn_logit_softcapping=None, use_bidirectional_attention=False,
)
DEFAULT_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}

# canonical state-dict prefix of the language model, by checkpoint layout
_PREFIXES = ("model.",                    # Gemma3ForCausalLM
             "model.language_model.",     # Gemma3ForConditionalGeneration, transformers 5
             "language_model.model.")     # Gemma3ForConditionalGeneration, transformers 4


def text_config(cfg: dict) -> dict:
    """The gemma3_text config with defaults filled in (from a `gemma3` config's text_config)."""
    if cfg.get("model_type") == "gemma3":
        tc = cfg.get("text_config")
        if not isinstance(tc, dict):
            raise ModelImportError("gemma3 config.json has no 'text_config' for its text model")
        # token ids / tying may sit at the top level of a multimodal config
        tc = {**{k: cfg[k] for k in ("tie_word_embeddings", "bos_token_id", "eos_token_id",
                                     "pad_token_id") if k in cfg}, **tc}
    else:
        tc = cfg
    return {**TEXT_DEFAULTS, **tc}


def layer_types(cfg: dict) -> list[str]:
    types = cfg.get("layer_types")
    n = int(cfg["num_hidden_layers"])
    if not types:  # older configs: every `sliding_window_pattern`-th layer is global
        pattern = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6)
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    if len(types) != n:
        raise ModelImportError(f"gemma3: {len(types)} layer_types for {n} layers")
    for t in types:
        if t not in DEFAULT_THETA:
            raise ModelImportError(f"gemma3: unknown layer type '{t}'; supported: "
                                   f"{', '.join(DEFAULT_THETA)}")
    return list(types)


def rope_parameters(cfg: dict) -> dict:
    """Per-layer-type rope parameters from either config style: transformers 5
    `rope_parameters` {full_attention: ..., sliding_attention: ...}, or the older `rope_theta`
    (global), `rope_local_base_freq` (local) and `rope_scaling` (global layers only)."""
    given = cfg.get("rope_parameters")
    given = given if isinstance(given, dict) else {}
    if "rope_theta" in given or "rope_type" in given:  # one flat dict: applies to global layers
        given = {"full_attention": given}
    old_theta = {"full_attention": cfg.get("rope_theta"),
                 "sliding_attention": cfg.get("rope_local_base_freq")}
    out = {}
    for t, default in DEFAULT_THETA.items():
        p = dict(given.get(t) or {})
        if t == "full_attention" and not p and cfg.get("rope_scaling"):
            p = dict(cfg["rope_scaling"])
        p.setdefault("rope_type", "default")
        p.setdefault("rope_theta", old_theta[t] if old_theta[t] is not None else default)
        out[t] = p
    return out


@register_frontend
class Gemma3Frontend(Frontend):
    family = "gemma3"
    model_types = ("gemma3_text", "gemma3")

    def spec(self, cfg: dict) -> ModelSpec:
        c = text_config(cfg)
        if c.get("attn_logit_softcapping") is not None:
            raise ModelImportError("gemma3: attention logit soft-capping "
                                   f"(attn_logit_softcapping={c['attn_logit_softcapping']}) "
                                   "is not supported")
        if c.get("use_bidirectional_attention"):
            raise ModelImportError("gemma3: use_bidirectional_attention=true (an encoder) is "
                                   "not supported; only causal language models are")
        H, nh = int(c["hidden_size"]), int(c["num_attention_heads"])
        nkv = int(c.get("num_key_value_heads") or nh)
        hd = int(c.get("head_dim") or H // nh)
        bias = bool(c["attention_bias"])
        rc = {**c, "rope_parameters": rope_parameters(c)}
        layers = tuple(
            LayerSpec(n_heads=nh, n_kv_heads=nkv, head_dim=hd, ffn_dim=int(c["intermediate_size"]),
                      window=int(c["sliding_window"]) if t == "sliding_attention" else None,
                      rope=rope_spec(rc, hd, t), qk_norm=True, qkv_bias=bias, o_bias=bias,
                      sandwich_norm=True)
            for t in layer_types(c))
        cap = c.get("final_logit_softcapping")
        return ModelSpec(family=self.family, vocab_size=int(c["vocab_size"]), hidden_size=H,
                         layers=layers, norm="rms", norm_eps=float(c["rms_norm_eps"]),
                         act=_act(c.get("hidden_activation") or c.get("hidden_act")),
                         gated_mlp=True, embed_scale=H ** 0.5,
                         attn_scale=float(c["query_pre_attn_scalar"]) ** -0.5,
                         final_logit_softcap=None if cap is None else float(cap),
                         tie_embeddings=bool(c["tie_word_embeddings"]),
                         max_positions=int(c["max_position_embeddings"]), **token_ids(c))

    def names(self, spec: ModelSpec, prefix: str = "model.") -> dict[str, str]:
        names = {"embed.weight": f"{prefix}embed_tokens.weight", "norm.weight": f"{prefix}norm.weight"}
        for i, ls in enumerate(spec.layers):
            names.update(decoder_layer_names(i, ls, prefix=f"{prefix}layers"))
        if not spec.tie_embeddings:
            names["lm_head.weight"] = "lm_head.weight"
        return names

    def convert(self, hf: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
        prefix = next((p for p in _PREFIXES if f"{p}embed_tokens.weight" in hf), None)
        if prefix is None:
            raise ModelImportError("gemma3: no embedding weight found (looked for "
                                   + ", ".join(f"'{p}embed_tokens.weight'" for p in _PREFIXES) + ")")
        out = {}
        for ours, theirs in self.names(spec, prefix).items():
            if theirs not in hf:
                raise ModelImportError(f"{self.family}: weight '{theirs}' missing from checkpoint")
            w = hf[theirs].float()
            if ours.endswith("norm.weight"):  # every Gemma RMSNorm scales by (1 + w)
                w = 1.0 + w
            out[ours] = w
        return out

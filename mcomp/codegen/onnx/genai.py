"""genai_config.json: what onnxruntime-genai needs to generate from an exported folder.

The decoder's input/output names are the graph's (model.py); head counts are the first
layer's, and per-layer KV-head counts are read by onnxruntime-genai from each layer's past
KV input shape (a concrete dim), so a pruned model needs nothing extra here. The cache is
shared between past and present (GroupQueryAttention writes the new tokens in place, as the
builder's CPU models do); context_length and max_length are the export's max_length, the
positions its rotary caches cover.
"""
from __future__ import annotations

from ...compiler.spec import ModelSpec
from .lowering import ExportOptions

# mcomp family → onnxruntime-genai model type (its list of decoder-only LLM types)
GENAI_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text"}


def genai_config(spec: ModelSpec, opts: ExportOptions, filename: str = "model.onnx") -> dict:
    first = spec.layers[0]
    eos = list(spec.eos_token_ids)
    return {
        "model": {
            "bos_token_id": spec.bos_token_id if spec.bos_token_id is not None else eos[0],
            "context_length": opts.max_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": first.head_dim,
                "hidden_size": spec.hidden_size,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": first.n_heads,
                "num_hidden_layers": spec.n_layers,
                "num_key_value_heads": first.n_kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": spec.pad_token_id if spec.pad_token_id is not None else eos[0],
            "type": GENAI_TYPES.get(spec.family, "decoder"),
            "vocab_size": spec.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True,
            "length_penalty": 1.0, "max_length": opts.max_length, "min_length": 0,
            "no_repeat_ngram_size": 0, "num_beams": 1, "num_return_sequences": 1,
            "past_present_share_buffer": True, "repetition_penalty": 1.0, "temperature": 1.0,
            "top_k": 1, "top_p": 1.0,
        },
    }

"""Tiny models built in code for fast unit tests (never for quality claims)."""
from __future__ import annotations

import torch

from mcomp.compiler import ir
from mcomp.compiler.context import CompileContext
from mcomp.compiler.spec import LayerSpec, ModelSpec, RopeSpec


def tiny_spec(n_layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
              head_dim: int = 16, ffn: int = 96, vocab: int = 128, **model_kw) -> ModelSpec:
    ls = LayerSpec(n_heads=heads, n_kv_heads=kv_heads, head_dim=head_dim, ffn_dim=ffn,
                   rope=RopeSpec(theta=10000.0, dim=head_dim))
    kw = dict(family="llama", vocab_size=vocab, hidden_size=hidden, layers=(ls,) * n_layers,
              bos_token_id=1, eos_token_ids=(2,))
    kw.update(model_kw)
    return ModelSpec(**kw)


def tiny_gm(spec: ModelSpec | None = None, seed: int = 0, std: float = 0.2):
    """A traced canonical model with random (non-trivial) weights."""
    spec = spec or tiny_spec()
    gm = ir.build(spec)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in gm.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return gm


def tiny_ctx(vocab: int = 128, seed: int = 0) -> CompileContext:
    g = torch.Generator().manual_seed(seed)
    return CompileContext(calib_ids=torch.randint(3, vocab, (4096,), generator=g),
                          probe_ids=torch.randint(3, vocab, (2, 32), generator=g), bos_id=1)


def small_ctx(n_samples: int = 8, seq_len: int = 128) -> CompileContext:
    """tiny_ctx with fewer, shorter calibration windows: keeps calibrated-pass tests fast."""
    import dataclasses

    from mcomp.compiler.context import CalibrationConfig
    return dataclasses.replace(tiny_ctx(), config=CalibrationConfig(n_samples=n_samples, seq_len=seq_len))

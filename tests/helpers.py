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


def kv_map_reference(gm, ids, maps, monkeypatch):
    """Logits of the no-cache forward with every layer's attention replaced by a pure-torch
    oracle that first maps the post-RoPE keys and the values, k, v (B, Hkv, T, D) →
    maps[i](k, v), then runs explicit causal softmax attention with the model's scale (GQA by
    repeating KV heads). The oracle for caches that store a transform of K/V (ThinK's kept
    channels, Eigen's bases)."""
    spec = ir.get_spec(gm)
    for i in range(spec.n_layers):
        mod = gm.get_submodule(f"layers.{i}.attn")

        def fwd(q, k, v, h, state=None, f=maps[i], scale=mod.scale):
            g = q.shape[1] // k.shape[1]
            k, v = (t.repeat_interleave(g, 1) for t in f(k, v))
            s = (q @ k.transpose(-1, -2)) * scale
            T = q.shape[2]
            s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
            return (s.softmax(-1) @ v).transpose(1, 2).flatten(2)
        monkeypatch.setattr(mod, "forward", fwd)
    try:
        with torch.inference_mode():
            return gm(ids, torch.arange(ids.shape[1])[None], None)
    finally:
        monkeypatch.undo()


def kv_state_round_trip(gm, tmp_path, state_names, run):
    """Save `gm` as an artifact (with a minimal tokenizer folder), load it back and check what a
    KV kind's pass stored survives exactly: the layers' kv_state tensors are exactly
    `state_names` per layer, every tensor and every layer's KV spec is equal. Returns the logits
    `run(model)` gives for the original and for the loaded model, for the caller's tolerance
    (the same tensors; GEMM blocking over differently aligned mmap'd copies may differ)."""
    from mcomp.codegen import load_artifact, save_artifact
    tok = tmp_path / "hf"
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    (tok / "tokenizer_config.json").write_text('{"bos_token": "<s>"}')
    (tok / "special_tokens_map.json").write_text("{}")
    art = load_artifact(save_artifact(gm, tmp_path / "art", tokenizer_dir=tok, source="tiny"))
    sa, sb = gm.state_dict(), art.gm.state_dict()
    n = ir.get_spec(gm).n_layers
    assert {k for k in sb if ".kv_state." in k} == {f"layers.{i}.kv_state.{s}" for i in range(n)
                                                   for s in state_names}
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert ir.get_spec(art.gm).layers == ir.get_spec(gm).layers
    return run(gm), run(art.gm)

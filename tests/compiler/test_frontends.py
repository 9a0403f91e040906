"""Frontend parity: canonical model vs the HF transformers model, fp32, tiny random configs.

Every parameter (biases and norm weights included) is re-drawn at random after HF's init, so a
missing bias, a wrong transpose or a norm mapped to the wrong slot shows up in the logits.
Sliding-window configs use a window smaller than the sequence, and the test checks that the
window actually changes the logits (so agreeing on them means something).
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mcomp.compiler import ir  # noqa: E402
from mcomp.compiler.frontend import FRONTENDS, import_model  # noqa: E402
from mcomp.compiler.frontend.gemma3 import Gemma3Frontend  # noqa: E402
from mcomp.errors import ModelImportError  # noqa: E402

TOL = 1e-4
B, T = 2, 24
VOCAB = 160
WINDOW = 8

SMALL = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, vocab_size=VOCAB,
             max_position_embeddings=128)


def _randomize(model: torch.nn.Module, *, norm_offset: float) -> None:
    """Redraw every parameter; norm weights around `norm_offset` (1 for x̂*w, 0 for gemma's x̂*(1+w))."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mname, mod in model.named_modules():
            is_norm = "norm" in type(mod).__name__.lower()
            for pname, p in mod.named_parameters(recurse=False):
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
                if is_norm and pname == "weight":
                    p.add_(norm_offset)


def _hf(config, *, norm_offset: float = 1.0):
    torch.manual_seed(0)
    # sdpa: the same attention kernel as the canonical model, so parity is bit-exact except
    # where the math differs on purpose (gpt2's gelu_new formula vs F.gelu(approximate="tanh"))
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    _randomize(model, norm_offset=norm_offset)
    return model.eval()


def _inputs(vocab: int = VOCAB):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    pos = torch.arange(T)[None].expand(B, T)
    return ids, pos


def _logits(imported, ids, pos, spec=None):
    gm = ir.build(spec or imported.spec, imported.state_dict)
    with torch.no_grad():
        return gm(ids, pos)


def check_parity(hf_model, path, *, vocab: int = VOCAB, window_matters: bool = False):
    imported = import_model(path)
    ids, pos = _inputs(vocab)
    with torch.no_grad():
        ref = hf_model(input_ids=ids).logits.float()
    ours = _logits(imported, ids, pos)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape == (B, T, imported.spec.vocab_size)
    diff = (ours - ref).abs().max().item()
    assert diff <= TOL, f"{imported.spec.family}: max |Δlogit| {diff:.3g} > {TOL}"
    if window_matters:  # the same weights with global attention everywhere must disagree
        windows = [ls.window for ls in imported.spec.layers]
        assert any(w is not None and w < T for w in windows), windows
        glob = dataclasses.replace(imported.spec, layers=tuple(
            dataclasses.replace(ls, window=None) for ls in imported.spec.layers))
        assert (_logits(imported, ids, pos, glob) - ref).abs().max().item() > 100 * TOL
    return imported, diff


# ----------------------------------------------------------------------------- parity

def test_llama(save_hf):
    cfg = transformers.LlamaConfig(**SMALL, num_hidden_layers=2, num_key_value_heads=2,
                                   tie_word_embeddings=False)
    model = _hf(cfg)
    imp, _ = check_parity(model, save_hf(model))
    assert imp.spec.family == "llama" and not imp.spec.tie_embeddings


def test_mistral_sliding_window(save_hf):
    cfg = transformers.MistralConfig(**SMALL, num_hidden_layers=2, num_key_value_heads=2,
                                     sliding_window=WINDOW, tie_word_embeddings=True)
    model = _hf(cfg)
    imp, _ = check_parity(model, save_hf(model), window_matters=True)
    assert [ls.window for ls in imp.spec.layers] == [WINDOW, WINDOW]


def test_qwen2_bias_and_sliding_layers(save_hf):
    # layers from max_window_layers on slide (transformers' Qwen2 rule)
    cfg = transformers.Qwen2Config(**SMALL, num_hidden_layers=3, num_key_value_heads=2,
                                   use_sliding_window=True, sliding_window=WINDOW,
                                   max_window_layers=1, tie_word_embeddings=True)
    model = _hf(cfg)
    imp, _ = check_parity(model, save_hf(model), window_matters=True)
    assert [ls.window for ls in imp.spec.layers] == [None, WINDOW, WINDOW]
    assert all(ls.qkv_bias and not ls.o_bias for ls in imp.spec.layers)


def test_qwen3_qk_norm_explicit_head_dim(save_hf):
    cfg = transformers.Qwen3Config(**SMALL, num_hidden_layers=2, num_key_value_heads=2,
                                   head_dim=32, tie_word_embeddings=False)
    model = _hf(cfg)
    imp, _ = check_parity(model, save_hf(model))
    ls = imp.spec.layers[0]
    assert (ls.head_dim, ls.q_dim, ls.qk_norm, ls.qkv_bias) == (32, 128, True, False)


def _gemma3_text_config(**over):
    kw = dict(**SMALL, num_hidden_layers=4, num_key_value_heads=2, head_dim=32,
              query_pre_attn_scalar=24, sliding_window=WINDOW,
              layer_types=["sliding_attention", "sliding_attention", "full_attention",
                           "sliding_attention"],
              rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                               "full_attention": {"rope_type": "default", "rope_theta": 1_000.0}})
    kw.update(over)
    return transformers.Gemma3TextConfig(**kw)


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_gemma3_text(save_hf, softcap):
    model = _hf(_gemma3_text_config(final_logit_softcapping=softcap), norm_offset=0.0)
    imp, _ = check_parity(model, save_hf(model), window_matters=True)
    s = imp.spec
    assert [ls.window for ls in s.layers] == [WINDOW, WINDOW, None, WINDOW]
    assert [ls.rope.theta for ls in s.layers] == [10_000.0, 10_000.0, 1_000.0, 10_000.0]
    assert s.embed_scale == 64 ** 0.5 and s.attn_scale == 24 ** -0.5
    assert s.final_logit_softcap == softcap and s.act == "gelu_tanh"


def test_gemma3_multimodal_checkpoint(save_hf):
    """A `gemma3` (image-text) checkpoint imports its language model; the vision tower is ignored."""
    text = _gemma3_text_config(vocab_size=VOCAB + 4)
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=2,
                                             image_size=28, patch_size=14)
    cfg = transformers.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                    mm_tokens_per_image=4, boi_token_index=VOCAB + 1,
                                    eoi_token_index=VOCAB + 2, image_token_index=VOCAB + 3)
    model = _hf(cfg, norm_offset=0.0)
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    imp, _ = check_parity(model, save_hf(model), window_matters=True)
    assert imp.spec.family == "gemma3" and imp.spec.vocab_size == VOCAB + 4


def test_gpt2(save_hf):
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                  vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)
    model = _hf(cfg)
    imp, _ = check_parity(model, save_hf(model))
    s = imp.spec
    assert (s.norm, s.learned_positions, s.gated_mlp, s.layers[0].rope) == ("layer", 64, False, None)


# ----------------------------------------------------------------------------- config mapping

def test_gemma3_older_config_style_maps_like_new():
    """rope_theta / rope_local_base_freq / sliding_window_pattern (no layer_types) give the same spec."""
    new = _gemma3_text_config(num_hidden_layers=7, layer_types=None,
                              rope_parameters={"sliding_attention": {"rope_theta": 10_000.0},
                                               "full_attention": {"rope_theta": 1_000.0}})
    new = new.to_dict()
    old = {k: v for k, v in new.items() if k not in ("layer_types", "rope_parameters",
                                                    "_sliding_window_pattern")}
    old.update(rope_theta=1_000.0, rope_local_base_freq=10_000.0, sliding_window_pattern=6)
    fe = Gemma3Frontend()
    s_new, s_old = fe.spec(new), fe.spec(old)
    assert s_new == s_old
    assert [ls.window for ls in s_old.layers] == [WINDOW] * 5 + [None, WINDOW]
    assert [ls.rope.theta for ls in s_old.layers] == [10_000.0] * 5 + [1_000.0, 10_000.0]


def _config_only(tmp_path, cfg: dict):
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def test_gemma3_attn_softcap_is_rejected(tmp_path):
    cfg = _gemma3_text_config(attn_logit_softcapping=50.0).to_dict()
    with pytest.raises(ModelImportError, match="attn_logit_softcapping"):
        import_model(_config_only(tmp_path, cfg))


def test_gpt2_per_layer_attn_scale_is_rejected(tmp_path):
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4,
                                  scale_attn_by_inverse_layer_idx=True).to_dict()
    with pytest.raises(ModelImportError, match="scale_attn_by_inverse_layer_idx"):
        import_model(_config_only(tmp_path, cfg))


# ----------------------------------------------------------------------------- bad sources

@pytest.mark.parametrize("model_type", ["bert", "mamba"])
def test_unknown_architecture_lists_supported(tmp_path, model_type):
    with pytest.raises(ModelImportError) as e:
        import_model(_config_only(tmp_path, {"model_type": model_type}))
    msg = str(e.value)
    assert model_type in msg
    for mt in ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma3", "gpt2"):
        assert mt in FRONTENDS and mt in msg


def test_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelImportError, match="config.json"):
        import_model(tmp_path)


def test_random_non_gguf_file(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(torch.randint(0, 256, (256,), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(ModelImportError, match="neither a HF folder nor a GGUF"):
        import_model(f)


def test_missing_path(tmp_path):
    with pytest.raises(ModelImportError, match="not found"):
        import_model(tmp_path / "nope")


def test_missing_weight_is_named(save_hf):
    cfg = transformers.Qwen3Config(**SMALL, num_hidden_layers=1, num_key_value_heads=2)
    path = save_hf(_hf(cfg))
    from safetensors.torch import load_file, save_file
    sd = load_file(path / "model.safetensors")
    del sd["model.layers.0.self_attn.k_norm.weight"]
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelImportError, match="k_norm"):
        import_model(path)

"""The transformers reference-cache harness of bench_kv.py (mcomp.bench.hf_kv_reference), on a
tiny random HF llama: streaming through a DynamicCache reproduces the no-cache logits, and the
quanto-quantized caches measurably do not (the harness sees the compression)."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("optimum.quanto")

from mcomp.bench import hf_kv_reference as ref  # noqa: E402

TOL = 1e-4
VOCAB = 160
T = 150            # > residual_length 128: the quantized store is flushed (re-quantized) once


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(one_thread):
    # head_dim 32 = q_group_size: with quanto's axis 0 each group is one token's head vector
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=2,
                                   num_key_value_heads=1, num_hidden_layers=2, vocab_size=VOCAB,
                                   max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.15 + (1.0 if "norm" in name else 0.0))
    return m.eval()


@pytest.fixture(scope="module")
def windows():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, VOCAB, (2, T), generator=g)
    ids[:, 0] = 1                                                   # BOS first, as make_windows
    return ids


@pytest.fixture(scope="module")
def no_cache(model, windows):
    with torch.no_grad():
        return model(input_ids=windows, use_cache=False).logits.float()


def test_stream_dynamic_equals_no_cache(model, windows, no_cache):
    st = ref.stream_logits(model, windows, ref.make_cache(model, ref.REFERENCES["dynamic"]))
    assert st.shape == no_cache.shape
    assert (st - no_cache).abs().max().item() <= TOL


@pytest.mark.parametrize("name", ["quanto2", "quanto4"])
def test_stream_quanto_differs(model, windows, no_cache, name):
    cache = ref.make_cache(model, ref.REFERENCES[name])
    st = ref.stream_logits(model, windows, cache)
    # the first token (BOS) is quantized at once: every later step already sees the loss
    assert (st[:, 1:] - no_cache[:, 1:]).abs().amax(-1).min().item() > TOL
    assert (st - no_cache).abs().max().item() > (0.05 if name == "quanto2" else 0.005)
    # after T tokens the store holds 129 (BOS + 128 flushed at step 128), the residual the rest
    state = ref.cache_bytes(cache)
    assert state["quantized_tokens"] == 2 * 129
    bits = ref.REFERENCES[name].nbits
    # per token per layer: K and V, 1 KV head × 32 values: codes + fp32 scale and shift per 32
    per_tok = 2 * 2 * (32 * bits / 8 + 8)
    assert state["quantized_bytes"] / state["quantized_tokens"] == pytest.approx(per_tok, rel=0.02)
    assert state["fp_bytes"] == 2 * 2 * 2 * (T - 129) * 32 * 4


def test_streaming_eval_metrics(model, windows):
    dyn = ref.streaming_eval(model, windows, ref.REFERENCES["dynamic"], batch_size=2)
    assert dyn["tokens_scored"] == 2 * (T - 1) and dyn["mode"] == "stream"
    assert dyn["kld"] < 1e-6 and dyn["top1_agreement"] == 1.0
    assert dyn["ppl"] == pytest.approx(dyn["base_ppl"], rel=1e-5)
    assert dyn["kv_bytes_per_token"] == 2 * 2 * 32 * 4             # dense fp32 K+V, 2 layers
    q2 = ref.streaming_eval(model, windows, ref.REFERENCES["quanto2"], batch_size=1)
    assert q2["kld"] > 1e-3 and q2["base_ppl"] == pytest.approx(dyn["base_ppl"], rel=1e-5)
    assert q2["kv_bytes_per_token"] < dyn["kv_bytes_per_token"]
    assert q2["kv_bytes_per_token_fp16_scales"] < q2["kv_bytes_per_token"]


def test_quanto_per_channel_keys_fail_in_streaming(model, windows):
    """Why the reference uses axis_key=0: quanto's axis -1 groups run over B·H·T rows, and the
    first decoded token gives B·H rows < q_group_size (documented in the module)."""
    per_channel = ref.ReferenceCache("q2k", "", "quanto", nbits=2, axis_key=-1, axis_value=0,
                                     q_group_size=32, residual_length=128)
    with pytest.raises(ValueError, match="Group size"):
        ref.stream_logits(model, windows[:1, :4], ref.make_cache(model, per_channel))


def test_unknown_reference():
    from mcomp.errors import ConfigError
    with pytest.raises(ConfigError, match="quanto2"):
        ref.get_reference("quanto3")

"""KIVI online key rotation (KVSpec.k_rotation="hadamard"): exact in full precision, quantized
keys stored in the rotated basis, fast kernel = reference with the rotation on.

Tolerances:
- rotation vs no rotation with nothing quantized (residual window ≥ sequence): attention
  outputs / logits equal within atol = rtol = 1e-5 (fp32; the only difference is the rounding of
  q·R and k·R before the dot products, observed ~1e-6).
- kernel vs reference through a model with the rotation on: in tests/runtime/test_kivi.py
  (test_streaming_with_kernel_equals_reference_through_model, same 1e-4).
"""
from __future__ import annotations

import pytest
import torch

from mcomp.compiler.hadamard import hadamard
from mcomp.compiler.spec import KVSpec, LayerSpec
from mcomp.errors import ConfigError
from mcomp.runtime.kv.dense import DenseParams
from mcomp.runtime.kv.kivi import KIVICache, KIVIParams

from helpers import tiny_gm, tiny_spec
from test_kivi import stream_logits, with_kv

def kv(rot="hadamard", bits=2, g=4, r=4, sink=1):
    return KVSpec("kivi", KIVIParams(k_bits=bits, v_bits=bits, group_size=g, residual=r,
                                     sink=sink, k_rotation=rot))


def test_spec_validation_and_serialization():
    s = kv()
    assert KVSpec.from_dict(s.to_dict()) == s
    d = s.to_dict()
    del d["params"]["k_rotation"]
    assert KVSpec.from_dict(d) == kv("none")
    assert KVSpec().to_dict() == {"kind": "dense", "params": {"dtype": "float32", "version": 1}}
    with pytest.raises(ConfigError, match="k_rotation 'x' not in none, hadamard"):
        kv("x")
    with pytest.raises(ConfigError, match="unknown field"):
        DenseParams.from_dict({"k_rotation": "hadamard"})
    with pytest.raises(ConfigError, match="head_dim=12 is not a power of two"):
        LayerSpec(n_heads=2, n_kv_heads=1, head_dim=12, ffn_dim=8, kv=kv(g=4))
    LayerSpec(n_heads=2, n_kv_heads=1, head_dim=24, ffn_dim=8, kv=kv(g=4))   # blocks of 8


def test_keys_are_quantized_in_the_rotated_basis():
    ls = LayerSpec(n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=8, kv=kv(bits=8, sink=0, r=0))
    c = KIVICache(ls, 1)
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, 2, 8, 16, generator=g), torch.randn(1, 2, 8, 16, generator=g)
    q = torch.randn(1, 4, 8, 16, generator=g)
    c.attend(q, k, v, 0.25, None)
    K, V = c.full_kv()
    assert c.n_q == 8
    R = hadamard(16)
    torch.testing.assert_close(K, k @ R, atol=0.05, rtol=0)     # 8-bit codes of the rotated keys
    torch.testing.assert_close(V, v, atol=0.05, rtol=0)         # values are not rotated


@pytest.mark.parametrize("window", [None, 6])
def test_rotation_is_exact_without_quantization(window):
    """Residual window longer than the sequence: nothing is quantized, so the rotated cache must
    reproduce the unrotated one (prefill chunk and decode steps, reference and kernel paths)."""
    def gm_for(rot):
        spec = with_kv(tiny_spec(), kv(rot, r=64, sink=0))
        if window:
            spec = spec.with_layer(1, window=window)
        return tiny_gm(spec)

    ids = torch.randint(3, 128, (2, 30), generator=torch.Generator().manual_seed(5))
    plain, rotated = stream_logits(gm_for("none"), ids, prefill=7), stream_logits(gm_for("hadamard"), ids, prefill=7)
    torch.testing.assert_close(rotated, plain, atol=1e-5, rtol=1e-5)


def test_rotation_changes_the_quantized_model():
    ids = torch.randint(3, 128, (2, 30), generator=torch.Generator().manual_seed(6))
    a = stream_logits(tiny_gm(with_kv(tiny_spec(), kv("none"))), ids, prefill=5)
    b = stream_logits(tiny_gm(with_kv(tiny_spec(), kv("hadamard"))), ids, prefill=5)
    assert (a - b).abs().max() > 1e-3    # different keys get quantized: a real change


def test_quantize_before_attend_equals_streaming_with_rotation():
    # One layer: the keys that get quantized come straight from the embeddings, identical in the
    # 40-token chunk and in the one-token steps, so no 2-bit code can flip on a rounding boundary
    # and the paths differ only by fp32 reassociation (observed ≤ 3e-5). With two layers, ~1e-6
    # differences in layer 0's output flip layer-1 codes and the gap is seed-dependent noise of up
    # to ~2e-3 (with or without rotation), which would hide nothing a tolerance could catch.
    gm = tiny_gm(with_kv(tiny_spec(n_layers=1), kv()), seed=4)
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(stream_logits(gm, ids, quantize_before_attend=True, prefill=40),
                               stream_logits(gm, ids), atol=1e-4, rtol=1e-4)

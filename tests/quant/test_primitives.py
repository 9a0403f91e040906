"""Pack/unpack, QuantLinear storage and WeightScheme validation against independent oracles."""
from __future__ import annotations

import pytest
import torch

from mcomp.errors import ConfigError
from mcomp.quant import primitives as P
from mcomp.quant.linear import QuantLinear
from mcomp.quant.scheme import WeightScheme

KS = (1, 7, 13, 576, 577)


def oracle_dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, g: int) -> torch.Tensor:
    """w = (q − z)·s with per-(row, group) s, z expanded column by column; last group partial."""
    K = q.shape[1]
    s = scale.float().repeat_interleave(g, dim=1)[:, :K]                   # (N, K)
    z = zero.float().repeat_interleave(g, dim=1)[:, :K]
    return (q.float() - z) * s


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("K", KS)
def test_pack_unpack_round_trip(bits, K):
    g = torch.Generator().manual_seed(bits * 1000 + K)
    q = torch.randint(0, 2 ** bits, (5, K), generator=g, dtype=torch.uint8)
    p = P.pack(q, bits)
    assert p.dtype == torch.uint8
    assert p.shape == (5, WeightScheme(bits=bits, group_size=0).packed_cols(K))
    assert torch.equal(P.unpack(p, bits, K), q)


def test_pack_layout_known_answer():
    """The byte layout is the artifact format (and what ONNX MatMulNBits reads): low bits first."""
    assert P.pack(torch.tensor([[1, 2]], dtype=torch.uint8), 4).tolist() == [[0x21]]
    assert P.pack(torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8), 2).tolist() == [[0b00111001]]
    # 3-bit: 8 codes → one little-endian 24-bit word, code j at bits [3j, 3j+3)
    codes = list(range(8))
    word = sum(c << (3 * j) for j, c in enumerate(codes))
    assert P.pack(torch.tensor([codes], dtype=torch.uint8), 3).tolist() == \
        [[word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF]]
    # a partial 3-bit block keeps only the bytes it needs: 3 codes = 9 bits → 2 bytes
    assert P.pack(torch.tensor([[7, 7, 7]], dtype=torch.uint8), 3).tolist() == [[0xFF, 0x01]]
    assert P.pack(torch.tensor([[200, 3]], dtype=torch.uint8), 8).tolist() == [[200, 3]]


SCHEMES = [
    WeightScheme(bits=4, group_size=128),
    WeightScheme(bits=4, group_size=128, symmetric=True),
    WeightScheme(bits=3, group_size=64, scale_dtype="bfloat16"),
    WeightScheme(bits=2, group_size=32, scale_dtype="float32"),
    WeightScheme(bits=8, group_size=0),
    WeightScheme(bits=8, group_size=0, symmetric=True),
    WeightScheme(bits=4, group_size=1024),                 # one group wider than the row
]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: f"{s.label()}-{s.scale_dtype}")
@pytest.mark.parametrize("K", (13, 576, 577, 640))
def test_from_codes_dequantize_matches_oracle(scheme, K):
    N = 6
    gen = torch.Generator().manual_seed(K)
    G, qmax = scheme.groups(K), 2 ** scheme.bits - 1
    assert G == -(-K // scheme.effective_group(K))
    codes = torch.randint(0, qmax + 1, (N, K), generator=gen, dtype=torch.uint8)
    scale = 0.01 + torch.rand(N, G, generator=gen)
    zero = (torch.rand(N, G, generator=gen) * qmax).round()
    m = QuantLinear.from_codes(codes, scale, zero, scheme)
    assert torch.equal(m.codes(), codes)
    assert m.scales.dtype == P.scale_dtype(scheme) and m.scales.shape == (N, G)
    stored_s = scale.to(P.scale_dtype(scheme)).float()
    if scheme.symmetric:
        assert m.zeros is None
        stored_z = torch.full((N, G), float(2 ** (scheme.bits - 1)))
    else:
        stored_z = zero.to(P.scale_dtype(scheme)).float()
    want = oracle_dequantize(codes, stored_s, stored_z, scheme.effective_group(K))
    assert torch.equal(m.dequantize(), want)


@pytest.mark.parametrize("scheme", SCHEMES + [WeightScheme(bits=3, group_size=0, symmetric=True)],
                         ids=lambda s: f"{s.label()}-{s.scale_dtype}")
@pytest.mark.parametrize("N,K", [(3, 13), (8, 576), (5, 577), (2, 1)])
def test_nbytes_equals_stored_buffers(scheme, N, K):
    m = QuantLinear(K, N, scheme, bias=True)
    stored = sum(t.numel() * t.element_size() for name, t in m.state_dict().items() if name != "bias")
    assert scheme.nbytes(N, K) == stored


@pytest.mark.parametrize("kwargs", [
    dict(bits=5), dict(bits=1), dict(bits=16), dict(group_size=12), dict(group_size=-8),
    dict(group_size=4), dict(scale_dtype="int8"),
])
def test_invalid_scheme_raises(kwargs):
    with pytest.raises(ConfigError):
        WeightScheme(**kwargs)


def test_scheme_serialization():
    s = WeightScheme(bits=3, group_size=64, symmetric=True, scale_dtype="bfloat16", method="rtn")
    assert WeightScheme.from_dict(s.to_dict()) == s
    with pytest.raises(ConfigError, match="unknown"):
        WeightScheme.from_dict({**s.to_dict(), "bogus": 1})
    with pytest.raises(ConfigError, match="version"):
        WeightScheme.from_dict({**s.to_dict(), "version": 99})
    with pytest.raises(ConfigError):
        WeightScheme.from_dict({**s.to_dict(), "bits": 5})


def test_group_helpers():
    s = WeightScheme(bits=4, group_size=128)
    assert s.groups(576) == 5 and s.effective_group(576) == 128
    assert s.groups(512) == 4 and s.groups(100) == 1
    pc = WeightScheme(bits=4, group_size=0)
    assert pc.groups(576) == 1 and pc.effective_group(576) == 576
    mask = P.group_mask(576, 128)
    assert mask.shape == (5, 128) and mask.sum() == 576 and mask[4].sum() == 64
    padded = P.pad_groups(torch.ones(2, 576), 128)
    assert padded.shape == (2, 5, 128) and padded[:, 4, 64:].abs().sum() == 0

"""Quantized token embedding (QuantEmbedding) and the tied lm_head that shares its tensors:
gather semantics, ties kept through the quantizers and through an artifact round trip, untied
models, and float-embedding (format version 1) artifacts. Tiny models built in code."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from mcomp import api
from mcomp.codegen import load_artifact, save_artifact, verify_artifact
from mcomp.codegen.manifest import DIGEST_KEY, TensorInfo, manifest_digest
from mcomp.compiler import ir, verify
from mcomp.compiler.recipe import Recipe, parse_weights_flag
from mcomp.errors import ArtifactError, ConfigError
from mcomp.quant import primitives as P
from mcomp.quant.embedding import QuantEmbedding, head_is_tied
from mcomp.quant.gptq import GPTQConfig, QuantizeWeightsGPTQ
from mcomp.quant.hqq import HQQConfig, QuantizeWeightsHQQ
from mcomp.quant.linear import QuantLinear
from mcomp.quant.rtn import QuantizeWeightsRTN, RTNConfig
from mcomp.quant.scheme import WeightScheme

from tests.helpers import small_ctx, tiny_gm, tiny_spec

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
POS = torch.arange(12).expand(2, -1)


def _logits(gm):
    with torch.no_grad():
        return gm(IDS, POS)


def _rtn(**kw):
    return QuantizeWeightsRTN(RTNConfig(bits=4, group_size=32, **kw))


def _stored_bytes(manifest: dict) -> int:
    return sum(TensorInfo(t["dtype"], tuple(t["shape"])).nbytes for t in manifest["tensors"].values())


# ----------------------------------------------------------------------------- the module

@pytest.mark.parametrize("bits,group,symmetric", [(2, 16, False), (3, 32, False), (4, 32, False),
                                                  (4, 48, True), (8, 0, False), (8, 0, True)])
def test_forward_is_dequantize_then_embedding(bits, group, symmetric):
    """Bit-exact: gathering packed rows and dequantizing them == F.embedding of the whole table."""
    V, H = 50, 72                        # 72 = a partial last group for g32 and g48
    scheme = WeightScheme(bits=bits, group_size=group, symmetric=symmetric)
    w = torch.randn(V, H, generator=torch.Generator().manual_seed(bits))
    s, z = P.rtn_params(w, scheme)
    codes = P.quantize_codes(w, s, z, bits, scheme.effective_group(H))
    emb = QuantEmbedding.from_codes(codes, s, z, scheme)
    ids = torch.tensor([[0, 7, 7, 49], [3, 0, 12, 48]])           # repeats, first and last rows
    out = emb(ids)
    assert out.shape == (2, 4, H) and out.dtype == torch.float32
    assert torch.equal(out, F.embedding(ids, emb.dequantize()))
    assert emb.num_embeddings == V and emb.embedding_dim == H


def test_embedding_has_no_bias():
    with pytest.raises(ConfigError, match="no bias"):
        QuantEmbedding(8, 16, WeightScheme(), bias=True)


# ----------------------------------------------------------------------------- quantizers

def test_tied_rtn_shares_one_table():
    gm = tiny_gm()
    res = _rtn(embedding_bits=8, embedding_group_size=0).run(gm, None)
    gm = res.gm
    embed, head = gm.embed, gm.lm_head
    assert isinstance(embed, QuantEmbedding) and type(head) is QuantLinear
    assert head.qweight is embed.qweight and head.scales is embed.scales and head.zeros is embed.zeros
    assert head_is_tied(gm) and ir.get_spec(gm).tie_embeddings
    assert embed.scheme == head.scheme and embed.scheme.label() == "rtn:int8:per-channel:asym"
    assert res.stats["embedding"]["tied_head"] is True
    assert res.stats["skipped"] == [{"node": "lm_head", "reason": "tied to the quantized embedding"}]
    # the head computes with the table's dequantized weight (reference kernel: exact)
    x = torch.randn(3, 64)
    from mcomp.runtime.kernels import reference_mode
    with reference_mode():
        assert torch.equal(head(x), F.linear(x, embed.dequantize()))
    # counted once: every stored tensor except the head's (which are the embedding's)
    sd = gm.state_dict()
    assert ir.weight_bytes(gm) == sum(t.numel() * t.element_size() for k, t in sd.items()
                                      if not k.startswith("lm_head."))
    verify.check_structure(gm)


def test_quantized_embedding_and_asked_for_head_stay_tied():
    """skip_roles=() asks for the head too: with a quantized tied table it follows the table
    instead of getting (and untying into) a copy of its own."""
    gm = _rtn(embedding_bits=4, skip_roles=()).run(tiny_gm(), None).gm
    assert ir.get_spec(gm).tie_embeddings and head_is_tied(gm)
    assert gm.lm_head.scheme.group_size == 32


def test_hqq_fits_the_embedding_with_its_solver():
    gm = tiny_gm()
    w = gm.embed.weight.detach().clone()
    res = QuantizeWeightsHQQ(HQQConfig(bits=4, group_size=32, embedding_bits=4)).run(gm, None)
    gm = res.gm
    assert gm.embed.scheme.method == "hqq" and head_is_tied(gm)
    rtn = _rtn(embedding_bits=4).run(tiny_gm(), None).gm     # same weights (seed 0)
    err = lambda m: (m.embed.dequantize() - w).abs().mean()  # noqa: E731
    assert err(gm) < err(rtn)                                # HQQ minimizes |W − W_r|


def test_gptq_quantizes_the_embedding_with_rtn():
    gm = QuantizeWeightsGPTQ(GPTQConfig(bits=4, group_size=32, embedding_bits=8,
                                        embedding_group_size=0)).run(tiny_gm(), small_ctx()).gm
    assert gm.embed.scheme.method == "rtn" and head_is_tied(gm)
    assert gm.get_submodule("layers.0.q_proj").scheme.method == "gptq"


def test_untied_model_quantizes_embedding_and_head_independently():
    spec = tiny_spec(tie_embeddings=False)
    gm = _rtn(embedding_bits=8, embedding_group_size=0, skip_roles=()).run(tiny_gm(spec), None).gm
    assert isinstance(gm.embed, QuantEmbedding) and type(gm.lm_head) is QuantLinear
    assert gm.lm_head.qweight is not gm.embed.qweight
    assert gm.embed.scheme.bits == 8 and gm.lm_head.scheme.bits == 4
    assert not ir.get_spec(gm).tie_embeddings
    # default skip list: the untied head stays float
    gm = _rtn(embedding_bits=4).run(tiny_gm(spec), None).gm
    assert isinstance(gm.embed, QuantEmbedding) and isinstance(gm.lm_head, nn.Linear)


def test_float_embedding_by_default():
    gm = _rtn().run(tiny_gm(), None).gm
    assert isinstance(gm.embed, nn.Embedding) and gm.lm_head.weight is gm.embed.weight


def test_config_validation():
    with pytest.raises(ConfigError, match="embedding_bits=5"):
        RTNConfig(embedding_bits=5)
    with pytest.raises(ConfigError, match="group size"):
        RTNConfig(embedding_bits=4, embedding_group_size=12)
    assert RTNConfig().embedding_scheme() is None
    assert RTNConfig(bits=4, group_size=64, embedding_bits=4).embedding_scheme().group_size == 64


# ----------------------------------------------------------------------------- artifacts

@pytest.mark.parametrize("quantizer", ["rtn8", "hqq4"])
def test_tied_round_trip(tmp_path, quantizer):
    if quantizer == "rtn8":
        gm = _rtn(embedding_bits=8, embedding_group_size=0).run(tiny_gm(), None).gm
    else:
        gm = QuantizeWeightsHQQ(HQQConfig(bits=4, group_size=32, embedding_bits=4)).run(tiny_gm(), None).gm
    path = save_artifact(gm, tmp_path / "a", tokenizer_dir=None, source="tiny")
    art = load_artifact(path)
    assert torch.equal(_logits(gm), _logits(art.gm))            # rtol = atol = 0
    g2 = art.gm
    assert isinstance(g2.embed, QuantEmbedding) and head_is_tied(g2)
    assert g2.lm_head.qweight is g2.embed.qweight and ir.get_spec(g2).tie_embeddings
    m = art.manifest
    assert m["format_version"] == 3
    assert m["weights"]["embed"]["kind"] == "quantized"
    assert m["weights"]["embed"]["scheme"] == gm.embed.scheme.to_dict()
    assert m["weights"]["lm_head"]["tied_to"] == "embed" and m["weights"]["lm_head"]["bytes"] == 0
    assert m["weights"]["lm_head"]["scheme"] == m["weights"]["embed"]["scheme"]
    assert not any(k.startswith("lm_head.") for k in m["tensors"])
    assert "embed.qweight" in m["tensors"] and "embed.weight" not in m["tensors"]
    # one copy in the artifact: the stored bytes are the IR's weight bytes, before and after load
    assert _stored_bytes(m) == ir.weight_bytes(gm) == ir.weight_bytes(g2)
    assert m["weights"]["embed"]["bytes"] == gm.embed.scheme.nbytes(128, 64)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert f.metadata()["format_version"] == "3"
    # a loaded artifact saves again unchanged
    again = load_artifact(save_artifact(g2, tmp_path / "b", tokenizer_dir=None, source="tiny"))
    assert torch.equal(_logits(g2), _logits(again.gm))


def test_untied_round_trip(tmp_path):
    spec = tiny_spec(tie_embeddings=False)
    gm = _rtn(embedding_bits=8, embedding_group_size=0, skip_roles=()).run(tiny_gm(spec), None).gm
    art = load_artifact(save_artifact(gm, tmp_path / "a", tokenizer_dir=None, source="tiny"))
    assert torch.equal(_logits(gm), _logits(art.gm))
    w = art.manifest["weights"]
    assert "tied_to" not in w["lm_head"] and w["lm_head"]["bytes"] > 0
    assert w["embed"]["scheme"]["bits"] == 8 and w["lm_head"]["scheme"]["bits"] == 4
    assert art.gm.lm_head.qweight is not art.gm.embed.qweight


def test_float_embedding_artifact_layout(tmp_path):
    """An fp-embedding artifact keeps the version-1 weight layout (no `embed` entry,
    `embed.weight` stored, head tied as before) inside a version-3 manifest."""
    gm = _rtn().run(tiny_gm(), None).gm
    path = save_artifact(gm, tmp_path / "a", tokenizer_dir=None, source="tiny")
    m = json.loads((path / "manifest.json").read_text())
    assert m["format_version"] == 3 and "embed" not in m["weights"]
    assert m["weights"]["lm_head"] == {"kind": "float", "shape": [128, 64], "scheme": None,
                                       "bytes": 0, "tied_to": "embed"}
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "mcomp-artifact", "format_version": "3"}
    art = load_artifact(path)
    assert torch.equal(_logits(gm), _logits(art.gm))
    assert art.gm.lm_head.weight is art.gm.embed.weight


def _tamper(path, edit):
    mpath = path / "manifest.json"
    m = json.loads(mpath.read_text())
    edit(m)
    m[DIGEST_KEY] = manifest_digest(m)
    mpath.write_text(json.dumps(m))


@pytest.fixture
def tied_artifact(tmp_path):
    gm = _rtn(embedding_bits=4).run(tiny_gm(), None).gm
    return save_artifact(gm, tmp_path / "a", tokenizer_dir=None, source="tiny")


def test_version_1_manifest_with_embedding_entry_is_rejected(tied_artifact):
    _tamper(tied_artifact, lambda m: m.update(format_version=1))
    with pytest.raises(ArtifactError, match="needs format version 2") as e:
        verify_artifact(tied_artifact)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("edit,what", [
    (lambda m: m["weights"]["lm_head"]["scheme"].update(bits=8), "lm_head is tied"),
    (lambda m: m["weights"]["lm_head"].update(kind="float", scheme=None), "lm_head is tied"),
    (lambda m: m["weights"]["embed"].update(shape=[64, 128]), "'embed' has shape"),
])
def test_inconsistent_embedding_entries_are_rejected(tied_artifact, edit, what):
    _tamper(tied_artifact, edit)
    with pytest.raises(ArtifactError, match=what) as e:
        load_artifact(tied_artifact)
    assert "\n" not in str(e.value) and "manifest.json" in str(e.value)


def test_save_refuses_a_broken_tie(tmp_path):
    gm = _rtn(embedding_bits=4).run(tiny_gm(), None).gm
    gm.lm_head.scales = gm.lm_head.scales.clone()        # no longer the embedding's tensor
    with pytest.raises(ArtifactError, match="does not share the embedding"):
        save_artifact(gm, tmp_path / "a", tokenizer_dir=None, source="tiny")


def test_inspect_shows_the_embedding_scheme(tied_artifact):
    tot = api.inspect(tied_artifact)["totals"]
    assert tot["embedding"] == "rtn:int4:g32:asym" and tot["lm_head"] == "rtn:int4:g32:asym"
    assert tot["tie_embeddings"]


# ----------------------------------------------------------------------------- recipes

@pytest.mark.parametrize("flag,bits,group", [
    ("rtn:4:g128", 0, None), ("rtn:4:g128:emb", 4, None), ("rtn:4:g128:emb8", 8, 0),
    ("hqq:4:g64:emb4", 4, None), ("rtn:3:g128:emb4g64", 4, 64), ("rtn:4:emb4pc", 4, 0)])
def test_weights_flag_embedding_suffix(flag, bits, group):
    cfg = parse_weights_flag(flag).config
    assert (cfg.embedding_bits, cfg.embedding_group_size) == (bits, group)


@pytest.mark.parametrize("flag", ["rtn:4:g128:embx", "rtn:4:g128:emb8:g64", "rtn:4:g128:emb5"])
def test_weights_flag_bad_embedding_suffix(flag):
    with pytest.raises(ConfigError):
        parse_weights_flag(flag)


def test_toml_recipe_fields():
    r = Recipe.from_dict({"pass": [{"name": "quantize_weights_rtn", "bits": 4, "group_size": 128,
                                    "embedding_bits": 8, "embedding_group_size": 0}]}, "test")
    assert r.passes[0].config.embedding_scheme().label() == "rtn:int8:per-channel:asym"
    assert r.to_dict()["passes"][0]["config"]["embedding_bits"] == 8

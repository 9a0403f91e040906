"""Frontend parity on the real shipped checkpoints (SmolLM2-135M, Gemma 3 270M), fp32, real text.

The HF reference is loaded from the same converted folder the frontend imported. The Gemma
input is longer than its 512-token sliding window so local and global layers differ.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import require_model
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from mcomp.compiler import ir  # noqa: E402
from mcomp.compiler.frontend import import_model  # noqa: E402

pytestmark = pytest.mark.slow

TOL = 1e-4
# Emma from the shared corpus next to the checkout; the package's embedded sample otherwise
EMMA = Path(__file__).resolve().parents[3] / "shared" / "data" / "austen_emma.txt"


def _text() -> str:
    if EMMA.is_file():
        text = EMMA.read_text(encoding="utf-8")
        return text[text.index("Emma Woodhouse"):]
    from mcomp.data import evaluation_text
    return evaluation_text()




def _import(name: str):
    require_model(name)
    return import_model(name)


def _text_ids(hf_dir: Path, n_tokens: int, batch: int, bos: int | None) -> torch.Tensor:
    """`batch` rows of `n_tokens` consecutive tokens of real text (row b continues where row
    b-1 ended), each beginning with BOS."""
    text = _text()
    tok = tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    ids = tok.encode(text[:20_000 * batch], add_special_tokens=False).ids
    body = n_tokens - (bos is not None)
    assert len(ids) >= batch * body
    rows = [([bos] if bos is not None else []) + ids[b * body:(b + 1) * body] for b in range(batch)]
    return torch.tensor(rows)


def _parity(name: str, n_tokens: int, batch: int, **hf_kwargs):
    imported = _import(name)
    spec = imported.spec
    ids = _text_ids(imported.hf_dir, n_tokens, batch, spec.bos_token_id)
    pos = torch.arange(n_tokens)[None].expand(batch, n_tokens)
    with torch.no_grad():
        gm = ir.build(spec, imported.state_dict)
        ours = gm(ids, pos)
        del gm
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            imported.hf_dir, dtype=torch.float32, **hf_kwargs).eval()
        ref = hf(input_ids=ids).logits.float()
    assert ours.shape == ref.shape == (batch, n_tokens, spec.vocab_size)
    top1 = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    diff = ours.sub_(ref).abs_().max().item()
    print(f"{name}: max |Δlogit| = {diff:.3g} over {batch}x{n_tokens} tokens, top-1 agree {top1:.4f}")
    assert diff <= TOL, f"{name}: max |Δlogit| {diff:.3g} > {TOL}"
    return spec


def test_smollm2_135m():
    spec = _parity("smollm2-135m", n_tokens=256, batch=2)
    assert spec.family == "llama" and spec.n_layers == 30


def test_gemma3_270m_beyond_sliding_window():
    # HF's default sdpa attention (eager adds ~5e-5 of rounding from a different op order)
    spec = _parity("gemma3-270m", n_tokens=640, batch=1, attn_implementation="sdpa")
    windows = [ls.window for ls in spec.layers]
    assert spec.family == "gemma3" and None in windows
    assert all(w is None or w < 640 for w in windows) and any(w is not None for w in windows)

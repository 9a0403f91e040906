"""Real SmolLM2-135M: mcomp's perplexity equals transformers' on the same windows, and greedy
generation produces English. Slow: loads the checkpoint (and transformers)."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from tests.conftest import require_model
import torch
import torch.nn.functional as F

from mcomp.runtime.session import Session

pytestmark = pytest.mark.slow

DATA = Path("/work/shared/data/austen_persuasion.txt")
CTX, WINDOWS = 512, 8


@pytest.fixture(scope="module")
def smollm2():
    require_model("smollm2-135m")
    return Session.from_model("smollm2-135m")


def hf_perplexity(hf_dir: Path, text: str, ctx: int, windows: int, bos: int) -> tuple[float, int]:
    """The protocol written against transformers alone: HF tokenizer without specials, BOS +
    ctx-1 text tokens per window, mean cross-entropy over the ctx-1 targets of each window."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    ids = tok(text, add_special_tokens=False)["input_ids"][: windows * (ctx - 1)]
    assert len(ids) == windows * (ctx - 1)
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    body = torch.tensor(ids).view(windows, ctx - 1)                          # (W, ctx-1)
    x = torch.cat([torch.full((windows, 1), bos), body], dim=1)              # (W, ctx)
    total = 0.0
    with torch.inference_mode():
        for i in range(0, windows, 2):
            logits = model(input_ids=x[i:i + 2]).logits.float()              # (2, ctx, V)
            total += F.cross_entropy(logits[:, :-1].flatten(0, 1), x[i:i + 2, 1:].flatten(),
                                     reduction="sum").item()
    n = windows * (ctx - 1)
    return math.exp(total / n), n


def test_perplexity_matches_transformers(smollm2):
    pytest.importorskip("transformers")
    text = DATA.read_text(encoding="utf-8")
    ours = smollm2.perplexity(text, ctx=CTX, max_tokens=WINDOWS * (CTX - 1))
    hf_dir = smollm2.tokenizer.folder
    theirs, n = hf_perplexity(hf_dir, text, CTX, WINDOWS, bos=smollm2.bos_id)
    rel = abs(ours.ppl - theirs) / theirs
    print(f"\nSmolLM2-135M ppl ctx={CTX}: mcomp {ours.ppl:.5f}, transformers {theirs:.5f}, "
          f"rel diff {rel:.2e} ({ours.tokens_scored} tokens scored, {ours.windows} windows)")
    assert smollm2.bos_id == 1
    assert (ours.windows, ours.tokens_scored) == (WINDOWS, n)
    assert rel < 1e-3
    assert 5 < ours.ppl < 200  # a real language model on English prose, not noise


def test_greedy_generation_is_english(smollm2):
    out = smollm2.generate("The capital of France is", max_new_tokens=20)
    print(f"\ngenerated: {out[0]!r}; decode {smollm2.last_stats.decode_tokens_per_s:.1f} tok/s "
          f"(torch threads {torch.get_num_threads()})")
    assert isinstance(out, list) and len(out) == 1 and out[0].strip()
    assert len(re.findall(r"[A-Za-z]{2,}", out[0])) >= 3

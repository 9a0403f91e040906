"""Pure functions over logits: NLL, KL divergence, top-1 agreement, logit drift.

Shared by the runtime's evaluation (perplexity, compare) and by pass verification (drift on a
probe batch), so that "KL" means the same number everywhere: KL(base || test) per predicted
token, computed in fp32 from log_softmax, as llama.cpp's `perplexity --kl-divergence` reports.

Every function takes logits (..., V) and flattens the leading dims to N tokens; `mask`
(same leading shape, bool) selects the tokens that count (e.g. non-padding positions).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _flat(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(..., V) → (N, V) fp32, keeping only masked-in rows."""
    x = logits.reshape(-1, logits.shape[-1]).float()  # (N, V)
    if mask is not None:
        x = x[mask.reshape(-1).to(torch.bool)]
    return x


# Rows per chunk in the per-token metrics: every op is row-wise, so chunking changes nothing
# numerically but bounds the fp32 temporaries (log-softmax, its exp, differences) to a few
# (256, V) buffers. Without it a 1024-token window of Gemma 3's 262k vocabulary needs ~5 GB.
_ROWS = 256


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each target: logits (..., V), targets (...) → (...) fp32."""
    V = logits.shape[-1]
    x, y = logits.reshape(-1, V), targets.reshape(-1)
    nll = torch.cat([F.cross_entropy(x[i:i + _ROWS].float(), y[i:i + _ROWS], reduction="none")
                     for i in range(0, x.shape[0], _ROWS)]) if x.shape[0] else x.new_zeros(0)
    return nll.reshape(targets.shape)


def token_kl(base_logits: torch.Tensor, test_logits: torch.Tensor) -> torch.Tensor:
    """KL(base || test) per token: sum_v p_base (log p_base - log p_test); (..., V) → (...).

    Clamped at 0: for identical distributions rounding can give tiny negatives."""
    if base_logits.shape != test_logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(base_logits.shape)} vs "
                         f"{tuple(test_logits.shape)}")
    V = base_logits.shape[-1]
    b, t = base_logits.reshape(-1, V), test_logits.reshape(-1, V)
    out = torch.empty(b.shape[0], dtype=torch.float32)
    for i in range(0, b.shape[0], _ROWS):
        lp = F.log_softmax(b[i:i + _ROWS].float(), dim=-1)  # (rows, V)
        lq = F.log_softmax(t[i:i + _ROWS].float(), dim=-1)
        out[i:i + _ROWS] = (lp.exp() * (lp - lq)).sum(-1)
    return out.clamp_min(0.0).reshape(base_logits.shape[:-1])


def token_top1(base_logits: torch.Tensor, test_logits: torch.Tensor) -> torch.Tensor:
    """Whether the argmax token agrees, per token: (..., V) → (...) bool."""
    return base_logits.argmax(-1) == test_logits.argmax(-1)


def drift(ref_logits: torch.Tensor, new_logits: torch.Tensor,
          mask: torch.Tensor | None = None) -> dict[str, float]:
    """How far `new` moved from `ref` on the same inputs: max |Δlogit|, mean KL(ref || new)
    per token, top-1 agreement fraction, and the token count these are over."""
    if ref_logits.shape != new_logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(ref_logits.shape)} vs "
                         f"{tuple(new_logits.shape)}")
    r, n = _flat(ref_logits, mask), _flat(new_logits, mask)  # (N, V)
    if r.shape[0] == 0:
        raise ValueError("drift over zero tokens (mask selects nothing)")
    return {
        "max_abs_logit": (r - n).abs().max().item(),
        "kld": token_kl(r, n).double().mean().item(),
        "top1": token_top1(r, n).double().mean().item(),
        "tokens": int(r.shape[0]),
    }

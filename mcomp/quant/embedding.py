"""QuantEmbedding: a packed token-embedding table, one leaf node in the IR; and the tie between
it and a quantized lm_head.

The table E (V, H) is stored exactly as a QuantLinear with out_features = V and in_features = H
stores its weight — same scheme, same primitives, same artifact tensors: `qweight` (V, packed)
uint8, `scales` (V, G) and `zeros` (V, G) unless symmetric. That is the point of the layout:
logits = h·Eᵀ is a linear whose weight is E, so a tied lm_head is a plain QuantLinear whose
buffers *are* the embedding's tensors (one table in memory, one in the artifact, and the fast
int4/int8 head kernels apply unchanged). QuantEmbedding therefore subclasses QuantLinear for its
storage, construction (`from_codes`), `codes` and `dequantize`, and replaces only `forward`.

forward(ids) gathers the packed rows of the ids and dequantizes only those: a decode step
touches one row, not V. The reference semantics is `F.embedding(ids, self.dequantize())`, and
the gather is bit-exact with it: dequantization is elementwise, w = (q − z)·s, so gathering rows
before or after it computes the same fp32 values.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import fx, nn

from ..compiler import ir
from ..errors import ConfigError
from . import primitives as P
from .linear import QuantLinear
from .scheme import WeightScheme

EMBED = "embed"       # the canonical model's token embedding module (role "embed")
HEAD = "lm_head"

# (w (V, H) fp32, scheme) → per (row, group) scale and zero, each (V, G): a quantizer's grid fit
GridFit = Callable[[torch.Tensor, WeightScheme], tuple[torch.Tensor, torch.Tensor]]


class QuantEmbedding(QuantLinear):
    """Packed (V, H) table; `in_features` = H (embedding_dim), `out_features` = V (vocab).
    The constructor keeps QuantLinear's (in_features, out_features, scheme) order so that the
    inherited `from_codes` builds it; an embedding has no bias."""

    def __init__(self, in_features: int, out_features: int, scheme: WeightScheme, bias: bool = False):
        if bias:
            raise ConfigError("QuantEmbedding: an embedding table has no bias")
        super().__init__(in_features, out_features, scheme, bias=False)

    @property
    def num_embeddings(self) -> int:
        return self.out_features

    @property
    def embedding_dim(self) -> int:
        return self.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)                                                 # (n,)
        codes = P.unpack(self.qweight[flat], self.scheme.bits, self.in_features)  # (n, H)
        scale = self.scales[flat].float()                                      # (n, G)
        # zero_points() on the gathered rows only (symmetric: the implicit mid code)
        zero = (self.zeros[flat].float() if self.zeros is not None
                else torch.full_like(scale, float(2 ** (self.scheme.bits - 1))))
        w = P.dequantize_codes(codes, scale, zero, self.scheme.effective_group(self.in_features))
        return w.view(*ids.shape, self.in_features)                            # (..., H)

    def tied_head(self) -> QuantLinear:
        """A QuantLinear (H → V) whose buffers are this table's tensors: the tied lm_head."""
        with torch.device("meta"):  # its own buffers are placeholders, replaced just below
            head = QuantLinear(self.in_features, self.out_features, self.scheme)
        share_table(head, self)
        return head

    def extra_repr(self) -> str:
        return f"vocab={self.out_features}, dim={self.in_features}, {self.scheme.label()}"


def share_table(head: QuantLinear, embed: QuantEmbedding) -> None:
    """Point the head's stored tensors at the embedding's (the same tensor objects)."""
    for name, t in embed._buffers.items():
        head._buffers[name] = t
    head._kernel = None


def tie_head(model: nn.Module) -> None:
    """Re-establish the tie after the two modules were given separate tensors (a strict
    `load_state_dict(assign=True)` assigns each state-dict entry to its own module)."""
    head, embed = model.get_submodule(HEAD), model.get_submodule(EMBED)
    if isinstance(embed, QuantEmbedding):
        share_table(head, embed)
    else:
        head.weight = embed.weight


def head_is_tied(model: nn.Module) -> bool:
    """Does lm_head read exactly the embedding's tensors (float: the same Parameter; quantized:
    the same qweight/scales/zeros objects and scheme)?"""
    head, embed = model.get_submodule(HEAD), model.get_submodule(EMBED)
    if isinstance(embed, QuantEmbedding):
        return (isinstance(head, QuantLinear) and not isinstance(head, QuantEmbedding)
                and head.scheme == embed.scheme and head.bias is None
                and set(head._buffers) == set(embed._buffers)
                and all(head._buffers[k] is t for k, t in embed._buffers.items()))
    return getattr(head, "weight", None) is embed.weight


def quantize_embedding(gm: fx.GraphModule, scheme: WeightScheme, fit: GridFit) -> dict:
    """Replace the float token embedding by a QuantEmbedding on the grid `fit` chooses.

    With a tied spec the lm_head becomes the table's tied QuantLinear (whatever the quantizer's
    skip list says: a tie is one table, it cannot be float on one side) and the spec stays tied.
    Untied, only the embedding changes; the head is an ordinary linear of the pass.
    Returns the stats row of the pass (scheme, bytes before/after, whether the head followed)."""
    embed = gm.get_submodule(EMBED)
    if isinstance(embed, QuantEmbedding):
        return {"scheme": embed.scheme.label(), "skipped": "already quantized"}
    w = embed.weight.detach().float()                                          # (V, H)
    s, z = fit(w, scheme)                                                      # (V, G) each
    codes = P.quantize_codes(w, s, z, scheme.bits, scheme.effective_group(w.shape[1]))
    qembed = QuantEmbedding.from_codes(codes, s, z, scheme)
    ir.replace_module(gm, EMBED, qembed)
    tied = ir.get_spec(gm).tie_embeddings
    if tied:
        ir.replace_module(gm, HEAD, qembed.tied_head())
    rel_err = float((w - qembed.dequantize()).pow(2).sum() / w.pow(2).sum().clamp(min=1e-30))
    return {"scheme": scheme.label(), "tied_head": tied,
            "fp_bytes": w.numel() * embed.weight.element_size(),
            "packed_bytes": scheme.nbytes(*w.shape), "weight_rel_err": round(rel_err, 6)}

"""cskv: CSKV's training-free channel shrinking (arXiv 2409.10593): the palu pass's factors,
set as `cskv` caches (a bi-branch cache: exact recent window + low-rank latent; runtime/kv/cskv.py).

CSKV initializes its low-rank K/V projections from an SVD of the weights (§3.2; the paper
compares plain SVD and ASVD's activation-scaled SVD and keeps the latter). This pass uses the
whitened SVD of the palu pass (Palu §3.4, SVD-LLM), which minimizes the projection's *output*
error ‖X Wᵀ − X W_rᵀ‖_F on the calibration activations exactly, where ASVD's diagonal scaling
approximates that; ranks are uniform across layers as in CSKV (`:fisher` uses Palu's Fisher
allocation). CSKV's layer-wise reconstruction fine-tuning (§3.4) is not run: these are the
factors it would start from.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..compiler.passes import register_pass
from .palu import Palu, PaluConfig


@dataclass(frozen=True)
class CSKVConfig(PaluConfig):
    KIND: ClassVar[str] = "cskv"
    kv: str = "cskv:0.5"           # the `--kv cskv:...` shorthand


@register_pass
class CSKV(Palu):
    name = "cskv"
    Config = CSKVConfig
    version = 1

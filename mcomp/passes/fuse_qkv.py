"""fuse_qkv: q_proj, k_proj, v_proj → one qkv_proj + split. Exact (same products, one GEMM)."""
from __future__ import annotations

from dataclasses import dataclass

from ..compiler.passes import Pass, PassConfig, PassResult, register_pass
from .fusion import fuse_siblings


@dataclass(frozen=True)
class FuseQKVConfig(PassConfig):
    pass


@register_pass
class FuseQKV(Pass):
    name = "fuse_qkv"
    Config = FuseQKVConfig
    exact = True
    stage = "fuse"

    def run(self, gm, ctx) -> PassResult:
        stats = fuse_siblings(gm, ("q_proj", "k_proj", "v_proj"), "qkv_proj", "qkv_proj", "fused_qkv")
        return PassResult(gm, stats)

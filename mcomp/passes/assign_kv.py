"""assign_kv: choose each layer's KV representation (LayerSpec.kv) — e.g. KIVI 2/4-bit.

Only the spec changes (the runtime builds the matching cache container from it; the artifact
manifest stores it per layer). Verification probes run without a KV cache (state=None), so this
pass shows zero drift there by construction: measure its effect with streaming decode,
`mcomp eval TARGET --kv kivi2 --streaming` (Session.streaming_perplexity).

The `--kv` shorthand can also ask for rotations: `:hk` sets KVSpec.k_rotation (an online key
rotation inside the KIVI cache; still only a spec change), `:hv` adds the rotate_v pass (a
Hadamard rotation of V folded into v_proj/o_proj weights, stage "transform"), so one shorthand
may stand for two passes (`kv_passes`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..compiler import ir
from ..compiler.passes import STAGES, Pass, PassConfig, PassResult, register_pass
from ..compiler.spec import KV_BITS, KVSpec
from ..errors import ConfigError
# imported here so that loading the KV passes (recipe._load_pass_modules) registers rotate_v too
from .rotate_v import RotateV


@dataclass(frozen=True)
class AssignKVConfig(PassConfig):
    kind: str = "kivi"
    bits: int = 4                    # K and V bits unless k_bits / v_bits say otherwise
    k_bits: int = 0                  # 0 = bits
    v_bits: int = 0                  # 0 = bits
    group_size: int = 32
    residual: int = 128
    sink: int = 0
    k_axis: str = "channel"
    k_rotation: str = "none"         # none | hadamard: online post-RoPE key rotation (KVSpec)
    dtype: str = "float32"           # fp residual / sink storage (dense: the cache dtype)
    layers: tuple[int, ...] = ()     # layers to assign; empty = all
    skip_layers: tuple[int, ...] = ()  # layers left as they are (e.g. (0,) keeps layer 0 dense)
    version: int = 1

    def __post_init__(self):
        if self.bits not in KV_BITS:
            raise ConfigError(f"assign_kv: bits={self.bits} must be one of {KV_BITS}")
        self.kv_spec()  # validates the rest

    def kv_spec(self) -> KVSpec:
        if self.kind == "dense":
            return KVSpec(kind="dense", dtype=self.dtype)
        return KVSpec(kind=self.kind, dtype=self.dtype, k_bits=self.k_bits or self.bits,
                      v_bits=self.v_bits or self.bits, group_size=self.group_size,
                      residual=self.residual, sink=self.sink, k_axis=self.k_axis,
                      k_rotation=self.k_rotation)


@register_pass
class AssignKV(Pass):
    name = "assign_kv"
    Config = AssignKVConfig
    exact = False
    stage = "kv"

    def run(self, gm, ctx) -> PassResult:
        from ..runtime.kvcache import KV_REPRESENTATIONS
        spec = ir.get_spec(gm)
        cfg = self.config
        n = spec.n_layers
        for i in (*cfg.layers, *cfg.skip_layers):
            if not -n <= i < n:
                raise ConfigError(f"assign_kv: layer {i} out of range (model has {n} layers)")
        chosen = {i % n for i in cfg.layers} if cfg.layers else set(range(n))
        chosen -= {i % n for i in cfg.skip_layers}
        kv = cfg.kv_spec()
        KV_REPRESENTATIONS.get(kv.kind)

        def bpt(s):
            return sum(KV_REPRESENTATIONS.get(l.kv.kind).bytes_per_token(l) for l in s.layers)

        before = bpt(spec)
        new = spec
        for i in sorted(chosen):
            new = new.with_layer(i, kv=kv)  # LayerSpec validates kv against head_dim
        ir.set_spec(gm, new)
        fp16 = sum(2 * l.kv_dim * 2 for l in new.layers)
        after = bpt(new)
        stats = {"layers": sorted(chosen), "kv": kv.label(),
                 "kv_bytes_per_token_before": before, "kv_bytes_per_token_after": after,
                 "kv_ratio_vs_fp16": round(after / fp16, 4),
                 "note": "verification probes run without a KV cache (state=None), so drift is "
                         "zero here by construction; measure with `mcomp eval TARGET --kv ... "
                         "--streaming`"}
        return PassResult(gm, stats)


def _parse_shorthand(text: str) -> tuple[AssignKVConfig, bool]:
    """`--kv` text → (assign_kv config, whether V is rotated by the rotate_v pass)."""
    parts = [p.strip().lower() for p in text.strip().split(":") if p.strip()]
    if not parts:
        raise ConfigError("--kv: empty value; expected e.g. kivi2, kivi4, kivi2:g32:r128:hv")
    head = parts[0]
    if head == "dense":
        if len(parts) > 1:
            raise ConfigError(f"--kv '{text}': dense takes no options")
        return AssignKVConfig(kind="dense"), False
    if not (head.startswith("kivi") and head[4:].isdigit()):
        raise ConfigError(f"--kv '{text}': expected kivi2, kivi4, kivi8 or dense "
                          "(options :gGROUP :rRESIDUAL :sSINK :kt :hk :hv)")
    opts: dict = {"kind": "kivi", "bits": int(head[4:])}
    rotate_v = False
    names = {"g": "group_size", "r": "residual", "s": "sink"}
    for p in parts[1:]:
        if p == "kt":
            opts["k_axis"] = "token"
        elif p == "hk":
            opts["k_rotation"] = "hadamard"
        elif p == "hv":
            rotate_v = True
        elif p[:1] in names and p[1:].isdigit():
            opts[names[p[0]]] = int(p[1:])
        else:
            raise ConfigError(f"--kv '{text}': unknown option '{p}' (use gN, rN, sN, kt, hk, hv)")
    try:
        return AssignKVConfig(**opts), rotate_v
    except ConfigError as e:
        raise ConfigError(f"--kv '{text}': {e}") from None


def kv_shorthand(text: str) -> AssignKVConfig:
    """`kivi2` / `kivi4` / `kivi8` (K and V bits, group 32, residual 128), optionally followed by
    `:gN`, `:rN`, `:sN` (sink), `:kt` (per-token keys, ablation), `:hk` (Hadamard key rotation),
    or `dense` → the assign_kv config. `:hv` is a weight rewrite, not a KV spec: use kv_passes."""
    cfg, rotate_v = _parse_shorthand(text)
    if rotate_v:
        raise ConfigError(f"--kv '{text}': ':hv' rotates weights (the rotate_v pass), it is not "
                          "part of a KV spec; build the passes with kv_passes()")
    return cfg


def kv_passes(text: str) -> list[Pass]:
    """The passes a `--kv` shorthand stands for: [rotate_v] if `:hv`, then assign_kv."""
    cfg, rotate_v = _parse_shorthand(text)
    return ([RotateV()] if rotate_v else []) + [AssignKV(cfg)]


def with_kv_passes(recipe, passes: list[Pass]):
    """The recipe with the `--kv` passes in it: assign_kv replaces the kv stage; a rotation pass
    replaces only a pass of its own name (other passes of its stage stay), in stage order."""
    for p in passes:
        if p.stage == "kv":
            recipe = recipe.replace_stage(p)
            continue
        kept = [q for q in recipe.passes if q.name != p.name]
        ordered = sorted(kept + [p], key=lambda q: STAGES.index(q.stage))   # stable
        recipe = dataclasses.replace(recipe, passes=tuple(ordered), name=f"{recipe.name}+{p.name}")
    return recipe


def apply_kv_flag(gm, text: str) -> list[dict]:
    """Apply a `--kv` shorthand to an existing IR (any float target; `:hv` needs float v_proj and
    o_proj) without a pass manager; returns each pass's stats."""
    stats = []
    for p in kv_passes(text):
        p.check(gm)
        stats.append(p.run(gm, None).stats)
    return stats


def apply_kv(gm, config: AssignKVConfig):
    """Set the KV representation on an existing IR (any target) without a pass manager."""
    return AssignKV(config).run(gm, None)

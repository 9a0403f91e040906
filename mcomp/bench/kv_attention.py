"""Decode attention step: KIVI fast kernel vs PyTorch SDPA over dense fp32 / bf16 caches.

`mcomp bench attention --ctx 16384 --kv kivi2 [--json]`. One query token (B=1), SmolLM2-135M
shapes (9 query heads, 3 KV heads, head_dim 64), random K/V filled into the cache without
timing, the same `torch.set_num_threads` for every variant, median of `repeats` timed calls
after warm-up. All variants run in the same process, interleaved, so ratios are comparable on
a shared machine even when absolute times drift.

`layers` (--layers): how many independent layer caches one timed call walks through, as a decode
step walks through every layer's cache. With 1 (the default) the same cache is attended again
and again, so a dense fp32 cache of up to ~32 MB stays in this CPU's L3 between calls — which
never happens in a model, where the other layers' caches and the weights pass through L3 in
between. With the model's layer count (30 for SmolLM2) each call reads its cache from DRAM, as
decode does. Times are per layer either way.
"""
from __future__ import annotations

import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

HQ, HKV, D = 9, 3, 64


def _time(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def run(ctxs: list[int], kv: str = "kivi2", threads: int = 2, repeats: int = 20,
        layers: int = 1) -> dict:
    from ..compiler.spec import LayerSpec
    from ..errors import ConfigError
    from ..runtime.kernels import kivi_attention as ka
    from ..runtime.kv import parse_kv
    from ..runtime.kv.kivi import KIVICache

    choice = parse_kv(kv)
    if choice.spec.kind != "kivi" or choice.rewrites:
        raise ConfigError(f"bench attention times the KIVI decode kernel on random K/V; '{kv}' is "
                          "not a plain kivi scheme (use `mcomp bench decode` for whole models)")
    mod = ka.load()  # KernelUnavailable (exit 4) rather than timing the reference by accident
    torch.set_num_threads(threads)
    spec = choice.spec
    ls = LayerSpec(n_heads=HQ, n_kv_heads=HKV, head_dim=D, ffn_dim=1, kv=spec)
    scale = D ** -0.5
    rows = []
    for S in ctxs:
        g = torch.Generator().manual_seed(S)
        sets = []                                     # one (q, K, V, cache) per layer
        for _ in range(layers):
            k = torch.randn(1, HKV, S, D, generator=g)
            v = torch.randn(1, HKV, S, D, generator=g)
            q = torch.randn(1, HQ, 1, D, generator=g)
            cache = KIVICache(ls, 1)
            for a in range(0, S, 4096):
                cache.append(k[:, :, a:a + 4096], v[:, :, a:a + 4096])
            sets.append((q, k, v, k.to(torch.bfloat16), v.to(torch.bfloat16),
                         q.to(torch.bfloat16), cache))

        def sdpa32():
            for q, k, v, *_ in sets:
                F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)

        def sdpa16():
            for _, _, _, k16, v16, q16, _ in sets:
                F.scaled_dot_product_attention(q16, k16, v16, scale=scale, enable_gqa=True)

        def kivi():  # mask None: one decode step over a full cache, every key visible
            for q, *_, cache in sets:
                ka.decode(cache, q, scale, None)

        q, k, v, *_, cache = sets[0]
        err = (ka.decode(cache, q, scale, None)
               - F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)).abs().max().item()
        t32, t16, tk = (_time(f, repeats) / layers for f in (sdpa32, sdpa16, kivi))
        dense32 = 2 * HKV * D * 4 * S
        rows.append({"ctx": S, "kivi_ms": tk * 1e3, "sdpa_fp32_ms": t32 * 1e3,
                     "sdpa_bf16_ms": t16 * 1e3, "speedup_vs_sdpa_fp32": t32 / tk,
                     "speedup_vs_sdpa_bf16": t16 / tk, "kivi_cache_bytes": cache.nbytes(),
                     "dense_fp32_bytes": dense32, "dense_bf16_bytes": dense32 // 2,
                     "max_abs_err_vs_fp32": err})
        sets.clear()   # free this context's caches before building the next
    return {"kv": spec.label(), "kv_flag": kv, "threads": threads, "repeats": repeats, "layers": layers,
            "simd": mod.kivi_simd(),
            "shape": {"batch": 1, "q_heads": HQ, "kv_heads": HKV, "head_dim": D},
            "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "load_avg": os.getloadavg()[0], "results": rows}


def section(res: dict) -> str:
    """docs/benchmarks.md section name: one per layer setting."""
    return "kv" if res.get("layers", 1) == 1 else "kv-layers"


def to_markdown(res: dict) -> str:
    layers = res.get("layers", 1)
    where = ("the same cache every call (a dense fp32 cache up to ~32 MB stays in L3: the "
             "kernel's least favourable case)" if layers == 1 else
             f"{layers} independent layer caches per call, as one decode step walks through a "
             f"{layers}-layer model (every cache comes from DRAM); times per layer")
    lines = [
        "## KV attention kernel: one decode step, KIVI vs SDPA, "
        f"{layers} layer{'s' if layers > 1 else ''} per call",
        "",
        "`mcomp bench attention " + " ".join(f"--ctx {r['ctx']}" for r in res["results"])
        + f" --kv {res.get('kv_flag', '<scheme>')} --threads {res['threads']} --layers {layers} "
        f"--repeats {res['repeats']}` — "
        f"{res['kv']}; B=1, {res['shape']['q_heads']} q heads / {res['shape']['kv_heads']} KV "
        f"heads, head_dim {res['shape']['head_dim']} (SmolLM2-135M); {res['threads']} threads for "
        f"every variant; {where}; median of {res['repeats']}; kernel build "
        f"{res.get('simd', '?')}; torch {res['torch']}; load average at start "
        f"{res['load_avg']:.2f}. The KIVI cache holds everything except the 128-token fp "
        "residual quantized; its error vs fp32 attention is the quantization error, not the "
        "kernel's.",
        "",
        "| ctx | KIVI kernel ms | SDPA fp32 ms | SDPA bf16 ms | speedup vs fp32 | speedup vs bf16 "
        "| KIVI cache MB | fp32 cache MB |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in res["results"]:
        lines.append(f"| {r['ctx']} | {r['kivi_ms']:.3f} | {r['sdpa_fp32_ms']:.3f} | "
                     f"{r['sdpa_bf16_ms']:.3f} | {r['speedup_vs_sdpa_fp32']:.2f}× | "
                     f"{r['speedup_vs_sdpa_bf16']:.2f}× | {r['kivi_cache_bytes'] / 1e6:.2f} | "
                     f"{r['dense_fp32_bytes'] / 1e6:.2f} |")
    return "\n".join(lines)

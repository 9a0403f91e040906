"""KV-cache quantization quality → docs/benchmarks.md (between the bench:kv-quality markers).

For each KV scheme, applied to every layer of the uncompressed model (mcomp.passes.assign_kv),
evaluate on Persuasion (mcomp.data.evaluation_text, windows of --ctx tokens, BOS first) with the
compression in the loop (Session.streaming_perplexity):

- "prefill" mode (quantize-before-attend: every query attends to exactly the cache state
  token-by-token decode would have had at its step) over --max-tokens text tokens;
- "stream" mode (token-by-token decode through the real cache) over --stream-tokens, as the
  check that both agree.

KL divergence and top-1 agreement are against the same model attending without a cache
(full-precision K/V). Plain `mcomp eval` (no cache) would show no difference at all.

    python benchmarks/bench_kv.py [--model smollm2-135m] [--max-tokens 4096] [--stream-tokens 1022]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

SCHEMES = [
    ("dense fp32", "dense"),
    ("kivi8 (g32, r128)", "kivi8"),
    ("kivi4 (g32, r128)", "kivi4"),
    ("kivi2 (g32, r128)", "kivi2"),
    ("kivi2 (g64, r128)", "kivi2:g64"),
    ("kivi2 per-token K (g32, r128) — ablation", "kivi2:kt"),
    ("kivi2 (g32, r128, 4 sink tokens)", "kivi2:s4"),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--stream-tokens", type=int, default=1022)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--schemes", nargs="*", default=None, help="subset of shorthands")
    ap.add_argument("--stream-schemes", nargs="*", default=["kivi2"],
                    help="schemes also decoded token by token (slow in Python)")
    ap.add_argument("--out", default="docs/benchmarks.md")
    ap.add_argument("--json", default="benchmarks/results/kv_quality.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from mcomp import data
    from mcomp.api import load
    from mcomp.bench import write_section
    from mcomp.passes.assign_kv import apply_kv, kv_shorthand

    text = data.evaluation_text()
    base = load(args.model)
    dense_fp16 = sum(2 * l.kv_dim * 2 for l in base.spec.layers)
    rows = []
    for label, sh in SCHEMES:
        if args.schemes and sh not in args.schemes:
            continue
        s = load(args.model)
        apply_kv(s.gm, kv_shorthand(sh))
        s.spec = s.gm.meta["mcomp.spec"]
        t0 = time.perf_counter()
        pre = s.streaming_perplexity(text, ctx=args.ctx, max_tokens=args.max_tokens,
                                     mode="prefill", batch_size=2)
        st = (s.streaming_perplexity(text, ctx=args.ctx, max_tokens=args.stream_tokens,
                                     mode="stream", batch_size=2)
              if args.stream_tokens and sh in args.stream_schemes else None)
        row = {"scheme": label, "flag": sh, "prefill": pre, "stream": st,
               "kv_bytes_per_token": pre["kv_bytes_per_token"],
               "ratio_vs_fp16": pre["kv_bytes_per_token"] / dense_fp16,
               "seconds": time.perf_counter() - t0}
        rows.append(row)
        print(json.dumps({"scheme": label, "ppl": pre["ppl"], "base": pre["base_ppl"],
                          "kld": pre["kld"], "stream_ppl": st and st["ppl"],
                          "stream_base": st and st["base_ppl"]}), flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=1))
    base_ppl = rows[0]["prefill"]["base_ppl"]
    n = rows[0]["prefill"]["tokens_scored"]
    lines = [
        f"## KV-cache quantization quality ({args.model})",
        "",
        f"`python benchmarks/bench_kv.py --model {args.model} --max-tokens {args.max_tokens} "
        f"--stream-tokens {args.stream_tokens}` — Persuasion, {args.ctx}-token windows (BOS "
        f"first), {n} tokens scored in quantize-before-attend prefill mode (each query sees the "
        "cache exactly as streaming decode would); the stream columns decode token by token "
        f"through the real cache on the first {args.stream_tokens} tokens (schemes "
        f"{', '.join(args.stream_schemes)}). KL / top-1 against "
        f"the same model attending to full-precision K/V (ppl {base_ppl:.4f}). KV bytes: the "
        "quantized store per token over all layers, scales/mins (fp16) included; the fp "
        "residual window (≤ 128 + 31 tokens per layer) is a constant on top. The fp32 model "
        "weights come from the GGUF (Q4_1-dequantized) checkpoint.",
        "",
        "| KV scheme | ppl | Δppl | KL | top-1 | stream ppl | stream no-cache ppl | KV B/token | × fp16 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        p, st = r["prefill"], r["stream"]
        lines.append(
            f"| {r['scheme']} | {p['ppl']:.4f} | {100 * (p['ppl'] / p['base_ppl'] - 1):+.2f}% | "
            f"{p['kld']:.5f} | {100 * p['top1_agreement']:.2f}% | "
            + (f"{st['ppl']:.4f} | {st['base_ppl']:.4f}" if st else "- | -")
            + f" | {r['kv_bytes_per_token']} | {r['ratio_vs_fp16']:.3f} |")
    write_section(args.out, "kv-quality", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

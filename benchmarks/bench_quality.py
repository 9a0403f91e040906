"""Quality of the shipped presets on the real models → docs/benchmarks.md (section "quality").

    python benchmarks/bench_quality.py [--models smollm2-135m gemma3-270m] [--tokens 4088]

Calibration text: the embedded Pride and Prejudice sample; evaluation text: the embedded
Persuasion sample (a different novel); windows of 512 tokens with BOS first. KL divergence and
top-1 agreement are against the unmodified fp32 model on the same windows.
"""
from __future__ import annotations

import argparse
import time

import torch

import mcomp
from mcomp.bench import write_section
from mcomp.compiler import ir

PRESETS = ("fp32", "int8", "int4")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--tokens", type=int, default=4088)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--out", default="docs/benchmarks.md")
    args = ap.parse_args()
    torch.set_num_threads(2)
    text = mcomp.data.evaluation_text()
    rows = []
    for model in args.models:
        base = mcomp.load(model)
        total = ir.weight_bytes(base.gm)
        emb = base.gm.get_submodule("embed").weight.numel() * 4
        for preset in PRESETS:
            t0 = time.perf_counter()
            res = mcomp.optimize(model, preset)
            r = res.session().compare(base, text, ctx=args.ctx, max_tokens=args.tokens)
            rep = res.report
            rows.append((model, preset, r["ppl"], r["base_ppl"], r["kld"], r["top1_agreement"],
                         r["tokens_scored"], rep.linear_bytes_after / rep.linear_bytes_before,
                         rep.weight_bytes_after / 1e6, emb / total))
            print(rows[-1], f"{time.perf_counter() - t0:.0f}s", flush=True)
    lines = ["## Quality of the presets (perplexity, KL, top-1 vs fp32)", "",
             f"Command: `python benchmarks/bench_quality.py --models {' '.join(args.models)} "
             f"--tokens {args.tokens}`. Evaluation: embedded Persuasion sample, ctx {args.ctx}, BOS "
             "first, non-overlapping windows; the probe batch and the calibration text (Pride and "
             "Prejudice) are other text. The checkpoints were dequantized from 4-bit GGUF files "
             "(SmolLM2 Q4_1, Gemma 3 Q4_K_M), so the fp32 baseline already carries 4-bit error.", "",
             "| model | preset | ppl | base ppl | KL | top-1 | tokens scored | decoder linear bytes | total weight MB | embedding share |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for m, p, ppl, bppl, kld, top1, n, lin, mb, emb in rows:
        lines.append(f"| {m} | {p} | {ppl:.3f} | {bppl:.3f} | {kld:.4f} | {100 * top1:.2f}% | {n} | "
                     f"{100 * lin:.1f}% | {mb:.1f} | {100 * emb:.0f}% |")
    write_section(args.out, "quality", "\n".join(lines))


if __name__ == "__main__":
    main()

"""Prefill speed of a FLAP-pruned SmolLM2 vs the unpruned model, alternated in one loop.

    python benchmarks/prune_prefill_ratio.py [--ratio 0.2] [--rounds 2] [--threads 2]

Two measurements per round: the prefill of generation, whose lm_head projects only the last
position (what time-to-first-token costs), and a forward that projects all positions (what a
perplexity evaluation costs; pruning never touches the head, so its share dilutes the ratio).

Both models get the fp32 preset's exact fusions, so the only difference is the pruning. Run it
on a quiet machine (`uptime` load below ~1.5): the ratio is what to read.
"""
from __future__ import annotations

import argparse

import torch

import mcomp
from mcomp.compiler import ir

from bench_prune import prefill_speed  # same measurement as the pruning benchmark


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write-docs", action="store_true",
                    help="write the prune-prefill section of docs/benchmarks.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = mcomp.optimize(args.model, "fp32").gm
    pruned = mcomp.optimize(args.model, "fp32", prune=f"flap:{args.ratio}").gm
    vocab = ir.get_spec(base).vocab_size
    rows = []
    for rnd in range(args.rounds):
        for last_only, what in ((True, "generation prefill (last-position logits)"),
                                (False, "full-logits forward (all 512 positions)")):
            r = prefill_speed({"base": base, "pruned": pruned}, vocab, repeats=args.repeats,
                              last_logits_only=last_only)
            rows.append((rnd, what, r["base"], r["pruned"]))
            print(f"round {rnd}, {what}: base {r['base']:.1f} tok/s, flap {args.ratio:.0%} "
                  f"{r['pruned']:.1f} tok/s, ratio {r['pruned'] / r['base']:.3f}x "
                  f"({args.threads} threads, 512 tokens, median of {args.repeats}, alternated)")
    if args.write_docs:
        import os

        from mcomp.bench import write_section
        table = [f"### Prefill speed of the pruned model ({args.model}, FLAP {args.ratio:.0%})", "",
                 f"Command: `python benchmarks/prune_prefill_ratio.py --ratio {args.ratio} "
                 f"--rounds {args.rounds} --threads {args.threads} --write-docs` (load average "
                 f"{os.getloadavg()[0]:.1f} at the end; {args.threads} threads, 512-token prompt, "
                 f"median of {args.repeats}, pruned and unpruned alternated; both with q/k/v and "
                 "gate/up fused).", "",
                 "| round | forward | unpruned tok/s | pruned tok/s | ratio |", "|---|---|---|---|---|"]
        table += [f"| {n} | {w} | {b:.1f} | {p:.1f} | {p / b:.3f}× |" for n, w, b, p in rows]
        table += ["", "Generation's prefill projects only the last position onto the vocabulary, "
                  "so the unpruned lm_head (not touched by pruning) no longer dilutes the ratio; "
                  "the full-logits forward is what a perplexity evaluation pays."]
        write_section(os.path.join(os.path.dirname(__file__), "..", "docs", "benchmarks.md"),
                      "prune-prefill", "\n".join(table))


if __name__ == "__main__":
    main()

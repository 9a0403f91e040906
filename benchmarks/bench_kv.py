"""KV-cache quantization quality → docs/benchmarks.md (between the bench:kv-quality markers).

For each KV scheme (a `--kv` shorthand: mcomp.passes.assign_kv.apply_kv_flag, so `:hv` also
runs the rotate_v pass on the weights and `:hk` turns on the cache's online key rotation),
applied to every layer of the uncompressed model, evaluate on Persuasion
(mcomp.data.evaluation_text, windows of --ctx tokens, BOS first) with the compression in the
loop (Session.streaming_perplexity):

- "prefill" mode (quantize-before-attend: every query attends to exactly the cache state
  token-by-token decode would have had at its step) over --max-tokens text tokens;
- "stream" mode (token-by-token decode through the real cache) over --stream-tokens, as the
  check that both agree.

KL divergence and top-1 agreement are against the same model attending without a cache
(full-precision K/V). Plain `mcomp eval` (no cache) would show no difference at all.

Results are kept per model in --json (rows replaced by flag, so a run with --schemes updates
only those rows), and the section is rendered from every model's file: run once per model.

    python benchmarks/bench_kv.py [--model smollm2-135m] [--max-tokens 2044] [--stream-tokens 511]
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
    ("kivi4 + Hadamard V", "kivi4:hv"),
    ("kivi2 (g32, r128)", "kivi2"),
    ("kivi2 (g64, r128)", "kivi2:g64"),
    ("kivi2 per-token K (g32, r128) — ablation", "kivi2:kt"),
    ("kivi2 + Hadamard V", "kivi2:hv"),
    ("kivi2 + Hadamard K", "kivi2:hk"),
    ("kivi2 + Hadamard V + Hadamard K", "kivi2:hv:hk"),
    ("kivi2 per-token K + Hadamard K (QuaRot-style)", "kivi2:kt:hk"),
    ("kivi2 (g32, r128, 1 sink token: BOS)", "kivi2:s1"),
    ("kivi2 (g32, r128, 4 sink tokens)", "kivi2:s4"),
    ("kivi2 (g32, r128, 16 sink tokens)", "kivi2:s16"),
    ("kivi2 + Hadamard V, 4 sink tokens", "kivi2:hv:s4"),
    ("kivi2 + Hadamard K, 4 sink tokens", "kivi2:hk:s4"),
    ("kivi2 + Hadamard V + K, 4 sink tokens", "kivi2:hv:hk:s4"),
    ("kivi2 + Hadamard V, 16 sink tokens", "kivi2:hv:s16"),
    ("kivi2 + Hadamard K, 16 sink tokens", "kivi2:hk:s16"),
    ("kivi2 + Hadamard V + K, 16 sink tokens", "kivi2:hv:hk:s16"),
]
ORDER = {sh: i for i, (_, sh) in enumerate(SCHEMES)}
MODEL_ORDER = ("smollm2-135m", "gemma3-270m")
JSON_DIR = Path("benchmarks/results")


def json_path(model: str) -> Path:
    # the SmolLM2 file keeps its historical name
    return JSON_DIR / ("kv_quality.json" if model == "smollm2-135m" else f"kv_quality_{model}.json")


def measure(model: str, label: str, sh: str, args, dense_fp16: int) -> dict:
    from mcomp import data
    from mcomp.api import load
    from mcomp.passes.assign_kv import apply_kv_flag

    text = data.evaluation_text()
    s = load(model)
    apply_kv_flag(s.gm, sh)
    s.spec = s.gm.meta["mcomp.spec"]
    t0 = time.perf_counter()
    pre = s.streaming_perplexity(text, ctx=args.ctx, max_tokens=args.max_tokens,
                                 mode="prefill", batch_size=args.batch_size)
    st = (s.streaming_perplexity(text, ctx=args.ctx, max_tokens=args.stream_tokens,
                                 mode="stream", batch_size=args.batch_size)
          if args.stream_tokens and sh in args.stream_schemes else None)
    return {"scheme": label, "flag": sh, "prefill": pre, "stream": st,
            "kv_bytes_per_token": pre["kv_bytes_per_token"],
            "ratio_vs_fp16": pre["kv_bytes_per_token"] / dense_fp16,
            "ctx": args.ctx, "max_tokens": args.max_tokens, "stream_tokens": args.stream_tokens,
            "threads": args.threads, "batch_size": args.batch_size,
            "seconds": time.perf_counter() - t0}


def render_model(model: str, rows: list[dict]) -> list[str]:
    rows = sorted(rows, key=lambda r: ORDER.get(r["flag"], len(ORDER)))
    base = next((r for r in rows if r["flag"] == "dense"), rows[0])
    p0 = base["prefill"]
    streamed = [r["flag"] for r in rows if r["stream"]]
    st_tokens = max((r.get("stream_tokens") or 0 for r in rows if r["stream"]), default=0)
    flags = [r["flag"] for r in rows]
    cmd = (f"python benchmarks/bench_kv.py --model {model} --ctx {p0['ctx']} --max-tokens "
           f"{rows[0].get('max_tokens', p0['tokens_scored'])} --stream-tokens {st_tokens} "
           f"--threads {rows[0].get('threads', 2)} --batch-size {rows[0].get('batch_size', 2)}"
           + ("" if flags == [sh for _, sh in SCHEMES] else f" --schemes {' '.join(flags)}")
           + f" --stream-schemes {' '.join(streamed)}")
    lines = [
        f"### {model}",
        "",
        f"`{cmd}` — {p0['ctx']}-token windows, {p0['tokens_scored']} tokens scored in "
        "quantize-before-attend prefill mode; stream columns: token-by-token decode through the "
        f"real cache on the first {st_tokens} tokens (schemes {', '.join(streamed) or 'none'}). "
        f"KL / top-1 against the same model attending to full-precision K/V (ppl "
        f"{p0['base_ppl']:.4f}).",
        "",
        "| KV scheme | `--kv` | ppl | Δppl | KL | top-1 | stream ppl | stream no-cache ppl | KV B/token | × fp16 |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        p, st = r["prefill"], r["stream"]
        lines.append(
            f"| {r['scheme']} | `{r['flag']}` | {p['ppl']:.4f} | "
            f"{100 * (p['ppl'] / p['base_ppl'] - 1):+.2f}% | {p['kld']:.5f} | "
            f"{100 * p['top1_agreement']:.2f}% | "
            + (f"{st['ppl']:.4f} | {st['base_ppl']:.4f}" if st else "- | -")
            + f" | {r['kv_bytes_per_token']} | {r['ratio_vs_fp16']:.3f} |")
    return lines


NOTES = """\
Protocol: Persuasion (`mcomp.data.evaluation_text()`), BOS first in every window. KV bytes: the
quantized store per token over all layers, scales/mins (fp16) included; the fp residual window
(≤ 128 + 31 tokens per layer) and sink tokens are a constant on top. The fp32 model weights come
from the GGUF (4-bit) checkpoints. Rotations: `:hv` = the rotate_v pass (Hadamard on V folded into
v_proj/o_proj weights, verified exact), `:hk` = KVSpec.k_rotation (keys and queries rotated by a
Hadamard matrix after RoPE inside the KIVI cache, exact in full precision)."""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=2044)
    ap.add_argument("--stream-tokens", type=int, default=511)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--schemes", nargs="*", default=None, help="subset of shorthands (or new ones)")
    ap.add_argument("--stream-schemes", nargs="*", default=["kivi2"],
                    help="schemes also decoded token by token (slow in Python)")
    ap.add_argument("--out", default="docs/benchmarks.md")
    ap.add_argument("--render-only", action="store_true",
                    help="measure nothing; rewrite the section from the stored JSON files")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from mcomp.api import load
    from mcomp.bench import write_section

    path = json_path(args.model)
    old = json.loads(path.read_text()) if path.exists() else []
    # rows measured on other windows cannot share a table: keep only those of this protocol
    rows = {r["flag"]: r for r in old if r["prefill"]["ctx"] == args.ctx
            and r.get("max_tokens", r["prefill"]["tokens_scored"]) == args.max_tokens}
    todo = [] if args.render_only else args.schemes or [sh for _, sh in SCHEMES]
    labels = dict((sh, label) for label, sh in SCHEMES)
    if todo:
        dense_fp16 = sum(2 * l.kv_dim * 2 for l in load(args.model).spec.layers)
    for sh in todo:
        row = measure(args.model, labels.get(sh, sh), sh, args, dense_fp16)
        rows[sh] = row
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(list(rows.values()), indent=1))   # after every row: resumable
        p, st = row["prefill"], row["stream"]
        print(json.dumps({"scheme": sh, "ppl": p["ppl"], "base": p["base_ppl"], "kld": p["kld"],
                          "stream_ppl": st and st["ppl"], "seconds": round(row["seconds"])}),
              flush=True)
    lines = ["## KV-cache quantization quality", ""]
    for model in sorted({*MODEL_ORDER, args.model},
                        key=lambda m: MODEL_ORDER.index(m) if m in MODEL_ORDER else 99):
        p = json_path(model)
        if p.exists() and (data := json.loads(p.read_text())):
            lines += render_model(model, data) + [""]
    lines.append(NOTES)
    write_section(args.out, "kv-quality", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

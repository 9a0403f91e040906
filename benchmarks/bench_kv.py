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

`--references dynamic quanto4 quanto2` adds reference rows from transformers' own caches
(mcomp.bench.hf_kv_reference): the same checkpoint run by transformers (fp32, sdpa), decoded
token by token over exactly the stream windows, with `DynamicCache` (the harness check: KL ≈ 0)
and `QuantizedCache(backend="quanto", nbits=4|2, axis_key=0, axis_value=0, q_group_size=32,
residual_length=128)`; KL / top-1 of those rows are against the transformers model without a
cache. They are rendered in a second table per model next to mcomp's stream rows at equal bits.

Results are kept per model in --json (rows replaced by flag, so a run with --schemes updates
only those rows), and the section is rendered from every model's file: run once per model.
Hand-written text after the generated notes (the findings) is kept when the section is rewritten.

    python benchmarks/bench_kv.py [--model smollm2-135m] [--max-tokens 2044] [--stream-tokens 511]
        [--references dynamic quanto4 quanto2]
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
    ("kivi4 per-token K (g32, r128) — ablation", "kivi4:kt"),
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
    ("kivi2 (g64, r128) + Hadamard V + K, 16 sink tokens (≤ 0.16× fp16)", "kivi2:g64:hv:hk:s16"),
    ("kivi2 (g64, r128) + Hadamard V, 16 sink tokens (≤ 0.16× fp16)", "kivi2:g64:hv:s16"),
]
ORDER = {sh: i for i, (_, sh) in enumerate(SCHEMES)}
MODEL_ORDER = ("smollm2-135m", "gemma3-270m")
JSON_DIR = Path("benchmarks/results")


REF_PREFIX = "ref:"      # flag of a reference row: "ref:" + hf_kv_reference.REFERENCES key
# mcomp stream rows shown next to the reference rows of equal bits (same K/V bits, group 32,
# residual 128): per-channel K (KIVI) and per-token K (the granularity quanto can stream)
PEERS = {4: ("kivi4", "kivi4:kt"), 2: ("kivi2", "kivi2:kt")}
KIVI_LAYOUT = {"": "K per-channel (blocks of 32 tokens), V per-token g32; fp16 scale+min; "
                   "128–159 recent tokens fp",
               ":kt": "K and V per-token g32; fp16 scale+min; 128–159 recent tokens fp"}
QUANTO_LAYOUT = ("K and V per-token g32 (axis 0); fp32 scale+shift; 0–127 recent tokens fp, "
                 "all re-quantized when the residual fills")


def is_reference(row: dict) -> bool:
    return row["flag"].startswith(REF_PREFIX)


def json_path(model: str) -> Path:
    # the SmolLM2 file keeps its historical name
    return JSON_DIR / ("kv_quality.json" if model == "smollm2-135m" else f"kv_quality_{model}.json")


def measure(model: str, label: str, sh: str, args, dense_fp16: int) -> dict:
    from mcomp import data
    from mcomp.api import load
    from mcomp.passes.assign_kv import apply_kv_flag

    text = data.evaluation_text()
    s = load(model)
    apply_kv_flag(s.gm, sh, s.tokenizer)
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


def measure_references(model: str, names: list[str], args, dense_fp16: int):
    """Yield transformers-cache rows (hf_kv_reference) on exactly the windows of the stream
    rows, one per reference."""
    from importlib.metadata import version

    from mcomp import data
    from mcomp.api import load
    from mcomp.bench import hf_kv_reference as hkr

    refs = [hkr.get_reference(n) for n in names]
    s = load(model)
    text = data.evaluation_text()
    wins = s.windows(text, args.ctx, args.stream_tokens)                  # (W, ctx)
    hf = hkr.load_hf_model(model, attn_implementation="sdpa")
    t0 = time.perf_counter()
    parity = hkr.compare_no_cache(hf, s.gm, wins)   # transformers vs mcomp, no cache
    parity["seconds"] = round(time.perf_counter() - t0, 2)
    del s
    for ref in refs:
        t0 = time.perf_counter()
        st = hkr.streaming_eval(hf, wins, ref, batch_size=args.batch_size)
        yield {"scheme": ref.label, "flag": REF_PREFIX + ref.name, "reference": ref.to_dict(),
               "prefill": None, "stream": st,
               "kv_bytes_per_token": st["kv_bytes_per_token"],
               "kv_bytes_per_token_fp16_scales": st["kv_bytes_per_token_fp16_scales"],
               "ratio_vs_fp16": st["kv_bytes_per_token"] / dense_fp16,
               "no_cache_vs_mcomp": parity, "attn_implementation": "sdpa",
               "versions": {p: version(p) for p in ("transformers", "optimum-quanto", "torch")},
               "ctx": args.ctx, "max_tokens": args.max_tokens,
               "stream_tokens": args.stream_tokens, "threads": args.threads,
               "batch_size": args.batch_size, "seconds": time.perf_counter() - t0}


def render_references(model: str, rows: list[dict], refs: list[dict]) -> list[str]:
    """Second table: transformers reference caches next to mcomp's stream rows at equal bits."""
    by_flag = {r["flag"]: r for r in rows if r["stream"]}
    ref_bits = sorted({r["reference"]["nbits"] for r in refs if r["reference"]["nbits"]},
                      reverse=True)
    st_tokens = refs[0]["stream"]["tokens_scored"]
    check = next((r for r in refs if r["reference"]["kind"] == "dynamic"), None)
    par = refs[0]["no_cache_vs_mcomp"]
    table = []
    for bits in ref_bits:
        for flag in PEERS.get(bits, ()):
            if flag in by_flag:
                r = by_flag[flag]
                table.append((f"mcomp {r['scheme']}", f"`--kv {flag}`",
                              KIVI_LAYOUT[flag[len(flag.split(':')[0]):]], bits, r,
                              r["kv_bytes_per_token"]))
        for r in refs:
            if r["reference"]["nbits"] == bits:
                table.append((r["scheme"], f"`{r['reference']['config']}`", QUANTO_LAYOUT, bits, r,
                              r["kv_bytes_per_token_fp16_scales"]))
    if check:
        table.append((check["scheme"], f"`{check['reference']['config']}`", "dense fp32 K/V",
                      32, check, check["kv_bytes_per_token_fp16_scales"]))
    mismatched = sorted({row[4]["stream"]["tokens_scored"] for row in table} - {st_tokens})
    lines = [
        f"#### {model}: streaming decode against transformers' QuantizedCache",
        "",
        f"Token-by-token decode of the first {st_tokens} tokens (the stream windows above, BOS "
        f"first, {refs[0]['ctx']}-token windows) through each cache, in one run. mcomp rows: "
        "KL / top-1 against mcomp without a cache; transformers rows: the same HF folder run by "
        f"transformers {refs[0]['versions']['transformers']} (fp32, sdpa attention, "
        f"optimum-quanto {refs[0]['versions']['optimum-quanto']}), KL / top-1 against that "
        "transformers model without a cache. The two no-cache models agree on these windows to "
        f"max |Δlogit| {par['max_abs_logit']:.2g}, KL {par['kld']:.1e}, top-1 "
        f"{100 * par['top1']:.2f}%"
        + (f"; harness check: transformers' DynamicCache streamed gives KL "
           f"{check['stream']['kld']:.1e}, top-1 {100 * check['stream']['top1_agreement']:.2f}%, "
           f"ppl {check['stream']['ppl']:.4f} vs {check['stream']['base_ppl']:.4f} without cache."
           if check else ".")
        + (f" (rows on other token counts: {mismatched})" if mismatched else ""),
        "",
        "| KV cache | configuration | layout | bits | stream ppl | no-cache ppl | KL | top-1 "
        "| KV B/token | × fp16 | B/token with fp16 scales |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, cfg, layout, bits, r, b16 in table:
        st = r["stream"]
        lines.append(f"| {name} | {cfg} | {layout} | {bits} | {st['ppl']:.4f} | "
                     f"{st['base_ppl']:.4f} | {st['kld']:.5f} | "
                     f"{100 * st['top1_agreement']:.2f}% | {r['kv_bytes_per_token']:.0f} | "
                     f"{r['ratio_vs_fp16']:.3f} | {b16:.0f} |")
    lines += [
        "",
        "quanto's `axis_key=-1` (per-channel keys, as KIVI and mcomp's `kivi*`) cannot stream: "
        "quanto groups along the flattened B·H·T rows and requires `q_group_size` to divide "
        "them, but `QuantizedLayer` quantizes its first update (one token: B·H rows) at once, so "
        "it raises `Group size (32) must be a divisor of (…)` at the first token; the reference "
        "therefore uses transformers' default axes (0, 0), i.e. per-token K like mcomp's `:kt` "
        "ablation. KV B/token for quanto is measured on its store after the last window (packed "
        "uint8 codes + scale + shift, over the tokens in the store); quanto keeps scale and shift "
        "in the model dtype (fp32: 2 bits/value on top of the codes vs 1 for mcomp's fp16 "
        "scale/min), the last column counts them at 16 bits.",
    ]
    return lines


def render_model(model: str, rows: list[dict]) -> list[str]:
    refs = [r for r in rows if is_reference(r)]
    rows = [r for r in rows if not is_reference(r)]
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
           + f" --stream-schemes {' '.join(streamed)}"
           + (f" --references {' '.join(r['flag'][len(REF_PREFIX):] for r in refs)}"
              if refs else ""))
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
    if refs:
        lines += [""] + render_references(model, rows, refs)
    return lines


NOTES = """\
Protocol: Persuasion (`mcomp.data.evaluation_text()`), BOS first in every window. KV bytes: the
quantized store per token over all layers, scales/mins (fp16) included; the fp residual window
(≤ 128 + 31 tokens per layer) and sink tokens are a constant on top. The fp32 model weights come
from the GGUF (4-bit) checkpoints. Rotations: `:hv` = the rotate_v pass (Hadamard on V folded into
v_proj/o_proj weights, verified exact), `:hk` = KVSpec.k_rotation (keys and queries rotated by a
Hadamard matrix after RoPE inside the KIVI cache, exact in full precision)."""


def kept_findings(out: str) -> str:
    """Hand-written text that follows NOTES in the current section (kept on rewrite)."""
    p = Path(out)
    text = p.read_text() if p.exists() else ""
    begin, end = "<!-- bench:kv-quality:begin -->", "<!-- bench:kv-quality:end -->"
    if begin not in text or end not in text:
        return ""
    section = text.split(begin, 1)[1].split(end, 1)[0]
    return section.split(NOTES, 1)[1].strip() if NOTES in section else ""


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
    ap.add_argument("--references", nargs="*", default=[],
                    help="transformers reference caches, streamed like --stream-schemes over "
                         "--stream-tokens (comma or space separated): dynamic, quanto4, quanto2")
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
    rows = {r["flag"]: r for r in old if not is_reference(r) and r["prefill"]["ctx"] == args.ctx
            and r.get("max_tokens", r["prefill"]["tokens_scored"]) == args.max_tokens}
    # reference rows are streamed only: same ctx and the same streamed tokens
    rows.update({r["flag"]: r for r in old if is_reference(r) and r["ctx"] == args.ctx
                 and r["stream_tokens"] == args.stream_tokens})
    references = [n for a in args.references for n in a.split(",") if n]
    if args.render_only:
        todo, references = [], []
    else:
        todo = args.schemes or ([] if references else [sh for _, sh in SCHEMES])
    labels = dict((sh, label) for label, sh in SCHEMES)
    if references:
        from mcomp.bench.hf_kv_reference import get_reference
        for n in references:
            get_reference(n)   # fail on a typo before any measuring
    if todo or references:
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
    for ref_row in (measure_references(args.model, references, args, dense_fp16)
                    if references else []):
        rows[ref_row["flag"]] = ref_row
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(list(rows.values()), indent=1))
        st = ref_row["stream"]
        print(json.dumps({"reference": ref_row["flag"], "stream_ppl": st["ppl"],
                          "base": st["base_ppl"], "kld": st["kld"],
                          "top1": st["top1_agreement"], "bytes": st["kv_bytes_per_token"],
                          "seconds": round(ref_row["seconds"])}), flush=True)
    tail = kept_findings(args.out)
    lines = ["## KV-cache quantization quality", ""]
    for model in sorted({*MODEL_ORDER, args.model},
                        key=lambda m: MODEL_ORDER.index(m) if m in MODEL_ORDER else 99):
        p = json_path(model)
        if p.exists() and (data := json.loads(p.read_text())):
            lines += render_model(model, data) + [""]
    lines.append(NOTES)
    if tail:
        lines += ["", tail]
    write_section(args.out, "kv-quality", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

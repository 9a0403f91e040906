"""Structured pruning benchmark → docs/benchmarks.md (one `prune-MODEL` section per model).

For each model: calibrate on the embedded Pride & Prejudice sample (mcomp.data.calibration_text,
default CalibrationConfig: 32 windows × 256 tokens), prune 20% and 30% of the non-embedding
parameters with flap, wanda-sp and magnitude, and evaluate on Persuasion
(mcomp.data.evaluation_text, 512-token windows, BOS first): perplexity, KL divergence and top-1
agreement against the unpruned model (Session.compare), prefill tokens/s of a 512-token prompt
through the runtime's KV-cache path, pruned / unpruned measured alternately in the same run
(median of repeats, torch.set_num_threads), and weight bytes.

    python benchmarks/bench_prune.py [--models smollm2-135m gemma3-270m] [--max-tokens 8192]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch


def prefill_speed(gms: dict, vocab: int, tokens: int = 512, repeats: int = 5,
                  last_logits_only: bool = True) -> dict[str, float]:
    """tokens/s of one 512-token prefill (batch 1) per model, measured round-robin.

    `last_logits_only` (default) measures the prefill of generation (time to first token),
    whose lm_head runs on the last position only; False projects all positions, as a
    perplexity forward does (for SmolLM2 the unpruned head is then ~20% of the FLOPs)."""
    from mcomp.compiler import ir
    from mcomp.runtime.kvcache import AttentionState
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab - 1, (1, tokens), generator=g)
    pos = torch.arange(tokens)[None]
    times: dict[str, list[float]] = {k: [] for k in gms}

    def once(gm):
        state = AttentionState(ir.get_spec(gm), 1, model=gm)
        state.last_logits_only = last_logits_only
        state.begin(pos)
        t0 = time.perf_counter()
        gm(ids, pos, state)
        return time.perf_counter() - t0

    with torch.inference_mode():
        for gm in gms.values():
            once(gm)  # warm-up
        for _ in range(repeats):
            for k, gm in gms.items():
                times[k].append(once(gm))
    return {k: tokens / statistics.median(v) for k, v in times.items()}


def bench_model(model: str, ratios, methods, max_tokens: int, threads: int, log,
                calib_samples: int = 32, prior: dict | None = None, save=None) -> dict:
    """Rows already in `prior` (same settings) are kept, not rerun; `save(out)` runs after
    every row, so a killed run resumes where it stopped."""
    from mcomp import data
    from mcomp.compiler import ir
    from mcomp.compiler.context import CalibrationConfig, CompileContext
    from mcomp.compiler.frontend import import_model
    from mcomp.compiler.manager import PassManager, VerifyConfig
    from mcomp.prune import shrink
    from mcomp.prune.structured import PruneStructured, PruneStructuredConfig
    from mcomp.runtime.session import Session
    from mcomp.runtime.tokenizer import Tokenizer

    torch.set_num_threads(threads)
    imported = import_model(model)
    spec = imported.spec
    base = ir.build(spec, imported.state_dict)
    del imported.state_dict
    tok = Tokenizer.from_dir(imported.hf_dir, spec)
    ctx = CompileContext.from_text(lambda t: tok.encode(t, add_bos=False), data.calibration_text(),
                                   probe_text=data.evaluation_text(), bos_id=tok.bos_id,
                                   config=CalibrationConfig(n_samples=calib_samples))
    base_sess = Session(base, tok)
    text = data.evaluation_text()
    ne, emb = shrink.non_embedding_params(spec), shrink.embedding_params(spec)
    out = {"model": model, "non_embedding_params": ne, "embedding_params": emb,
           "embedding_share": emb / (ne + emb), "threads": threads,
           "calib_samples": calib_samples, "max_tokens": max_tokens, "rows": []}
    same = prior and all(prior.get(k) == out[k] for k in ("threads", "calib_samples", "max_tokens"))
    done = {(x["method"], x["ratio"]): x for x in (prior["rows"] if same else [])}
    t0 = time.perf_counter()
    res = base_sess.perplexity(text, ctx=512, max_tokens=max_tokens)
    out["base"] = {"ppl": res.ppl, "tokens_scored": res.tokens_scored,
                   "weight_bytes": ir.weight_bytes(base)}
    log(f"{model} base ppl {res.ppl:.3f} over {res.tokens_scored} tokens ({time.perf_counter() - t0:.0f}s)")
    for ratio in ratios:
        for method in methods:
            if (method, ratio) in done:
                out["rows"].append(done[(method, ratio)])
                log(f"{model} {method}:{ratio} kept from the previous run")
                continue
            t0 = time.perf_counter()
            p = PruneStructured(PruneStructuredConfig(method=method, ratio=ratio))
            gm, rep = PassManager([p], verify=VerifyConfig(enabled=False)).run(base, ctx, model)
            t_prune = time.perf_counter() - t0
            st = rep.passes[0].stats
            cmp = Session(gm, tok).compare(base_sess, text, ctx=512, max_tokens=max_tokens)
            speed = prefill_speed({"base": base, "pruned": gm}, spec.vocab_size)
            pspec = ir.get_spec(gm)
            row = {"method": method, "ratio": ratio, "removed_ratio": st["removed_ratio"],
                   "ppl": cmp["ppl"], "base_ppl": cmp["base_ppl"], "kld": cmp["kld"],
                   "top1": cmp["top1_agreement"], "tokens_scored": cmp["tokens_scored"],
                   "prefill_tok_s": speed["pruned"], "base_prefill_tok_s": speed["base"],
                   "prefill_ratio": speed["pruned"] / speed["base"],
                   "weight_bytes": ir.weight_bytes(gm), "prune_seconds": t_prune,
                   "structure": st["structure"], "structure_search": st.get("structure_search"),
                   "heads": [l.n_heads for l in pspec.layers],
                   "kv_heads": [l.n_kv_heads for l in pspec.layers],
                   "ffn": [l.ffn_dim for l in pspec.layers]}
            out["rows"].append(row)
            log(f"{model} {method}:{ratio} removed {st['removed_ratio']:.3f} ppl {cmp['ppl']:.3f} "
                f"KL {cmp['kld']:.4f} prefill ×{row['prefill_ratio']:.2f} ({t_prune:.0f}s prune)")
            del gm
            if save is not None:
                save(out)
    return out


def to_markdown(r: dict, command: str) -> str:
    b = r["base"]
    lines = [f"### {r['model']}", "", f"Command: `{command}`", "",
             f"Non-embedding parameters {r['non_embedding_params'] / 1e6:.1f} M, embedding "
             f"{r['embedding_params'] / 1e6:.1f} M ({100 * r['embedding_share']:.0f}% of all "
             f"parameters). Unpruned: ppl {b['ppl']:.3f}, weights {b['weight_bytes'] / 1e6:.1f} MB. "
             f"Evaluated on {b['tokens_scored']} tokens of Persuasion (512-token windows, BOS "
             f"first); calibrated on Pride & Prejudice ({r['calib_samples']} × 256 tokens).", "",
             "| method | structure | target | removed | ppl | Δppl | Δppl ÷ wanda-sp's | KL | top-1 "
             "| prefill ×unpruned | weight MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    wanda = {x["ratio"]: x["ppl"] - x["base_ppl"] for x in r["rows"] if x["method"] == "wanda-sp"}
    for x in r["rows"]:
        inc = x["ppl"] - x["base_ppl"]
        rel = f"{inc / wanda[x['ratio']]:.2f}" if x["ratio"] in wanda else "–"
        lines.append(
            f"| {x['method']} | {x['structure']} | {x['ratio']:.0%} | {100 * x['removed_ratio']:.1f}% "
            f"| {x['ppl']:.3f} | {inc:+.3f} | {rel} | {x['kld']:.4f} | {100 * x['top1']:.1f}% "
            f"| {x['prefill_ratio']:.2f}× | {x['weight_bytes'] / 1e6:.1f} |")
    lines += ["", f"{r['threads']} threads (torch.set_num_threads), torch {torch.__version__}, "
              f"{platform.machine()}. Prefill ratio: one 512-token prompt through the KV-cache "
              "path (last-position logits, as in generation), pruned and unpruned alternated in "
              "the same run, median of 5; on a loaded machine read it with ±0.1× noise (the "
              "quiet-machine measurement is the prefill section below).", ""]
    for x in r["rows"]:
        search = x.get("structure_search")
        why = (" — structure search, calibration loss " +
               ", ".join(f"{k} {v:.4f}" for k, v in search.items())) if search else ""
        lines.append(f"- {x['method']} {x['ratio']:.0%}{why}: heads {x['heads']}, kv heads "
                     f"{x['kv_heads']}, ffn {x['ffn']}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m"])
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.3])
    ap.add_argument("--methods", nargs="+", default=["flap", "wanda-sp", "magnitude"])
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib-samples", type=int, default=32, help="calibration windows of 256 tokens")
    ap.add_argument("--json", default="benchmarks/results/prune.json")
    ap.add_argument("--out", default="docs/benchmarks.md")
    args = ap.parse_args(argv)

    def log(msg):
        print(msg, flush=True)

    from mcomp.bench import write_section
    jpath = Path(args.json)
    jpath.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(jpath.read_text()) if jpath.exists() else []
    for m in args.models:
        def save(r, m=m):
            nonlocal results
            results = [x for x in results if x["model"] != m] + [r]
            jpath.write_text(json.dumps(results, indent=1))

        prior = next((x for x in results if x["model"] == m), None)
        r = bench_model(m, args.ratios, args.methods, args.max_tokens, args.threads, log,
                        args.calib_samples, prior=prior, save=save)
        save(r)
        cmd = (f"python benchmarks/bench_prune.py --models {m} --max-tokens {args.max_tokens} "
               f"--calib-samples {args.calib_samples} --threads {args.threads}")
        md = to_markdown(r, cmd)
        write_section(args.out, f"prune-{m}", md)
        print(md)


if __name__ == "__main__":
    main()

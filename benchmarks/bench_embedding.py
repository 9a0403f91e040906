"""Quantized token embedding (and the tied lm_head that shares it): size vs quality.

    python benchmarks/bench_embedding.py [--model smollm2-135m]
        [--weights rtn:4:g128,rtn:4:g128:emb8,rtn:4:g128:emb4] [--max-tokens 2044]
        [--threads 1] [--out benchmarks/results/embedding.json] [--write-docs]

Each configuration is compiled with `mcomp.optimize(model, "int4", weights=FLAG)` (q/k/v and
gate/up fused, decoder linears RTN int4 g128) and differs only in the embedding suffix: none
(fp32 table, today's default), `:emb8` (8-bit per row, asymmetric, fp16 scale/zero) or `:emb4`
(4-bit g128). SmolLM2 ties lm_head to the embedding, so the head follows the table. Each is
scored with `Session.compare` against the fp32 model (the "fp32" preset) on
mcomp.data.evaluation_text(): BOS-prefixed non-overlapping 512-token windows, KL(fp32 ‖ q) per
predicted token, top-1 agreement, perplexity. The artifact is written too, and its
model.safetensors size is reported next to `ir.weight_bytes` (the tie must be stored once).
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SECTION = "embedding"
DEFAULT_WEIGHTS = ("rtn:4:g128", "rtn:4:g128:emb8", "rtn:4:g128:emb4")
DEFAULT_OUT = Path("benchmarks/results/embedding.json")
log = logging.getLogger("bench_embedding")


def run(model: str, flags: list[str], max_tokens: int, threads: int) -> list[dict]:
    import mcomp
    from mcomp import data
    from mcomp.codegen import save_artifact
    from mcomp.compiler import ir

    torch.set_num_threads(threads)
    text = data.evaluation_text()
    base = mcomp.optimize(model, "fp32")
    base_session = base.session()
    rows = [{"weights": "fp32", "embedding": "fp32", "weight_bytes": ir.weight_bytes(base.gm),
             "artifact_weight_bytes": None, "kld": 0.0, "top1_agreement": 1.0,
             "ppl": None, "base_ppl": None, "tokens_scored": None, "compile_s": 0.0}]
    for flag in flags:
        t0 = time.perf_counter()
        res = mcomp.optimize(model, "int4", weights=flag)
        seconds = time.perf_counter() - t0
        gm = res.gm
        with tempfile.TemporaryDirectory() as tmp:
            art = save_artifact(gm, Path(tmp) / "a", tokenizer_dir=None, source=model)
            stored = (art / "model.safetensors").stat().st_size
        embed = gm.get_submodule("embed")
        emb_stats = res.report.passes[-1].stats.get("embedding") or {}
        score = res.session().compare(base_session, text, ctx=512, max_tokens=max_tokens)
        row = {"weights": flag,
               "embedding": embed.scheme.label() if hasattr(embed, "scheme") else "fp32",
               "tied": ir.get_spec(gm).tie_embeddings,
               "head_shares_table": getattr(gm.get_submodule("lm_head"), "qweight", None)
               is getattr(embed, "qweight", False),
               "table_rel_err": emb_stats.get("weight_rel_err"),
               "weight_bytes": ir.weight_bytes(gm), "artifact_weight_bytes": stored,
               "compile_s": round(seconds, 1), **score}
        log.info("%s: %.1f MB, kld %.4f ppl %.2f (base %.2f)", flag, row["weight_bytes"] / 1e6,
                 row["kld"], row["ppl"], row["base_ppl"])
        rows.append(row)
        del res, gm
    for r in rows[1:]:
        rows[0].update(ppl=r["base_ppl"], base_ppl=r["base_ppl"], tokens_scored=r["tokens_scored"])
    return rows


def markdown(rows: list[dict], model: str, flags: list[str], max_tokens: int, threads: int) -> str:
    q = [r for r in rows if r["weights"] != "fp32"]
    cmd = (f"python benchmarks/bench_embedding.py --model {model} --weights {','.join(flags)} "
           f"--max-tokens {max_tokens} --threads {threads} --write-docs")
    lines = [
        "## Quantized token embedding and tied lm_head",
        "",
        "```",
        cmd,
        "```",
        "",
        f"{model}, decoder linears RTN int4 g128 (q/k/v and gate/up fused) in every quantized row; "
        "only the token embedding differs. The model ties lm_head to the embedding, so a "
        "quantized table is also the head (a QuantLinear over the same tensors, stored once). "
        f"KL(fp32 ‖ q) and top-1 agreement per predicted token against the fp32 model, "
        f"{q[0]['tokens_scored']} tokens of Persuasion in BOS-prefixed 512-token windows; "
        f"{threads} thread(s). Weight MB = `ir.weight_bytes` (ties counted once); artifact MB = "
        "size of model.safetensors written by `save_artifact` (header included). Table error = "
        "‖E − Ê‖²/‖E‖² of the embedding. Caveat: this checkpoint's fp32 table was dequantized from "
        "the GGUF's Q8_0 `token_embd` (blocks of 32, one scale each), so it already carries 8-bit "
        "rounding; a per-row 8-bit grid is coarser than Q8_0 and its error here is real, but the "
        "8-bit row cannot show what Q8_0 itself cost.",
        "",
        "| weights | embedding (= tied head) | table error | weight MB | artifact MB | KL vs fp32 | "
        "top-1 | ppl |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        art = "-" if r["artifact_weight_bytes"] is None else f"{r['artifact_weight_bytes'] / 1e6:.1f}"
        err = "-" if r.get("table_rel_err") is None else f"{r['table_rel_err']:.2e}"
        lines.append(f"| `{r['weights']}` | {r['embedding']} | {err} | {r['weight_bytes'] / 1e6:.1f} | "
                     f"{art} | {r['kld']:.4f} | {r['top1_agreement']:.3f} | {r['ppl']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--weights", default=",".join(DEFAULT_WEIGHTS))
    ap.add_argument("--max-tokens", type=int, default=2044)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--write-docs", action="store_true")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    flags = [f.strip() for f in a.weights.split(",") if f.strip()]
    rows = run(a.model, flags, a.max_tokens, a.threads)
    out = a.out if a.out.is_absolute() else ROOT / a.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": a.model, "threads": a.threads, "max_tokens": a.max_tokens,
                               "rows": rows}, indent=1))
    md = markdown(rows, a.model, flags, a.max_tokens, a.threads)
    print(md)
    if a.write_docs:
        from mcomp.bench import write_section
        write_section(ROOT / "docs/benchmarks.md", SECTION, md)


if __name__ == "__main__":
    main()

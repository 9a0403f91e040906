"""`mcomp` command line: thin click commands over mcomp.api.

Errors: one line on stderr and a non-zero exit code — 2 usage/config, 3 model or artifact,
4 internal/pass/kernel. `--debug` (before the command) shows the traceback instead.
"""
from __future__ import annotations

import json
import logging
import sys
from contextlib import contextmanager

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..compiler.frontend import BUILTIN_MODELS, DEFAULT_MODEL
from ..errors import MCompError
from ..runtime.kv import shorthand_help

# --kv help is built from the registered KV representations (runtime/kv/), not written here
KV_HELP = f"KV representation shorthand, one of: {shorthand_help()}."

err = Console(stderr=True)
out = Console()
if not out.is_terminal:   # piped or captured: rich would assume 80 columns and truncate tables
    out = Console(width=160)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


@contextmanager
def _progress(label: str, enabled: bool = True):
    """A rich progress bar on stderr; yields an (done, total[, text]) callback."""
    if not enabled:
        yield lambda *a, **k: None
        return
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err, transient=True) as prog:
        task = prog.add_task(label, total=None)

        def update(done, total, text=None):
            prog.update(task, completed=done, total=total,
                        description=f"{label} {text}" if text else label)

        yield update


class CLIGroup(click.Group):
    """Turns mcomp errors into one line + exit code, everything else into an internal error."""

    def invoke(self, ctx):
        debug = "--debug" in sys.argv[1:]
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except MCompError as e:
            if debug:
                raise
            err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            err.print("interrupted")
            sys.exit(130)
        except Exception as e:  # our bug or the environment's: still one line unless --debug
            if debug:
                raise
            err.print(f"[red]internal error:[/red] {type(e).__name__}: {e} "
                      "(run with --debug for a traceback)", highlight=False, soft_wrap=True)
            sys.exit(4)


@click.group(cls=CLIGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.version_option(package_name="mcomp")
def cli(debug: bool, verbose: int):
    """mcomp: compress transformer LMs (prune, quantize, KV) into verified, runnable artifacts."""
    from rich.logging import RichHandler
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(message)s",
                        handlers=[RichHandler(console=err, show_path=False)])


MODEL_HELP = (f"Model: a built-in name ({', '.join(BUILTIN_MODELS.names())}), a HF checkpoint "
              f"folder, or a .gguf file. Default: {DEFAULT_MODEL}.")
TARGET_HELP = "An artifact directory, or anything MODEL accepts."


# ----------------------------------------------------------------------------- optimize
@cli.command()
@click.argument("model", required=False, default=DEFAULT_MODEL)
@click.option("--preset", help="Named recipe shipped with mcomp (default: int4).")
@click.option("--recipe", "recipe_file", type=click.Path(dir_okay=False),
              help="Recipe TOML file (see docs/recipes.md).")
@click.option("--weights", help="Weight quantization shorthand METHOD:BITS[:gGROUP][:emb[BITS[gGROUP]]], "
              "e.g. rtn:4:g128, rtn:8 (per-channel), rtn:4:pc; a suffix :emb8 (or :emb, :emb4g64) also "
              "quantizes the token embedding and a tied lm_head with it (one shared table). "
              "Replaces the recipe's weight pass. With --weight-budget "
              "or --weight-bits: a bare METHOD (rtn, hqq, gptq, awq) choosing the quantizer.")
@click.option("--weight-budget", metavar="SIZE", help="Mixed precision: total weight bytes of the "
              "result (embedding, norms, fp lm_head included), e.g. 60MB, 57.5MiB; per linear the "
              "format with the least measured damage that fits. Default quantizer: rtn.")
@click.option("--weight-bits", type=float, metavar="BITS", help="Mixed precision: average bits per "
              "quantized weight, scales and zeros counted, e.g. 3.5.")
@click.option("--prune", help="Structured pruning shorthand METHOD:RATIO (share of non-embedding "
              "parameters removed), e.g. flap:0.2, wanda-sp:0.3, magnitude:0.2; METHOD:SIZE for the "
              "weight bytes to end at, e.g. flap:400MB; or layers:N to remove N whole blocks. "
              "Replaces the recipe's prune stage.")
@click.option("--kv", "kv", help=KV_HELP + " Replaces the recipe's kv stage (assign_kv, plus the "
              "weight rewrites a shorthand asks for, e.g. rotate_v for kivi's :hv); see docs/recipes.md.")
@click.option("--calib", type=click.Path(dir_okay=False), help="Calibration text file (default: embedded Austen sample).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Artifact directory to write "
              "(default: out/<model>-<recipe>).")
@click.option("--emit", default="safetensors", show_default=True, metavar="FORMATS",
              help="What to write, comma-separated: safetensors (the mcomp artifact), onnx "
              "(model.onnx + genai_config.json for onnxruntime / onnxruntime-genai). "
              "'safetensors,onnx' puts both in one folder.")
@click.option("--onnx-accuracy-level", type=click.IntRange(0, 4), default=None,
              help="MatMulNBits compute type of the ONNX export: 4 (default) int8 activations, "
              "onnxruntime's fast CPU path; 0 fp32 activations.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def optimize(model, preset, recipe_file, weights, weight_budget, weight_bits, prune, kv, calib,
             out_dir, emit, onnx_accuracy_level, as_json):
    """Import MODEL, run a verified pass pipeline, write an artifact and print its report."""
    from .. import api
    if preset and recipe_file:
        raise click.UsageError("give --preset or --recipe, not both")
    recipe = api.resolve_recipe(recipe_file or preset, weights, prune, kv,
                                weight_budget=weight_budget, weight_bits=weight_bits)
    if out_dir is None:
        stem = model if model in BUILTIN_MODELS else __import__("pathlib").Path(model).stem
        out_dir = f"out/{stem}-{recipe.name.replace('+', '-')}"
    with _progress("optimize", enabled=not as_json) as update:
        at = {"i": 0, "n": 0, "name": ""}     # the running pass, for per-layer progress text

        def on_pass(i, n, name):
            at.update(i=i, n=n, name=name)
            update(i, n, name)

        def on_layer(layer, n_layers, stats):
            phase = stats.get("phase", "layer")
            update(at["i"], at["n"], f"{at['name']}: {phase} {layer + 1}/{n_layers}")

        onnx_opts = {} if onnx_accuracy_level is None else {"accuracy_level": onnx_accuracy_level}
        result = api.optimize(model, recipe, calib=calib, out=out_dir, emit=emit,
                              emit_options={"onnx": onnx_opts}, on_pass=on_pass, on_layer=on_layer)
    rep = result.report.to_dict()
    if as_json:
        out.print_json(json.dumps({"artifact": str(result.artifact), "recipe": recipe.to_dict(),
                                   "report": rep}, default=str))
        return
    t = Table(title=f"{model} · recipe {recipe.name}", title_justify="left")
    t.add_column("pass", no_wrap=True)
    for col in ("seconds", "max |Δlogit|", "KL", "top-1", "KL total", "weights"):
        t.add_column(col, justify="right")
    for p in rep["passes"]:
        d, dt = p["drift"] or {}, p["drift_total"] or {}
        t.add_row(p["name"], f"{p['seconds']:.2f}", f"{d.get('max_abs_logit', float('nan')):.3g}",
                  f"{d.get('kld', float('nan')):.2e}", f"{d.get('top1', float('nan')):.3f}",
                  f"{dt.get('kld', float('nan')):.2e}", _mb(p["weight_bytes"]))
    out.print(t)
    lb, la = rep["linear_bytes_before"], rep["linear_bytes_after"]
    out.print(f"weights {_mb(rep['weight_bytes_before'])} → {_mb(rep['weight_bytes_after'])}; "
              f"decoder linears {_mb(lb)} → {_mb(la)} ({100 * la / max(lb, 1):.1f}%)")
    for p in rep["passes"]:
        kd = p.get("kv_drift")
        if kd:
            out.print(f"{p['name']}: through the KV caches (prefill {kd['prefill']}, then "
                      f"{kd['decode_steps']} decode steps vs no cache): max |Δlogit| "
                      f"{kd['max_abs_logit']:.3g}, KL {kd['kld']:.2e}, top-1 {kd['top1']:.3f}; "
                      f"cache bytes match the kinds' accounting ({kd['kv_bytes']:,} B)")
    mixed = next((p["stats"] for p in rep["passes"] if p["name"] == "quantize_weights_mixed"), None)
    if mixed:
        sens = mixed["sensitivity"]
        formats = ", ".join(f"{n}× {f}" for f, n in sorted(mixed["formats"].items()))
        took = "from cache" if sens["cached"] else f"in {sens['seconds']:.1f}s"
        out.print(f"mixed plan ({mixed['method']}, {sens['measure']} sensitivity {took}): {formats}; "
                  f"{mixed['avg_bits']:.3f} bits/weight; weights predicted "
                  f"{mixed['predicted_weight_bytes']:,} B, measured {mixed['measured_weight_bytes']:,} B "
                  "(`mcomp inspect` for the table)")
    from ..codegen.emit import ARTIFACT, parse_emit
    if ARTIFACT in parse_emit(emit):
        out.print(f"artifact: [bold]{result.artifact}[/bold]  (probe drift measured on the embedded "
                  f"evaluation text; run `mcomp eval {result.artifact} --base {model}` for KL/perplexity)")
    else:   # an export only: mcomp eval/run need the safetensors artifact, genai runs the folder
        out.print(f"export: [bold]{result.artifact}[/bold]  (probe drift measured in mcomp before "
                  f"lowering; run it with onnxruntime_genai.Model('{result.artifact}'))")


# ----------------------------------------------------------------------------- export
@cli.command()
@click.argument("artifact", type=click.Path(file_okay=False))
@click.option("--format", "fmt", default="onnx", show_default=True, help="Target format.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder to write (a new or empty folder, or an earlier mcomp export).")
@click.option("--accuracy-level", type=click.IntRange(0, 4), default=None,
              help="onnx: MatMulNBits compute type, 4 (default) int8 activations, 0 fp32.")
@click.option("--max-length", type=click.IntRange(1), default=None,
              help="onnx: positions the rotary caches cover, genai's context_length "
              "(default: the model's positions, at most 4096).")
def export(artifact, fmt, out_dir, accuracy_level, max_length):
    """Export a written ARTIFACT to another runtime's format (onnx: onnxruntime, onnxruntime-genai)."""
    from .. import api
    opts = {k: v for k, v in (("accuracy_level", accuracy_level), ("max_length", max_length))
            if v is not None}
    with _progress("export") as update:
        update(0, 1, f"lowering to {fmt}")
        path = api.export(artifact, out_dir, fmt, opts)
        update(1, 1, "written")
    total = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    out.print(f"{fmt} export: [bold]{path}[/bold] ({_mb(total)})")


# ----------------------------------------------------------------------------- run
@cli.command()
@click.argument("target", default=DEFAULT_MODEL)
@click.option("--prompt", "-p", required=True, help="Prompt text.")
@click.option("--max-new-tokens", "-n", default=64, show_default=True, type=click.IntRange(1, 100000))
@click.option("--temperature", "-t", default=0.0, show_default=True, type=click.FloatRange(0.0),
              help="0 = greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0.0, 1.0))
@click.option("--seed", default=None, type=int, help="Seed for sampling.")
def run(target, prompt, max_new_tokens, temperature, top_p, seed):
    """Generate text from TARGET, streaming it to stdout."""
    from .. import api
    session = api.load(target)
    sys.stdout.write(prompt)
    sys.stdout.flush()
    for piece in session.stream(prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                                top_p=top_p, seed=seed):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


# ----------------------------------------------------------------------------- eval
@cli.command("eval")
@click.argument("target", default=DEFAULT_MODEL)
@click.option("--data", "data_file", type=click.Path(dir_okay=False),
              help="Evaluation text (default: embedded Austen sample, Persuasion).")
@click.option("--ctx", default=512, show_default=True, type=click.IntRange(2), help="Window length (BOS included).")
@click.option("--max-tokens", default=None, type=click.IntRange(1),
              help="Text tokens to consume at most [default: 16384; 1024 with --streaming/--quantized-prefill].")
@click.option("--base", help="Base model/artifact: also report KL divergence and top-1 agreement against it.")
@click.option("--kv", "kv", help="Apply a KV representation to TARGET first; evaluate it with "
              "--streaming or --quantized-prefill. " + KV_HELP)
@click.option("--streaming", is_flag=True, help="Token-by-token decode through the real KV cache "
              "(slow; default 1024 tokens). Reports KL/top-1 against the same model without a cache.")
@click.option("--quantized-prefill", is_flag=True, help="One forward per window in quantize-before-"
              "attend mode (every query sees the cache state streaming would have had; fast).")
@click.option("--passkey", "passkey", metavar="LENGTHS", help="Passkey retrieval instead of "
              "perplexity at these context lengths in tokens, e.g. 1024,2048 or 1k,2k,4k,8k: the "
              "haystack is prefilled, the question fed token by token through the cache; compares "
              "the --kv scheme (or the target's own KV) with a dense fp32 cache trial by trial.")
@click.option("--passkey-trials", default=5, show_default=True, type=click.IntRange(1),
              help="Passkey trials per length (needle depths spread over 0.1..0.9, seeded keys).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_(target, data_file, ctx, max_tokens, base, kv, streaming, quantized_prefill, passkey,
          passkey_trials, as_json):
    """Perplexity of TARGET (non-overlapping windows, BOS first); with --base, KL and top-1 too.

    Plain evaluation attends without a KV cache, so it cannot see KV compression: use
    --streaming (or --quantized-prefill) for that, or --passkey for long-context retrieval."""
    from .. import api, data
    if streaming and quantized_prefill:
        raise click.UsageError("give --streaming or --quantized-prefill, not both")
    if passkey is not None:
        if streaming or quantized_prefill or base or data_file:
            raise click.UsageError("--passkey builds its own prompts; it does not combine with "
                                   "--data, --base, --streaming or --quantized-prefill")
        _eval_passkey(target, kv, passkey, passkey_trials, as_json)
        return
    kv_mode = "stream" if streaming else "prefill" if quantized_prefill else None
    if kv_mode and base:
        raise click.UsageError("--base is for plain evaluation; KV evaluation reports KL against "
                               "TARGET without a cache")
    if max_tokens is None:
        max_tokens = 1024 if kv_mode else 16384
    text = data.read_text(data_file) if data_file else data.evaluation_text()
    session = api.load(target)
    if kv:
        from ..passes.assign_kv import apply_kv_flag
        # `:hv` also rotates V in the (float) weights; palu/think calibrate on the embedded text
        apply_kv_flag(session.gm, kv, session.tokenizer)
        session.spec = session.gm.meta["mcomp.spec"]
        if not kv_mode:
            err.print("[yellow]note:[/yellow] --kv without --streaming/--quantized-prefill: plain "
                      "evaluation attends without a cache and does not see the KV scheme")
    with _progress("eval", enabled=not as_json) as update:
        if kv_mode:
            res = session.streaming_perplexity(text, ctx=ctx, max_tokens=max_tokens, mode=kv_mode,
                                               progress=update)
        elif base:
            res = session.compare(api.load(base), text, ctx=ctx, max_tokens=max_tokens, progress=update)
        else:
            res = session.perplexity(text, ctx=ctx, max_tokens=max_tokens, progress=update).to_dict()
    res = {"target": str(target), "data": data_file or "embedded:eval_persuasion.txt", "ctx": ctx, **res}
    if as_json:
        out.print_json(json.dumps(res, default=str))
        return
    line = f"ppl {res['ppl']:.4f} over {res['tokens_scored']} tokens (ctx {ctx})"
    if kv_mode:
        line += (f", {kv_mode} mode, KV {', '.join(res['kv'])} ({res['kv_bytes_per_token']} B/token); "
                 f"no-cache ppl {res['base_ppl']:.4f}; KL {res['kld']:.5f}; "
                 f"top-1 agreement {100 * res['top1_agreement']:.2f}%")
    elif base:
        line += (f"; base ppl {res['base_ppl']:.4f}; KL {res['kld']:.5f}; "
                 f"top-1 agreement {100 * res['top1_agreement']:.2f}%")
    out.print(line)


def _eval_passkey(target, kv, lengths_text, trials, as_json):
    from .. import api
    from ..runtime import passkey as pk
    lengths = pk.parse_lengths(lengths_text)
    session = api.load(target)
    own = [pk.TARGET] if any(l.kv.kind != "dense" for l in session.spec.layers) else []
    cfg = pk.PasskeyConfig(lengths=lengths, schemes=("dense", *([kv] if kv else own)),
                           trials=trials)
    with _progress("passkey", enabled=not as_json) as update:
        rep = pk.run_passkey(session, cfg, progress=update)
    res = {"target": str(target), **rep.to_dict()}
    if as_json:
        out.print_json(json.dumps(res, default=str))
        return
    ref = cfg.reference
    others = [s for s in cfg.schemes if s != ref]
    t = Table(title=f"{target} · passkey retrieval, {trials} trials per length (greedy, "
              f"question fed token by token)", title_justify="left")
    t.add_column("length", justify="right")
    for s in cfg.schemes:
        t.add_column(f"{rep.labels[s]} correct", justify="right")
    for s in others:
        t.add_column(f"{s} = {ref}", justify="right")
        t.add_column(f"{s} needle quantized", justify="right")
    by = {(r["length"], r["scheme"]): r for r in rep.summary()}
    for n in cfg.lengths:
        cells = [f"{by[n, s]['correct']}/{by[n, s]['trials']}" for s in cfg.schemes]
        for s in others:
            r = by[n, s]
            cells.append(f"{r['matches_reference']}/{r['trials']}")
            cells.append("-" if r["needle_quantized"] is None else f"{r['needle_quantized']}/{r['trials']}")
        t.add_row(str(n), *cells)
    out.print(t)
    for s in others:
        out.print(f"{s} answers equal the {ref} cache's on every trial: "
                  f"{'yes' if rep.matches_reference(s) else 'no'}")
    out.print(f"{rep.seconds:.0f} s; lengths count prompt + {cfg.answer_tokens} answer tokens; "
              "'needle quantized': trials where the needle sat in the quantized store (not the fp "
              "residual window) when the answer began")


# ----------------------------------------------------------------------------- inspect
@cli.command()
@click.argument("target", default=DEFAULT_MODEL)
@click.option("--json", "as_json", is_flag=True)
def inspect(target, as_json):
    """Per-layer table: heads, KV heads, head_dim, FFN, weight bytes and scheme, KV bytes/token."""
    from .. import api
    info = api.inspect(target)
    if as_json:
        out.print_json(json.dumps(info, default=str))
        return
    t = Table(title=f"{target} ({info['family']})", title_justify="left")
    for col in ("layer", "heads", "kv heads", "head_dim", "ffn", "window", "weights", "scheme", "KV B/token"):
        t.add_column(col, justify="left" if col == "scheme" else "right")
    for l in info["layers"]:
        t.add_row(str(l["layer"]), str(l["heads"]), str(l["kv_heads"]), str(l["head_dim"]),
                  str(l["ffn"]), str(l["window"] or "-"), _mb(l["weight_bytes"]),
                  ", ".join(l["schemes"]), f"{l['kv_bytes_per_token']} ({l['kv_label']})")
    out.print(t)
    if info.get("mixed"):
        _print_plan(info["mixed"])
    tot = info["totals"]
    out.print(f"total weights {_mb(tot['weight_bytes'])} (decoder linears "
              f"{_mb(tot['linear_weight_bytes'])}, embedding/head/norms "
              f"{_mb(tot['embedding_and_head_bytes'])}"
              + (f", KV factors {_mb(tot['kv_state_bytes'])}" if tot.get("kv_state_bytes") else "")
              + f"); KV cache {tot['kv_bytes_per_token']} bytes/token "
              f"({tot['kv_bytes_per_token'] * 2048 / 1e6:.1f} MB at 2048 tokens)")
    costs = "; ".join(f"at {n} tokens {c['bytes_read'] / 1e6:.1f} MB read, {c['flops'] / 1e9:.2f} GFLOP"
                      for n, c in tot["kv_decode_cost"].items())
    out.print(f"KV cost model, one decode step over all layers (attention and any "
              f"rematerialization, batch 1): {costs}")
    head = "tied (shares the table)" if tot["tie_embeddings"] else tot["lm_head"]
    out.print(f"embedding {tot['embedding']}; lm_head {head}")


def _print_plan(mixed: dict) -> None:
    """Per-layer format table of a mixed-precision artifact (one column per linear role)."""
    rows = mixed["plan"]
    roles = list(dict.fromkeys(r["role"] for r in rows))
    by_layer: dict = {}
    for r in rows:
        by_layer.setdefault(r["layer"], {})[r["role"]] = r
    t = Table(title=f"mixed-precision plan ({mixed.get('method') or 'read from the modules'})",
              title_justify="left")
    t.add_column("layer", justify="right")
    for role in roles:
        t.add_column(role, justify="left")
    t.add_column("bytes", justify="right")
    for layer, cells in by_layer.items():
        t.add_row("head" if layer is None else str(layer),
                  *[cells[r]["format"] if r in cells else "" for r in roles],
                  _mb(sum(c["bytes"] for c in cells.values())))
    out.print(t)
    formats = ", ".join(f"{n}× {f}" for f, n in sorted(mixed["formats"].items()))
    pred = mixed.get("predicted_weight_bytes")
    line = f"formats: {formats}; weights measured {mixed['measured_weight_bytes']:,} B"
    if pred is not None:
        target = mixed.get("target") or {}
        goal = (f"{target['budget_bytes']:,} B" if target.get("budget_bytes")
                else f"{target.get('avg_bits')} bits/weight")
        line += (f", predicted {pred:,} B (target {goal}; the plan has {mixed['avg_bits']:.3f} "
                 "bits/weight)")
    out.print(line)


# ----------------------------------------------------------------------------- bench
@cli.group()
def bench():
    """Reproducible benchmarks; results as markdown tables in docs/benchmarks.md."""


@bench.command("runtime")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help=MODEL_HELP)
@click.option("--threads", default=2, show_default=True, type=click.IntRange(1))
@click.option("--decode-steps", default=32, show_default=True, type=click.IntRange(1))
@click.option("--out", "out_file", default="docs/benchmarks.md", show_default=True,
              type=click.Path(dir_okay=False), help="Markdown file whose runtime section is replaced.")
@click.option("--json", "as_json", is_flag=True)
def bench_runtime(model, threads, decode_steps, out_file, as_json):
    """HF eager fp32 vs mcomp fp32 vs mcomp int4: prefill/decode tokens/s, weight bytes, peak RSS."""
    from pathlib import Path

    from ..bench import runtime as rb
    cfg = rb.BenchConfig(model=model, threads=threads, decode_steps=decode_steps)
    with _progress("bench", enabled=not as_json) as update:
        results = rb.run(cfg, progress=lambda text: update(0, None, text))
    rb.write_report(results, cfg, Path(out_file))
    if as_json:
        out.print_json(json.dumps(results))
    else:
        out.print(rb.to_markdown(results, cfg))
        out.print(f"written to {out_file}")


@bench.command("decode")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help=MODEL_HELP)
@click.option("--preset", default="fp32", show_default=True, help="Weights for every row.")
@click.option("--kv", "kv", multiple=True, default=("kivi2",), show_default=True,
              help="KV scheme(s) to compare with the dense fp32 cache; repeat for several. " + KV_HELP)
@click.option("--ctx", default=8192, show_default=True, type=click.IntRange(2),
              help="Context length the last decode step attends over.")
@click.option("--steps", default=32, show_default=True, type=click.IntRange(1))
@click.option("--threads", default=2, show_default=True, type=click.IntRange(1))
@click.option("--out", "out_file", default="docs/benchmarks.md", show_default=True,
              type=click.Path(dir_okay=False), help="Markdown file whose kv-decode section is replaced.")
@click.option("--no-write", is_flag=True, help="Do not write the markdown section.")
@click.option("--json", "as_json", is_flag=True)
def bench_decode(model, preset, kv, ctx, steps, threads, out_file, no_write, as_json):
    """End-to-end decode tokens/s at long context: dense fp32 KV cache vs quantized KV caches,
    same weights, same threads, each row in its own process."""
    from ..bench import kv_decode as kd
    cfg = kd.DecodeBenchConfig(model=model, preset=preset, kv=tuple(kv), ctx=ctx, steps=steps,
                               threads=threads)
    with _progress("bench", enabled=not as_json) as update:
        res = kd.run(cfg, progress=lambda text: update(0, None, text))
    if not no_write:
        from ..bench import write_section
        write_section(out_file, kd.section(res), kd.to_markdown(res))
    if as_json:
        out.print_json(json.dumps(res))
    else:
        out.print(kd.to_markdown(res).split("\n```json")[0])


@bench.command("anchors")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="A built-in model (its GGUF feeds llama.cpp).")
@click.option("--ctx", "ctxs", multiple=True, type=click.IntRange(2), default=(128, 2048),
              show_default=True, help="Decode context length(s); repeat for several.")
@click.option("--weights", "weights", multiple=True, default=("int4", "rtn:4:g128:emb8"),
              show_default=True, help="mcomp preset or --weights spec per row, optionally +KV (e.g. "
              "rtn:4:g128:emb8+kivi4); repeat for several.")
@click.option("--llama-quant", "llama_quants", multiple=True, default=("Q4_0", "shipped"),
              show_default=True, help="llama.cpp file type per row (requantized by llama.cpp), "
              "or 'shipped' for the model's own GGUF.")
@click.option("--llama-kv", "llama_kv", multiple=True, default=("f16",), show_default=True,
              type=click.Choice(["f16", "q8_0", "q4_0"]), help="llama.cpp KV cache type(s).")
@click.option("--threads", default=2, show_default=True, type=click.IntRange(1))
@click.option("--rounds", default=3, show_default=True, type=click.IntRange(1))
@click.option("--steps", default=32, show_default=True, type=click.IntRange(1))
@click.option("--out", "out_file", default="docs/benchmarks.md", show_default=True,
              type=click.Path(dir_okay=False), help="Markdown file whose anchors section is replaced.")
@click.option("--no-write", is_flag=True, help="Do not write the markdown section.")
@click.option("--json", "as_json", is_flag=True)
def bench_anchors(model, ctxs, weights, llama_quants, llama_kv, threads, rounds, steps, out_file,
                  no_write, as_json):
    """mcomp vs llama.cpp on the same checkpoint, threads and tokens, in one run: prefill and
    decode tok/s, fraction of the bandwidth bound, peak RSS."""
    import sys

    from ..bench import anchors as ab
    cfg = ab.AnchorConfig(model=model, threads=threads, contexts=tuple(ctxs), steps=steps,
                          rounds=rounds, mcomp_weights=tuple(weights),
                          llama_quants=tuple(llama_quants), llama_kv=tuple(llama_kv))
    with _progress("bench", enabled=not as_json) as update:
        res = ab.run(cfg, progress=lambda text: update(0, None, text))
    if not no_write:
        ab.write_report(res, out_file, "mcomp bench " + " ".join(sys.argv[2:]))
    if as_json:
        out.print_json(json.dumps(res))
    else:
        out.print(ab.to_markdown(res))


@bench.command("onnx")
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help=MODEL_HELP)
@click.option("--weights", "weights", multiple=True, default=("rtn:4:g128:emb8", "gptq:4:g64:emb4g32"),
              show_default=True, help="--weights spec per mcomp row (each gives a runtime row and "
              "an onnxruntime-genai row on its export); repeat for several.")
@click.option("--ctx", "ctxs", multiple=True, type=click.IntRange(2), default=(128, 2048),
              show_default=True, help="Decode context length(s); repeat for several.")
@click.option("--no-builder", is_flag=True, help="Leave out the onnxruntime-genai builder's int4 row.")
@click.option("--text", "texts", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Another evaluation text (a KL column each, besides the embedded one); repeat "
              "for several domains, e.g. code and legal text.")
@click.option("--threads", default=2, show_default=True, type=click.IntRange(1))
@click.option("--rounds", default=3, show_default=True, type=click.IntRange(1))
@click.option("--out", "out_file", default="docs/benchmarks.md", show_default=True,
              type=click.Path(dir_okay=False), help="Markdown file whose onnx section is replaced.")
@click.option("--no-write", is_flag=True, help="Do not write the markdown section.")
@click.option("--json", "as_json", is_flag=True)
def bench_onnx(model, weights, ctxs, no_builder, texts, threads, rounds, out_file, no_write, as_json):
    """mcomp runtime vs onnxruntime-genai on mcomp's ONNX export vs onnxruntime-genai on the
    builder's int4 model: prefill/decode tok/s, file size, KL vs fp32, in one run."""
    from pathlib import Path

    from ..bench import onnx as ob
    cfg = ob.OnnxBenchConfig(model=model, weights=tuple(weights), contexts=tuple(ctxs),
                             threads=threads, rounds=rounds, builder=not no_builder,
                             texts=tuple(str(Path(t).resolve()) for t in texts))
    with _progress("bench onnx", enabled=not as_json) as update:
        res = ob.run(cfg, progress=lambda text: update(0, None, text))
    if not no_write:
        ob.write_report(res, Path(out_file))
    if as_json:
        out.print_json(json.dumps(res))
    else:
        out.print(ob.to_markdown(res))


@bench.command("attention")
@click.option("--ctx", "ctxs", multiple=True, type=click.IntRange(1), default=(4096, 16384, 32768),
              show_default=True, help="Context length(s); repeat the option for several.")
@click.option("--kv", "kv", default="kivi2", show_default=True, help="KV scheme (kivi2, kivi4, ...).")
@click.option("--threads", default=2, show_default=True, type=click.IntRange(1))
@click.option("--repeats", default=20, show_default=True, type=click.IntRange(1))
@click.option("--layers", default=1, show_default=True, type=click.IntRange(1),
              help="Independent layer caches walked per timed call, as a decode step walks a "
              "model's layers (30 for SmolLM2: caches come from DRAM, not L3). Times are per layer.")
@click.option("--out", "out_file", default="docs/benchmarks.md", show_default=True,
              type=click.Path(dir_okay=False), help="Markdown file whose kv section is replaced.")
@click.option("--no-write", is_flag=True, help="Do not write the markdown section.")
@click.option("--json", "as_json", is_flag=True)
def bench_attention(ctxs, kv, threads, repeats, layers, out_file, no_write, as_json):
    """One decode attention step over a KIVI cache (fast kernel) vs SDPA over dense fp32 / bf16
    caches, SmolLM2 shapes (9 q heads, 3 KV heads, head_dim 64), same threads."""
    from ..bench import kv_attention as kb
    results = kb.run(list(ctxs), kv=kv, threads=threads, repeats=repeats, layers=layers)
    if not no_write:
        from ..bench import write_section
        write_section(out_file, kb.section(results), kb.to_markdown(results))
    if as_json:
        out.print_json(json.dumps(results))
    else:
        out.print(kb.to_markdown(results))


def main():
    cli(prog_name="mcomp")


if __name__ == "__main__":
    main()

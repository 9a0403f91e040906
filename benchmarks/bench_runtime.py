"""Runtime benchmark (HF eager fp32 vs mcomp fp32 vs mcomp int4) → docs/benchmarks.md.

Same as `mcomp bench runtime`; kept as a script so the benchmark is reproducible from a checkout:
    python benchmarks/bench_runtime.py [--threads 2] [--model smollm2-135m]
"""
from mcomp.cli.main import cli

if __name__ == "__main__":
    import sys
    cli(["bench", "runtime", *sys.argv[1:]], prog_name="mcomp")

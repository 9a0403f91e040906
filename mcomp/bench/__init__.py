"""Benchmarks runnable as `mcomp bench ...`; scripts in benchmarks/ call into here.

Every benchmark owns one section of docs/benchmarks.md, delimited by
`<!-- bench:NAME:begin -->` / `<!-- bench:NAME:end -->`, and replaces only that section.
"""
from __future__ import annotations

from pathlib import Path

HEADER = "# Benchmarks\n\nEvery table below comes from an actual run of the command above it.\n"


def write_section(path: str | Path, name: str, body: str) -> None:
    """Replace (or append) the `name` section of a markdown file; other sections are kept."""
    path = Path(path)
    begin, end = f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"
    section = f"{begin}\n{body.strip()}\n{end}"
    text = path.read_text() if path.exists() else HEADER
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        text = pre + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def run_isolated(fn, args: tuple, name: str) -> dict:
    """Run `fn(*args, queue)` in a fresh spawned process and return the dict it puts on the
    queue (its own peak RSS, no state shared with earlier rows). A child reports failures as
    {"error": ...} instead of dying silently; that becomes a RuntimeError here."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=fn, args=(*args, q))
    p.start()
    res = q.get()
    p.join()
    if "error" in res:
        raise RuntimeError(f"benchmark {name} failed: {res['error']}")
    return res

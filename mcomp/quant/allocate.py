"""One format per linear, least total sensitivity under a byte budget: a multiple-choice knapsack.

    minimize   Σ_i Σ_j cost[i][j] · x_ij
    subject to Σ_j x_ij = 1                      (each linear gets exactly one format)
               Σ_i Σ_j size[i][j] · x_ij ≤ budget (bytes: codes + scales + zeros)
               x_ij ∈ {0, 1}

Solved exactly as a mixed-integer linear program by HiGHS through `scipy.optimize.milp`
(120 linears × 9 formats = 1080 binaries on SmolLM2 solve in about 0.2 s). A dynamic program
over bytes would need a byte grid (the budget is ~10⁷ bytes) and with it rounding; a greedy
exchange is not optimal. Sizes are integers and the plan's byte total is checked exactly after
rounding the solver's solution; should the solver's feasibility tolerance ever admit a plan a
few bytes over, the budget is tightened by the excess and the problem solved again.

Total sensitivity is additive over linears by assumption (each was measured alone); that is
the standard approximation of mixed-precision planners (HAWQ, llama.cpp's importance mixes).
"""
from __future__ import annotations

import math
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from ..errors import ConfigError


@dataclass(frozen=True)
class Allocation:
    choice: tuple[int, ...]     # chosen option per item
    bytes: int                  # Σ chosen sizes
    cost: float                 # Σ chosen costs
    status: str                 # the solver's message


@contextmanager
def _quiet_stdout() -> Iterator[None]:
    """HiGHS prints a stray debug line ("HighsMipSolverData::transformNewIntegerFeasibleSolution
    tmpSolver.run();") straight to file descriptor 1 whatever its output options (HiGHS issue
    #2783); keep it out of the CLI's output. Without a real stdout (captured), do nothing."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        fd = None
    if fd is None:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def _usable(cost: float) -> bool:
    return math.isfinite(cost)


def bounds(costs: Sequence[Sequence[float]], sizes: Sequence[Sequence[int]]) -> tuple[int, int]:
    """(smallest reachable bytes, largest useful bytes): every item at its smallest usable option;
    every item at its least-cost option (ties: the smaller) — beyond that more bytes buy nothing."""
    lo = hi = 0
    for c, s in zip(costs, sizes):
        opts = [j for j in range(len(c)) if _usable(c[j])]
        if not opts:
            raise ConfigError("an item has no usable option (every cost is NaN or infinite)")
        lo += min(s[j] for j in opts)
        hi += s[min(opts, key=lambda j: (c[j], s[j]))]
    return lo, hi


def solve(costs: Sequence[Sequence[float]], sizes: Sequence[Sequence[int]], budget: int,
          max_rounds: int = 5) -> Allocation:
    """Exact least-cost choice of one option per item with Σ size ≤ budget (see module doc).
    Options with a non-finite cost are never chosen. ConfigError if the budget is unreachable."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    if not costs:
        return Allocation((), 0, 0.0, "nothing to allocate")
    lo, _ = bounds(costs, sizes)
    if budget < lo:
        raise ConfigError(f"budget {budget} bytes is below the smallest reachable {lo} bytes")
    items = [(i, j) for i, c in enumerate(costs) for j in range(len(c))]
    c = np.array([costs[i][j] if _usable(costs[i][j]) else 0.0 for i, j in items], dtype=float)
    upper = np.array([1.0 if _usable(costs[i][j]) else 0.0 for i, j in items])
    s = np.array([sizes[i][j] for i, j in items], dtype=float)
    scale = max(float(np.abs(c).max()), 1e-300)      # costs span decades; keep the LP well scaled
    one = np.zeros((len(costs), len(items)))
    for k, (i, _) in enumerate(items):
        one[i, k] = 1.0
    limit = budget
    for _ in range(max_rounds):
        with _quiet_stdout():
            res = milp(c / scale, integrality=np.ones(len(items)), bounds=Bounds(0, upper),
                       constraints=[LinearConstraint(one, 1, 1),
                                    LinearConstraint((s / limit)[None, :], -np.inf, 1.0)],
                       options={"mip_rel_gap": 0.0, "disp": False})
        if res.x is None:
            raise ConfigError(f"no plan fits {budget} bytes ({res.message})")
        x = res.x.reshape(-1)
        choice, k = [], 0
        for cc in costs:                              # the largest x of each item is its 1
            choice.append(int(np.argmax(x[k:k + len(cc)])))
            k += len(cc)
        total = sum(sizes[i][j] for i, j in enumerate(choice))
        if total <= budget:
            return Allocation(tuple(choice), total,
                              float(sum(costs[i][j] for i, j in enumerate(choice))), res.message)
        limit -= total - budget                       # tolerance let a few bytes through
    raise ConfigError(f"the solver could not meet the budget of {budget} bytes exactly")

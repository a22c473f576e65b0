"""Global budget allocation: one option (method, level) per layer, minimum total error under a size budget.

This is a multi-choice knapsack. `solve_dp` is exact on a budget discretized into `resolution`
units (sizes rounded *up*, so the true budget is never exceeded; with integer sizes and
resolution >= budget it is exact); dominated options (larger and no better than another) are
dropped first. `solve_lagrangian` scales to very large models: for a multiplier λ every layer
picks argmin cost + λ·size independently, λ is bisected to the cheapest feasible point, then the
left-over budget is spent greedily on the best error reduction per unit of size.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .errors import LlmpressError


@dataclass(frozen=True)
class Option:
    label: str  # e.g. "whitened_svd@0.3"
    cost: float  # error this option adds (lower is better)
    size: int  # parameters or bytes it stores


def _check(options: Sequence[Sequence[Option]], budget: float) -> None:
    if not options or any(len(layer) == 0 for layer in options):
        raise ValueError("every layer needs at least one option")
    smallest = sum(min(o.size for o in layer) for layer in options)
    if smallest > budget:
        raise LlmpressError(
            f"infeasible budget: {budget:,.0f} but the smallest option of every layer already totals {smallest:,}; "
            "raise the budget or add more aggressive options (higher ratios)"
        )


def pareto_indices(layer: Sequence[Option]) -> list[int]:
    """Indices of the options not dominated by a smaller-or-equal, no-worse one (sorted by size)."""
    order = sorted(range(len(layer)), key=lambda i: (layer[i].size, layer[i].cost))
    kept, best = [], float("inf")
    for i in order:
        if layer[i].cost < best:
            kept.append(i)
            best = layer[i].cost
    return kept


def total(options: Sequence[Sequence[Option]], choice: Sequence[int]) -> tuple[float, int]:
    """(total cost, total size) of a choice of one option index per layer."""
    picked = [layer[i] for layer, i in zip(options, choice)]
    return sum(o.cost for o in picked), sum(o.size for o in picked)


def solve_dp(options: Sequence[Sequence[Option]], budget: float, resolution: int = 65536) -> list[int]:
    """Multi-choice knapsack on a discretized budget; returns one option index per layer.

    Exact on the discretized sizes; rounding each size up can leave up to one unit per layer
    unspent, which a final greedy pass spends (`spend_leftover`).
    """
    _check(options, budget)
    unit = max(budget / resolution, 1.0)
    slots = int(budget // unit)
    inf = float("inf")
    dp = np.full(slots + 1, inf)
    dp[0] = 0.0
    back = []
    for layer in options:
        kept = pareto_indices(layer)
        new = np.full(slots + 1, inf)
        arg = np.full(slots + 1, -1, dtype=np.int16 if len(layer) < 2**15 else np.int64)
        for i in kept:
            w = int(np.ceil(layer[i].size / unit - 1e-9))
            if w > slots:
                continue
            candidate = np.full(slots + 1, inf)
            candidate[w:] = dp[: slots + 1 - w] + layer[i].cost
            better = candidate < new
            new[better] = candidate[better]
            arg[better] = i
        back.append(arg)
        dp = new
    if not np.isfinite(dp).any():
        raise LlmpressError(
            f"infeasible budget {budget:,.0f} at resolution {resolution}: raise the budget or the resolution"
        )
    # dp[b] = best cost using exactly b units; walk back from the best end point.
    b = int(np.argmin(dp))
    choice = []
    for layer, arg in zip(reversed(options), reversed(back)):
        i = int(arg[b])
        choice.append(i)
        b -= int(np.ceil(layer[i].size / unit - 1e-9))
    return spend_leftover(options, choice[::-1], budget)


def _pick(options, lam: float) -> list[int]:
    return [min(range(len(layer)), key=lambda i: (layer[i].cost + lam * layer[i].size, layer[i].size)) for layer in options]


def solve_lagrangian(options: Sequence[Sequence[Option]], budget: float, iterations: int = 100) -> list[int]:
    """Fast near-optimal allocation (see module docstring); never exceeds the budget."""
    _check(options, budget)
    lo, hi = 0.0, 1.0
    while total(options, _pick(options, hi))[1] > budget:
        hi *= 2.0
        if hi > 1e30:
            break
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if total(options, _pick(options, mid))[1] > budget:
            lo = mid
        else:
            hi = mid
    choice = _pick(options, hi)
    if total(options, choice)[1] > budget:  # λ could not get there: start from the smallest options
        choice = [min(range(len(layer)), key=lambda i: layer[i].size) for layer in options]
    return spend_leftover(options, choice, budget)


def spend_leftover(options: Sequence[Sequence[Option]], choice: list[int], budget: float) -> list[int]:
    """Greedily upgrade layers while the budget allows, best error reduction per extra unit first."""
    choice = list(choice)
    _, size = total(options, choice)
    while True:
        best = None
        for li, layer in enumerate(options):
            current = layer[choice[li]]
            for i, option in enumerate(layer):
                extra = option.size - current.size
                gain = current.cost - option.cost
                if gain > 0 and size + extra <= budget:
                    rate = gain / max(extra, 1e-12)
                    if best is None or rate > best[0]:
                        best = (rate, li, i, extra)
        if best is None:
            return choice
        _, li, i, extra = best
        choice[li] = i
        size += extra


def solve_brute_force(options: Sequence[Sequence[Option]], budget: float) -> list[int]:
    """Exhaustive search, for tests on small instances."""
    _check(options, budget)
    best, best_choice = float("inf"), None
    for choice in itertools.product(*[range(len(layer)) for layer in options]):
        cost, size = total(options, choice)
        if size <= budget and cost < best:
            best, best_choice = cost, list(choice)
    return best_choice

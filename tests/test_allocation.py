import random

import pytest

from compress.allocation import Option, pareto_indices, solve_brute_force, solve_dp, solve_lagrangian, total
from compress.errors import LlmpressError


def _instance(seed, layers=4, choices=4):
    rng = random.Random(seed)
    options = []
    for _ in range(layers):
        sizes = sorted(rng.sample(range(1, 40), choices))
        costs = sorted((rng.random() for _ in range(choices)), reverse=True)
        if rng.random() < 0.5:  # a dominated option: bigger and worse
            costs[-1] = costs[0] + 0.1
        options.append([Option(f"o{i}", c, s) for i, (c, s) in enumerate(zip(costs, sizes))])
    return options


@pytest.mark.parametrize("seed", range(30))
def test_dp_is_optimal_and_lagrangian_feasible(seed):
    options = _instance(seed)
    smallest = sum(min(o.size for o in layer) for layer in options)
    largest = sum(max(o.size for o in layer) for layer in options)
    budget = random.Random(seed).randint(smallest, largest)
    optimum, _ = total(options, solve_brute_force(options, budget))
    dp_cost, dp_size = total(options, solve_dp(options, budget, resolution=budget))
    assert dp_size <= budget and dp_cost == pytest.approx(optimum)
    lg_cost, lg_size = total(options, solve_lagrangian(options, budget))
    assert lg_size <= budget and lg_cost >= optimum - 1e-12
    coarse_cost, coarse_size = total(options, solve_dp(options, budget, resolution=16))
    assert coarse_size <= budget and coarse_cost >= optimum - 1e-12  # rounding up stays feasible


def test_lagrangian_is_optimal_on_convex_instances():
    # convex error curves (diminishing returns), the shape SVD truncation produces
    options = [[Option(f"r{r}", scale / (r + 1) ** 2, 10 * r + 5) for r in range(8)] for scale in (1.0, 3.0, 0.5, 2.0)]
    for budget in (40, 90, 150, 300):
        best, _ = total(options, solve_brute_force(options, budget))
        cost, size = total(options, solve_lagrangian(options, budget))
        assert size <= budget and cost == pytest.approx(best, rel=0.05)


def test_pareto_drops_dominated():
    layer = [Option("a", 1.0, 10), Option("b", 2.0, 20), Option("c", 0.5, 30), Option("d", 0.5, 40)]
    assert pareto_indices(layer) == [0, 2]


def test_infeasible_budget_is_a_clear_error():
    options = [[Option("x", 1.0, 10), Option("y", 0.5, 20)]] * 3
    for solver in (solve_dp, solve_lagrangian):
        with pytest.raises(LlmpressError, match="infeasible budget.*totals 30"):
            solver(options, 29)

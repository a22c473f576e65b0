import random

import pytest
import torch

import compress.report

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


def _across_methods_recipe(**allocation):
    return {
        "calibration": {"num_samples": 4, "seq_len": 32},
        "stages": [{"method": "gqsa", "group_size": 16}, {"method": "whitened_svd"}, {"method": "magnitude"}],
        "allocation": {"strategy": "knapsack", "unit": "bytes", "cost": "fisher",
                       "candidates": {0: [0.0, 0.5], 1: [0.2, 0.4, 0.6, 0.8], 2: [0.5]}, **allocation},
    }  # fmt: skip


def test_one_knapsack_across_methods_applies_each_layers_choice(tokenizer, calib_text):
    """Each layer gets one (method, level) of the candidates or stays dense; the compressed model
    has exactly those modules, the sizes (bf16 as served) respect the budget, and no option larger
    than the dense layer is ever chosen."""
    from compress.api import compress_model
    from compress.modules import GQSALinear, LowRankLinear, SparseLinear
    from conftest import tiny_model

    model, report = compress_model(
        tiny_model("llama"), _across_methods_recipe(ratio=0.75), dataset=str(calib_text), tokenizer=tokenizer, progress=False
    )
    plan = report["allocation"]
    assert plan["stages"] == [0, 1, 2] and plan["chosen_total"] <= plan["budget"]
    assert plan["budget"] == int(0.25 * plan["dense_total"])
    kinds = {"gqsa g16": GQSALinear, "whitened_svd": LowRankLinear, "magnitude": SparseLinear}  # plan labels
    for choice in plan["layers"]:
        module = model.get_submodule(choice["name"])
        if choice["method"] is None:
            assert type(module) is torch.nn.Linear
        else:
            assert isinstance(module, kinds[choice["method"]]) and choice["bytes"] < choice["dense_bytes"]
    records = {r["name"]: r for r in report["layers"]}
    assert {c["name"] for c in plan["layers"] if c["method"]} == set(records)
    for choice in plan["layers"]:
        if choice["method"]:
            record = records[choice["name"]]
            assert record["method"] == choice["method"].split()[0] and record["bytes_after"] == choice["bytes"]
    assert "and 3 methods" in compress.report.report_markdown(report)


def test_max_size_is_a_whole_model_budget(tokenizer, calib_text):
    from compress.api import compress_model
    from compress.metrics import serving_dtype
    from compress.report import model_size
    from conftest import tiny_model

    with serving_dtype(torch.bfloat16):
        dense = model_size(tiny_model("llama"))["bytes"]
    limit = int(0.5 * dense)
    model, report = compress_model(
        tiny_model("llama"), _across_methods_recipe(max_size=limit), dataset=str(calib_text), tokenizer=tokenizer, progress=False
    )
    assert report["model_size"]["compressed"]["bytes"] <= limit
    assert report["model_size"]["dense"]["bytes"] == dense
    with pytest.raises(LlmpressError, match="not even the"):
        compress_model(tiny_model("llama"), _across_methods_recipe(max_size=1000), dataset=str(calib_text), tokenizer=tokenizer, progress=False)


def test_from_ratio_profiles_a_stage_only_for_budgets_that_need_it(tokenizer, calib_text, monkeypatch):
    """A stage with from_ratio 0.6 is never profiled (nor chosen) when the budget removes less,
    given as a ratio or as a whole-model max_size; it is profiled when the budget removes more."""
    from compress.api import compress_model
    from compress.compressors import COMPRESSORS
    from compress.metrics import serving_dtype
    from compress.report import model_size
    from conftest import tiny_model

    svd = COMPRESSORS["whitened_svd"]
    profiled = []
    original = svd.profile
    monkeypatch.setattr(svd, "profile", lambda self, *args, **kw: profiled.append(1) or original(self, *args, **kw))

    def run(**budget):
        profiled.clear()
        recipe = _across_methods_recipe(**budget, from_ratio={1: 0.6})
        _, report = compress_model(tiny_model("llama"), recipe, dataset=str(calib_text), tokenizer=tokenizer, progress=False)
        plan = report["allocation"]
        assert plan["chosen_total"] <= plan["budget"]
        return plan, bool(profiled)

    plan, svd_profiled = run(ratio=0.3)
    assert not svd_profiled and all(c["method"] != "whitened_svd" for c in plan["layers"])
    assert run(ratio=0.75)[1]
    # a whole-model size: the fraction it implies for the targets decides, before profiling
    with serving_dtype(torch.bfloat16):
        dense = model_size(tiny_model("llama"))["bytes"]
    implied = []
    for share in (0.65, 0.5):
        plan, svd_profiled = run(max_size=int(share * dense))
        implied.append(1 - plan["budget"] / plan["dense_total"])
        assert svd_profiled == (implied[-1] >= 0.6)
    assert implied[0] < 0.6 <= implied[1]  # both sides of from_ratio


@pytest.mark.parametrize(
    "change, message",
    [
        ({"stages": [{"method": "gqsa", "ratio": 0.25}, {"method": "whitened_svd"}, {"method": "magnitude"}]}, "set by the allocation"),
        ({"allocation": {"strategy": "knapsack", "unit": "bytes", "ratio": 0.5, "candidates": {5: [0.1]}}}, "not a stage index"),
        ({"allocation": {"strategy": "uniform", "ratio": 0.5, "candidates": {0: [0.0]}}}, "need strategy: knapsack"),
        ({"allocation": {"strategy": "knapsack", "unit": "params", "max_size": "1GB", "candidates": {0: [0.0]}}}, "unit: bytes"),
        ({"allocation": {"strategy": "knapsack", "unit": "bytes", "max_size": "8 parsecs", "candidates": {0: [0.0]}}}, "not understood"),
        ({"allocation": {"strategy": "knapsack", "unit": "bytes", "ratio": 0.5, "max_size": "1GB", "candidates": {0: [0.0]}}}, "exactly one budget"),
        ({"allocation": {"strategy": "knapsack", "unit": "bytes", "ratio": 0.5, "candidates": {0: [0.0], 1: [0.5]}, "from_ratio": {2: 0.6}}}, "not among allocation.candidates"),
        ({"allocation": {"strategy": "knapsack", "unit": "bytes", "ratio": 0.5, "candidates": {0: [0.0]}, "from_ratio": {0: 0.6}}}, "every candidate stage"),
        ({"allocation": {"strategy": "knapsack", "unit": "bytes", "ratio": 0.5, "candidates": {0: [0.0], 1: [0.5]}, "from_ratio": {1: 1.5}}}, "in \\[0, 1\\)"),
    ],
)
def test_bad_cross_method_allocations_are_clear_errors(change, message):
    from compress.recipe import load_recipe

    with pytest.raises(LlmpressError, match=message):
        load_recipe({**_across_methods_recipe(ratio=0.5), **change})


def test_parse_size():
    from compress.budget import parse_size

    assert parse_size("8GB") == 8 * 10**9 and parse_size("1.5GiB") == int(1.5 * 2**30) and parse_size(42) == 42

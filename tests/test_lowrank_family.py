"""FWSVD and its block-wise Fisher, truncation errors for every rank, and the knapsack wired into a run."""

import pytest
import torch

import compress
from compress.blocks import find_decoder_blocks
from compress.budget import AllocationConfig, profile_layers, solve_allocation
from compress.compressors import COMPRESSORS, FWSVDConfig, LayerStats, SVDConfig, WhitenedSVDConfig, rank_for_ratio
from compress.compressors.fwsvd import fisher_weighted_svd
from compress.compressors.svd import truncation_errors
from compress.compressors.whitened_svd import whitened_svd
from compress.data import calibration_windows
from compress.errors import LlmpressError
from compress.fisher import collect_fisher
from compress.modules import LowRankLinear
from compress.metrics import relative_errors
from compress.pipelines import DenseStatsPipeline, SequentialPipeline, build_pipeline
from compress.targets import match_linears
from conftest import tiny_model


def _problem(seed=0, out=24, inp=32, n=300):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, inp, generator=g) @ (torch.randn(inp, inp, generator=g) * torch.logspace(0, -2, inp))
    return torch.randn(out, inp, generator=g), (X.T @ X).double()


@pytest.mark.parametrize("method", ["svd", "whitened_svd", "fwsvd"])
def test_truncation_errors_match_reconstruction_at_every_rank(method):
    W, gram = _problem()
    row_fisher = torch.rand(24, dtype=torch.float64) ** 4  # very uneven row importance
    if method == "svd":
        u, s, vh = torch.linalg.svd(W.double(), full_matrices=False)
    elif method == "whitened_svd":
        u, s, vh = whitened_svd(W, gram, 1e-4)
    else:
        u, s, vh = fisher_weighted_svd(W, row_fisher)
    plain, weighted = truncation_errors(W, u, s, vh, gram)
    for rank in (0, 1, 7, 20, 24):
        approx = (u[:, :rank] * s[:rank]) @ vh[:rank]
        rel, wtd = relative_errors(W, approx, gram)
        assert float(plain[rank]) == pytest.approx(rel, rel=1e-6, abs=1e-9)
        assert float(weighted[rank]) == pytest.approx(wtd, rel=1e-6, abs=1e-9)


def test_profile_sizes_and_errors_equal_compress():
    W, gram = _problem()
    bias = torch.randn(24)
    stats = LayerStats({"gram": gram, "fisher_row": torch.rand(24, dtype=torch.float64)}, 300)
    for method, config in [("svd", SVDConfig(ratio=0.5)), ("whitened_svd", WhitenedSVDConfig(ratio=0.5)), ("fwsvd", FWSVDConfig(ratio=0.5))]:
        compressor = COMPRESSORS[method]()
        results = compressor.profile(W, bias, stats, config, [0.2, 0.5, 0.8])
        for result in results:
            module = compressor.compress(W, bias, stats, config.model_copy(update={"ratio": result.level}))
            rel, wtd = relative_errors(W, module.to_dense(), gram)
            assert (result.values, result.bytes) == (module.num_values(), module.num_bytes())
            assert result.rel_error == pytest.approx(rel, rel=1e-4)
            assert result.rel_weighted_error == pytest.approx(wtd, rel=1e-4)


def test_fwsvd_protects_important_rows():
    W, _ = _problem()
    row_fisher = torch.ones(24, dtype=torch.float64)
    row_fisher[:4] = 1e4  # the loss cares a lot about the first four outputs
    module = COMPRESSORS["fwsvd"]().compress(W, None, LayerStats({"fisher_row": row_fisher}), FWSVDConfig(ratio=0.7))
    plain = COMPRESSORS["svd"]().compress(W, None, LayerStats(), SVDConfig(ratio=0.7))
    assert isinstance(module, LowRankLinear) and module.rank == plain.rank == rank_for_ratio(24, 32, 0.7)
    important = lambda m: float((W[:4] - m.to_dense()[:4]).norm() / W[:4].norm())  # noqa: E731
    assert important(module) < 0.5 * important(plain)
    with pytest.raises(LlmpressError, match="one value per output row"):
        fisher_weighted_svd(W, torch.ones(5))


def test_blockwise_fisher_equals_full_backward(tokenizer, calib_text):
    model = tiny_model("llama")
    ids = calibration_windows(tokenizer, str(calib_text), 3, 32, 0)
    _, blocks = find_decoder_blocks(model)
    linears = match_linears(model, ["Linear"], ["lm_head"])
    fisher = collect_fisher(model, blocks, linears, ids, torch.device("cpu"), torch.device("cpu"), chunk_size=2, progress=False)
    expected = {name: torch.zeros_like(lin.weight, dtype=torch.float64) for name, lin in linears.items()}
    for seq in ids:  # reference: ordinary autograd through the whole model, one sequence at a time
        model.zero_grad()
        with torch.enable_grad():
            model(input_ids=seq[None], labels=seq[None]).loss.backward()
        for name, lin in linears.items():
            expected[name] += lin.weight.grad.double().square()
    assert set(fisher) == set(linears)
    for name in linears:
        torch.testing.assert_close(fisher[name]["fisher_row"], expected[name].sum(1), rtol=1e-3, atol=1e-12)
        torch.testing.assert_close(fisher[name]["fisher_col"], expected[name].sum(0), rtol=1e-3, atol=1e-12)
    assert all(p.requires_grad for p in model.parameters())  # flags restored after the backward passes


def test_fwsvd_recipe_end_to_end(tokenizer, calib_text):
    recipe = {"calibration": {"num_samples": 3, "seq_len": 32}, "stages": [{"method": "fwsvd", "ratio": 0.5}]}
    model, report = compress.compress_model(tiny_model("qwen2"), recipe, dataset=str(calib_text), tokenizer=tokenizer, progress=False)
    assert isinstance(model.model.layers[1].mlp.down_proj, LowRankLinear)
    assert report["summary"]["nominal_ratio_removed"] >= 0.5
    ids = torch.randint(0, 300, (1, 16))
    assert torch.isfinite(model(input_ids=ids).logits).all()


@pytest.mark.parametrize("unit", ["params", "bytes"])
def test_knapsack_run_respects_budget_and_beats_uniform_cost(tokenizer, calib_text, unit):
    base = {"calibration": {"num_samples": 4, "seq_len": 48}, "stages": [{"method": "whitened_svd"}]}
    knap = {**base, "allocation": {"ratio": 0.4, "unit": unit, "levels": [0, 0.2, 0.4, 0.6, 0.8]}}
    model, report = compress.compress_model(tiny_model("llama"), knap, dataset=str(calib_text), tokenizer=tokenizer, progress=False)
    plan = report["allocation"]
    assert plan["strategy"] == "knapsack" and plan["chosen_total"] <= plan["budget"]
    assert plan["budget"] == int(0.6 * plan["dense_total"])
    summary = report["summary"]  # layers left dense have no record but count as kept targets
    kept = {r["name"] for r in report["layers"]}
    dense_left = [c for c in plan["layers"] if c["name"] not in kept]
    assert all(c["level"] == 0 for c in dense_left) and summary["layers_left_dense"] == len(dense_left)
    stored = summary["values_after"] if unit == "params" else summary["bytes_after"]
    assert stored == plan["chosen_total"] <= plan["budget"]
    assert summary["params_before" if unit == "params" else "bytes_before"] == plan["dense_total"]
    removed = summary["nominal_ratio_removed" if unit == "params" else "storage_ratio_removed"]
    assert removed >= 0.4 - 1e-9
    assert len({c["level"] for c in plan["layers"]}) > 1  # not uniform: layers differ in sensitivity
    assert "Allocation: knapsack" in compress.report.report_markdown(report)


def test_knapsack_beats_uniform_on_the_profile(tokenizer, calib_text):
    model = tiny_model("llama")
    ids = calibration_windows(tokenizer, str(calib_text), 4, 48, 0)
    stage = WhitenedSVDConfig(ratio=0.4)
    pipeline = DenseStatsPipeline(model, [stage], progress=False)
    levels = [0.0, 0.2, 0.4, 0.6, 0.8]
    profiles = profile_layers(pipeline, ids, 0, levels)
    config = AllocationConfig(ratio=0.4, levels=levels, cost="weighted_sq")
    plan = solve_allocation(profiles, config)
    uniform_cost = sum(next(r for r in results if r.level == 0.4).rel_weighted_error ** 2 for results in profiles.values())
    uniform_size = sum(next(r for r in results if r.level == 0.4).values for results in profiles.values())
    assert uniform_size <= plan.budget  # uniform is feasible, so the optimum can only be better
    assert plan.total_cost <= uniform_cost + 1e-12 and plan.chosen_total <= plan.budget
    lagrangian = solve_allocation(profiles, config.model_copy(update={"solver": "lagrangian"}))
    assert lagrangian.chosen_total <= lagrangian.budget and lagrangian.total_cost >= plan.total_cost - 1e-9
    with pytest.raises(LlmpressError, match="infeasible budget"):
        solve_allocation(profiles, AllocationConfig(ratio=0.9, levels=[0.0, 0.2], cost="weighted_sq"))


def test_fisher_cost_weighs_layers_by_their_fisher_energy(tokenizer, calib_text):
    """cost: fisher collects the layers' Fisher energy Σ F_ij·W_ij² (a backward pass the method
    itself does not need) and prices each option as its squared weighted error times it."""
    model = tiny_model("llama")
    ids = calibration_windows(tokenizer, str(calib_text), 3, 32, 0)
    pipeline = DenseStatsPipeline(model, [WhitenedSVDConfig(ratio=0.4)], progress=False)
    levels = [0.0, 0.2, 0.4, 0.6]
    with pytest.raises(LlmpressError, match="needs Fisher"):
        solve_allocation(profile_layers(pipeline, ids, 0, levels), AllocationConfig(ratio=0.3, levels=levels, cost="fisher"))
    pipeline = DenseStatsPipeline(model, [WhitenedSVDConfig(ratio=0.4)], progress=False, fisher_for={0})
    profiles = profile_layers(pipeline, ids, 0, levels)
    energies = {name: results[0].sensitivity for name, results in profiles.items()}
    assert all(e is not None and e > 0 for e in energies.values())
    assert len({round(e, 12) for e in energies.values()}) == len(energies)  # layers differ
    plan = solve_allocation(profiles, AllocationConfig(ratio=0.3, levels=levels, cost="fisher"))
    expected = sum(
        next(r for r in profiles[c.name] if r.level == c.level).rel_weighted_error ** 2 * energies[c.name] for c in plan.layers
    )
    assert plan.total_cost == pytest.approx(expected) and plan.chosen_total <= plan.budget
    recipe = {"calibration": {"num_samples": 3, "seq_len": 32}, "stages": [{"method": "whitened_svd"}],
              "allocation": {"ratio": 0.3, "levels": levels}}  # fmt: skip  (fisher is the default cost)
    _, report = compress.compress_model(tiny_model("llama"), recipe, dataset=str(calib_text), tokenizer=tokenizer, progress=False)
    assert report["allocation"]["chosen_total"] <= report["allocation"]["budget"]
    assert report["allocation"]["cost"] == "fisher"


def test_dense_statistics_mode_equals_reused_stats(tokenizer, calib_text):
    ids = calibration_windows(tokenizer, str(calib_text), 3, 32, 0)
    stages = [WhitenedSVDConfig(ratio=0.5)]
    first = tiny_model("llama")
    records = build_pipeline(first, stages, "dense", progress=False).run(ids)
    stats = {}
    second = tiny_model("llama")
    DenseStatsPipeline(second, stages, progress=False).collect(ids, lambda i, s: stats.update(s))
    reused = DenseStatsPipeline(second, stages, progress=False).run(None, stats=stats)
    assert [r.rel_weighted_error for r in records] == pytest.approx([r.rel_weighted_error for r in reused])
    x = torch.randint(0, 300, (1, 12))
    torch.testing.assert_close(first(input_ids=x).logits, second(input_ids=x).logits)
    sequential = tiny_model("llama")
    seq_records = SequentialPipeline(sequential, stages, progress=False).run(ids)
    assert seq_records[0].rel_weighted_error == pytest.approx(records[0].rel_weighted_error)  # block 0: same inputs
    assert seq_records[-1].rel_weighted_error != pytest.approx(records[-1].rel_weighted_error)  # later blocks differ
    with pytest.raises(LlmpressError, match="statistics must be"):
        build_pipeline(first, stages, statistics="bogus")

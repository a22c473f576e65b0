"""Wanda and layer-wise OBS (SparseGPT): masks of the right shape, and less output error than magnitude."""

import copy

import pytest
import torch

import compress
from compress.compressors import COMPRESSORS, LayerStats, MagnitudeConfig, SparseGPTConfig, WandaConfig
from compress.compressors.masks import row_mask
from compress.compressors.mfac import MFACConfig
from compress.compressors.sparsegpt import inverse_hessian_factor, sparsegpt_prune
from compress.errors import LlmpressError
from compress.modules import SparseLinear, TileSparseLinear
from compress.metrics import relative_errors
from conftest import tiny_model


def _problem(seed=0, out=32, inp=64, n=500):
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -1.5, inp)[torch.randperm(inp, generator=g)]
    X = torch.randn(n, inp, generator=g) @ (torch.randn(inp, inp, generator=g) * 0.3 + torch.eye(inp)) * scales
    gram = (X.T @ X).double()
    stats = LayerStats({"gram": gram, "channel_norm_sq": gram.diagonal().clone()}, n)
    return torch.randn(out, inp, generator=g), stats


@pytest.mark.parametrize("pattern,ratio", [("unstructured", 0.5), ("unstructured", 0.7), ("2:4", None), ("4:8", None)])
def test_obs_beats_wanda_beats_magnitude(pattern, ratio):
    W, stats = _problem()
    errors = {}
    for method, cls in [("magnitude", MagnitudeConfig), ("wanda", WandaConfig), ("sparsegpt", SparseGPTConfig)]:
        extra = {"blocksize": 16} if method == "sparsegpt" else {}
        module = COMPRESSORS[method]().compress(W, None, stats, cls(ratio=ratio, pattern=pattern, **extra))
        assert isinstance(module, SparseLinear)
        dense = module.to_dense()
        mask = dense != 0
        if pattern == "unstructured":
            assert abs(1 - mask.float().mean().item() - ratio) < 0.02
        else:
            n, m = map(int, pattern.split(":"))
            assert (mask.view(32, -1, m).sum(-1) <= n).all()
        errors[method] = relative_errors(W, dense, stats["gram"])[1]
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"]


@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_tile_pattern_sits_between_unstructured_and_magnitude(ratio):
    """Tile-structured OBS: every 8-row x 16-column tile keeps one column set, the module stores it
    compactly, OBS beats magnitude and Wanda at the same pattern, and loses (a little) to
    unstructured OBS, which has the most freedom."""
    W, stats = _problem()
    errors = {}
    for method, cls in [("magnitude", MagnitudeConfig), ("wanda", WandaConfig), ("sparsegpt", SparseGPTConfig)]:
        extra = {"blocksize": 32} if method == "sparsegpt" else {}
        config = cls(ratio=ratio, pattern="tile", tile_rows=8, tile_cols=16, **extra)
        module = COMPRESSORS[method]().compress(W, None, stats, config)
        assert isinstance(module, TileSparseLinear) and module.keep == round(16 * (1 - ratio))
        mask = module.to_dense() != 0
        tiles = mask.view(4, 8, 4, 16)
        assert (tiles == tiles[:, :1]).all() and (tiles[:, 0].sum(-1) == module.keep).all()
        errors[method] = relative_errors(W, module.to_dense(), stats["gram"])[1]
    unstructured = COMPRESSORS["sparsegpt"]().compress(W, None, stats, SparseGPTConfig(ratio=ratio, blocksize=32))
    free = relative_errors(W, unstructured.to_dense(), stats["gram"])[1]
    assert free < errors["sparsegpt"] < errors["wanda"] < errors["magnitude"]
    with pytest.raises(ValueError, match="tiles"):
        COMPRESSORS["sparsegpt"]().compress(W[:, :60], None, LayerStats({"gram": stats["gram"][:60, :60]}), config)
    with pytest.raises(ValueError, match="keeps no column"):
        SparseGPTConfig(ratio=0.99, pattern="tile", tile_cols=16)


def test_sparsegpt_updates_kept_weights_and_handles_dead_inputs():
    W, stats = _problem()
    gram = stats["gram"].clone()
    gram[5, :] = 0
    gram[:, 5] = 0  # input channel 5 never fires
    pruned, keep = sparsegpt_prune(W, gram, SparseGPTConfig(ratio=0.5, blocksize=16))
    assert (pruned[~keep] == 0).all() and (pruned[:, 5] == 0).all() and not keep[:, 5].any()
    assert not torch.allclose(pruned[keep], W[keep])  # OBS compensation moved the survivors
    with pytest.raises(LlmpressError, match="NaN"):
        inverse_hessian_factor(torch.full((4, 4), float("nan")), 0.01, "q_proj")
    singular = torch.ones(6, 6, dtype=torch.float64)  # rank one: needs damping to factor
    upper, dead = inverse_hessian_factor(singular, 1e-12, "x")
    assert torch.isfinite(upper).all() and not dead.any()


def test_wanda_keeps_weights_on_loud_channels_per_row():
    W = torch.ones(4, 8)
    norms = torch.ones(8, dtype=torch.float64)
    norms[3] = 1e6
    W[:, 3] = 1e-3  # tiny weight on a very loud channel: worth keeping
    module = COMPRESSORS["wanda"]().compress(W, None, LayerStats({"channel_norm_sq": norms}), WandaConfig(ratio=0.5))
    mask = module.to_dense() != 0
    assert mask[:, 3].all() and (mask.sum(1) == 4).all()
    assert (row_mask(torch.rand(3, 10), 0.3).sum(1) == 7).all()


def test_pruning_recipes_on_a_tiny_model(tokenizer, calib_text):
    for stage in ({"method": "wanda", "pattern": "2:4"}, {"method": "sparsegpt", "ratio": 0.5}):
        recipe = {"calibration": {"num_samples": 3, "seq_len": 32}, "stages": [stage]}
        model, report = compress.compress_model(tiny_model("llama"), recipe, dataset=str(calib_text), tokenizer=tokenizer, progress=False)
        assert isinstance(model.model.layers[0].mlp.down_proj, SparseLinear)
        assert report["summary"]["nominal_ratio_removed"] == pytest.approx(0.5, abs=0.01)
        assert torch.isfinite(model(input_ids=torch.randint(0, 300, (1, 8))).logits).all()


def test_mfac_inverse_matches_dense_inverse():
    from compress.compressors.mfac import BlockFisherInverse

    g = torch.randn(10, 48, dtype=torch.float64)
    inv = BlockFisherInverse(g, block_size=16, damp=1e-2)
    dense = torch.zeros(48, 48, dtype=torch.float64)
    for b in range(3):
        gb = g[:, 16 * b : 16 * (b + 1)]
        fisher = inv.lam * torch.eye(16, dtype=torch.float64) + gb.T @ gb / 10
        dense[16 * b : 16 * (b + 1), 16 * b : 16 * (b + 1)] = torch.linalg.inv(fisher)
    torch.testing.assert_close(inv.diag(), dense.diagonal())
    v = torch.randn(48, dtype=torch.float64)
    torch.testing.assert_close(inv.mul(v), dense @ v)
    # the M-FAC recursion (one Sherman-Morrison step per gradient) reaches the same inverse
    rec = torch.eye(16, dtype=torch.float64) / inv.lam
    for gi in g[:, :16]:
        u = rec @ gi
        rec = rec - torch.outer(u, u) / (10 + gi @ u)
    torch.testing.assert_close(rec, dense[:16, :16])


@pytest.mark.parametrize("pattern,ratio", [("unstructured", 0.5), ("2:4", None)])
def test_mfac_obs_beats_magnitude_in_fisher_loss(pattern, ratio):
    from compress.compressors.mfac import MFACConfig, mfac_prune

    g = torch.Generator().manual_seed(0)
    W = torch.randn(8, 32, generator=g)
    # gradients with strongly unequal, correlated directions: the quadratic model of the loss
    grads = torch.randn(64, 256, generator=g) @ (torch.randn(256, 256, generator=g) * torch.logspace(0, -2, 256)) * 0.1
    fisher = grads.double().T @ grads.double() / 64
    loss = lambda dw: float(dw.reshape(-1).double() @ fisher @ dw.reshape(-1).double())  # noqa: E731
    config = MFACConfig(ratio=ratio, pattern=pattern, block_size=256, damp=1e-4, steps=4)
    pruned, keep = mfac_prune(W, grads, config)
    assert (pruned[~keep] == 0).all()
    if ratio:
        assert abs((~keep).float().mean().item() - ratio) < 0.01
    else:
        assert (keep.view(8, -1, 4).sum(-1) == 2).all()
    magnitude = COMPRESSORS["magnitude"]().compress(W, None, LayerStats(), MagnitudeConfig(ratio=ratio, pattern=pattern))
    assert loss(pruned - W) < 0.7 * loss(magnitude.to_dense() - W)


def test_mfac_configs_share_one_inverse_per_gradient_window():
    from compress.compressors.base import LayerStats
    from compress.compressors.mfac import MFACCompressor, MFACConfig

    g = torch.Generator().manual_seed(0)
    W = torch.randn(8, 32, generator=g)
    stats = LayerStats({"grads": torch.randn(16, 256, generator=g)}, 16)
    compressor = MFACCompressor()
    shared = [compressor.compress(W, None, stats, MFACConfig(ratio=r, block_size=64)).to_dense() for r in (0.3, 0.6)]
    assert len(stats.derived) == 1  # built once, reused by the second sparsity
    alone = [compressor.compress(W, None, LayerStats(dict(stats.tensors), 16), MFACConfig(ratio=r, block_size=64)).to_dense() for r in (0.3, 0.6)]
    for a, b in zip(shared, alone):
        torch.testing.assert_close(a, b)
    compressor.compress(W, None, stats, MFACConfig(ratio=0.3, block_size=64, damp=1.0))
    assert len(stats.derived) == 2  # another damping is another inverse


def test_mfac_recipe_compresses_during_the_backward_walk(tokenizer, calib_text):
    recipe = {
        "calibration": {"num_samples": 4, "seq_len": 32},
        "stages": [{"method": "mfac", "ratio": 0.5, "block_size": 64, "targets": ["re:.*mlp.*"]}, {"method": "eora", "rank": 2}],
    }
    model, report = compress.compress_model(tiny_model("llama"), recipe, dataset=str(calib_text), tokenizer=tokenizer, progress=False)
    mlp = model.model.layers[0].mlp.down_proj
    assert mlp.base.format == "sparse_bitmap" and mlp.rank == 2
    first = [r for r in report["layers"] if r["stage"] == 0]
    assert len(first) == 6 and [r["block"] for r in first] == [1, 1, 1, 0, 0, 0]  # compressed last block first
    assert all(abs(1 - r["values_after"] / r["params_before"] - 0.5) < 0.01 for r in first)
    assert torch.isfinite(model(input_ids=torch.randint(0, 300, (1, 8))).logits).all()


def test_mfac_walks_recompute_gradients_on_the_partly_pruned_model(tokenizer, calib_text, monkeypatch):
    """walks: 3 prunes to 1/3 and 2/3 of the ratio from gradients of the model as pruned so far;
    what an earlier walk pruned stays pruned (zero weights have zero saliency), and the result
    differs from one walk's."""
    import compress.runner as runner

    interim: list[dict[str, torch.Tensor]] = []
    densify = runner.densify

    def recording(model, names):
        densify(model, names)
        interim.append({n: model.get_submodule(n).weight == 0 for n in names})

    monkeypatch.setattr(runner, "densify", recording)
    stage = {"method": "mfac", "ratio": 0.6, "block_size": 32, "steps": 2, "targets": ["re:.*mlp.*"]}
    recipe = {"calibration": {"num_samples": 4, "seq_len": 32}, "stages": [{**stage, "walks": 3}]}
    model, report = compress.compress_model(tiny_model("llama"), recipe, dataset=str(calib_text), tokenizer=tokenizer, progress=False)
    assert len(interim) == 2 and len(report["layers"]) == 6  # two intermediate walks, records of the last one
    for earlier, target in zip(interim, (0.2, 0.4)):
        for name, zeros in earlier.items():
            assert abs(float(zeros.float().mean()) - target) < 0.02
            final = model.get_submodule(name).to_dense() == 0
            assert bool(final[zeros].all()) and abs(float(final.float().mean()) - 0.6) < 0.02
    once, _ = compress.compress_model(tiny_model("llama"), {**recipe, "stages": [stage]}, dataset=str(calib_text), tokenizer=tokenizer, progress=False)
    layer = "model.layers.0.mlp.down_proj"
    assert not torch.equal(model.get_submodule(layer).to_dense(), once.get_submodule(layer).to_dense())
    with pytest.raises(LlmpressError, match="unstructured"):
        compress.load_recipe({"stages": [{"method": "mfac", "pattern": "2:4", "walks": 2}]})


def test_pipelines_sharing_a_gradient_walk_match_separate_walks(tokenizer, calib_text):
    """compress_from_gradients: two configs from one walk give what each gets from its own walk."""
    from compress.pipelines import SequentialPipeline, compress_from_gradients

    ids = torch.randint(0, 300, (3, 16), generator=torch.Generator().manual_seed(0))
    configs = [MFACConfig(ratio=0.5, block_size=32), MFACConfig(pattern="2:4", block_size=32)]
    base = tiny_model("llama")

    def pipeline(config):
        return SequentialPipeline(copy.deepcopy(base), [config], progress=False)

    shared = [pipeline(c) for c in configs]
    compress_from_gradients([(p, 0) for p in shared], ids)
    for config, together in zip(configs, shared):
        alone = pipeline(config)
        compress_from_gradients([(alone, 0)], ids)
        for a, b in zip(alone.model.modules(), together.model.modules()):
            if hasattr(a, "to_dense"):
                torch.testing.assert_close(a.to_dense(), b.to_dense())
    mismatched = SequentialPipeline(copy.deepcopy(base), [MFACConfig(ratio=0.5, targets=["re:.*mlp.*"])], progress=False)
    with pytest.raises(LlmpressError, match="same layers"):
        compress_from_gradients([(shared[0], 0), (mismatched, 0)], ids)


def test_mfac_float32_factor_matches_float64():
    """precision: float32 keeps Z in half the memory (what a 70B layer needs to fit one GPU);
    the factorization is still float64, so the inverse and the pruning barely move."""
    from compress.compressors.mfac import BlockFisherInverse, MFACConfig, mfac_prune

    g = torch.Generator().manual_seed(0)
    grads = torch.randn(32, 512, generator=g) @ torch.diag(torch.logspace(0, -2, 512))
    exact, half = (BlockFisherInverse(grads, 64, 0.1, dtype=dtype) for dtype in (torch.float64, torch.float32))
    assert half.z.dtype == torch.float32 and half.z.element_size() * 2 == exact.z.element_size()
    torch.testing.assert_close(half.diag(), exact.diag(), rtol=1e-5, atol=0)
    v = torch.randn(512, dtype=torch.float64, generator=g)
    torch.testing.assert_close(half.mul(v), exact.mul(v), rtol=1e-5, atol=1e-6 * float(exact.mul(v).abs().max()))
    W = torch.randn(8, 64, generator=g)
    a, keep_a = mfac_prune(W, grads, MFACConfig(ratio=0.5, block_size=64))
    b, keep_b = mfac_prune(W, grads, MFACConfig(ratio=0.5, block_size=64, precision="float32"))
    assert torch.equal(keep_a, keep_b)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _fisher_problem(m: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(m, d, generator=g, dtype=torch.float64) @ (torch.randn(d, d, generator=g, dtype=torch.float64) * 0.3 + torch.eye(d, dtype=torch.float64))
    return grads, torch.randn(2, d // 2, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("m", [10, 40])  # m < B: Woodbury factor; m >= B: the dense B x B blocks
def test_mfac_joint_update_is_the_exact_obs_solution(m):
    """One step, one Fisher block: w − F⁻¹ e_P [(F⁻¹)_PP]⁻¹ w_P for the pruned set P, the exact
    minimizer of the quadratic loss with w_P = 0 (what the sum of single-weight updates is not)."""
    from compress.compressors.mfac import BlockFisherInverse, MFACConfig, mfac_prune

    grads, W = _fisher_problem(m, 24)
    config = MFACConfig(ratio=0.5, block_size=24, damp=0.05, steps=1)
    pruned, keep = mfac_prune(W, grads, config)
    lam = BlockFisherInverse(grads, 24, 0.05).lam
    f_inv = torch.linalg.inv(lam * torch.eye(24, dtype=torch.float64) + grads.T @ grads / m)
    w = W.reshape(-1)
    p = (~keep).reshape(-1).nonzero().squeeze(1)
    exact = w - f_inv[:, p] @ torch.linalg.solve(f_inv[p][:, p], w[p])
    torch.testing.assert_close(pruned.reshape(-1), exact, rtol=1e-9, atol=1e-9)
    summed, _ = mfac_prune(W, grads, config.model_copy(update={"update": "sum"}))
    fisher = torch.linalg.inv(f_inv)
    loss = lambda v: float((v - w) @ fisher @ (v - w))  # noqa: E731
    assert loss(exact) < loss(summed.reshape(-1))


def test_dense_block_inverse_matches_the_woodbury_factor():
    from compress.compressors.mfac import BlockFisherInverse, DenseBlockFisherInverse, outer_product_sums

    grads, _ = _fisher_problem(20, 48)
    woodbury = BlockFisherInverse(grads, 16, 0.1)
    dense = DenseBlockFisherInverse(outer_product_sums(grads, 16), 20, 0.1)
    assert dense.lam == pytest.approx(woodbury.lam)
    torch.testing.assert_close(dense.diag(), woodbury.diag())
    v = torch.randn(48, dtype=torch.float64)
    torch.testing.assert_close(dense.mul(v), woodbury.mul(v))
    index = torch.tensor([[0, 5], [3, 2], [15, 1]])
    torch.testing.assert_close(dense.submatrix(index), woodbury.submatrix(index))


def test_gradient_walk_streams_block_sums(tokenizer, calib_text, monkeypatch):
    """m >= block_size: the walk folds gradients into per-block sums (in batches) and the result
    equals pruning from the kept gradients."""
    import compress.pipelines.gradients as gradients

    monkeypatch.setattr(gradients, "SUM_BATCH", 3)  # partial batches too
    dense = {}
    for inverse in ("blocks", "woodbury"):
        recipe = {"calibration": {"num_samples": 8, "seq_len": 16},
                  "stages": [{"method": "mfac", "ratio": 0.5, "block_size": 8, "inverse": inverse, "targets": ["re:.*mlp.*"]}]}  # fmt: skip
        model, _ = compress.compress_model(tiny_model("llama"), recipe, dataset=str(calib_text), tokenizer=tokenizer, progress=False)
        dense[inverse] = model.model.layers[0].mlp.down_proj.to_dense()
    assert gradients._shared_block_sums([(compress.pipelines.SequentialPipeline(tiny_model(), [MFACConfig(ratio=0.5, block_size=8)], progress=False), 0)], 8) == 8
    torch.testing.assert_close(dense["blocks"], dense["woodbury"], rtol=1e-4, atol=1e-5)

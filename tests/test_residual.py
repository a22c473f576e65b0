"""Stacked options: a stage's own result plus an EoRA residual (`residual_rank`), one module and
one knapsack option whose bytes count both parts."""

import pytest
import torch

import compress
from compress.budget import stage_label
from compress.compressors import COMPRESSORS, EoRAConfig, GPTQConfig, LayerStats, SVDConfig
from compress.errors import LlmpressError
from compress.metrics import relative_errors, serving_dtype
from compress.modules import EoRALinear, LowBitLinear, LowRankLinear, QuantizedEmbedding
from compress.recipe import load_recipe
from conftest import FAMILIES, family_model, tiny_model


def _layer(rows=48, cols=128, tokens=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols, generator=g) @ (torch.randn(cols, cols, generator=g) * torch.logspace(0, -1.5, cols))
    return torch.randn(rows, cols, generator=g), (x.T @ x).double()


def test_stacked_residual_is_the_eora_stage_in_one_module():
    weight, gram = _layer()
    stats = LayerStats({"gram": gram}, 512, name="mlp")
    plain = COMPRESSORS["gptq"]().apply(weight, None, stats, GPTQConfig(bits=2, group_size=32))
    stacked = COMPRESSORS["gptq"]().apply(weight, None, stats, GPTQConfig(bits=2, group_size=32, residual_rank=8))
    assert isinstance(plain, LowBitLinear) and isinstance(stacked, EoRALinear) and isinstance(stacked.base, LowBitLinear)
    as_stage = COMPRESSORS["eora"]().compress(weight, None, stats, EoRAConfig(rank=8), base=plain)
    torch.testing.assert_close(stacked.to_dense(), as_stage.to_dense())
    _, before = relative_errors(weight, plain.to_dense(), gram)
    _, after = relative_errors(weight, stacked.to_dense(), gram)
    assert after < 0.9 * before
    assert stacked.num_bytes() == plain.num_bytes() + 4 * 8 * (48 + 128)  # the factors, in float32 here


def test_profiles_price_the_residual():
    weight, gram = _layer()
    stats = LayerStats({"gram": gram}, 512, name="mlp")
    svd = COMPRESSORS["svd"]()
    alone = svd.profile(weight, None, stats, SVDConfig(ratio=0.5), [0.5, 0.7])
    stacked = svd.profile(weight, None, stats, SVDConfig(ratio=0.5, residual_rank=4), [0.5, 0.7])
    for a, s in zip(alone, stacked):
        assert s.bytes == a.bytes + 4 * 4 * (48 + 128)
        assert s.rel_weighted_error < a.rel_weighted_error


@pytest.mark.parametrize(
    "stage, match",
    [
        ({"method": "whitened_svd", "ratio": 0.5, "residual_rank": 4}, "residual_rank"),
        ({"method": "mfac", "ratio": 0.5, "residual_rank": 4}, "residual_rank"),
        ({"method": "gqsa", "optimize": ["bqpo"], "residual_rank": 4}, "drop residual_rank or optimize"),
        ({"method": "gptq", "residual_rank": 0}, "residual_rank"),
    ],
)
def test_a_residual_only_where_it_is_fit(stage, match):
    with pytest.raises(LlmpressError, match=match):
        load_recipe({"stages": [stage]})


def test_stacked_option_in_the_knapsack(tokenizer, calib_text, tmp_path):
    """W2 with a rank-4 residual is one candidate among W8 and W4: chosen layers hold it as one
    module, the plan names it, its bytes include the factors, and the checkpoint loads."""
    recipe = {
        "calibration": {"num_samples": 4, "seq_len": 32},
        "stages": [
            {"method": "gptq", "bits": 8, "group_size": 32, "blocksize": 64},
            {"method": "gptq", "bits": 2, "group_size": 32, "blocksize": 64, "residual_rank": 4},
        ],
        "allocation": {"strategy": "knapsack", "unit": "bytes", "cost": "fisher", "candidates": {0: [0], 1: [0]}, "ratio": 0.6},
    }
    assert stage_label(load_recipe(recipe).stages[1]) == "gptq w2 g32 + r4"
    model, report = compress.compress_model(tiny_model("qwen2"), recipe, dataset=str(calib_text), tokenizer=tokenizer, progress=False)
    plan = report["allocation"]
    assert plan["chosen_total"] <= plan["budget"]
    stacked = [c for c in plan["layers"] if c["method"] == "gptq w2 g32 + r4"]
    assert stacked
    for choice in stacked:
        module = model.get_submodule(choice["name"])
        assert isinstance(module, EoRALinear) and isinstance(module.base, LowBitLinear) and module.rank == 4
        with serving_dtype("bfloat16"):  # the recipe's serve_dtype
            assert choice["bytes"] == module.num_bytes() == module.base.num_bytes() + 2 * 4 * (module.in_features + module.out_features)
    out = compress.save_compressed(model, tmp_path / "ckpt", tokenizer=tokenizer, report=report)
    loaded = compress.load(out)
    ids = torch.randint(0, 300, (1, 12))
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_grouped_dictionary_with_a_residual_per_layer(tokenizer, calib_text, tmp_path):
    """CoSpaDi shared by two blocks: each layer gets its own residual on top of the shared atoms."""
    recipe = {
        "calibration": {"num_samples": 2, "seq_len": 32, "statistics": "dense"},
        "stages": [{"method": "cospadi", "ratio": 0.3, "group_size": 2, "max_iters": 2, "residual_rank": 2,
                    "targets": ["re:.*mlp\\.(gate|up)_proj"]}],
    }  # fmt: skip
    model, report = compress.compress_model(tiny_model("llama"), recipe, dataset=str(calib_text), tokenizer=tokenizer, progress=False)
    gate0, gate1 = (model.get_submodule(f"model.layers.{i}.mlp.gate_proj") for i in range(2))
    assert isinstance(gate0, EoRALinear) and isinstance(gate1, EoRALinear)
    assert gate1.base.dictionary() is gate0.base.atoms
    out = compress.save_compressed(model, tmp_path / "ckpt", tokenizer=tokenizer, report=report)
    loaded = compress.load(out)
    ids = torch.randint(0, 300, (1, 12))
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_low_rank_base_with_residual_in_a_sequential_run(tokenizer, calib_text):
    recipe = {"calibration": {"num_samples": 2, "seq_len": 32}, "stages": [{"method": "svd", "ratio": 0.6, "residual_rank": 2}]}
    model, report = compress.compress_model(tiny_model("llama"), recipe, dataset=str(calib_text), tokenizer=tokenizer, progress=False)
    q = model.model.layers[1].self_attn.q_proj
    assert isinstance(q, EoRALinear) and isinstance(q.base, LowRankLinear)
    assert all(r["format"] == "eora" for r in report["layers"])


@pytest.mark.parametrize("kind", FAMILIES)
def test_knapsack_with_low_bit_and_stacked_options_on_every_family(kind, tokenizer, calib_text):
    """W8, W3 and W3 + a rank-2 residual as candidates on each architecture (its own masks, RoPE,
    biases, fused projections), and W8/W4 for the embeddings (their Fisher through each family's
    own lookup, positions, scaling and logit softcapping): the plan meets its budget and the model
    still runs."""
    model = family_model(kind)
    recipe = {
        "calibration": {"num_samples": 2, "seq_len": 32},
        "embeddings": {"bits": [8, 4], "group_size": 32},
        "stages": [
            {"method": "gptq", "bits": 8, "group_size": 32, "blocksize": 64},
            {"method": "gptq", "bits": 3, "group_size": 32, "blocksize": 64},
            {"method": "gptq", "bits": 3, "group_size": 32, "blocksize": 64, "residual_rank": 2},
        ],
        "allocation": {"strategy": "knapsack", "unit": "bytes", "ratio": 0.7, "candidates": {0: [0], 1: [0], 2: [0]}},
    }
    model, report = compress.compress_model(model, recipe, dataset=str(calib_text), tokenizer=tokenizer, progress=False)
    plan = report["allocation"]
    assert plan["chosen_total"] <= plan["budget"]
    assert report["embeddings"]["bits"] in (8, 4) and isinstance(model.get_input_embeddings(), QuantizedEmbedding)
    formats = {type(model.get_submodule(c["name"])).__name__ for c in plan["layers"] if c["method"]}
    assert formats & {"LowBitLinear", "EoRALinear"}, formats
    ids = torch.randint(3, 300, (1, 24))
    assert torch.isfinite(model(input_ids=ids).logits).all()

"""GQSA's trained quantization parameters (compress/quant_tuning.py): block-wise (BQPO) and
end-to-end (E2E) tuning on calibration data, weights frozen."""

import pytest
import torch

import compress
from compress.blocks import find_decoder_blocks
from compress.compressors import COMPRESSORS, GQSAConfig, LayerStats
from compress.errors import LlmpressError
from compress.quant_tuning import TunableGQSA, TuningSettings, standing_in, take_tuning_sources, tune_block
from conftest import tiny_model


def _layer(ratio: float, seed: int = 0, codes: str = "fixed"):  # fixed: the toy targets below favour it
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(400, 64, generator=g) * torch.logspace(0, -1, 64)
    weight = torch.randn(32, 64, generator=g)
    config = GQSAConfig(ratio=ratio, group_size=8, blocksize=32, optimize=["bqpo"], bqpo_codes=codes)
    module = COMPRESSORS["gqsa"]().compress(weight, torch.randn(32, generator=g), LayerStats({"gram": (x.T @ x).double()}, 400), config)
    return module, x


@pytest.mark.parametrize("codes", ["fixed", "trained"])
@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_stand_in_starts_exactly_where_the_compressor_ended(ratio, codes):
    """θ = 0: the module's codes, or grid positions from the continuous weights that round to them."""
    module, x = _layer(ratio, codes=codes)
    modules, continuous = take_tuning_sources(torch.nn.ModuleDict({"layer": module}))
    assert list(modules) == ["layer"] and "tuning_source" not in module.__dict__
    assert (continuous["layer"] is None) == (codes == "fixed")
    stand_in = TunableGQSA(module, continuous["layer"])
    torch.testing.assert_close(stand_in.weight(), module.to_dense(), rtol=0, atol=1e-6)
    torch.testing.assert_close(stand_in(x), module(x), rtol=1e-5, atol=1e-5)


def test_block_tuning_lowers_the_error_and_writes_consistent_modules():
    """A 'block' of two GQSA layers trained towards the dense layers' outputs: the error goes down,
    and the module afterwards computes what the trained stand-in did."""
    torch.manual_seed(0)
    first, x = _layer(0.5, seed=1)
    dense = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.GELU(), torch.nn.Linear(32, 64))
    with torch.no_grad():
        dense[0].weight.copy_(first.to_dense() + 0.05 * torch.randn(32, 64))
        dense[0].bias.copy_(first.bias)
    block = torch.nn.Sequential(first, torch.nn.GELU(), torch.nn.Linear(32, 64))
    block[2].load_state_dict(dense[2].state_dict())
    hiddens = list(x.reshape(8, 50, 64).split(1))
    with torch.no_grad():
        targets = [dense(h) for h in hiddens]
    modules, continuous = take_tuning_sources(block)
    settings = TuningSettings(epochs=10, lr=3e-3, batch_size=2)
    result = tune_block(block, modules, continuous, hiddens, [{}] * len(hiddens), targets, settings, "cpu")
    assert result["kept"] and result["loss_after"] < 0.95 * result["loss_before"]
    with torch.no_grad():
        measured = sum(float((block(h) - t).square().sum()) for h, t in zip(hiddens, targets))
        total = sum(float(t.square().sum()) for t in targets)
    assert measured / total == pytest.approx(result["loss_after"], rel=1e-4)
    assert block[2].weight.requires_grad  # frozen only while tuning


def test_block_tuning_never_keeps_a_worse_block():
    """A learning rate far too large makes training worse: the closed-form values stay."""
    module, x = _layer(0.5, codes="trained")
    block = torch.nn.Sequential(module)
    before = module.to_dense().clone()
    hiddens = list(x.reshape(8, 50, 64).split(1))
    with torch.no_grad():
        targets = [module(h) * 1.01 for h in hiddens]  # close to what the block computes
    modules, continuous = take_tuning_sources(block)
    result = tune_block(block, modules, continuous, hiddens, [{}] * 8, targets, TuningSettings(2, 0.5, 2), "cpu")
    assert not result["kept"] and result["trained_loss"] > result["loss_before"]
    assert torch.equal(module.to_dense(), before)


def test_standing_in_restores_modules_and_requires_grad():
    module, _ = _layer(0.0)
    root = torch.nn.ModuleDict({"a": module, "b": torch.nn.Linear(4, 4)})
    with standing_in(root, {"a": module}, {}) as stand_ins:
        assert isinstance(root["a"], TunableGQSA) and not root["b"].weight.requires_grad
        assert stand_ins["a"].log_scale.requires_grad
    assert root["a"] is module and root["b"].weight.requires_grad


def test_bqpo_and_e2e_in_a_run(tokenizer, calib_text, tmp_path):
    """The recipe options end to end: every block's output error after BQPO is at most its
    closed-form error (lower in some block), E2E lowers the calibration loss, and the saved
    checkpoint computes what the tuned model does."""
    recipe = {
        "calibration": {"num_samples": 8, "seq_len": 48},
        "stages": [{"method": "gqsa", "ratio": 0.5, "group_size": 16, "optimize": ["bqpo", "e2e"],
                    "bqpo_epochs": 3, "bqpo_lr": 5e-3, "bqpo_batch_size": 2, "e2e_epochs": 2, "e2e_lr": 2e-3, "e2e_batch_size": 2}],
    }  # fmt: skip
    model, report = compress.compress_model(tiny_model("qwen2"), recipe, dataset=str(calib_text), tokenizer=tokenizer, progress=False)
    tuned = [b["bqpo"] for b in report["blocks"]]
    assert len(tuned) == 2
    assert all(t["trained_loss"] <= t["loss_before"] or not t["kept"] for t in tuned)
    assert any(t["kept"] and t["trained_loss"] < t["loss_before"] for t in tuned)
    e2e = report["tuning"]["e2e"]
    assert e2e["kept"] and e2e["loss_after"] < e2e["loss_before"]
    assert all(r["detail"].get("e2e") is True for r in report["layers"])
    out = compress.save_compressed(model, tmp_path / "tuned", tokenizer=tokenizer, report=report)
    ids = torch.randint(0, 300, (1, 10))
    torch.testing.assert_close(compress.load(out)(input_ids=ids).logits, model(input_ids=ids).logits)
    _, blocks = find_decoder_blocks(model)
    assert not any("tuning_source" in m.__dict__ for m in blocks.modules())


def test_bqpo_needs_sequential_statistics(tokenizer, calib_text):
    recipe = {"calibration": {"num_samples": 2, "seq_len": 32, "statistics": "dense"},
              "stages": [{"method": "gqsa", "ratio": 0.0, "optimize": ["bqpo"]}]}  # fmt: skip
    with pytest.raises(LlmpressError, match="statistics: sequential"):
        compress.compress_model(tiny_model(), recipe, dataset=str(calib_text), tokenizer=tokenizer, progress=False)

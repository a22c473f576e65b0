"""GPTQ W2/W3/W4/W8: error feedback beats round-to-nearest at the same bytes, the formats are exact, and
the method takes part in a knapsack across methods as one fixed option."""

import pytest
import torch

from compress.compressors import COMPRESSORS, GPTQConfig, LayerStats
from compress.compressors.gqsa import GQSAConfig
from compress.compressors.rtn import quantize_groups
from compress.errors import LlmpressError
from compress.metrics import serving_dtype
from compress.modules import GQSALinear, Int8Linear, LowBitLinear
from compress.modules.lowbit import pack_codes, unpack_codes


def _layer(rows=48, cols=128, tokens=512, seed=0):
    """A weight and the Gram of correlated inputs with a few loud channels (what LLM activations look like)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=gen)
    mix = torch.randn(cols, cols, generator=gen) / cols**0.5 + torch.eye(cols)
    x = torch.randn(tokens, cols, generator=gen) @ mix
    x[:, :4] *= 20
    return weight, (x.T @ x).double()


def _weighted_error(weight, approx, gram):
    delta = (weight - approx).double()
    return float(torch.einsum("ri,ij,rj->", delta, gram, delta))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_beats_round_to_nearest_at_equal_bytes(bits):
    weight, gram = _layer()
    config = GPTQConfig(bits=bits, group_size=32, blocksize=64)
    module = COMPRESSORS["gptq"]().compress(weight, None, LayerStats({"gram": gram}, 512), config)
    assert isinstance(module, {8: Int8Linear, 4: GQSALinear}.get(bits, LowBitLinear))
    rtn = quantize_groups(weight, bits, 32)
    ours, baseline = _weighted_error(weight, module.to_dense(), gram), _weighted_error(weight, rtn.dequantize(), gram)
    assert ours < 0.8 * baseline
    codes = module.qweight if bits == 8 else None
    if codes is not None:  # W8 uses the whole 8-bit range, not a 4-bit grid stored in bytes
        assert int(codes.max()) > 15


def test_w8_bytes_and_forward():
    weight, gram = _layer(rows=16, cols=64)
    bias = torch.randn(16)
    module = COMPRESSORS["gptq"]().compress(weight, bias, LayerStats({"gram": gram}, 512), GPTQConfig(bits=8, group_size=32, blocksize=64))
    x = torch.randn(3, 64)
    torch.testing.assert_close(module(x), x @ module.to_dense().T + bias)
    with serving_dtype(torch.bfloat16):  # one byte per weight, a bf16 scale and a uint8 zero point per group, bf16 bias
        assert module.num_bytes() == 16 * 64 + 16 * 2 * (2 + 1) + 16 * 2
    assert _weighted_error(weight, module.to_dense(), gram) < 1e-4 * _weighted_error(weight, torch.zeros_like(weight), gram)


@pytest.mark.parametrize("bits", [2, 3])
def test_low_bit_codes_pack_at_their_width(bits):
    codes = torch.randint(0, 2**bits, (3, 5, 32))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, 32 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits), codes.to(torch.int32))
    assert not torch.equal(unpack_codes(packed, bits), unpack_codes(pack_codes(codes.roll(1, -1), bits), bits))
    # the words the kernels read: code 4j+p at bits 2p of low byte j; (W3) the third bits of the
    # group's 32 columns in one 32-bit word, column 16o + 8h + 4s + p's at bit (16h + 2p + 2 + s + 8o) mod 32
    row = codes[0, 0].tolist()
    assert packed[0, 0, :8].tolist() == [sum((row[4 * j + p] & 3) << (2 * p) for p in range(4)) for j in range(8)]
    if bits == 3:
        third = sum(((row[c] >> 2) & 1) << ((16 * (c % 16 // 8) + 2 * (c % 4) + 2 + c % 8 // 4 + 8 * (c // 16)) % 32) for c in range(32))
        assert packed[0, 0, 8:].tolist() == [(third >> (8 * i)) & 0xFF for i in range(4)]


def test_w3_bytes_forward_and_round_trip():
    from compress.modules import build_module

    weight, gram = _layer(rows=16, cols=64)
    bias = torch.randn(16)
    module = COMPRESSORS["gptq"]().compress(weight, bias, LayerStats({"gram": gram}, 512), GPTQConfig(bits=3, group_size=32, blocksize=64))
    x = torch.randn(3, 64)
    torch.testing.assert_close(module(x), x @ module.to_dense().T + bias)
    with serving_dtype(torch.bfloat16):  # 3/8 byte per weight, a bf16 scale and a uint8 zero point per group, bf16 bias
        assert module.num_bytes() == 16 * 64 * 3 // 8 + 16 * 2 * (2 + 1) + 16 * 2
    codes = unpack_codes(module.qweight, 3)
    assert int(codes.max()) <= 7 and int(codes.max()) > 3  # the whole 3-bit range, nothing wider
    copy = build_module(module.spec(), torch.float32)
    copy.load_state_dict(module.state_dict())
    torch.testing.assert_close(copy(x), module(x))
    old_layout = {k: v for k, v in module.spec().items() if k != "packing"}  # written before the bit planes
    with pytest.raises(LlmpressError, match="compress the model again"):
        build_module(old_layout, torch.float32)
    with pytest.raises(ValueError, match="multiple of 32"):
        GPTQConfig(bits=3, group_size=16, blocksize=48)
    with pytest.raises(ValueError, match="multiple of 16"):
        GPTQConfig(bits=2, group_size=24, blocksize=48)


def test_w4_is_gqsa_with_every_group_kept():
    weight, gram = _layer(rows=16, cols=64)
    stats = LayerStats({"gram": gram}, 512)
    ours = COMPRESSORS["gptq"]().compress(weight, None, stats, GPTQConfig(bits=4, group_size=16, blocksize=64))
    gqsa = COMPRESSORS["gqsa"]().compress(weight, None, stats, GQSAConfig(ratio=0.0, group_size=16, blocksize=64))
    torch.testing.assert_close(ours.to_dense(), gqsa.to_dense())
    assert ours.num_bytes() == gqsa.num_bytes() and ours.all_groups


def test_group_size_must_divide_the_layer():
    weight, gram = _layer(rows=8, cols=96)
    with pytest.raises(ValueError, match="divisible by group_size"):
        COMPRESSORS["gptq"]().compress(weight, None, LayerStats({"gram": gram}, 512, name="mlp"), GPTQConfig(group_size=64, blocksize=128))


def _w8_w4_recipe(**allocation):
    return {
        "calibration": {"num_samples": 4, "seq_len": 32},
        "stages": [{"method": "gptq", "bits": 8, "group_size": 32, "blocksize": 64}, {"method": "gqsa", "group_size": 16}],
        "allocation": {"strategy": "knapsack", "unit": "bytes", "cost": "fisher", "candidates": {0: [0], 1: [0.0, 0.5]}, **allocation},
    }


def test_w8_is_a_fixed_knapsack_option(tokenizer, calib_text):
    """At 55% of bf16 bytes removed W8 alone (~45% with groups of 32) cannot meet the budget and W4 everywhere is not needed:
    the plan mixes W8 and W4, and every chosen module is the format of its option."""
    from compress.api import compress_model
    from conftest import tiny_model

    model, report = compress_model(tiny_model("qwen2"), _w8_w4_recipe(ratio=0.55), dataset=str(calib_text), tokenizer=tokenizer, progress=False)
    plan = report["allocation"]
    assert plan["chosen_total"] <= plan["budget"]
    methods = {c["method"] for c in plan["layers"]}
    assert "gptq w8 g32" in methods and any(m and m.startswith("gqsa") for m in methods)
    for choice in plan["layers"]:
        module = model.get_submodule(choice["name"])
        if choice["method"] == "gptq w8 g32":
            assert isinstance(module, Int8Linear) and choice["level"] == 0.0
        elif choice["method"]:
            assert isinstance(module, GQSALinear)


def test_a_method_without_levels_only_takes_level_zero():
    from compress.recipe import load_recipe

    bad = _w8_w4_recipe(ratio=0.5)
    bad["allocation"]["candidates"] = {0: [0.5], 1: [0.0]}
    with pytest.raises(LlmpressError, match="only candidate is \\[0\\]"):
        load_recipe(bad)
    alone = {**_w8_w4_recipe(ratio=0.5), "stages": [{"method": "gptq", "bits": 8}]}
    alone["allocation"] = {"strategy": "knapsack", "unit": "bytes", "ratio": 0.5}
    with pytest.raises(LlmpressError, match="no level to allocate"):
        load_recipe(alone)


def test_a_candidate_that_cannot_take_a_layer_is_left_out_of_the_knapsack(tokenizer, calib_text, caplog):
    """W4 g64 cannot compress a down_proj of 96 inputs: the knapsack plans that layer from the other
    options (and says so), where a uniform recipe stops with the fix."""
    import logging

    from transformers import AutoModelForCausalLM, LlamaConfig

    from compress.api import compress_model
    from conftest import tiny_config

    config = LlamaConfig(**{**tiny_config("llama").to_dict(), "intermediate_size": 96})
    torch.manual_seed(0)
    recipe = {
        "calibration": {"num_samples": 2, "seq_len": 32},
        "stages": [{"method": "gptq", "bits": 8, "group_size": 32, "blocksize": 64}, {"method": "gptq", "bits": 4, "group_size": 64}],
        "allocation": {"strategy": "knapsack", "unit": "bytes", "ratio": 0.6, "candidates": {0: [0], 1: [0]}},
    }
    with caplog.at_level(logging.WARNING, logger="compress"):
        model, report = compress_model(AutoModelForCausalLM.from_config(config), recipe, dataset=str(calib_text), tokenizer=tokenizer, progress=False)
    assert "gptq w4 g64 cannot compress 2 layer(s)" in caplog.text
    down = [c for c in report["allocation"]["layers"] if c["name"].endswith("down_proj")]
    assert len(down) == 2 and all(c["method"] != "gptq w4 g64" for c in down)
    assert any(c["method"] == "gptq w4 g64" for c in report["allocation"]["layers"])
    uniform = {"calibration": {"num_samples": 2, "seq_len": 32}, "stages": [{"method": "gptq", "bits": 4, "group_size": 64}]}
    with pytest.raises(LlmpressError, match="choose a group_size that divides it"):
        compress_model(AutoModelForCausalLM.from_config(config), uniform, dataset=str(calib_text), tokenizer=tokenizer, progress=False)

"""DeltaSparseLinear (rows of value + 4-bit column gap entries): exact encoding, honest bytes,
a pruning stage that writes it, and a checkpoint that loads back bit-exact."""

from __future__ import annotations

import pytest
import torch

import compress
from compress.errors import LlmpressError
from compress.kernels.delta_matmul import ROW_ALIGN
from compress.metrics import served_itemsize
from compress.modules import DeltaSparseLinear, SparseLinear, build_module
from conftest import tiny_model


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.995])
def test_rows_encode_every_mask_exactly(sparsity):
    torch.manual_seed(0)
    w = torch.randn(24, 333)
    mask = torch.rand(24, 333) >= sparsity
    mask[2] = False  # a dead row
    mask[5, :] = True  # a full row
    mask[7] = False
    mask[7, [0, 17, 18, 300, 332]] = True  # gaps of 16 (one filler), 0, 281 (17 fillers), 31
    module = DeltaSparseLinear.from_dense(w * mask, mask, None)
    assert torch.equal(module.to_dense(), w * mask)
    assert torch.equal(module.mask(), mask)
    starts = module.row_start.long()
    assert bool(((starts[1:] - starts[:-1]) % ROW_ALIGN == 0).all()) and int(starts[-1]) == module.values.numel()
    # the row with known gaps: 5 kept weights + 1 + 17 fillers, padded to one ROW_ALIGN
    assert int(starts[8] - starts[7]) == ROW_ALIGN and module.nnz == int(mask.sum())


def test_bytes_count_entries_gaps_and_row_starts():
    torch.manual_seed(1)
    w = torch.randn(64, 1024, dtype=torch.bfloat16)
    mask = torch.rand(64, 1024) >= 0.5
    delta = DeltaSparseLinear.from_dense(w * mask, mask, None)
    entries = delta.values.numel()
    assert delta.num_bytes() == entries * served_itemsize(torch.bfloat16) + entries // 2 + 4 * 65
    bitmap = SparseLinear.from_dense(w, mask, None)
    # at 50%: about 0.63 of dense against the bitmap's 0.56 (fillers and padding a few percent)
    assert 0.62 < delta.num_bytes() / delta.dense_num_bytes() < 0.66
    assert bitmap.num_bytes() < delta.num_bytes()


def test_empty_twin_from_spec_loads_the_state():
    w = torch.randn(10, 70)
    mask = torch.rand(10, 70) > 0.6
    module = DeltaSparseLinear.from_dense(w * mask, mask, torch.randn(10))
    twin = build_module(module.spec(), torch.float32)
    twin.load_state_dict(module.state_dict())
    x = torch.randn(3, 70)
    assert torch.equal(twin(x), module(x))


def test_pruning_stage_writes_delta_rows_and_the_checkpoint_round_trips(tokenizer, calib_text, tmp_path):
    recipe = {
        "calibration": {"num_samples": 4, "seq_len": 32},
        "stages": [{"method": "wanda", "ratio": 0.6, "sparse_format": "delta"}],
    }
    bitmap_recipe = {**recipe, "stages": [{"method": "wanda", "ratio": 0.6}]}
    model, report = compress.compress_model(tiny_model("qwen2"), recipe, dataset=str(calib_text), tokenizer=tokenizer, progress=False)
    reference, _ = compress.compress_model(tiny_model("qwen2"), bitmap_recipe, dataset=str(calib_text), tokenizer=tokenizer, progress=False)
    assert {r["format"] for r in report["layers"]} == {"sparse_delta"}
    down, down_bitmap = model.model.layers[1].mlp.down_proj, reference.model.layers[1].mlp.down_proj
    assert isinstance(down, DeltaSparseLinear) and torch.equal(down.to_dense(), down_bitmap.to_dense())
    ids = torch.randint(0, 300, (2, 16))
    expected = model(ids, use_cache=False).logits
    assert torch.allclose(expected, reference(ids, use_cache=False).logits, atol=1e-5)
    out = compress.save_compressed(model, tmp_path / "ckpt", tokenizer=tokenizer)
    assert torch.equal(compress.load(out)(ids, use_cache=False).logits, expected)


def test_tile_pattern_refuses_a_sparse_format():
    with pytest.raises((LlmpressError, ValueError), match="sparse_format"):
        compress.load_recipe({"stages": [{"method": "sparsegpt", "ratio": 0.5, "pattern": "tile", "sparse_format": "delta"}]})

"""DeltaSparseLinear (rows of value + 4-bit column advance entries in 32-row slices): exact
encoding, split-K marks, honest bytes, a pruning stage that writes it, a checkpoint that loads
back bit-exact, and a clear refusal of the earlier row-by-row layout."""

from __future__ import annotations

import pytest
import torch

import compress
from compress.errors import LlmpressError
from compress.kernels.delta_matmul import CHUNK, MARK_CHUNKS, SLICE_ALIGN, SLICE_ROWS
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
    starts = module.slice_start.long()
    assert starts.numel() == 1 + 1 and int(starts[-1]) == module.values.numel()  # 24 rows: one slice
    assert int(starts[1]) % (SLICE_ROWS * SLICE_ALIGN) == 0 and module.nnz == int(mask.sum())
    # every entry lies inside its row: padding advances 0, no column past in_features
    _, row, col = module.columns()
    assert int(col.max()) < 333 and int(col.min()) >= 0


def test_known_row_codes_and_marks():
    """Row 1 keeps columns 0, 15, 16, 47 and 300: codes 0, 15, 1, then 15 + 15 + 1 (two fillers)
    and 15·16 + 13 (16 fillers); its marks are its column before entries 0 and 256·m."""
    w = torch.zeros(3, 700)
    mask = torch.zeros(3, 700, dtype=torch.bool)
    mask[1, [0, 15, 16, 47, 300]] = True
    mask[2, ::2] = True  # 350 kept weights: the slice is 352 entries a row, two marks
    w[mask] = torch.arange(1, int(mask.sum()) + 1, dtype=torch.float32)
    module = DeltaSparseLinear.from_dense(w, mask, None)
    position, row, col = module.columns()
    codes = torch.stack([module.gaps & 0xF, module.gaps >> 4], 1).flatten()[position[row == 1]]
    assert codes[:23].tolist() == [0, 15, 1, 15, 15, 1] + [15] * 16 + [13] and set(codes[23:].tolist()) == {0}
    assert col[row == 1][:23].tolist()[-1] == 300 and module.values[position[row == 1]][:6].tolist() == [1, 2, 3, 0, 0, 4]
    per_mark = MARK_CHUNKS * CHUNK
    assert module.marks.shape == (SLICE_ROWS, 2)
    assert module.marks[2].tolist() == [0, 2 * per_mark - 2]  # before row 2's entry 256 (column 512): column 510
    assert module.marks[1].tolist() == [0, 300] and module.marks[0].tolist() == [0, 0]  # past a row's end: its last column


def test_bytes_count_entries_codes_slice_starts_and_marks():
    torch.manual_seed(1)
    w = torch.randn(64, 1024, dtype=torch.bfloat16)
    mask = torch.rand(64, 1024) >= 0.5
    delta = DeltaSparseLinear.from_dense(w * mask, mask, None)
    entries = delta.values.numel()
    assert delta.marks.shape == (64, 3)  # slices of ~560 entries a row: marks at 0, 256, 512
    assert delta.num_bytes() == entries * served_itemsize(torch.bfloat16) + entries // 2 + 4 * 3 + 4 * 64 * 3
    bitmap = SparseLinear.from_dense(w, mask, None)
    # a random mask: rows differ by ~16 kept weights and each slice is padded to its longest row
    assert 0.62 < delta.num_bytes() / delta.dense_num_bytes() < 0.68
    # 50% in every row, as Wanda and SparseGPT prune: about 0.63 of dense (+3% fillers and padding)
    even = torch.zeros_like(mask).scatter_(1, torch.rand(64, 1024).topk(512, 1).indices, True)
    even_delta = DeltaSparseLinear.from_dense(w * even, even, None)
    assert 0.62 < even_delta.num_bytes() / even_delta.dense_num_bytes() < 0.655
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


def test_a_checkpoint_of_the_row_by_row_layout_is_refused_clearly():
    module = DeltaSparseLinear.from_dense(torch.randn(4, 40), torch.rand(4, 40) > 0.5, None)
    spec = {k: v for k, v in module.spec().items() if k not in ("layout", "marks")}
    with pytest.raises(LlmpressError, match="compress the model again"):
        build_module(spec, torch.float32)


def test_tile_pattern_refuses_a_sparse_format():
    with pytest.raises((LlmpressError, ValueError), match="sparse_format"):
        compress.load_recipe({"stages": [{"method": "sparsegpt", "ratio": 0.5, "pattern": "tile", "sparse_format": "delta"}]})

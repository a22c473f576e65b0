"""GQSA: group-sparse INT4 layers, their packed format, and error feedback beating round-to-nearest."""

import pytest
import torch

import compress
from compress.compressors import COMPRESSORS, GQSAConfig, LayerStats
from compress.compressors.gqsa import gqsa_quantize
from compress.modules import GQSALinear
from compress.modules.gqsa import pack_int4, unpack_int4
from compress.metrics import relative_errors
from conftest import tiny_model


def _problem(seed=0, out=24, inp=64, n=600):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, inp, generator=g) @ (torch.randn(inp, inp, generator=g) * 0.3 + torch.eye(inp))
    X = X * torch.logspace(0, -1, inp)[torch.randperm(inp, generator=g)]
    return torch.randn(out, inp, generator=g), (X.T @ X).double()


def _naive(W, ratio, g):
    """Baseline: keep the groups with the largest norm, round each to nearest on its own grid."""
    rows, cols = W.shape
    groups = W.reshape(rows, cols // g, g)
    keep = groups.norm(dim=-1).topk(round((1 - ratio) * cols / g), dim=1).indices
    out = torch.zeros_like(groups)
    for r in range(rows):
        for c in keep[r]:
            v = groups[r, c]
            lo, hi = min(v.min(), 0.0), max(v.max(), 0.0)
            scale = (hi - lo) / 15
            zero = torch.round(-lo / scale)
            out[r, c] = (torch.clamp(torch.round(v / scale) + zero, 0, 15) - zero) * scale
    return out.reshape(rows, cols)


def test_int4_packing_round_trips():
    codes = torch.randint(0, 16, (3, 5, 8))
    assert torch.equal(unpack_int4(pack_int4(codes)).long(), codes)


@pytest.mark.parametrize("ratio,group_size", [(0.0, 8), (0.5, 8), (0.5, 16), (0.75, 16)])
def test_gqsa_module_is_exact_and_beats_naive(ratio, group_size):
    W, gram = _problem()
    config = GQSAConfig(ratio=ratio, group_size=group_size, blocksize=32)
    dequantized = gqsa_quantize(W, gram, config).dequantized
    module = COMPRESSORS["gqsa"]().compress(W, None, LayerStats({"gram": gram}), config)
    assert isinstance(module, GQSALinear)
    torch.testing.assert_close(module.to_dense(), dequantized, rtol=0, atol=1e-6)
    k = module.groups_per_row
    assert k == round((1 - ratio) * 64 / group_size)
    index = 0 if ratio == 0 else 2  # int16 group index, not stored when every group is kept
    assert module.num_bytes() == 24 * k * (group_size // 2 + index + 1 + 4)  # codes, index, zero, fp32 scale
    x = torch.randn(5, 64)
    torch.testing.assert_close(module(x), x @ module.to_dense().T, rtol=1e-5, atol=1e-5)
    _, ours = relative_errors(W, module.to_dense(), gram)
    _, naive = relative_errors(W, _naive(W, ratio, group_size), gram)
    assert ours < naive


def test_gqsa_config_errors():
    with pytest.raises(ValueError, match="multiple of group_size"):
        GQSAConfig(group_size=16, blocksize=40)
    with pytest.raises(ValueError, match="even"):
        GQSAConfig(group_size=7, blocksize=70)


def test_gqsa_recipe_saves_and_loads(tokenizer, calib_text, tmp_path):
    recipe = {"calibration": {"num_samples": 3, "seq_len": 32}, "stages": [{"method": "gqsa", "ratio": 0.5, "group_size": 16}]}
    model, report = compress.compress_model(tiny_model("qwen2"), recipe, dataset=str(calib_text), tokenizer=tokenizer, progress=False)
    # as served in bf16: half the groups, each 13 bytes per 16 weights (codes, int16 index, zero, bf16 scale) vs 32
    assert report["summary"]["storage_ratio_removed"] > 0.78
    out = compress.save_compressed(model, tmp_path / "gqsa", tokenizer=tokenizer, report=report)
    ids = torch.randint(0, 300, (1, 10))
    assert torch.equal(compress.load(out)(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.75])
def test_gqsa_blockwise_selection_and_scale_refit(ratio):
    """Blockwise selection keeps the requested groups per row; the closed-form scale refit never
    raises (and here lowers) the calibration-weighted error of the same codes."""
    W, gram = _problem(seed=1, inp=128)
    errors = {}
    for selection in ("global", "blockwise"):
        for refit in (False, True):
            config = GQSAConfig(ratio=ratio, group_size=8, blocksize=32, selection=selection, refit_scales=refit)
            codes, scales, zeros, index, dense, _ = gqsa_quantize(W, gram, config)
            assert index.shape == (24, round((1 - ratio) * 16))
            assert (index.diff(dim=1) > 0).all()
            errors[selection, refit] = relative_errors(W, dense, gram)[1]
        assert errors[selection, True] < errors[selection, False]
    _, naive = relative_errors(W, _naive(W, ratio, 8), gram)
    assert errors["blockwise", True] < naive


def test_refit_scales_solves_the_least_squares_problem():
    """At the refit scales the gradient of ‖(W − Ŵ)Xᵀ‖² w.r.t. every scale is ~0 (up to damping)."""
    from compress.compressors.gqsa import refit_scales

    W, gram = _problem(seed=2, inp=64)
    codes, scales, zeros, index, *_ = gqsa_quantize(W, gram, GQSAConfig(ratio=0.5, group_size=8, blocksize=32, refit_scales=False))
    s = refit_scales(W, gram, codes, zeros, index, scales, damp=1e-10).requires_grad_(True)
    dense = torch.zeros(24, 8, 8, dtype=torch.float64).scatter(1, index[..., None].expand(-1, -1, 8), (codes - zeros[..., None]).double() * s[..., None])
    diff = W.double() - dense.reshape(24, 64)
    loss = torch.einsum("ri,ij,rj->", diff, gram, diff)
    (grad,) = torch.autograd.grad(loss, s)
    assert float(grad.abs().max()) < 1e-6 * float(loss.detach())


def test_refit_scales_memory_cap_chunks_rows_without_changing_the_result():
    """The (rows, groups, g, groups) temporary is capped (13 GB at 14336 inputs otherwise):
    one row at a time gives the same scales as all rows at once."""
    from compress.compressors.gqsa import refit_scales

    W, gram = _problem(seed=3, inp=64)
    codes, scales, zeros, index, *_ = gqsa_quantize(W, gram, GQSAConfig(ratio=0.5, group_size=8, blocksize=32, refit_scales=False))
    together = refit_scales(W, gram, codes, zeros, index, scales)
    row_bytes = 64 * 8 * 8  # cols × groups × float64
    one_by_one = refit_scales(W, gram, codes, zeros, index, scales, max_bytes=row_bytes)
    torch.testing.assert_close(one_by_one, together, rtol=1e-10, atol=1e-12)


def test_plain_w4_stores_no_group_index():
    """Every group kept: groups in column order, no index; the bytes are codes, zero points and
    scales only (bf16 served: g/2 + 1 + 2 bytes per group)."""
    from compress.metrics import serving_dtype
    from compress.modules import GQSALinear

    out_f, in_f, g = 8, 64, 16
    codes = torch.randint(0, 16, (out_f, in_f // g, g))
    order = torch.stack([torch.randperm(in_f // g) for _ in range(out_f)])  # given out of order: stored sorted
    scales, zeros = torch.rand(out_f, in_f // g), torch.randint(0, 16, (out_f, in_f // g))
    module = GQSALinear.from_codes(codes, scales, zeros, order, in_f, None)
    assert module.group_index is None and "group_index" not in module.state_dict()
    reference = torch.zeros(out_f, in_f // g, g)
    reference.scatter_(1, order[..., None].expand(-1, -1, g), (codes - zeros[..., None]) * scales[..., None])
    torch.testing.assert_close(module.to_dense(), reference.reshape(out_f, in_f))
    with serving_dtype(torch.bfloat16):
        assert module.num_bytes() == out_f * (in_f // g) * (g // 2 + 1 + 2)
    twin = GQSALinear.from_spec(module.spec(), torch.float32)
    twin.load_state_dict(module.state_dict())
    torch.testing.assert_close(twin.to_dense(), module.to_dense())

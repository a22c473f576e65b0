"""Sparse-dictionary compression: sizes, ROCKET, CoSpaDi (per layer and shared), DictLinear."""

import pytest
import torch
from conftest import tiny_model

import compress
from compress.compressors import COMPRESSORS, LayerStats, rank_for_ratio
from compress.compressors.cospadi import CoSpaDiConfig, cospadi_dictionary
from compress.compressors.rocket import RocketConfig, WhitenedSpectrum, rocket_best
from compress.compressors.sparse_coding import (
    batch_omp,
    code_on_support,
    dense_coefficients,
    dictionary_shape,
)
from compress.compressors.whitened_svd import WhitenedSVDConfig
from compress.errors import LlmpressError
from compress.modules import DictLinear
from compress.metrics import relative_errors


def _layer(out_f=48, in_f=32, tokens=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(in_f) + 0.5 * torch.randn(in_f, in_f, generator=g)
    x = torch.randn(tokens, in_f, generator=g) @ mix * torch.linspace(0.2, 3.0, in_f)
    w = torch.randn(out_f, in_f, generator=g) / in_f**0.5
    return w, LayerStats({"gram": (x.double().T @ x.double())}, tokens)


@pytest.mark.parametrize("ratio,ks", [(0.2, 1.0), (0.3, 2.0), (0.5, 3.0), (0.4, 1.5)])
def test_dictionary_shape_fits_the_budget(ratio, ks):
    out_f, in_f = 96, 64
    k, s = dictionary_shape(out_f, in_f, ratio, ks, max_atoms=min(out_f, in_f))
    assert k * in_f + s * out_f <= (1 - ratio) * out_f * in_f
    assert 1 <= s <= k <= min(out_f, in_f)
    if ks == 1.0:
        assert k == s == rank_for_ratio(out_f, in_f, ratio)  # plain low rank


def test_dictionary_shape_rounds_coefficients_for_vector_loads():
    """With values_multiple m, s (if >= 8·m and < k) becomes a multiple of m and k takes the freed
    budget; small s and plain low rank (s = k) are left alone."""
    out_f, in_f = 1536, 576
    k, s = dictionary_shape(out_f, in_f, 0.3, 2.0, max_atoms=in_f)
    k8, s8 = dictionary_shape(out_f, in_f, 0.3, 2.0, max_atoms=in_f, values_multiple=8)
    k16, s16 = dictionary_shape(out_f, in_f, 0.3, 2.0, max_atoms=in_f, values_multiple=16)
    assert s % 16 != 0 and s8 == s - s % 8 and s16 == s - s % 16
    for kk, ss in ((k8, s8), (k16, s16)):
        assert kk >= k and kk * in_f + ss * out_f <= 0.7 * out_f * in_f < (kk + 1) * in_f + ss * out_f
    assert dictionary_shape(96, 64, 0.3, 2.0, max_atoms=64, values_multiple=8) == dictionary_shape(96, 64, 0.3, 2.0, max_atoms=64)
    assert dictionary_shape(out_f, in_f, 0.3, 1.0, max_atoms=in_f, values_multiple=8) == dictionary_shape(out_f, in_f, 0.3, 1.0, max_atoms=in_f)


def test_invalid_shapes_give_clear_errors():
    with pytest.raises(LlmpressError, match=r"ratio must be in \(0, 1\)"):
        dictionary_shape(8, 8, 1.2, 2.0)
    with pytest.raises(LlmpressError, match="ks .* must be >= 1"):
        dictionary_shape(8, 8, 0.3, 0.5)
    with pytest.raises(LlmpressError, match="leaves no room"):
        dictionary_shape(4, 4, 0.99, 2.0)
    with pytest.raises(ValueError, match="every ks must be >= 1"):
        RocketConfig(ratio=0.3, ks=[1.0, 0.5])


def test_rocket_with_ks_one_equals_whitened_svd():
    w, stats = _layer()
    rocket = COMPRESSORS["rocket"]().compress(w, None, stats, RocketConfig(ratio=0.3, ks=[1.0]))
    svd = COMPRESSORS["whitened_svd"]().compress(w, None, stats, WhitenedSVDConfig(ratio=0.3))
    torch.testing.assert_close(rocket.to_dense(), svd.to_dense(), rtol=1e-4, atol=1e-5)
    assert rocket.num_values() == svd.num_values()


def test_rocket_sparse_coefficients_beat_low_rank_at_equal_size():
    w, stats = _layer(96, 64)
    spectrum = WhitenedSpectrum.of(w, stats["gram"], 1e-4)
    low_rank = rocket_best(spectrum, 0.4, RocketConfig(ratio=0.4, ks=[1.0]))
    sparse = rocket_best(spectrum, 0.4, RocketConfig(ratio=0.4))
    assert sparse.ks > 1.0 and sparse.rel_weighted_error < low_rank.rel_weighted_error
    assert sparse.num_values() <= 0.6 * 96 * 64
    _, weighted = relative_errors(w, sparse.to_dense(), stats["gram"])
    assert weighted == pytest.approx(sparse.rel_weighted_error, rel=1e-3)  # the whitened error is the output error


def test_omp_recovers_true_supports_and_values():
    torch.manual_seed(0)
    atoms = torch.randn(24, 48, dtype=torch.float64)
    support = torch.stack([torch.randperm(24)[:3] for _ in range(100)]).sort(1).values
    a = dense_coefficients(torch.randn(100, 3, dtype=torch.float64), support, 24) @ atoms
    found = batch_omp(a, atoms, 3, steps=3)
    values, residual = code_on_support(a, atoms, found)
    assert torch.equal(found, support)
    assert float(residual.sum().sqrt() / a.norm()) < 1e-6


def test_cospadi_recovers_a_planted_sparse_dictionary():
    torch.manual_seed(0)
    m, n, k, s = 600, 48, 24, 3
    atoms = torch.randn(k, n, dtype=torch.float64)
    support = torch.stack([torch.randperm(k)[:s] for _ in range(m)])
    values = torch.randn(m, s, dtype=torch.float64) * (1 + torch.rand(m, s, dtype=torch.float64))
    w = dense_coefficients(values, support, k) @ atoms
    x = torch.randn(400, n, dtype=torch.float64) @ (torch.eye(n, dtype=torch.float64) + 0.3 * torch.randn(n, n, dtype=torch.float64))
    factors, errors = cospadi_dictionary(w, x.T @ x, k, s, CoSpaDiConfig(ratio=0.5, max_iters=60, tol=0.0))
    assert errors[0] > 0.3  # the ROCKET start is far from it
    assert float((factors.to_dense() - w).norm() / w.norm()) < 1e-4


def test_cospadi_improves_on_its_rocket_start():
    w, stats = _layer(96, 64)
    config = CoSpaDiConfig(ratio=0.4, ks=2.0, max_iters=5)
    k, s = dictionary_shape(96, 64, 0.4, 2.0, max_atoms=64)
    _, errors = cospadi_dictionary(w, stats["gram"], k, s, config)
    assert min(errors[1:]) < errors[0]
    module = COMPRESSORS["cospadi"]().compress(w, None, stats, config)
    _, weighted = relative_errors(w, module.to_dense(), stats["gram"])
    assert weighted == pytest.approx(min(errors), rel=1e-3)
    assert (module.num_atoms, module.nnz_per_row) == (k, s)


def test_dict_linear_forward_sizes_and_errors():
    torch.manual_seed(0)
    atoms, values = torch.randn(20, 32), torch.randn(48, 5)
    support = torch.stack([torch.randperm(20)[:5] for _ in range(48)])
    bias = torch.randn(48)
    module = DictLinear.from_factors(atoms, values, support, bias)
    dense = dense_coefficients(values, support, 20) @ atoms
    torch.testing.assert_close(module.to_dense(), dense)
    x = torch.randn(3, 7, 32)
    torch.testing.assert_close(module(x), x @ dense.T + bias, rtol=1e-5, atol=1e-5)
    assert module.index_bits == 5 and module.coef_index.shape == (48, 4)  # 20 atoms: 5 bits, 5 indices in 4 bytes
    assert module.num_values() == 20 * 32 + 48 * 5 + 48
    assert module.num_bytes() == 4 * (20 * 32 + 48 * 5 + 48) + 48 * 4  # values, then the packed indices
    with pytest.raises(RuntimeError, match="never tied"):
        DictLinear(32, 48, 20, 5, False, atoms_from="model.layers.0.x").dictionary()


def test_grouped_cospadi_shares_one_stored_dictionary(tokenizer, calib_text, tmp_path):
    recipe = {
        "calibration": {"num_samples": 2, "seq_len": 32, "statistics": "dense"},
        "stages": [{"method": "cospadi", "ratio": 0.3, "group_size": 2, "max_iters": 2, "targets": ["re:.*mlp\\.(gate|up)_proj"]}],
    }
    model, report = compress.compress_model(tiny_model("llama", layers=3), recipe, dataset=str(calib_text), tokenizer=tokenizer, progress=False)
    gate0, gate1, gate2 = (model.get_submodule(f"model.layers.{i}.mlp.gate_proj") for i in range(3))
    assert gate0.atoms_from is None and gate1.atoms_from == "model.layers.0.mlp.gate_proj"
    assert gate1.dictionary() is gate0.atoms and gate2.atoms_from is None  # blocks 0-1 share, block 2 alone
    assert "atoms" not in dict(gate1.named_parameters())
    summary = report["summary"]
    assert summary["nominal_ratio_removed"] == pytest.approx(0.3, abs=0.02)  # the shared atoms counted once
    out = compress.save_compressed(model, tmp_path / "ckpt", tokenizer=tokenizer, report=report)
    loaded = compress.load(out)
    ids = torch.randint(0, 300, (1, 12))
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert loaded.get_submodule("model.layers.1.mlp.gate_proj").dictionary() is loaded.get_submodule("model.layers.0.mlp.gate_proj").atoms


def test_grouped_stage_needs_dense_statistics(tokenizer, calib_text):
    recipe = {"calibration": {"num_samples": 2, "seq_len": 32}, "stages": [{"method": "cospadi", "ratio": 0.3, "group_size": 2}]}
    with pytest.raises(LlmpressError, match="statistics: dense"):
        compress.compress_model(tiny_model(), recipe, dataset=str(calib_text), tokenizer=tokenizer, progress=False)



@pytest.mark.parametrize("bits", [1, 3, 8, 10, 13, 16])
def test_index_packing_round_trips(bits):
    from compress.modules.dictionary import pack_bits, packed_row_bytes, unpack_bits

    index = torch.randint(0, 2**bits, (7, 11))
    packed = pack_bits(index, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (7, packed_row_bytes(11, bits))
    assert torch.equal(unpack_bits(packed, bits, 11), index)


def test_unpacked_dict_checkpoints_are_refused_clearly():
    spec = {"format": "dict", "in_features": 8, "out_features": 4, "bias": False, "num_atoms": 300, "nnz_per_row": 2}
    with pytest.raises(ValueError, match="compress the model again"):
        DictLinear.from_spec(spec, torch.float32)


def test_rocket_int8_coefficients_halve_their_bytes_at_nearly_the_same_error():
    from compress.metrics import serving_dtype

    w, stats = _layer(96, 64)
    compressor = COMPRESSORS["rocket"]()
    with serving_dtype("bfloat16"):
        floats = compressor.compress(w, None, stats, RocketConfig(ratio=0.3, ks=[2.0]))
        codes = compressor.compress(w, None, stats, RocketConfig(ratio=0.3, ks=[2.0], coefficient_bits=8))
        assert codes.coef_values.dtype == torch.int8 and codes.spec()["coefficient_bits"] == 8
        values = codes.coef_values.numel()
        # the same shape; each coefficient 1 byte instead of 2, plus one bf16 scale per row
        assert codes.num_bytes() == floats.num_bytes() - values + 2 * 96
        profile = compressor.profile(w, None, stats, RocketConfig(ratio=0.3, ks=[2.0], coefficient_bits=8), [0.3])[0]
        assert profile.bytes == codes.num_bytes()  # the knapsack prices what is stored
    _, err16 = relative_errors(w, floats.to_dense(), stats["gram"])
    _, err8 = relative_errors(w, codes.to_dense(), stats["gram"])
    assert err16 <= err8 < err16 * 1.05 + 1e-3  # rounding to int8, then the dictionary refit to the codes
    x = torch.randn(5, 64)
    torch.testing.assert_close(codes(x), x @ codes.to_dense().T, rtol=1e-5, atol=1e-5)
    rebuilt = DictLinear.from_spec(codes.spec(), torch.float32)
    rebuilt.load_state_dict(codes.state_dict())
    torch.testing.assert_close(rebuilt.to_dense(), codes.to_dense())


@pytest.mark.parametrize("coefficient_bits", [16, 8])
def test_rocket_w8_atoms_store_a_byte_per_atom_value_at_nearly_the_same_error(coefficient_bits):
    """atom_bits: 8 stores the atoms as W8 groups (Int8Linear's layout, a bf16 scale and a zero
    point per 64 columns): their bytes halve, the error in the calibration metric barely moves,
    the knapsack's profile prices what is stored, and the module serves and reloads what it was
    built from."""
    from compress.metrics import serving_dtype

    w, stats = _layer(96, 128)
    compressor = COMPRESSORS["rocket"]()
    config = dict(ratio=0.3, ks=[2.0], coefficient_bits=coefficient_bits)
    with serving_dtype("bfloat16"):
        floats = compressor.compress(w, None, stats, RocketConfig(**config))
        codes = compressor.compress(w, None, stats, RocketConfig(**config, atom_bits=8))
        assert codes.spec()["atom_bits"] == 8 and codes.atom_group == 64 and not hasattr(codes, "atoms")
        assert codes.atom_codes.dtype == torch.uint8 and codes.atom_codes.shape == (codes.num_atoms, 2, 64)
        atoms = codes.num_atoms * 128
        assert codes.num_atoms == floats.num_atoms  # the same shape: the values' budget is unchanged
        assert codes.num_bytes() == floats.num_bytes() - atoms + 2 * codes.num_atoms * 2 + codes.num_atoms * 2  # scale, zero
        profile = compressor.profile(w, None, stats, RocketConfig(**config, atom_bits=8), [0.3])[0]
        assert profile.bytes == codes.num_bytes() and profile.values == codes.num_values()
    _, err16 = relative_errors(w, floats.to_dense(), stats["gram"])
    _, err8 = relative_errors(w, codes.to_dense(), stats["gram"])
    assert err16 < err8 < err16 * 1.02 + 1e-3
    x = torch.randn(5, 128)
    torch.testing.assert_close(codes(x), x @ codes.to_dense().T, rtol=1e-5, atol=1e-5)
    rebuilt = DictLinear.from_spec(codes.spec(), torch.float32)
    rebuilt.load_state_dict(codes.state_dict())
    torch.testing.assert_close(rebuilt.to_dense(), codes.to_dense())
    with pytest.raises(ValueError, match="atom_bits must be 16"):
        DictLinear(8, 4, 4, 2, False, atom_bits=4)


@pytest.mark.parametrize("storage", [{"coefficient_bits": 8}, {"atom_bits": 8}])
def test_grouped_cospadi_in_8_bits_stores_the_atoms_once_and_keeps_its_error(storage):
    """int8 coefficients (every layer's bytes shrink) or W8 atoms (the owner's shrink, the others
    store none): the group's atoms stay in its first layer, read by the others."""
    (w1, s1), (w2, s2) = _layer(48, 64, seed=1), _layer(48, 64, seed=2)
    compressor = COMPRESSORS["cospadi"]()
    kwargs = dict(ratio=0.3, group_size=2, max_iters=2)
    floats = compressor.compress_group([w1, w2], [None, None], [s1, s2], CoSpaDiConfig(**kwargs), ["a", "b"])
    codes = compressor.compress_group([w1, w2], [None, None], [s1, s2], CoSpaDiConfig(**kwargs, **storage), ["a", "b"])
    assert codes[1].atoms_from == "a" and codes[1].atom_store() is codes[0] and codes[0].num_bytes() < floats[0].num_bytes()
    if "atom_bits" in storage:
        assert codes[0].atom_bits == codes[1].atom_bits == 8 and "atom_codes" not in codes[1]._buffers
        assert codes[1].num_bytes() == floats[1].num_bytes()
    else:
        assert [m.coefficient_bits for m in codes] == [8, 8] and codes[1].dictionary() is codes[0].atoms
        assert codes[1].num_bytes() < floats[1].num_bytes()
    for f, c, (w, st) in zip(floats, codes, [(w1, s1), (w2, s2)]):
        _, err16 = relative_errors(w, f.to_dense(), st["gram"])
        _, err8 = relative_errors(w, c.to_dense(), st["gram"])
        assert err8 < err16 * 1.05 + 1e-3
    with pytest.raises(ValueError, match="same shape and storage"):
        codes[1].tie(floats[0] if "atom_bits" in storage else _rocket_owner(w1, s1))


def _rocket_owner(w, stats) -> DictLinear:
    """A ROCKET layer of the same input width with another atom count: not a group's owner."""
    return COMPRESSORS["rocket"]().compress(w, None, stats, RocketConfig(ratio=0.6, ks=[1.0]))


@pytest.mark.parametrize("model_kind", ["llama"])
def test_dict_bits_benchmark_runs_and_8_bits_save_bytes(tiny_model_dir, calib_text, tmp_path):
    import json

    from compress.eval.bench_dict_bits import main

    main(["--model", str(tiny_model_dir), "--calib", str(calib_text), "--eval", str(calib_text), "--num-samples", "2",
          "--seq-len", "32", "--eval-seq-len", "32", "--max-windows", "2", "--out", str(tmp_path)])  # fmt: skip
    floats, codes, w8_atoms = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(r["coefficient_bits"], r["atom_bits"]) for r in (floats, codes, w8_atoms)] == [(16, 16), (8, 16), (8, 8)]
    assert w8_atoms["bytes_after"] < codes["bytes_after"] < floats["bytes_after"]
    assert "int8 + row scale | W8 g64" in (tmp_path / "results.md").read_text()

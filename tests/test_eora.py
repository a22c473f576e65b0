import pytest
import torch

import compress
from compress.compressors import COMPRESSORS, EoRAConfig, LayerStats, MagnitudeConfig
from compress.compressors.svd import truncated_svd
from compress.modules import EoRALinear, LowRankLinear, SparseLinear
from compress.metrics import relative_errors
from conftest import tiny_model


def _problem(seed=0, out=24, inp=32, n=300):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, inp, generator=g) @ (torch.randn(inp, inp, generator=g) * torch.logspace(0, -2, inp))
    return torch.randn(out, inp, generator=g), (X.T @ X).double()


@pytest.mark.parametrize("rank", [2, 4, 8])
def test_eora_beats_plain_svd_of_residual_at_equal_rank(rank):
    W, gram = _problem()
    base = COMPRESSORS["magnitude"]().compress(W, None, LayerStats(), MagnitudeConfig(pattern="2:4"))
    eora = COMPRESSORS["eora"]().compress(W, None, LayerStats({"gram": gram}), EoRAConfig(rank=rank), base=base)
    assert isinstance(eora, EoRALinear) and eora.rank == rank
    delta = W - base.to_dense()
    up, down = truncated_svd(delta, rank)
    _, plain = relative_errors(W, base.to_dense() + (up @ down).float(), gram)
    _, before = relative_errors(W, base.to_dense(), gram)
    _, after = relative_errors(W, eora.to_dense(), gram)
    assert after < plain < before
    x = torch.randn(5, 32)
    torch.testing.assert_close(eora(x), x @ eora.to_dense().T, rtol=1e-4, atol=1e-4)
    assert eora.num_values() == base.num_values() + rank * (24 + 32)
    assert eora.num_bytes() == base.num_bytes() + 4 * rank * (24 + 32)


def test_eora_needs_a_base():
    W, gram = _problem()
    with pytest.raises(ValueError, match="after a compression stage"):
        COMPRESSORS["eora"]().compress(W, None, LayerStats({"gram": gram}), EoRAConfig(rank=2))


def test_eora_stage_in_pipeline_and_round_trip(tokenizer, calib_text, tmp_path):
    recipe = {
        "calibration": {"num_samples": 4, "seq_len": 48, "weighted_errors": True},
        "stages": [
            {"method": "svd", "ratio": 0.6, "targets": ["re:.*self_attn.*"]},
            {"method": "magnitude", "ratio": 0.6, "targets": ["re:.*mlp.*"]},
            {"method": "eora", "rank": 4},
        ],
    }
    model, report = compress.compress_model(tiny_model("llama"), recipe, dataset=str(calib_text), tokenizer=tokenizer, progress=False)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, EoRALinear) and isinstance(q.base, LowRankLinear)
    assert isinstance(model.model.layers[1].mlp.up_proj.base, SparseLinear)
    by_stage = {}
    for r in report["layers"]:
        by_stage.setdefault(r["name"], {})[r["stage"]] = r
    for name, stages in by_stage.items():
        first = stages.get(0) or stages.get(1)
        assert stages[2]["rel_weighted_error"] < first["rel_weighted_error"], name
    assert report["summary"]["layers"] == 14  # each layer counted once
    ids = torch.randint(0, 300, (1, 16))
    out = compress.save_compressed(model, tmp_path / "ckpt")
    assert torch.equal(compress.load(out)(ids).logits, model(ids).logits)


def test_eora_rank_from_a_size_budget():
    W, gram = _problem()
    base = COMPRESSORS["magnitude"]().compress(W, None, LayerStats(), MagnitudeConfig(pattern="2:4"))
    config = EoRAConfig(budget=0.25)
    module = COMPRESSORS["eora"]().compress(W, None, LayerStats({"gram": gram}), config, base=base)
    assert module.rank == int(0.25 * 24 * 32 // (24 + 32)) == 3
    assert (module.num_values() - base.num_values()) <= 0.25 * 24 * 32
    for bad in ({}, {"rank": 2, "budget": 0.1}):
        with pytest.raises(ValueError, match="exactly one of 'rank'"):
            EoRAConfig(**bad)

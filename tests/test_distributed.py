"""torchrun: two CPU ranks (gloo) compress a tiny model to the checkpoint one rank writes.

The same CLI runs under `torch.distributed.run` with 1 and with 2 processes, one thread each.
Tolerance: the two runs feed the compressors the same sequences, but the 2-rank statistics are
the sum of two fp64 partial sums (and Fisher sums likewise), so they differ from the 1-rank ones
in the last bits (relative ~1e-15). The compressors work in fp32 and the differences do not grow
past fp32 rounding on this model: compressed tensors must agree to 1e-5 of their scale, integer
ones (masks, indices, codes) exactly.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file

from compress.distributed import Parallel
from compress.eval.bench_ranks import torchrun

RECIPES = {
    "gram (sparsegpt)": "stages:\n  - {method: sparsegpt, ratio: 0.5}\n",
    "fisher (fwsvd)": "stages:\n  - {method: fwsvd, ratio: 0.3}\n",
    "gradients (mfac)": "stages:\n  - {method: mfac, ratio: 0.5, block_size: 16}\n",
    # full-batch steps: two ranks' averaged gradients equal one rank's (each rank holds 3 of the 6 sequences)
    "block and end-to-end tuning (gqsa)": (
        "stages:\n  - {method: gqsa, ratio: 0.5, group_size: 16, optimize: [bqpo, e2e], bqpo_epochs: 2, bqpo_batch_size: 6,\n"
        "     e2e_epochs: 2, e2e_batch_size: 6}\n"
    ),
    "knapsack across methods": (
        "stages:\n  - {method: gqsa, group_size: 16}\n  - {method: whitened_svd}\n  - {method: magnitude}\n"
        "allocation: {strategy: knapsack, unit: bytes, cost: fisher, ratio: 0.6,\n"
        "             candidates: {0: [0.0, 0.5], 1: [0.2, 0.4, 0.6], 2: [0.5]}}\n"
    ),
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    directory = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama", layers=3).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("kind", list(RECIPES))
def test_two_ranks_write_the_checkpoint_one_rank_writes(kind, model_dir, calib_text, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("calibration: {num_samples: 6, seq_len: 32}\n" + RECIPES[kind])
    outputs = {}
    for ranks in (1, 2):
        out = tmp_path / f"ranks{ranks}"
        done = torchrun(ranks, timeout=600, args=[
            "compress", str(model_dir), "--recipe", str(recipe), "--dataset", str(calib_text), "--device", "cpu",
            "--output-dir", str(out), "--quiet",
        ])  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        outputs[ranks] = load_file(out / "model.safetensors")
        report = json.loads((out / "report.json").read_text())
        assert report["ranks"] == ranks and report["calibration"]["tokens"] == 6 * 32
        assert not (tmp_path / f".ranks{ranks}.progress").exists()  # every rank's progress removed
    one, two = outputs[1], outputs[2]
    assert set(one) == set(two)
    compressed = [n for n in one if n.rsplit(".", 1)[-1] not in ("weight", "bias")]
    assert compressed  # the recipe compressed something (values, bitmaps, factors): not only dense weights compared
    worst = 0.0
    for name, expected in one.items():
        got = two[name]
        assert got.shape == expected.shape and got.dtype == expected.dtype, name
        if expected.is_floating_point():
            scale = expected.abs().max().clamp_min(1e-12)
            worst = max(worst, float((got - expected).abs().max() / scale))
            assert (got - expected).abs().max() <= 1e-5 * scale, name
        else:
            assert torch.equal(got, expected), name
    print(f"{kind}: largest difference {worst:.2e} of a tensor's scale")


def test_work_split_is_balanced_and_the_same_on_every_rank():
    costs = {"q": 4.0, "k": 1.0, "v": 1.0, "o": 4.0, "up": 8.0, "down": 8.0}
    owners = Parallel(0, 2).assign(costs)
    assert owners == Parallel(1, 2).assign(costs)  # every rank derives the same split
    loads = [sum(c for n, c in costs.items() if owners[n] == r) for r in (0, 1)]
    assert loads == [13.0, 13.0]
    rows = torch.arange(7)
    shares = [Parallel(r, 3).share(rows) for r in range(3)]
    assert torch.equal(torch.cat(shares), rows) and [len(s) for s in shares] == [3, 2, 2]
    from compress.errors import LlmpressError

    with pytest.raises(LlmpressError, match="2 calibration sequences for 3 ranks"):
        Parallel(0, 3).share(rows[:2])

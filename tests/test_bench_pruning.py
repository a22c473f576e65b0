"""The pruning benchmark script runs end to end on a tiny model."""

import json

import pytest

from compress.eval.bench_pruning import main
from conftest import check_bench_perplexities


@pytest.mark.parametrize("model_kind", ["llama"])
def test_bench_pruning_tiny(tiny_model_dir, calib_text, tmp_path):
    out = tmp_path / "bench"
    main([
        "--model", str(tiny_model_dir), "--calib", str(calib_text), "--eval", str(calib_text), "--out", str(out),
        "--ratios", "0.5", "--patterns", "2:4", "--gqsa-ratios", "0.5", "--mfac-ratios", "0.5", "--mfac-patterns", "2:4", "--mfac-grads", "2", "--mfac-seq-len", "16",
        "--mfac-updates", "joint", "sum", "--mfac-walks", "1", "2", "--gqsa-tuned-ratios", "0.5", "--gqsa-tuning", "bqpo_epochs=1", "e2e_epochs=1",
        "--tile-ratios", "0.5", "--tile", "16", "32",
        "--num-samples", "2", "--seq-len", "32", "--eval-seq-len", "64", "--max-windows", "2",
    ])  # fmt: skip
    rows = {r["name"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    names = ("magnitude/uniform/0.5", "wanda/2:4", "sparsegpt/uniform/0.5", "gqsa-g16[blockwise+refit]/W4S50", "mfac[m=2,joint]/uniform/0.5", "mfac[m=2,sum]/2:4", "sparsegpt/tile16x32/0.5",
             "gqsa-g16[seq]/W4S50", "gqsa-g16[seq+bqpo]/W4S50", "gqsa-g16[seq+bqpo+e2e]/W4S50", "mfac[m=2,joint,walks=2]/uniform/0.5")
    check_bench_perplexities(rows, names, tiny_model_dir, calib_text, 64, 2)
    assert rows["sparsegpt/2:4"]["params_removed"] == pytest.approx(0.5, abs=0.01)
    assert rows["mfac[m=2,joint]/2:4"]["params_removed"] == pytest.approx(0.5, abs=0.01)
    assert rows["mfac[m=2,joint,walks=2]/uniform/0.5"]["params_removed"] == pytest.approx(0.5, abs=0.01)
    assert rows["mfac[m=2,sum]/2:4"]["walk_seconds_shared"] == rows["mfac[m=2,joint]/uniform/0.5"]["walk_seconds_shared"]  # one walk
    bqpo, e2e = rows["gqsa-g16[seq+bqpo]/W4S50"], rows["gqsa-g16[seq+bqpo+e2e]/W4S50"]
    assert bqpo["bqpo_block_error_after"] <= bqpo["bqpo_block_error_before"]
    assert e2e["e2e_loss_after"] <= e2e["e2e_loss_before"] and e2e["bytes_removed"] == bqpo["bytes_removed"]
    assert rows["gqsa-g16[blockwise+refit]/W4S50"]["bytes_removed"] > rows["sparsegpt/uniform/0.5"]["bytes_removed"]
    assert rows["sparsegpt/uniform/0.5"]["mean_weighted_error"] < rows["magnitude/uniform/0.5"]["mean_weighted_error"]
    tile = rows["sparsegpt/tile16x32/0.5"]
    assert tile["params_removed"] == pytest.approx(0.5, abs=0.01)
    assert tile["bytes_removed"] > rows["sparsegpt/uniform/0.5"]["bytes_removed"]  # 1 index byte per 16 values, not a bitmap

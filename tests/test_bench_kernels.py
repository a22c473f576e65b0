"""The kernel and decode benchmark scripts run end to end (on CPU: tiny shapes, PyTorch paths)."""

import json

import pytest
import torch

from compress.eval import bench_decode, bench_kernels


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU run is the real benchmark, minutes long")
def test_bench_kernels_runs_and_checks_every_format(tmp_path):
    bench_kernels.main(["--out", str(tmp_path), "--shapes", "128x256", "--tokens", "1", "3", "--sparsities", "0.5", "0.9", "--repeats", "3"])
    result = json.loads((tmp_path / "results.json").read_text())
    rows = result["rows"]
    cases = {r["case"] for r in rows}
    assert {"dense (cuBLAS)", "bitmap 50%", "tile 64x64 50%", "tile 64x128 90%", "W4 g128", "W4 g128 tensor cores", "GQSA W4S50 g16", "low-rank 30%"} <= cases
    assert all("error" not in r and r["rel_err"] < 1e-5 for r in rows)
    limits = {r["case"]: r["byte_limit"] for r in rows}
    assert limits["tile 64x64 50%"] > limits["bitmap 50%"] > 1.5  # the tile index costs less than a bitmap
    assert (tmp_path / "results.md").read_text().count("\n") == len(rows) + 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU run is the real benchmark, minutes long")
def test_bench_decode_runs_every_variant(tmp_path):
    bench_decode.main(["--out", str(tmp_path), "--batches", "1", "--prompt", "4", "--new-tokens", "3", "--layers", "1"])
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == list(bench_decode.VARIANTS)
    size = {r["variant"]: r["decoder_linear_gib"] for r in rows}
    assert size["W4 g128"] < size["tile 75%"] < size["tile 50%"] < size["dense"]
    assert all(r["tokens_per_s"] > 0 for r in rows)

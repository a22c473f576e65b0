"""The whole-model size benchmark end to end on a tiny model: `llmpress compress --max-size` and
`llmpress eval --ppl` in fresh processes, the row read back from the checkpoint's report, the
table and the plot written, and a rerun that skips the size already measured."""

import json

import pytest

from compress.eval import bench_sizes
from compress.model_loading import load_model
from compress.report import model_size
from compress.metrics import serving_dtype


@pytest.mark.slow
def test_bench_sizes_row_table_plot_and_resume(tmp_path, tiny_model_dir, calib_text, monkeypatch):
    with serving_dtype("bfloat16"):
        dense = model_size(load_model(str(tiny_model_dir), device="cpu"))["bytes"]
    size = str(int(dense * 0.6))
    out = tmp_path / "out"
    args = ["--model", str(tiny_model_dir), "--eval", str(calib_text), "--sizes", size, "--windows", "1", "--out", str(out),
            "--work", str(tmp_path / "work"), "--set", "calibration.num_samples=2", "--set", "calibration.seq_len=32",
            "--set", f"calibration.dataset={calib_text}"]  # fmt: skip
    bench_sizes.main(args)
    (row,) = json.loads((out / "results.json").read_text())["rows"]
    assert row["size"] == size and row["bytes"] <= int(size) and row["dense_bytes"] == dense
    assert row["perplexity"] > 1 and row["embeddings"].startswith("W") and sum(row["linears"].values()) > 0
    assert (out / "results.md").read_text().count("\n") == 3 and (out / "ppl_vs_size.png").exists()
    monkeypatch.setattr(bench_sizes, "run_size", lambda *a, **k: pytest.fail("a measured size was run again"))
    bench_sizes.main(args)

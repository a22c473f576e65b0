"""The budget benchmark end to end on a tiny model: every candidate profiled once, rows solved from
the shared profiles, the table and the plot written, and a rerun reusing the cache."""

import json

from compress.eval import bench_budget


def test_bench_budget_rows_table_plot_and_cache(tmp_path, tiny_model_dir, calib_text, monkeypatch):
    out, cache = tmp_path / "out", tmp_path / "cache.pt"
    args = ["--model", str(tiny_model_dir), "--calib", str(calib_text), "--eval", str(calib_text), "--out", str(out),
            "--num-samples", "2", "--seq-len", "32", "--eval-windows", "1", "--budgets", "0.5", "--cache", str(cache)]  # fmt: skip
    bench_budget.main(args)
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert "dense" in rows and (out / "results.md").exists() and (out / "ppl_vs_bytes.png").exists()
    measured = {n: r for n, r in rows.items() if "perplexity" in r and n != "dense"}
    assert any(n.startswith("auto v3") for n in measured)
    for r in measured.values():  # each plan meets its budget, in bytes as served
        assert r["target_bytes_removed"] >= r["budget"] - 1e-6
    # a rerun with a new candidate profiles only that one, priced by the cached Fisher energies
    monkeypatch.setitem(bench_budget.CANDIDATES, "w8-g32", ({"method": "gptq", "bits": 8, "group_size": 32}, [0.0]))
    monkeypatch.setitem(bench_budget.ROWS, "w8 g32 alone", ["w8-g32"])
    bench_budget.main(args)
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert "w8 g32 alone @ 50%" in rows

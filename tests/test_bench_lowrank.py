"""The low-rank benchmark script runs end to end on a tiny model and writes its table, JSON and plot."""

import json

import pytest

from compress.eval.bench_lowrank import main
from conftest import check_bench_perplexities


@pytest.mark.parametrize("model_kind", ["llama"])
def test_bench_lowrank_tiny(tiny_model_dir, calib_text, tmp_path, capsys):
    out = tmp_path / "bench"
    args = [
        "--model", str(tiny_model_dir), "--calib", str(calib_text), "--eval", str(calib_text), "--out", str(out),
        "--ratios", "0.3", "--costs", "weighted_sq", "plain", "--eora-ratios", "0.3", "--eora-ranks", "4",
        "--num-samples", "2", "--seq-len", "32", "--eval-seq-len", "64", "--max-windows", "2",
    ]  # fmt: skip
    main(args)
    rows = {r["name"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    expected = {"dense"} | {f"{m}/{a}/0.3" for m in ("svd", "fwsvd", "whitened_svd") for a in ("uniform", "knapsack")}
    expected |= {f"{m}/knapsack[plain]/0.3" for m in ("svd", "fwsvd", "whitened_svd")}
    expected |= {"whitened_svd/seq/0.3", "magnitude2:4/seq", "magnitude2:4+eora4/seq"}
    assert expected <= set(rows)
    check_bench_perplexities(rows, set(rows) - {"dense"}, tiny_model_dir, calib_text, 64, 2)
    for name, row in rows.items():
        if name.endswith("/0.3"):
            assert row["params_removed"] >= 0.3 - 0.02, name  # ranks round down: never much below the target
    knap = rows["whitened_svd/knapsack/0.3"]
    assert knap["knapsack_cost"] is not None and len(knap["levels"]) == 14
    eora = next(n for n in rows if "+eora4/seq/0.3" in n)
    assert rows[eora]["params_removed"] == pytest.approx(rows["whitened_svd/seq/0.3"]["params_removed"], abs=0.03)
    assert rows["whitened_svd/knapsack[plain]/0.3"]["cost"] == "plain"
    assert (out / "results.md").read_text().count("\n") == len(rows) + 2
    assert (out / "ppl_vs_ratio.png").stat().st_size > 1000
    assert "dense statistics and profiles" in capsys.readouterr().out
    main(args)  # a second run resumes: nothing is recomputed
    second = capsys.readouterr().out
    assert "dense statistics and profiles" not in second and " ppl " not in second


def test_bench_dictionary_rows_tiny(tiny_model_dir, calib_text, tmp_path):
    out = tmp_path / "bench"
    main([
        "--model", str(tiny_model_dir), "--calib", str(calib_text), "--eval", str(calib_text), "--out", str(out),
        "--methods", "rocket", "--ratios", "0.3", "--cospadi-ratios", "0.3", "--cospadi-groups", "1", "2",
        "--cospadi-iters", "1", "--skip-eora", "--num-samples", "2", "--seq-len", "32", "--eval-seq-len", "64",
        "--max-windows", "2",
    ])  # fmt: skip
    rows = {r["name"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    expected = {"rocket/uniform/0.3", "rocket/knapsack/0.3", "cospadi/uniform/0.3", "cospadi[g2]/uniform/0.3"}
    assert expected <= set(rows)
    for name in expected:
        assert 0.29 <= rows[name]["params_removed"] <= 0.33, name  # tiny layers round k, s down; shared atoms counted once
    check_bench_perplexities(rows, expected, tiny_model_dir, calib_text, 64, 2)

"""Pruning and GQSA benchmark: magnitude, Wanda, layer-wise OBS (SparseGPT-style) at several
unstructured sparsities and N:M patterns, and GQSA group-sparse INT4, all from one shared pass of
dense statistics; M-FAC (which needs per-sequence gradients) runs on the normal pipeline.

    python -m compress.eval.bench_pruning --model models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --calib ../shared/data/wikitext2/valid.txt --eval ../shared/data/wikitext2/test.txt \\
        --out runs/bench-pruning

Writes OUT/results.json, results.md and ppl_vs_ratio.png; rows already done are skipped.
"""

from __future__ import annotations

import argparse
import copy
import logging
import time

from compress.api import compress_model
from compress.compressors import COMPRESSORS

from .bench_lowrank import Bench, GridRow, write_outputs


def pruning_rows(methods: list[str], ratios: list[float], patterns: list[str]) -> list[GridRow]:
    rows = []
    for m in methods:
        config = COMPRESSORS[m].config_class
        rows += [GridRow(f"{m}/uniform/{r:g}", m, "uniform", r, config(method=m, ratio=r)) for r in ratios]
        for p in patterns:
            n, mm = map(int, p.split(":"))
            rows.append(GridRow(f"{m}/{p}", m, "uniform", 1 - n / mm, config(method=m, pattern=p)))
    return rows


def gqsa_rows(ratios: list[float], group_sizes: list[int]) -> list[GridRow]:
    config = COMPRESSORS["gqsa"].config_class
    return [
        GridRow(f"gqsa-g{g}/W4S{round(100 * r)}", "gqsa", "uniform", r, config(method="gqsa", ratio=r, group_size=g))
        for g in group_sizes
        for r in ratios
    ]


def mfac_rows(bench: Bench, ratios: list[float], num_grads: int) -> None:
    """M-FAC on the sequential pipeline (its gradients come from a backward walk)."""
    for ratio in ratios:
        name = f"mfac/uniform/{ratio:g}"
        if bench.done(name):
            continue
        recipe = {
            "calibration": {"num_samples": num_grads, "seq_len": bench.args.seq_len, "seed": bench.args.seed},
            "stages": [{"method": "mfac", "ratio": ratio}],
        }
        t0 = time.perf_counter()
        model, report = compress_model(copy.deepcopy(bench.dense), recipe, dataset=bench.args.calib, tokenizer=bench.tokenizer, progress=True)
        s = report["summary"]
        bench.record(
            {
                "name": name, "method": "mfac", "allocation": "uniform", "ratio": ratio, "statistics": "gradients",
                "params_removed": s["nominal_ratio_removed"], "bytes_removed": s["storage_ratio_removed"],
                "mean_weighted_error": None, "compress_seconds": round(time.perf_counter() - t0, 1),
                **bench.evaluate(model),
            }
        )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--calib", required=True, help="calibration text (disjoint from --eval)")
    parser.add_argument("--eval", required=True, help="evaluation text")
    parser.add_argument("--out", default="runs/bench-pruning")
    parser.add_argument("--methods", nargs="+", default=["magnitude", "wanda", "sparsegpt"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.5, 0.6, 0.7])
    parser.add_argument("--patterns", nargs="*", default=["2:4", "4:8"])
    parser.add_argument("--gqsa-ratios", nargs="*", type=float, default=[0.0, 0.5])
    parser.add_argument("--gqsa-group-sizes", nargs="*", type=int, default=[16])
    parser.add_argument("--mfac-ratios", nargs="*", type=float, default=[])
    parser.add_argument("--mfac-grads", type=int, default=64, help="per-sequence gradients for M-FAC")
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-windows", type=int, default=8)
    parser.add_argument("--eval-seq-len", type=int, default=2048)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    bench = Bench(args)
    bench.grid(pruning_rows(args.methods, args.ratios, args.patterns) + gqsa_rows(args.gqsa_ratios, args.gqsa_group_sizes))
    mfac_rows(bench, args.mfac_ratios, args.mfac_grads)
    print(write_outputs(bench.out, bench.rows, title="SmolLM2-135M, pruning and GQSA (dense statistics)"))
    print(f"wrote {bench.out / 'results.json'}, results.md, ppl_vs_ratio.png")


if __name__ == "__main__":
    main()

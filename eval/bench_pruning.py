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
import logging

from compress.compressors import COMPRESSORS

from .bench_lowrank import Bench, GridRow, add_common_args, write_outputs


def pruning_rows(methods: list[str], ratios: list[float], patterns: list[str]) -> list[GridRow]:
    rows = []
    for m in methods:
        config = COMPRESSORS[m].config_class
        rows += [GridRow(f"{m}/uniform/{r:g}", m, "uniform", r, config(method=m, ratio=r)) for r in ratios]
        for p in patterns:
            n, mm = map(int, p.split(":"))
            rows.append(GridRow(f"{m}/{p}", m, "uniform", 1 - n / mm, config(method=m, pattern=p)))
    return rows


def tile_rows(methods: list[str], ratios: list[float], tile: tuple[int, int]) -> list[GridRow]:
    """Tile-structured rows: every tile[0] output rows x tile[1] input columns keep one column set."""
    rows = []
    for m in methods:
        config = COMPRESSORS[m].config_class
        for r in ratios:
            stage = config(method=m, ratio=r, pattern="tile", tile_rows=tile[0], tile_cols=tile[1])
            rows.append(GridRow(f"{m}/tile{tile[0]}x{tile[1]}/{r:g}", m, "uniform", r, stage))
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
        stages = [{"method": "mfac", "ratio": ratio}]
        bench.sequential_row(f"mfac/uniform/{ratio:g}", ratio, stages, num_samples=num_grads, statistics="gradients")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, "runs/bench-pruning")
    parser.add_argument("--methods", nargs="+", default=["magnitude", "wanda", "sparsegpt"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.5, 0.6, 0.7])
    parser.add_argument("--patterns", nargs="*", default=["2:4", "4:8"])
    parser.add_argument("--tile-ratios", nargs="*", type=float, default=[0.5, 0.75], help="tile-structured sparsities")
    parser.add_argument("--tile-methods", nargs="*", default=["sparsegpt"])
    parser.add_argument("--tile", nargs=2, type=int, default=[64, 64], metavar=("ROWS", "COLS"))
    parser.add_argument("--gqsa-ratios", nargs="*", type=float, default=[0.0, 0.5])
    parser.add_argument("--gqsa-group-sizes", nargs="*", type=int, default=[16])
    parser.add_argument("--mfac-ratios", nargs="*", type=float, default=[])
    parser.add_argument("--mfac-grads", type=int, default=64, help="per-sequence gradients for M-FAC")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    bench = Bench(args)
    rows = pruning_rows(args.methods, args.ratios, args.patterns) + tile_rows(args.tile_methods, args.tile_ratios, tuple(args.tile))
    bench.grid(rows + gqsa_rows(args.gqsa_ratios, args.gqsa_group_sizes))
    mfac_rows(bench, args.mfac_ratios, args.mfac_grads)
    print(write_outputs(bench.out, bench.rows, title="SmolLM2-135M, pruning and GQSA (dense statistics)"))
    print(f"wrote {bench.out / 'results.json'}, results.md, ppl_vs_ratio.png")


if __name__ == "__main__":
    main()

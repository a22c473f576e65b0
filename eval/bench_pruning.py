"""Pruning and GQSA benchmark: magnitude, Wanda, layer-wise OBS (SparseGPT-style) at several
unstructured sparsities and N:M patterns, and GQSA group-sparse INT4, all from one shared pass of
dense statistics; M-FAC rows share one backward walk of the dense model for their per-sequence
gradients.

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

import torch

from compress.compressors import COMPRESSORS
from compress.data import calibration_windows
from compress.pipelines import SequentialPipeline, compress_from_gradients
from compress.report import summarize

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


GQSA_VARIANTS = {  # name -> (group selection, scale refit)
    "global": ("global", False),
    "global+refit": ("global", True),
    "blockwise": ("blockwise", False),
    "blockwise+refit": ("blockwise", True),
}


def gqsa_rows(ratios: list[float], group_sizes: list[int], variants: list[str]) -> list[GridRow]:
    """'gqsa-g16[blockwise+refit]/W4S50': group size, selection (+ scale refit), group sparsity."""
    config = COMPRESSORS["gqsa"].config_class
    rows = []
    for v in variants:
        selection, refit = GQSA_VARIANTS[v]
        for g in group_sizes:
            for r in ratios:
                stage = config(method="gqsa", ratio=r, group_size=g, selection=selection, refit_scales=refit)
                rows.append(GridRow(f"gqsa-g{g}[{v}]/W4S{round(100 * r)}", "gqsa", "uniform", r, stage))
    return rows


def mfac_rows(ratios: list[float], patterns: list[str]) -> list[GridRow]:
    config = COMPRESSORS["mfac"].config_class
    rows = [GridRow(f"mfac/uniform/{r:g}", "mfac", "uniform", r, config(method="mfac", ratio=r)) for r in ratios]
    for p in patterns:
        n, m = map(int, p.split(":"))
        rows.append(GridRow(f"mfac/{p}", "mfac", "uniform", 1 - n / m, config(method="mfac", pattern=p)))
    return rows


def mfac_grid(bench: Bench, rows: list[GridRow], num_grads: int, seq_len: int) -> None:
    """M-FAC rows from one backward walk of the dense model: per-sequence gradients are too many
    to keep for a whole model, so every row's copy is compressed block by block during the walk
    (`compress_from_gradients`); the walk's time is shared among the rows."""
    pending = [row for row in rows if not bench.done(row.name)]
    if not pending:
        return
    args = bench.args
    ids = calibration_windows(bench.tokenizer, args.calib, num_grads, seq_len, args.seed)
    pipelines = [SequentialPipeline(copy.deepcopy(bench.dense), [row.stage], progress=i == 0) for i, row in enumerate(pending)]
    start = time.perf_counter()
    with torch.no_grad():
        all_records = compress_from_gradients([(p, 0) for p in pipelines], ids)
    walk_seconds = time.perf_counter() - start
    layer_seconds = [sum(r.seconds for r in records) for records in all_records]
    shared = walk_seconds - sum(layer_seconds)
    print(f"M-FAC gradient walk ({num_grads} x {seq_len} tokens) and pruning: {walk_seconds:.0f} s", flush=True)
    for row, pipeline, records, own in zip(pending, pipelines, all_records, layer_seconds):
        # its pruning plus the whole walk
        extra = {"gradients": f"{num_grads} sequences x {seq_len} tokens", "walk_seconds_shared": round(shared, 1)}
        bench.record_row(row, summarize(records), own + shared, pipeline.model, **extra)


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
    parser.add_argument("--gqsa-variants", nargs="*", default=["blockwise+refit"], choices=list(GQSA_VARIANTS))
    parser.add_argument("--mfac-ratios", nargs="*", type=float, default=[])
    parser.add_argument("--mfac-patterns", nargs="*", default=[], help="N:M patterns for M-FAC")
    parser.add_argument("--mfac-grads", type=int, default=64, help="per-sequence gradients for M-FAC (m)")
    parser.add_argument("--mfac-seq-len", type=int, default=256, help="tokens per gradient sequence")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    bench = Bench(args)
    rows = pruning_rows(args.methods, args.ratios, args.patterns) + tile_rows(args.tile_methods, args.tile_ratios, tuple(args.tile))
    bench.grid(rows + gqsa_rows(args.gqsa_ratios, args.gqsa_group_sizes, args.gqsa_variants))
    mfac_grid(bench, mfac_rows(args.mfac_ratios, args.mfac_patterns), args.mfac_grads, args.mfac_seq_len)
    print(write_outputs(bench.out, bench.rows, title="SmolLM2-135M, pruning and GQSA (dense statistics)"))
    print(f"wrote {bench.out / 'results.json'}, results.md, ppl_vs_ratio.png")


if __name__ == "__main__":
    main()

"""Pruning and GQSA benchmark: magnitude, Wanda, layer-wise OBS (SparseGPT-style) at several
unstructured sparsities and N:M patterns, and GQSA group-sparse INT4, all from one shared pass of
dense statistics; M-FAC rows share one backward walk of the dense model for their per-sequence
gradients.

    python -m compress.eval.bench_pruning --model models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --calib ../shared/data/wikitext2/valid.txt --eval ../shared/data/wikitext2/test.txt \\
        --out runs/bench-pruning

GQSA rows with trained quantization parameters (`--gqsa-tuned-ratios`) run the sequential
pipeline (BQPO needs the compressed model's own block inputs): '[seq]' without training,
'[seq+bqpo]' with block-wise training, '[seq+bqpo+e2e]' the same model after end-to-end
training (one compression, evaluated before and after E2E).

Writes OUT/results.json, results.md and ppl_vs_ratio.png; rows already done are skipped.
"""

from __future__ import annotations

import argparse
import copy
import logging
import time

import torch
import yaml

from compress.api import compress_model
from compress.compressors import COMPRESSORS
from compress.data import calibration_windows
from compress.modules import GQSALinear
from compress.pipelines import SequentialPipeline, compress_from_gradients
from compress.quant_tuning import tune_end_to_end, tuning_settings
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


def gqsa_tuned(bench: Bench, ratios: list[float], group_size: int, stage_keys: dict) -> None:
    """Per group sparsity: the sequential baseline, BQPO, then E2E on the BQPO model."""
    args = bench.args
    calibration = {"num_samples": args.num_samples, "seq_len": args.seq_len, "seed": args.seed, "weighted_errors": True}
    for ratio in ratios:
        base = f"gqsa-g{group_size}[%s]/W4S{round(100 * ratio)}"
        stage = {"method": "gqsa", "ratio": ratio, "group_size": group_size}
        bench.sequential_row(base % "seq", ratio, [stage])
        if bench.done(base % "seq+bqpo") and bench.done(base % "seq+bqpo+e2e"):
            continue
        tuned = {**stage, "optimize": ["bqpo", "e2e"], **stage_keys}
        recipe = {"calibration": calibration, "stages": [{**tuned, "optimize": ["bqpo"]}]}
        t0 = time.perf_counter()
        model, report = compress_model(copy.deepcopy(bench.dense), recipe, dataset=args.calib, tokenizer=bench.tokenizer, progress=False)
        seconds = time.perf_counter() - t0
        blocks = [b["bqpo"] for b in report["blocks"]]
        s = report["summary"]
        row = {
            "method": "gqsa", "allocation": "uniform", "ratio": ratio, "statistics": "sequential",
            "params_removed": s["nominal_ratio_removed"], "bytes_removed": s["storage_ratio_removed"],
            "mean_weighted_error": s["mean_rel_weighted_error"],
            "bqpo_block_error_before": round(sum(b["loss_before"] for b in blocks) / len(blocks), 5),
            "bqpo_block_error_after": round(sum(b["loss_after"] for b in blocks) / len(blocks), 5),
            "bqpo_blocks_kept": sum(b["kept"] for b in blocks), "bqpo_seconds": round(sum(b["seconds"] for b in blocks), 1),
        }  # fmt: skip
        bench.record({"name": base % "seq+bqpo", **row, "compress_seconds": round(seconds, 1), **bench.evaluate(model)})
        settings = tuning_settings([COMPRESSORS["gqsa"].config_class(**tuned)], "e2e", args.seed)
        layers = {n: m for n, m in model.named_modules() if isinstance(m, GQSALinear)}
        t0 = time.perf_counter()
        e2e = tune_end_to_end(model, layers, bench.calib_ids, settings, "cpu", progress=True)
        e2e_seconds = time.perf_counter() - t0
        extra = {"e2e_loss_before": round(e2e["loss_before"], 4), "e2e_loss_after": round(e2e["loss_after"], 4), "e2e_seconds": round(e2e_seconds, 1)}
        bench.record({"name": base % "seq+bqpo+e2e", **row, **extra, "compress_seconds": round(seconds + e2e_seconds, 1), **bench.evaluate(model)})


def mfac_rows(ratios: list[float], patterns: list[str], grads: int, updates: list[str]) -> list[GridRow]:
    """'mfac[m=256,joint]/uniform/0.5': gradients, OBS update, sparsity (rows named 'mfac/...'
    were measured before these options, with m = 64 and the summed update)."""
    config = COMPRESSORS["mfac"].config_class
    rows = []
    for update in updates:
        tag = f"mfac[m={grads},{update}]"
        rows += [GridRow(f"{tag}/uniform/{r:g}", "mfac", "uniform", r, config(method="mfac", ratio=r, update=update)) for r in ratios]
        for p in patterns:
            n, m = map(int, p.split(":"))
            rows.append(GridRow(f"{tag}/{p}", "mfac", "uniform", 1 - n / m, config(method="mfac", pattern=p, update=update)))
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


def mfac_walk_rows(bench: Bench, ratios: list[float], grads: int, seq_len: int, updates: list[str], walks: list[int]) -> None:
    """'mfac[m=64,joint,walks=2]/uniform/0.5': gradients recomputed on the partly pruned model
    between walks (each row its own walks; the runner prunes to ratio·w/W after walk w)."""
    for w in (w for w in walks if w > 1):
        for update in updates:
            for ratio in ratios:
                name = f"mfac[m={grads},{update},walks={w}]/uniform/{ratio:g}"
                if bench.done(name):
                    continue
                stage = {"method": "mfac", "ratio": ratio, "update": update, "walks": w}
                recipe = {"calibration": {"num_samples": grads, "seq_len": seq_len, "seed": bench.args.seed}, "stages": [stage]}
                t0 = time.perf_counter()
                model, report = compress_model(copy.deepcopy(bench.dense), recipe, dataset=bench.args.calib, tokenizer=bench.tokenizer, progress=False)
                seconds = time.perf_counter() - t0
                s = report["summary"]
                row = {"method": "mfac", "allocation": "uniform", "ratio": ratio, "walks": w,
                       "gradients": f"{grads} sequences x {seq_len} tokens", "params_removed": s["nominal_ratio_removed"],
                       "bytes_removed": s["storage_ratio_removed"], "mean_weighted_error": s["mean_rel_weighted_error"]}  # fmt: skip
                bench.record({"name": name, **row, "compress_seconds": round(seconds, 1), **bench.evaluate(model)})


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
    parser.add_argument("--gqsa-tuned-ratios", nargs="*", type=float, default=[], help="group sparsities with BQPO/E2E rows")
    parser.add_argument("--gqsa-tuning", nargs="*", default=[], metavar="KEY=VALUE", help="gqsa keys for the tuned rows, e.g. bqpo_epochs=2")
    parser.add_argument("--mfac-ratios", nargs="*", type=float, default=[])
    parser.add_argument("--mfac-patterns", nargs="*", default=[], help="N:M patterns for M-FAC")
    parser.add_argument("--mfac-grads", type=int, default=64, help="per-sequence gradients for M-FAC (m)")
    parser.add_argument("--mfac-seq-len", type=int, default=256, help="tokens per gradient sequence")
    parser.add_argument("--mfac-updates", nargs="+", default=["joint"], choices=["joint", "sum"], help="OBS updates to compare")
    parser.add_argument("--mfac-walks", nargs="+", type=int, default=[1], help="backward walks (> 1: gradients recomputed)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    bench = Bench(args)
    rows = pruning_rows(args.methods, args.ratios, args.patterns) + tile_rows(args.tile_methods, args.tile_ratios, tuple(args.tile))
    bench.grid(rows + gqsa_rows(args.gqsa_ratios, args.gqsa_group_sizes, args.gqsa_variants))
    keys = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.gqsa_tuning)}
    gqsa_tuned(bench, args.gqsa_tuned_ratios, args.gqsa_group_sizes[0], keys)
    if 1 in args.mfac_walks:
        mfac_grid(bench, mfac_rows(args.mfac_ratios, args.mfac_patterns, args.mfac_grads, args.mfac_updates), args.mfac_grads, args.mfac_seq_len)
    mfac_walk_rows(bench, args.mfac_ratios, args.mfac_grads, args.mfac_seq_len, args.mfac_updates, args.mfac_walks)
    print(write_outputs(bench.out, bench.rows, title="SmolLM2-135M, pruning and GQSA (dense statistics)"))
    print(f"wrote {bench.out / 'results.json'}, results.md, ppl_vs_ratio.png")


if __name__ == "__main__":
    main()

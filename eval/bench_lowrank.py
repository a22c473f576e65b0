"""Low-rank benchmark: perplexity against compression ratio for SVD, FWSVD, whitened SVD and the
sparse-dictionary methods (ROCKET, CoSpaDi per layer and per group), uniform vs knapsack
allocation, plus EoRA compensation rows. Prints a table, writes JSON,
markdown and a plot.

    python -m compress.eval.bench_lowrank --model models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --calib ../shared/data/wikitext2/valid.txt --eval ../shared/data/wikitext2/test.txt \\
        --out runs/bench-lowrank

The grid (method x allocation x ratio) takes every statistic from the dense model
(`calibration.statistics: dense`): one calibration pass (Grams, plus the Fisher backward pass for
FWSVD) and one profile per method serve all rows, so each row costs only its SVDs and the
evaluation. EoRA rows run the normal sequential pipeline (EoRA's statistics come from the
compressed model's own inputs) against a sequential whitened-SVD baseline of equal size.
Rows already in OUT/results.json are skipped, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

from dataclasses import dataclass

import torch

from compress.api import compress_model
from compress.budget import COSTS, AllocationConfig, profile_block
from compress.compressors import COMPRESSORS, StageConfig, rank_for_ratio
from compress.data import calibration_windows
from compress.model_loading import load_model, load_tokenizer
from compress.pipelines import DenseStatsPipeline
from compress.recipe import CalibrationConfig, Recipe
from compress.report import summarize
from compress.runner import CompressionRunner
from compress.targets import match_linears

from .perplexity import perplexity

LEVELS = [round(0.05 * i, 2) for i in range(20)]


def _row_key(row: dict[str, Any]) -> str:
    return row["name"]


@dataclass
class GridRow:
    """One compressed model of the grid: a stage config applied uniformly or by the knapsack."""

    name: str
    method: str
    allocation: str  # "uniform" or "knapsack"
    ratio: float | None
    stage: StageConfig
    cost: str = "weighted_sq"  # knapsack cost (compress/budget.py COSTS)


def cospadi_rows(ratios: list[float], groups: list[int], max_iters: int, ks: float = 2.0) -> list[GridRow]:
    """CoSpaDi rows (uniform only: its per-level profile would rerun dictionary learning per level):
    'cospadi/uniform/0.3' per layer, 'cospadi[g4]/uniform/0.3' with 4 blocks sharing each dictionary."""
    config = COMPRESSORS["cospadi"].config_class
    rows = []
    for g in groups:
        method = "cospadi" if g == 1 else f"cospadi[g{g}]"
        for r in ratios:
            stage = config(method="cospadi", ratio=r, ks=ks, group_size=g, max_iters=max_iters)
            rows.append(GridRow(f"{method}/uniform/{r:g}", "cospadi", "uniform", r, stage))
    return rows


def lowrank_rows(methods: list[str], allocations: list[str], ratios: list[float], costs: list[str]) -> list[GridRow]:
    """Uniform rows, and knapsack rows per cost (the first cost unnamed: 'svd/knapsack/0.3',
    others named: 'svd/knapsack[plain]/0.3')."""
    rows = []
    for m in methods:
        for a in allocations:
            for i, cost in enumerate(costs if a == "knapsack" else costs[:1]):
                label = a if i == 0 else f"{a}[{cost}]"
                config = COMPRESSORS[m].config_class
                rows += [GridRow(f"{m}/{label}/{r:g}", m, a, r, config(method=m, ratio=r), cost) for r in ratios]
    return rows


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.results_path = self.out / "results.json"
        self.rows: list[dict[str, Any]] = json.loads(self.results_path.read_text())["rows"] if self.results_path.exists() else []
        self.tokenizer = load_tokenizer(args.model)
        self.dense = load_model(args.model, dtype="float32")
        self.calib_ids = calibration_windows(self.tokenizer, args.calib, args.num_samples, args.seq_len, args.seed)

    def done(self, name: str) -> bool:
        return any(_row_key(r) == name for r in self.rows)

    def record(self, row: dict[str, Any]) -> None:
        self.rows = [r for r in self.rows if _row_key(r) != row["name"]] + [row]
        meta = {k: v for k, v in vars(self.args).items()}
        self.results_path.write_text(json.dumps({"config": meta, "rows": self.rows}, indent=2))
        print(f"{row['name']:<40} ppl {row['perplexity']:>14.2f}  removed {100 * row['params_removed']:.2f}%", flush=True)

    def evaluate(self, model) -> dict[str, Any]:
        result = perplexity(model, self.tokenizer, self.args.eval, seq_len=self.args.eval_seq_len, max_windows=self.args.max_windows, progress=False)
        return {"perplexity": result.perplexity, "eval_tokens": result.tokens, "eval_seconds": round(result.seconds, 1)}

    # ---- the grid: dense statistics, reused -------------------------------------------------
    def grid(self, rows: list[GridRow], levels: list[float] = LEVELS) -> None:
        """Compress and evaluate each row from one shared pass of dense statistics; knapsack rows
        are solved on per-method profiles measured in the same pass."""
        if not self.done("dense"):
            self.record({"name": "dense", "method": "dense", "allocation": "-", "ratio": 0.0, "params_removed": 0.0, **self.evaluate(self.dense)})
        pending = [row for row in rows if not self.done(row.name)]
        if not pending:
            return
        stages = {row.method: row.stage for row in pending}  # one config per method to collect for
        profiled = sorted({row.method for row in pending if row.allocation == "knapsack"})
        methods = list(stages)
        start = time.perf_counter()
        stats: dict[str, Any] = {}
        fisher_for = {methods.index(r.method) for r in pending if r.allocation == "knapsack" and r.cost == "fisher"}
        collector = DenseStatsPipeline(self.dense, [stages[m] for m in methods], progress=True, fisher_for=fisher_for)
        profiles: dict[str, dict[str, Any]] = {m: {} for m in profiled}

        def on_block(index, block_stats):
            stats.update(block_stats)
            for m in profiled:
                profiles[m].update(profile_block(collector, methods.index(m), index, block_stats, levels))

        collector.collect(self.calib_ids, on_block)
        stats_seconds = time.perf_counter() - start
        print(f"dense statistics and profiles: {stats_seconds:.0f} s", flush=True)
        calibration = CalibrationConfig(statistics="dense", weighted_errors=True)
        for row in pending:
            model = copy.deepcopy(self.dense)
            t0 = time.perf_counter()
            allocation = None
            if row.allocation == "knapsack":
                allocation = AllocationConfig(ratio=row.ratio, levels=levels, cost=row.cost)
            recipe = Recipe(name=row.name, calibration=calibration, stages=[row.stage], allocation=allocation)
            result = CompressionRunner(model, recipe, progress=False).run(None, stats=stats, profiles=profiles.get(row.method))
            plan = result.plan
            seconds = time.perf_counter() - t0 + stats_seconds / len(pending)
            extra = {
                "knapsack_cost": plan.total_cost if plan else None,
                "cost": row.cost if plan else None,
                "levels": [c.level for c in plan.layers] if plan else None,
            }
            self.record_row(row, summarize(result.records, result.left_dense()), seconds, model, **extra)
            del model

    def record_row(self, row: GridRow, summary: dict[str, Any], seconds: float, model, **extra: Any) -> None:
        """Record a grid row compressed from dense statistics: sizes, error, time, perplexity."""
        self.record(
            {
                "name": row.name,
                "method": row.method,
                "allocation": row.allocation,
                "ratio": row.ratio,
                "statistics": "dense",
                "params_removed": summary["nominal_ratio_removed"],
                "bytes_removed": summary["storage_ratio_removed"],
                "mean_weighted_error": summary["mean_rel_weighted_error"],
                **extra,
                "compress_seconds": round(seconds, 1),
                **self.evaluate(model),
            }
        )

    # ---- EoRA: sequential pipeline ------------------------------------------------------------
    def eora(self) -> None:
        args = self.args
        runs: list[tuple[str, float | None, list[dict]]] = []
        for ratio in args.eora_ratios:
            runs.append((f"whitened_svd/seq/{ratio:g}", ratio, [{"method": "whitened_svd", "ratio": ratio}]))
            for rank in args.eora_ranks:
                deeper = _deeper_ratio(self.dense, ratio, rank)
                stages = [{"method": "whitened_svd", "ratio": deeper}, {"method": "eora", "rank": rank}]
                runs.append((f"whitened_svd@{deeper:.3f}+eora{rank}/seq/{ratio:g}", ratio, stages))
        prune = {"method": "magnitude", "pattern": "2:4"}
        runs.append(("magnitude2:4/seq", None, [prune]))
        for rank in args.eora_ranks:
            runs.append((f"magnitude2:4+eora{rank}/seq", None, [prune, {"method": "eora", "rank": rank}]))
        for name, ratio, stages in runs:
            self.sequential_row(name, ratio, stages)

    def sequential_row(
        self, name: str, ratio: float | None, stages: list[dict], num_samples: int | None = None, statistics: str = "sequential"
    ) -> None:
        """Compress a copy of the dense model with the normal pipeline (compress_model) and record it."""
        if self.done(name):
            return
        args = self.args
        calibration = {"num_samples": num_samples or args.num_samples, "seq_len": args.seq_len, "seed": args.seed, "weighted_errors": True}
        t0 = time.perf_counter()
        model, report = compress_model(
            copy.deepcopy(self.dense), {"calibration": calibration, "stages": stages}, dataset=args.calib,
            tokenizer=self.tokenizer, progress=False,
        )  # fmt: skip
        s = report["summary"]
        self.record(
            {
                "name": name,
                "method": "+".join(st["method"] for st in stages),
                "allocation": "uniform",
                "ratio": ratio,
                "statistics": statistics,
                "params_removed": s["nominal_ratio_removed"],
                "bytes_removed": s["storage_ratio_removed"],
                "mean_weighted_error": s["mean_rel_weighted_error"],
                "compress_seconds": round(time.perf_counter() - t0, 1),
                **self.evaluate(model),
            }
        )


def _deeper_ratio(model, ratio: float, rank: int) -> float:
    """Whitened-SVD ratio that, with an EoRA residual of `rank` on every layer, totals `ratio` removed."""
    shapes = [(m.out_features, m.in_features) for m in match_linears(model, ["Linear"], ["lm_head"]).values()]
    dense = sum(o * i for o, i in shapes)

    def size(r: float) -> int:
        return sum((rank_for_ratio(o, i, r) + rank) * (o + i) for o, i in shapes)

    lo, hi = ratio, 0.99
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if size(mid) > (1 - ratio) * dense else (lo, mid)
    return hi


def write_outputs(out: Path, rows: list[dict[str, Any]], title: str = "SmolLM2-135M, low-rank methods (dense statistics)") -> str:
    """Markdown table (also returned) and a perplexity-vs-ratio plot."""
    lines = [
        "| run | statistics | params removed | bytes removed | perplexity | mean weighted err | compress s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r.get("statistics", ""), r["method"], r["allocation"], r["ratio"] or 0)):
        err = r.get("mean_weighted_error")
        lines.append(
            f"| {r['name']} | {r.get('statistics', '-')} | {100 * r['params_removed']:.2f}% | "
            f"{100 * r.get('bytes_removed', r['params_removed']):.2f}% | {r['perplexity']:.2f} | "
            f"{'' if err is None else f'{err:.4f}'} | {r.get('compress_seconds', '')} |"
        )
    table = "\n".join(lines) + "\n"
    (out / "results.md").write_text(table)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return table
    # Two x axes: parameters removed (what a recipe's ratio sets) and true bytes removed (what a
    # user pays for: dictionary coefficients carry indices, so the two can differ by 20+ points).
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    series: dict[str, list[tuple[float, float, float]]] = {}
    for r in rows:
        if r.get("statistics") == "dense" and r["method"] != "dense":
            name = r["name"].split("/")
            point = (r["params_removed"], r.get("bytes_removed", r["params_removed"]), r["perplexity"])
            series.setdefault(f"{name[0]} ({name[1]})", []).append(point)
    dense = [r for r in rows if r["method"] == "dense"]
    for ax, axis, xlabel in zip(axes, (0, 1), ("target parameters removed (%)", "true bytes removed (%, indices counted)")):
        for i, (label, points) in enumerate(sorted(series.items())):
            points.sort(key=lambda p: p[axis])
            cycle = i // 10 % 3  # the colour cycle has 10 entries: later series change marker and line
            style = {"marker": "os^"[cycle], "linestyle": ("-", "--", ":")[cycle]}
            ax.plot([100 * p[axis] for p in points], [p[2] for p in points], label=label, **style)
        if dense:
            ax.axhline(dense[0]["perplexity"], color="gray", linestyle="--", label="dense")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
    axes[0].set_ylabel("WikiText-2 perplexity (log)")
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out / "ppl_vs_ratio.png", dpi=120, bbox_inches="tight")
    return table


def add_common_args(parser: argparse.ArgumentParser, out: str) -> None:
    """Model, data, calibration and evaluation options every benchmark script takes."""
    parser.add_argument("--model", required=True)
    parser.add_argument("--calib", required=True, help="calibration text (disjoint from --eval)")
    parser.add_argument("--eval", required=True, help="evaluation text")
    parser.add_argument("--out", default=out)
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-windows", type=int, default=8)
    parser.add_argument("--eval-seq-len", type=int, default=2048)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, "runs/bench-lowrank")
    parser.add_argument("--methods", nargs="+", default=["svd", "fwsvd", "whitened_svd"])
    parser.add_argument("--allocations", nargs="+", default=["uniform", "knapsack"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.3, 0.4])
    parser.add_argument("--costs", nargs="+", default=["weighted_sq"], choices=list(COSTS), help="knapsack costs to compare")
    parser.add_argument("--cospadi-ratios", nargs="*", type=float, default=[], help="CoSpaDi rows (uniform)")
    parser.add_argument("--cospadi-groups", nargs="+", type=int, default=[1], help="group sizes (1 = per layer)")
    parser.add_argument("--cospadi-iters", type=int, default=3)
    parser.add_argument("--eora-ratios", nargs="*", type=float, default=[0.3])
    parser.add_argument("--eora-ranks", nargs="*", type=int, default=[32, 64])
    parser.add_argument("--skip-grid", action="store_true")
    parser.add_argument("--skip-eora", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    bench = Bench(args)
    if not args.skip_grid:
        rows = lowrank_rows(args.methods, args.allocations, args.ratios, args.costs)
        bench.grid(rows + cospadi_rows(args.cospadi_ratios, args.cospadi_groups, args.cospadi_iters))
    if not args.skip_eora:
        bench.eora()
    print(write_outputs(bench.out, bench.rows))
    print(f"wrote {bench.out / 'results.json'}, results.md, ppl_vs_ratio.png")


if __name__ == "__main__":
    main()

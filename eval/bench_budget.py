"""The best model for a size: perplexity against bytes removed (as served in bf16) for each
method alone and for one knapsack across methods.

    python -m compress.eval.bench_budget --model models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --calib ../shared/data/wikitext2/valid.txt --eval ../shared/data/wikitext2/test.txt \\
        --out eval/results/budget

One calibration pass on the dense model collects every statistic (Grams, Fisher sums) and every
candidate's profile (size as served, error, Fisher cost at each level). Each row then solves the
knapsack over a subset of the candidates at one budget (a fraction of the decoder Linears' bf16
bytes removed) and compresses a fresh copy of the model from those dense statistics: a single
method at its best levels per layer ("gqsa" = W4 at g16/g32 with 0–75% of groups removed; "gptq" =
W8 or W4 at g64 per layer), or every candidate at once. Rows already in OUT/results.json are skipped (an interrupted run resumes).
Prints a table; writes results.json, results.md and ppl_vs_bytes.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from compress.budget import profile_layers
from compress.data import calibration_windows
from compress.metrics import serving_dtype
from compress.model_loading import load_model, load_tokenizer
from compress.pipelines import DenseStatsPipeline
from compress.recipe import load_recipe
from compress.report import model_size
from compress.runner import CompressionRunner

from .perplexity import perplexity

# every candidate (stage config, levels) profiled once; rows pick subsets
CANDIDATES: dict[str, tuple[dict[str, Any], list[float]]] = {
    "w4-g16": ({"method": "gqsa", "group_size": 16}, [0.0]),
    "gqsa-g32": ({"method": "gqsa", "group_size": 32}, [0.0, 0.25, 0.5, 0.75]),
    "whitened_svd": ({"method": "whitened_svd"}, [round(0.1 * i, 1) for i in range(1, 10)]),
    "sparsegpt": ({"method": "sparsegpt"}, [0.3, 0.5, 0.7]),
    "w8-g64": ({"method": "gptq", "bits": 8, "group_size": 64}, [0.0]),
    "w4-g64": ({"method": "gptq", "bits": 4, "group_size": 64}, [0.0]),
    "w3-g64": ({"method": "gptq", "bits": 3, "group_size": 64}, [0.0]),
    "w2-g64": ({"method": "gptq", "bits": 2, "group_size": 64}, [0.0]),
    # stacked: GPTQ plus an EoRA residual of a fixed rank, one option each
    "w3-g64-r8": ({"method": "gptq", "bits": 3, "group_size": 64, "residual_rank": 8}, [0.0]),
    "w2-g64-r8": ({"method": "gptq", "bits": 2, "group_size": 64, "residual_rank": 8}, [0.0]),
    "w2-g64-r16": ({"method": "gptq", "bits": 2, "group_size": 64, "residual_rank": 16}, [0.0]),
}
# rows may use part of a candidate's profiled levels: key -> (profiled candidate, levels)
DERIVED: dict[str, tuple[str, list[float]]] = {
    "w4-g32": ("gqsa-g32", [0.0]),
    "gqsa-g32-sparse": ("gqsa-g32", [0.25, 0.5, 0.75]),
}
# the cross-method knapsack as first measured, before the GPTQ candidates existed (its rows stay
# in results.json under this label; rerunning them needs the candidates of that time)
BEFORE_GPTQ = ["w4-g16", "gqsa-g32", "whitened_svd", "sparsegpt"]
ROWS = {
    "gqsa (W4, W4 + group sparsity)": ["w4-g16", "gqsa-g32"],
    "whitened_svd": ["whitened_svd"],
    "sparsegpt": ["sparsegpt"],
    "gptq (W8 g64, W4 g64)": ["w8-g64", "w4-g64"],
    "knapsack across methods": BEFORE_GPTQ,
    "knapsack across methods + gptq": BEFORE_GPTQ + ["w8-g64", "w4-g64"],
    "auto v1 (W8 g64, W4 g16/g32; from 60%: sparse g32, SVD)": ["w8-g64", "w4-g16", "w4-g32", "gqsa-g32-sparse", "whitened_svd"],
    "auto v2 (W8 g64, W4 g64; from 60%: sparse g32, SVD)": ["w8-g64", "w4-g64", "gqsa-g32-sparse", "whitened_svd"],
    "auto v3 (v2; from 70%: W3 g64, W2 g64)": ["w8-g64", "w4-g64", "gqsa-g32-sparse", "whitened_svd", "w3-g64", "w2-g64"],
    "gptq (W8, W4, W3, W2 g64)": ["w8-g64", "w4-g64", "w3-g64", "w2-g64"],
    "auto v4 (v3; from 70%: W3/W2 g64 + EoRA r8/r16)": [
        "w8-g64", "w4-g64", "gqsa-g32-sparse", "whitened_svd", "w3-g64", "w2-g64", "w3-g64-r8", "w2-g64-r8", "w2-g64-r16",
    ],
}
# a row's candidates profiled only from a budget on (the recipes' allocation.from_ratio)
FROM_RATIO = {"gqsa-g32-sparse": 0.6, "whitened_svd": 0.6, "w3-g64": 0.7, "w2-g64": 0.7, "w3-g64-r8": 0.7, "w2-g64-r8": 0.7, "w2-g64-r16": 0.7}
FLOORED_ROWS = {label for label in ROWS if label.startswith("auto")}
BUDGETS = [0.3, 0.5, 0.7, 0.8]


def candidate(key: str) -> tuple[dict[str, Any], list[float]]:
    """A key's stage config and levels (a derived key: its candidate's config, part of its levels)."""
    if key in DERIVED:
        base, levels = DERIVED[key]
        return CANDIDATES[base][0], levels
    return CANDIDATES[key]


def recipe_for(keys: list[str], budget: float, calib: dict[str, Any]) -> dict[str, Any]:
    stages = [dict(candidate(k)[0]) for k in keys]
    candidates = {i: candidate(k)[1] for i, k in enumerate(keys)}
    return {
        "name": "budget",
        "serve_dtype": "bfloat16",
        "calibration": {**calib, "statistics": "dense"},
        "stages": stages,
        "allocation": {"strategy": "knapsack", "unit": "bytes", "ratio": budget, "cost": "fisher", "candidates": candidates},
    }


def profile_all(model, input_ids, calib: dict[str, Any], keys: list[str] | None = None, sensitivity_from: dict | None = None):
    """(statistics by layer, profiles by candidate key and layer, seconds per phase). `keys`: only
    these candidates; `sensitivity_from`: profiles already priced, whose layers' Fisher energies
    (one number per layer, whatever the method) price the new ones instead of another Fisher pass."""
    keys = list(CANDIDATES) if keys is None else keys
    recipe = load_recipe(recipe_for(keys, 0.5, calib))
    fisher_for = frozenset() if sensitivity_from else frozenset(range(len(keys)))
    pipeline = DenseStatsPipeline(model, list(recipe.stages), progress=True, fisher_for=fisher_for)
    start = time.perf_counter()
    fisher = None if sensitivity_from else pipeline.collect_fisher(input_ids, list(range(len(keys))))
    fisher_seconds = time.perf_counter() - start
    stats: dict = {}
    seconds: dict[str, float] = {}
    profiles: dict[str, dict] = {}
    energy = {name: res[0].sensitivity for name, res in next(iter(sensitivity_from.values())).items()} if sensitivity_from else {}
    with serving_dtype(torch.bfloat16):
        for i, key in enumerate(keys):  # one profile pass per candidate, to time each
            start = time.perf_counter()
            found = profile_layers(pipeline, input_ids, {i: CANDIDATES[key][1]}, fisher=fisher, keep_stats=stats)
            seconds[key] = time.perf_counter() - start
            if energy:
                found = {name: [replace(r, sensitivity=energy[name]) for r in results] for name, results in found.items()}
            profiles[key] = found
    return stats, profiles, ({"fisher": fisher_seconds} if fisher is not None else {}) | seconds


def row_profiles(profiles: dict[str, dict], keys: list[str]) -> dict[str, list]:
    """The dense option plus each chosen candidate's options, stages renumbered for the row's recipe."""
    merged: dict[str, list] = {}
    for position, key in enumerate(keys):
        for name, results in profiles[key].items():
            if name not in merged:
                merged[name] = [r for r in results if r.stage is None]  # the dense layer
            merged[name] += [replace(r, stage=position) for r in results if r.stage is not None]
    return merged


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--calib", required=True)
    parser.add_argument("--eval", required=True)
    parser.add_argument("--out", default="eval/results/budget")
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--budgets", type=float, nargs="*", default=BUDGETS)
    parser.add_argument("--cache", help="file to keep the statistics and profiles in (a rerun skips profiling)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"rows": {}}

    tokenizer = load_tokenizer(args.model)
    pristine = load_model(args.model, dtype=torch.float32, device="cpu")
    calib = {"num_samples": args.num_samples, "seq_len": args.seq_len}
    input_ids = calibration_windows(tokenizer, args.calib, args.num_samples, args.seq_len, 0)
    if "dense" not in results["rows"]:
        ppl = perplexity(pristine, tokenizer, args.eval, seq_len=2048, max_windows=args.eval_windows, progress=False)
        with serving_dtype(torch.bfloat16):
            size = model_size(pristine)["bytes"]
        results["rows"]["dense"] = {"perplexity": ppl.perplexity, "model_bytes": size}
        results_path.write_text(json.dumps(results, indent=2))
    if args.cache and Path(args.cache).exists():
        stats, profiles, seconds = torch.load(args.cache, weights_only=False)
        missing = [k for k in CANDIDATES if k not in profiles]
        if missing:  # candidates added since the cache was written: profiled now, priced by the cached Fisher energies
            work = copy.deepcopy(pristine)
            _, found, found_seconds = profile_all(work, input_ids, calib, missing, sensitivity_from=profiles)
            del work
            profiles.update(found)
            seconds.update(found_seconds)
            torch.save((stats, profiles, seconds), args.cache)
    else:
        work = copy.deepcopy(pristine)
        stats, profiles, seconds = profile_all(work, input_ids, calib)
        del work
        if args.cache:
            torch.save((stats, profiles, seconds), args.cache)
    for key, (base, levels) in DERIVED.items():
        profiles[key] = {n: [r for r in rs if r.stage is None or r.level in levels] for n, rs in profiles[base].items()}
    results["profile_seconds"] = seconds
    print("profiling seconds:", {k: round(v, 1) for k, v in seconds.items()})
    # W4 g16 alone sets a size; the knapsack across methods gets exactly that size
    w4_bytes = sum(r.bytes for results in profiles["w4-g16"].values() for r in results if r.stage is not None)
    dense_bytes = sum(r.bytes for results in profiles["w4-g16"].values() for r in results if r.stage is None)
    w4_budget = 1 - w4_bytes / dense_bytes - 1e-9  # (1 - ratio) · dense rounds down to exactly W4's bytes
    plan_rows = [
        (label, [k for k in keys if label not in FLOORED_ROWS or FROM_RATIO.get(k, 0.0) <= budget], budget)
        for label, keys in ROWS.items()
        for budget in args.budgets
    ]
    plan_rows += [("W4 g16 alone", ["w4-g16"], w4_budget), ("knapsack across methods", BEFORE_GPTQ, w4_budget)]
    plan_rows += [("knapsack across methods + gptq", ROWS["knapsack across methods + gptq"], w4_budget)]
    for label, keys, budget in plan_rows:
        name = f"{label} @ {budget:.1%}" if budget == w4_budget else f"{label} @ {budget:.0%}"
        if name in results["rows"]:
            continue
        model = copy.deepcopy(pristine)
        data = recipe_for(keys, budget, calib)
        uniform = label == "W4 g16 alone"  # every layer W4: no allocation at all
        if uniform:
            data.pop("allocation")
            data["stages"][0]["ratio"] = 0.0
        recipe = load_recipe(data)
        runner = CompressionRunner(model, recipe, progress=False)
        start = time.perf_counter()
        try:
            run = runner.run(None, stats=stats, profiles=None if uniform else row_profiles(profiles, keys))
        except Exception as exc:  # an infeasible budget for this method set: recorded as such
            results["rows"][name] = {"method": label, "budget": budget, "infeasible": str(exc).splitlines()[0]}
            results_path.write_text(json.dumps(results, indent=2))
            print(f"{name}: {str(exc).splitlines()[0]}")
            continue
        seconds = time.perf_counter() - start
        plan = run.plan
        if plan is None:  # uniform: sizes from the records (bytes as served, counted in the run)
            before = sum(r.bytes_before for r in run.records)
            after = sum(r.bytes_after for r in run.records)
            chosen_total, dense_total, layers = after, before, []
        else:
            chosen_total, dense_total, layers = plan.chosen_total, plan.dense_total, plan.layers
        ppl = perplexity(model, tokenizer, args.eval, seq_len=2048, max_windows=args.eval_windows, progress=False)
        with serving_dtype(torch.bfloat16):
            size = model_size(model)["bytes"]
        chosen: dict[str, int] = {"w4-g16 0": len(run.records)} if plan is None else {}
        for c in layers:
            label_ = f"{keys[c.stage]} {c.level:g}" if c.stage is not None else "dense"
            chosen[label_] = chosen.get(label_, 0) + 1
        results["rows"][name] = {
            "method": label,
            "budget": budget,
            "perplexity": ppl.perplexity,
            "target_bytes_removed": 1 - chosen_total / dense_total,
            "model_bytes": size,
            "model_bytes_removed": 1 - size / results["rows"]["dense"]["model_bytes"],
            "compress_seconds": round(seconds, 1),
            "choices": dict(sorted(chosen.items(), key=lambda kv: -kv[1])),
        }
        results_path.write_text(json.dumps(results, indent=2))
        print(f"{name}: ppl {ppl.perplexity:.2f}, {results['rows'][name]['target_bytes_removed']:.1%} of bf16 target bytes removed")
    write_tables(results, out)


def write_tables(results: dict[str, Any], out: Path) -> None:
    rows = results["rows"]
    dense = rows["dense"]
    lines = [
        "# Perplexity against bytes as served (bf16), SmolLM2-135M-Instruct",
        "",
        f"Dense: perplexity {dense['perplexity']:.2f}, {dense['model_bytes']:,} bytes in bf16. Budgets are fractions of the "
        "decoder Linears' bf16 bytes removed (every index, mask, scale and zero point counted); whole-model bytes include "
        "embeddings and norms, which no method compresses.",
        "",
        "| method | budget | perplexity | Linear bytes removed | model bytes removed | compress s | choices |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in rows.items():
        if name == "dense":
            continue
        if "infeasible" in r:
            lines.append(f"| {r['method']} | {r['budget']:.0%} | infeasible | | | | {r['infeasible'][:60]} |")
            continue
        top = ", ".join(f"{k}: {v}" for k, v in list(r["choices"].items())[:4])
        lines.append(
            f"| {r['method']} | {r['budget']:.0%} | {r['perplexity']:.2f} | {r['target_bytes_removed']:.1%} | "
            f"{r['model_bytes_removed']:.1%} | {r['compress_seconds']} | {top} |"
        )
    if "profile_seconds" in results:
        lines += ["", "Profiling seconds (one calibration pass each): "
                  + ", ".join(f"{k} {v:.0f}" for k, v in results["profile_seconds"].items())]  # fmt: skip
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    # every row on a log scale, and the rows near dense on a linear one: the useful frontier
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    methods = list(dict.fromkeys(r["method"] for n, r in rows.items() if n != "dense"))
    colors, markers = plt.get_cmap("tab20"), "osv^DPX*<>hp"
    for i, method in enumerate(methods):
        points = sorted(
            (100 * r["target_bytes_removed"], r["perplexity"]) for n, r in rows.items()
            if n != "dense" and r["method"] == method and "perplexity" in r
        )  # fmt: skip
        for ax in axes if points else ():
            ax.plot([x for x, _ in points], [y for _, y in points], marker=markers[i % len(markers)],
                    color=colors(i % 20), label=method)  # fmt: skip
    for ax in axes:
        ax.axhline(dense["perplexity"], color="gray", linestyle="--", label="dense")
        ax.set(xlabel="decoder Linear bytes removed (%, bf16 as served)", ylabel="perplexity (WikiText-2 test)")
    axes[0].set(yscale="log", title="every row")
    axes[1].set(ylim=(dense["perplexity"] * 0.98, dense["perplexity"] * 2.5), title="near dense")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "ppl_vs_bytes.png", dpi=120, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()

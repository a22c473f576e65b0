"""The best model for a whole-model size, run as a user runs it: `llmpress compress MODEL
--max-size SIZE` (the auto recipe: embeddings and head chosen with the decoder Linears by one
knapsack, sequential statistics) then `llmpress eval --ppl`, one fresh process each.

    python -m compress.eval.bench_sizes --model models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --eval ../shared/data/wikitext2/test.txt --sizes 72175808 100MB 130MB \\
        --out eval/results/budget/whole-model --work runs/bench-sizes

Unlike bench_budget (decoder-Linear budgets solved from one shared set of dense statistics),
every row here is the product end to end at a whole-model size in bytes as served. Per row: the
size reached, perplexity, what the knapsack gave the embeddings, how many Linears took each
method, and the compress and eval times. Sizes already in OUT/results.json are skipped (a run
resumes). Prints a table; writes results.json, results.md and ppl_vs_size.png.
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import time
from pathlib import Path


def run_size(model: str, size: str, text: str, windows: int, work: Path, overrides: list[str] = ()) -> dict:
    """Compress to `size` and measure perplexity, in fresh processes; the row for the table.
    `overrides`: the CLI's `--set key=value` for the recipe (calibration size, for tests)."""
    out = work / size.replace("/", "_")
    started = time.perf_counter()
    cli = [sys.executable, "-m", "compress"]
    sets = [arg for override in overrides for arg in ("--set", override)]
    subprocess.run([*cli, "compress", model, "--max-size", size, "--output-dir", str(out), "--overwrite", *sets], check=True)
    compress_s = time.perf_counter() - started
    started = time.perf_counter()
    subprocess.run([*cli, "eval", str(out), "--ppl", text, "--max-windows", str(windows)], check=True)
    eval_s = time.perf_counter() - started
    return row_from_checkpoint(out, size, compress_s, eval_s)


def row_from_checkpoint(out: Path, size: str, compress_s: float, eval_s: float) -> dict:
    """The table's row from a checkpoint's report.json and eval.json."""
    report = json.loads((out / "report.json").read_text())
    ppl = json.loads((out / "eval.json").read_text())["perplexity"]
    embeddings = report.get("embeddings") or {}
    chosen = (report.get("allocation") or {}).get("layers") or []
    if chosen:  # the knapsack's labels: method, bits and group ("gptq w4 g64"), with the level where it has one
        labels = [
            (c["method"] or "dense") + (f" @{c['level']:g}" if c["level"] else "")
            for c in chosen
            if not (c["method"] or "").startswith("embeddings")
        ]
    else:
        labels = [f"{layer['method']} {layer.get('format', '')}".strip() for layer in report["layers"]]
    return {
        "size": size,
        "budget_bytes": report["allocation"]["budget"],
        "bytes": report["model_size"]["compressed"]["bytes"],
        "dense_bytes": report["model_size"]["dense"]["bytes"],
        "perplexity": ppl["perplexity"],
        "windows": ppl["windows"],
        "embeddings": f"W{embeddings['bits']} g{embeddings['group_size']} {embeddings.get('method', 'rtn')}" if embeddings else "kept",
        "linears": dict(collections.Counter(labels).most_common()),
        "compress_s": round(compress_s, 1),
        "eval_s": round(eval_s, 1),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| size asked | bytes as served | of dense | embeddings | decoder Linears (option: count) | perplexity | compress |",
        "|---|---:|---:|---|---|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: r["bytes"]):
        linears = ", ".join(f"{k}: {v}" for k, v in r["linears"].items())
        lines.append(
            f"| {r['size']} | {r['bytes'] / 1e6:.1f} MB | {r['bytes'] / r['dense_bytes']:.1%} | {r['embeddings']} | {linears} "
            f"| {r['perplexity']:.2f} | {r['compress_s'] / 60:.1f} min |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], dense_ppl: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["bytes"])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["bytes"] / 1e6 for r in rows], [r["perplexity"] for r in rows], "o-", label="llmpress --max-size")
    for r in rows:
        ax.annotate(r["embeddings"].rsplit(" ", 1)[0], (r["bytes"] / 1e6, r["perplexity"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if dense_ppl is not None:
        ax.axhline(dense_ppl, color="gray", linestyle="--", label=f"dense ({rows[0]['dense_bytes'] / 1e6:.0f} MB)")
    ax.set_xlabel("whole model, MB as served (bf16)")
    ax.set_ylabel("perplexity")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--eval", required=True, help="text file for perplexity")
    parser.add_argument("--sizes", nargs="+", required=True, help="whole-model sizes as --max-size takes them (130MB, 72175808)")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--dense-ppl", type=float, default=None, help="the dense model's perplexity, drawn as a line")
    parser.add_argument("--out", default="eval/results/budget/whole-model")
    parser.add_argument("--work", default="runs/bench-sizes", help="where the checkpoints go")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="passed to compress as --set")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.json"
    rows = json.loads(results.read_text())["rows"] if results.exists() else []
    for size in args.sizes:
        if any(r["size"] == size for r in rows):
            continue
        rows.append(run_size(args.model, size, args.eval, args.windows, Path(args.work), args.overrides))
        results.write_text(json.dumps({"model": args.model, "eval": args.eval, "rows": rows}, indent=2))
    text = table(rows)
    (out / "results.md").write_text(text + "\n")
    plot(rows, args.dense_ppl, out / "ppl_vs_size.png")
    print(text)


if __name__ == "__main__":
    main()

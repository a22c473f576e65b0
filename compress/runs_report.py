"""`llmpress report RUN_DIR...`: one table and plots across compressed checkpoints.

Each run directory holds `report.json` (written by `llmpress compress`) and optionally
`eval.json` (`llmpress eval DIR --ppl ... --tasks ... --json DIR/eval.json`). A directory with
only `eval.json` is a reference (the dense model, at ratio 0). Plots: perplexity and task
accuracy against the fraction of parameters removed, one line per method, and for knapsack runs
a heat map of the level chosen for each layer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from .errors import LlmpressError
from .report import across_methods, allocation_grid

ACC_METRICS = ("acc_norm", "acc")  # preferred accuracy metric per task, first found


def load_run(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    report_path, eval_path = directory / "report.json", directory / "eval.json"
    if not report_path.is_file() and not eval_path.is_file():
        raise LlmpressError(
            f"{str(directory)!r} has neither report.json nor eval.json: pass checkpoint directories made by "
            "`llmpress compress`, evaluated with `llmpress eval DIR ... --json DIR/eval.json`"
        )
    report = json.loads(report_path.read_text()) if report_path.is_file() else None
    evaluation = json.loads(eval_path.read_text()) if eval_path.is_file() else {}
    baseline = None
    if "baseline" in evaluation:  # written with --baseline: the first entry is this model
        evaluation, baseline = evaluation["model"], evaluation["baseline"]
    run: dict[str, Any] = {"name": directory.name, "eval": evaluation, "baseline": baseline}
    if report is None:
        run.update(method="dense", nominal=0.0, storage=0.0, allocation=None)
    else:
        stages = report["recipe"]["stages"]
        run.update(
            method="+".join(stage["method"] for stage in stages),
            nominal=report["summary"]["nominal_ratio_removed"],
            storage=report["summary"]["storage_ratio_removed"],
            allocation=report.get("allocation"),
        )
        if run["allocation"] and run["allocation"].get("strategy") == "knapsack":
            run["method"] += " (knapsack)"
    return run


def _accuracy(tasks: dict[str, dict[str, float]], task: str) -> tuple[str, float] | None:
    for metric in ACC_METRICS:
        if metric in tasks.get(task, {}):
            return metric, tasks[task][metric]
    return None


def runs_table(runs: Sequence[dict[str, Any]]) -> str:
    tasks = list(dict.fromkeys(t for run in runs for t in run["eval"].get("tasks", {})))
    header = ["run", "method", "values removed", "bytes removed", "perplexity"] + tasks
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    for run in runs:
        ppl = run["eval"].get("perplexity", {}).get("perplexity")
        cells = [run["name"], run["method"], f"{100 * run['nominal']:.1f}%", f"{100 * run['storage']:.1f}%"]
        cells.append("" if ppl is None else f"{ppl:.2f}")
        for task in tasks:
            acc = _accuracy(run["eval"].get("tasks", {}), task)
            cells.append("" if acc is None else f"{acc[1]:.4f} ({acc[0]})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plots(runs: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    dense = [r for r in runs if r["method"] == "dense"]
    methods = sorted({r["method"] for r in runs if r["method"] != "dense"})

    def series(value):
        for method in methods:
            points = sorted((r["nominal"], value(r)) for r in runs if r["method"] == method and value(r) is not None)
            if points:
                yield method, points

    def ppl(r):
        return r["eval"].get("perplexity", {}).get("perplexity")

    if any(ppl(r) is not None for r in runs):
        # the dense reference: a dense run, else the --baseline an evaluation was written with
        references = [(r["name"], ppl(r)) for r in dense if ppl(r) is not None]
        references += [
            (r["baseline"].get("model", "baseline"), r["baseline"]["perplexity"]["perplexity"])
            for r in runs
            if r.get("baseline") and "perplexity" in r["baseline"]
        ]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
        for ax, key, label in zip(axes, ("nominal", "storage"), ("parameters removed (%)", "bytes removed (%, as stored)")):
            for method in methods:
                points = sorted((r[key], ppl(r)) for r in runs if r["method"] == method and ppl(r) is not None)
                if points:
                    ax.plot([100 * x for x, _ in points], [y for _, y in points], marker="o", label=method)
            for name, value in dict(references).items():
                ax.axhline(value, color="gray", linestyle="--", label=f"{Path(str(name)).name} (dense)")
            ax.set_xlim(0, 100)  # a sensible axis even for one or two runs
            ax.set_yscale("log")
            ax.set(xlabel=label, title=f"Perplexity vs {label.split(' (')[0]}")
        axes[0].set_ylabel("perplexity (log)")
        axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
        fig.tight_layout()
        fig.savefig(out / "ppl_vs_ratio.png", dpi=120)
        plt.close(fig)
        written.append(out / "ppl_vs_ratio.png")
    tasks = list(dict.fromkeys(t for r in runs for t in r["eval"].get("tasks", {})))
    if tasks:
        fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.8), squeeze=False)
        for ax, task in zip(axes[0], tasks):

            def acc(r, task=task):
                found = _accuracy(r["eval"].get("tasks", {}), task)
                return None if found is None else found[1]

            for method, points in series(acc):
                ax.plot([100 * x for x, _ in points], [y for _, y in points], marker="o", label=method)
            for r in dense:
                if acc(r) is not None:
                    ax.axhline(acc(r), color="gray", linestyle="--")
            ax.set(title=task, xlabel="parameters removed (%)", ylabel="accuracy")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "acc_vs_ratio.png", dpi=120)
        plt.close(fig)
        written.append(out / "acc_vs_ratio.png")
    for r in runs:
        allocation = r.get("allocation")
        if allocation and allocation.get("strategy") == "knapsack":
            written.append(plot_allocation(allocation, r["name"], out / f"allocation_{r['name']}.png"))
    return written


def plot_allocation(allocation: dict[str, Any], name: str, path: Path) -> Path:
    """The knapsack's choices as a block × layer image: the level removed, or, across methods,
    the method (colour) and its level (text)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid, columns = allocation_grid(allocation)
    blocks = sorted(grid)
    fig, ax = plt.subplots(figsize=(1.2 * len(columns) + 2, 0.25 * len(blocks) + 1.5))
    if across_methods(allocation):  # colour: the chosen method; text: its level
        chosen, _ = allocation_grid(allocation, "method")
        stages, _ = allocation_grid(allocation, "stage")  # None with a method: an option outside the stages (embeddings)
        names = ["dense"] + sorted({m for row in chosen.values() for m in row.values() if m})
        data = [[names.index(chosen[b].get(c) or "dense") if c in chosen[b] else float("nan") for c in columns] for b in blocks]
        image = ax.imshow(data, aspect="auto", cmap="tab10", vmin=-0.5, vmax=9.5)
        for y, b in enumerate(blocks):
            for x, c in enumerate(columns):
                if chosen[b].get(c) and stages[b].get(c) is not None:
                    ax.text(x, y, f"{grid[b][c]:g}", ha="center", va="center", fontsize=5, color="white")
        bar = fig.colorbar(image, ax=ax, ticks=range(len(names)))
        bar.ax.set_yticklabels(names, fontsize=7)
        bar.ax.set_ylim(-0.5, len(names) - 0.5)
        title = f"{name}: method (colour) and level per layer"
    else:
        data = [[grid[b].get(c, float("nan")) for c in columns] for b in blocks]
        image = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        fig.colorbar(image, ax=ax)
        title = f"{name}: fraction removed per layer"
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(blocks)), blocks, fontsize=7)
    ax.set(ylabel="block", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_runs_report(run_dirs: Sequence[str | Path], output_dir: str | Path) -> Path:
    """report.md (the table, and links to the plots) and PNG plots in `output_dir`."""
    runs = [load_run(d) for d in run_dirs]
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(runs, out)
    if plots:
        figures = "".join(f"![{p.stem}]({p.name})\n" for p in plots)
    else:  # say so, rather than link plots that were not drawn
        figures = "No plots: no run has perplexity or task results yet (`llmpress eval DIR --ppl TEXT` writes DIR/eval.json).\n"
    text = "# llmpress runs\n\n" + runs_table(runs) + "\n" + figures
    path = out / "report.md"
    path.write_text(text)
    return path

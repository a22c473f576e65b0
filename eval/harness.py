"""lm-evaluation-harness on compressed models: the model object itself goes to HFLM, so what is
measured is the compressed modules and their kernels, not a dense reconstruction.

    results = compress.eval.evaluate("out/whitened-svd-20", ["local_arc_easy", "local_piqa"],
                                     include_path="../shared/data/lm_eval_tasks", limit=200)

Task names are lm-eval's (`arc_easy`, `hellaswag`, ... when their datasets are reachable) or
those of YAML task folders given with `include_path` (offline copies).
"""

from __future__ import annotations

import difflib
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from compress.errors import LlmpressError


def task_manager(include_path: str | Path | Sequence[str | Path] | None, tasks: Sequence[str]):
    """lm-eval's TaskManager for `tasks`, with extra task folders; unknown tasks are clear errors.

    Indexing lm-eval's own ~15k task configs takes about 30 s, so when the include folders hold
    every requested task only they are indexed.
    """
    from lm_eval.tasks import TaskManager

    paths = [include_path] if isinstance(include_path, (str, Path)) else list(include_path or [])
    for path in paths:
        if not Path(path).is_dir():
            raise LlmpressError(f"--include-path {str(path)!r} is not a directory of lm-eval task YAML files")
    if paths:
        local = TaskManager(include_path=[str(p) for p in paths], include_defaults=False)
        if set(tasks) <= set(local.all_tasks):
            return local
    manager = TaskManager(include_path=[str(p) for p in paths] or None)
    known = set(manager.all_tasks)
    for task in tasks:
        if task not in known:
            close = difflib.get_close_matches(task, known, n=4, cutoff=0.6)
            hint = f"; did you mean {close}?" if close else ""
            raise LlmpressError(
                f"unknown lm-eval task {task!r}{hint} Offline task folders are added with --include-path "
                "(e.g. ../shared/data/lm_eval_tasks, whose tasks are named local_arc_easy, local_piqa, ...)"
            )
    return manager


def evaluate(
    model: nn.Module | str | Path,
    tasks: Sequence[str],
    *,
    tokenizer=None,
    include_path: str | Path | Sequence[str | Path] | None = None,
    limit: int | float | None = None,
    batch_size: int = 1,
    num_fewshot: int | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
) -> dict[str, Any]:
    """Run lm-eval tasks; returns {"model", "tasks": {task: {metric: value}}, "config", "seconds"}."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from compress.model_loading import check_device

    if not tasks:
        raise LlmpressError("no tasks given: pass task names, e.g. --tasks local_arc_easy,local_piqa")
    manager = task_manager(include_path, tasks)
    start = time.perf_counter()
    source = getattr(getattr(model, "config", None), "_name_or_path", type(model).__name__)
    if not isinstance(model, nn.Module):
        from compress.model_loading import load_model, load_tokenizer

        source = str(model)
        tokenizer = tokenizer or load_tokenizer(model)
        model = load_model(model, dtype=dtype, device=check_device(device))
    if tokenizer is None:
        raise ValueError("evaluate() needs tokenizer=... when the model is passed as an object")
    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        task_manager=manager,
        limit=limit,
        num_fewshot=num_fewshot,
        log_samples=False,
        bootstrap_iters=1000,
    )
    results = {}
    for task, metrics in out["results"].items():
        results[task] = {
            key.split(",")[0]: value for key, value in metrics.items() if isinstance(value, (int, float)) and key != "alias"
        }
    return {
        "model": source,
        "tasks": results,
        "config": {"limit": limit, "num_fewshot": num_fewshot, "batch_size": batch_size, "device": device},
        "seconds": round(time.perf_counter() - start, 1),
    }


def results_table(rows: Sequence[dict[str, Any]], metric_order: Sequence[str] = ("acc", "acc_norm", "word_perplexity")) -> str:
    """Markdown: one row per evaluated model, one column per (task, metric)."""
    columns: list[tuple[str, str]] = []
    for row in rows:
        for task, metrics in row["tasks"].items():
            for metric in metric_order:
                if metric in metrics and (task, metric) not in columns:
                    columns.append((task, metric))
    header = "| model | " + " | ".join(f"{t} {m}" for t, m in columns) + " |"
    lines = [header, "|---|" + "---:|" * len(columns)]
    for row in rows:
        cells = []
        for task, metric in columns:
            value = row["tasks"].get(task, {}).get(metric)
            stderr = row["tasks"].get(task, {}).get(f"{metric}_stderr")
            cells.append("" if value is None else f"{value:.4f}" + (f" ± {stderr:.3f}" if isinstance(stderr, float) else ""))
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

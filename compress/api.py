"""The Python API: `compress_model(model_or_id, recipe, dataset=...) -> (model, report)`."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .budget import AllocationPlan, plan_allocation
from .data import calibration_windows
from .model_loading import check_device, load_model, load_tokenizer
from .pipeline import SequentialPipeline
from .recipe import Recipe, load_recipe
from .report import build_report, model_size

logger = logging.getLogger("compress")


def allocation_summary(plan: AllocationPlan | None, recipe: Recipe) -> dict[str, Any] | None:
    """The report's `allocation` section: the plan (knapsack) or the uniform level."""
    if recipe.allocation is None:
        return None
    if plan is None:
        return {"strategy": "uniform", "stage": recipe.allocation.stage, "ratio": recipe.allocation.ratio}
    return plan.as_dict()


def compress_model(
    model: nn.Module | str | Path,
    recipe: Recipe | dict | str | Path,
    dataset: str | Path | Sequence[str] | None = None,
    *,
    tokenizer=None,
    num_samples: int | None = None,
    seq_len: int | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    overrides: list[str] | None = None,
    progress: bool = True,
) -> tuple[nn.Module, dict[str, Any]]:
    """Compress a model in place following `recipe`; returns the model and a report dict.

    `model` is a loaded HF causal LM or anything `load_model` accepts (hub id, directory, .gguf).
    `dataset` overrides the recipe's calibration dataset (None: the recipe's, else the built-in
    WikiText-2 excerpt). `device` is where each block is computed (default: cuda if available);
    the model itself stays where it is.
    """
    start = time.perf_counter()
    device = check_device(device)
    recipe = load_recipe(recipe, overrides)
    calib = recipe.calibration
    if num_samples is not None:
        calib.num_samples = num_samples
    if seq_len is not None:
        calib.seq_len = seq_len
    if dataset is not None:
        calib.dataset = dataset if isinstance(dataset, (str, Path)) else None
    source = str(model) if isinstance(model, (str, Path)) else getattr(model.config, "_name_or_path", type(model).__name__)
    if isinstance(model, (str, Path)):
        tokenizer = tokenizer or load_tokenizer(model)
        model = load_model(model, dtype=dtype, device="cpu")
    dense_size = model_size(model)

    input_ids = None
    if calib.num_samples > 0:
        if tokenizer is None:
            raise ValueError("compress_model needs a tokenizer (tokenizer=...) when the model is passed as an object")
        texts = dataset if isinstance(dataset, (list, tuple)) else calib.dataset
        input_ids = calibration_windows(
            tokenizer, texts, calib.num_samples, calib.seq_len, calib.seed, calib.chat_template, calib.split, calib.text_field
        )
    pipeline = SequentialPipeline(
        model, recipe.stages, device=device, batch_size=calib.batch_size, progress=progress, statistics=calib.statistics
    )
    plan = None
    if recipe.allocation is not None and recipe.allocation.strategy == "knapsack":
        plan = plan_allocation(pipeline, input_ids, recipe.allocation)
        stage = recipe.stages[recipe.allocation.stage]
        pipeline.layer_configs = plan.layer_configs(stage, pipeline.compressors[recipe.allocation.stage].level_field)
    with torch.no_grad():
        records = pipeline.run(input_ids)
    calibration_info = {
        "dataset": str(calib.dataset) if calib.dataset else ("<list of strings>" if isinstance(dataset, (list, tuple)) else "built-in WikiText-2 valid excerpt"),
        "num_samples": calib.num_samples,
        "seq_len": calib.seq_len,
        "seed": calib.seed,
        "chat_template": calib.chat_template,
        "tokens": int(input_ids.numel()) if input_ids is not None else 0,
        "statistics": calib.statistics,
    }
    report = build_report(
        records,
        recipe=recipe.model_dump(mode="json"),
        model_source=source,
        model=model,
        dense_size=dense_size,
        calibration=calibration_info,
        block_log=pipeline.block_log,
        seconds=time.perf_counter() - start,
        left_dense=[(c.dense_values, c.dense_bytes) for c in plan.layers if c.level == 0] if plan else (),
    )
    report["allocation"] = allocation_summary(plan, recipe)
    report["device"] = str(device)
    report["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    return model, report

"""The Python API: `compress_model(model_or_id, recipe, dataset=...) -> (model, report)`.

Loads the recipe, the model and the calibration data once, then hands them to the one runner
(compress/runner.py: statistics → plan → compress) and builds the report.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .blocks import weight_stacks
from .experts import expert_linear_names, is_fused_experts, per_expert_stacks
from .metrics import LayerRecord, serving_dtype
from .data import calibration_windows
from .distributed import current
from .errors import LlmpressError
from .paths import check_output_dir
from .progress import RunProgress, fingerprint, progress_dir
from .model_loading import check_device, load_model, load_tokenizer, resolve_dtype
from .recipe import Recipe, load_recipe, with_calibration
from .report import build_report, model_size
from .runner import CompressionRunner

logger = logging.getLogger("compress")


def uncompressed_weight_stacks(pipeline) -> dict[str, Any] | None:
    """What of the decoder blocks no method can compress because it is not an nn.Linear: 3-D
    weights outside the experts modules llmpress turns into per-expert Linears (an MoE layout it
    does not know). None when there are none."""
    known = {
        f"{index}.{name}."
        for index, block in enumerate(pipeline.blocks)
        for name, module in block.named_modules()
        if is_fused_experts(module)
    }
    stacks = {name: n for name, n in weight_stacks(pipeline.blocks).items() if not any(name.startswith(k) for k in known)}
    if not stacks:
        return None
    block_params = sum(p.numel() for p in pipeline.blocks.parameters())
    total = sum(stacks.values())
    names = sorted({name.split(".", 1)[1] for name in stacks})
    return {"parameters": total, "share_of_block_parameters": total / block_params, "names": names}


def experts_summary(model: nn.Module, records: list[LayerRecord], calibration: str) -> dict[str, Any] | None:
    """The report's `experts` section: how many experts modules hold compressed experts and how
    many calibration tokens each expert layer saw (rare experts get shrunk or data-free statistics)."""
    experts = expert_linear_names(model)
    if not experts:
        return None
    calibrated = [r for r in records if r.name in experts and r.tokens is not None]
    tokens = [r.tokens for r in calibrated]
    return {
        "stacks": len(per_expert_stacks(model)),
        "expert_layers": len(experts),
        "compressed_expert_layers": sum(1 for r in records if r.name in experts),
        "calibration": calibration,
        "layers_without_tokens": sorted(r.name for r in calibrated if r.tokens == 0),
        "layers_with_fewer_tokens_than_inputs": sum(1 for r in calibrated if r.tokens < r.in_features),
        "tokens_min_median_max": [min(tokens), sorted(tokens)[len(tokens) // 2], max(tokens)] if tokens else None,
    }


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
    output_dir: str | Path | None = None,
    overwrite: bool = False,
    progress_to: str | Path | None = None,
    resume: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Compress a model in place following `recipe`; returns the model and a report dict.

    `model` is a loaded HF causal LM or anything `load_model` accepts (hub id, directory, .gguf).
    `dataset` overrides the recipe's calibration dataset (None: the recipe's, else the built-in
    WikiText-2 excerpt). `device` is where each block is computed (default: cuda if available);
    the model itself stays where it is. The recipe is not modified: `num_samples`, `seq_len`,
    `dataset` and `overrides` make a new one, which the report records as what ran.
    `output_dir`: also save the checkpoint there; the directory is checked before compressing.
    A sequential run writes its progress after every block (`progress_to`, by default beside
    `output_dir`); `resume=True` continues a killed run from its last finished block.
    """
    start = time.perf_counter()
    if output_dir is not None:
        check_output_dir(output_dir, overwrite)
    device = check_device(device)
    recipe = load_recipe(recipe, overrides)
    texts = dataset if isinstance(dataset, (list, tuple)) else None
    recipe = with_calibration(
        recipe,
        num_samples=num_samples,
        seq_len=seq_len,
        dataset=str(dataset) if dataset is not None and texts is None else None,
    )
    calib = recipe.calibration
    source = str(model) if isinstance(model, (str, Path)) else getattr(model.config, "_name_or_path", type(model).__name__)
    if isinstance(model, (str, Path)):
        tokenizer = tokenizer or load_tokenizer(model)
        model = load_model(model, dtype=resolve_dtype(dtype, device), device="cpu")
    with serving_dtype(recipe.serve_dtype):
        dense_size = model_size(model)

    parallel = current()  # several ranks (torchrun): rank 0 alone shows progress and saves
    progress = progress and parallel.is_main
    runner = CompressionRunner(model, recipe, device=device, progress=progress)
    input_ids = None
    if calib.num_samples > 0 and runner.needs_data():
        if tokenizer is None:
            raise ValueError("compress_model needs a tokenizer (tokenizer=...) when the model is passed as an object")
        input_ids = calibration_windows(
            tokenizer, texts or calib.dataset, calib.num_samples, calib.seq_len, calib.seed, calib.chat_template,
            calib.split, calib.text_field,
        )  # fmt: skip
    if progress_to is None and output_dir is not None:
        progress_to = progress_dir(output_dir)
    if progress_to is not None and parallel.active:  # each rank resumes its own share of the sequences
        progress_to = Path(progress_to) / f"rank{parallel.rank}"
    if resume and (progress_to is None or calib.statistics != "sequential"):
        raise LlmpressError("resume continues a sequential run that saves a checkpoint: give output_dir and statistics: sequential")
    run_progress = None
    if progress_to is not None and calib.statistics == "sequential":
        dtype = next(model.parameters()).dtype
        run_progress = RunProgress(progress_to, fingerprint(recipe.model_dump_json(), source, dtype, input_ids), resume)
        runner.save_progress(run_progress)
    with torch.no_grad():
        result = runner.run(input_ids)
    calibration_info = {
        "dataset": calib.dataset or ("<list of strings>" if texts else "built-in WikiText-2 valid excerpt"),
        "num_samples": calib.num_samples,
        "seq_len": calib.seq_len,
        "seed": calib.seed,
        "chat_template": calib.chat_template,
        "tokens": int(input_ids.numel()) if input_ids is not None else 0,
        "statistics": calib.statistics,
    }
    with serving_dtype(recipe.serve_dtype):
        report = build_report(
            result.records,
            recipe=recipe.model_dump(mode="json"),
            model_source=source,
            model=model,
            dense_size=dense_size,
            calibration=calibration_info,
            block_log=result.block_log,
            seconds=time.perf_counter() - start,
            left_dense=result.left_dense(),
        )
    report["allocation"] = result.allocation_summary(recipe)
    report["tuning"] = result.tuning
    report["embeddings"] = result.embeddings
    report["not_compressed"] = uncompressed_weight_stacks(runner.pipeline)
    report["experts"] = experts_summary(model, result.records, calib.moe)
    report["device"] = str(device)
    report["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    report["serve_dtype"] = recipe.serve_dtype
    report["model_size"]["stored"] = model_size(model)  # the checkpoint's tensors, in the dtype they are kept in
    report["ranks"] = parallel.world_size
    if output_dir is not None:
        from .checkpoint import save_compressed

        if parallel.is_main:
            save_compressed(model, output_dir, tokenizer=tokenizer, recipe=recipe, report=report, overwrite=overwrite)
        parallel.barrier()
        if run_progress is not None:
            run_progress.finish()
    return model, report

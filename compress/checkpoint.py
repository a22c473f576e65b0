"""Compressed checkpoints: factors in safetensors, metadata in config.json, written atomically.

Layout of a checkpoint directory:
    config.json          the model config + quantization_config {quant_method: llmpress, modules: {...}}
    model*.safetensors   the compressed modules' factors (never dense reconstructions) + untouched weights
    tokenizer files      when a tokenizer is given
    recipe.yaml          the recipe that produced it
    report.json/.md      per-layer sizes, errors and times
    allocation.png       with a knapsack allocation: the method and level chosen per layer

Everything is written into a temporary sibling directory that is renamed into place at the end,
so an interrupted save never leaves a half-written checkpoint under the requested name.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .checkpoint_check import validate_checkpoint
from .embeddings import checkpoint_entry, dense_embeddings
from .experts import fuse_untouched_stacks, per_expert_stacks
from .paths import check_output_dir, remove_stale_temporaries
from .hf_quantizer import LlmpressConfig, LlmpressHfQuantizer
from .report import compressed_modules, write_report

logger = logging.getLogger("compress")


def save_compressed(
    model: nn.Module,
    output_dir: str | Path,
    tokenizer=None,
    recipe: Any = None,
    report: dict[str, Any] | None = None,
    overwrite: bool = False,
    max_shard_size: str = "5GB",
) -> Path:
    """Write `model` (with its compressed modules) as an llmpress checkpoint; returns the path."""
    output_dir = check_output_dir(output_dir, overwrite)
    modules = {name: module.spec() for name, module in compressed_modules(model).items()}
    recipe_name = getattr(recipe, "name", None)
    config = LlmpressConfig(
        modules=modules, recipe=recipe_name, expert_stacks=list(per_expert_stacks(model)), embeddings=checkpoint_entry(model)
    )
    model.config.quantization_config = config
    # The model is now an llmpress model, whatever it was loaded from: a GGUF-loaded model still
    # carries transformers' (non-serializable) GGUF quantizer although its weights were dequantized.
    model.hf_quantizer = LlmpressHfQuantizer(config)
    with atomic_directory(output_dir) as tmp:
        # the model's own parameter names: transformers' MoE conversions would rename per-expert modules
        model.save_pretrained(tmp, max_shard_size=max_shard_size, save_original_format=False)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if recipe is not None:
            text = recipe.to_yaml() if hasattr(recipe, "to_yaml") else json.dumps(recipe, indent=2)
            (tmp / "recipe.yaml").write_text(text)
        if report is not None:
            write_report(report, tmp)
            allocation = report.get("allocation")
            if allocation and allocation.get("strategy") == "knapsack":
                from .runs_report import plot_allocation

                plot_allocation(allocation, output_dir.name, tmp / "allocation.png")
    return output_dir


@contextmanager
def atomic_directory(output_dir: Path) -> Iterator[Path]:
    """A temporary sibling directory to write into; renamed onto `output_dir` only on success.

    Stale temporaries of an earlier interrupted save to the same path are removed first. The
    result gets the permissions of an ordinary `save_pretrained` (the umask's), not the private
    0700 of a temporary directory.
    """
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(output_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        yield tmp
        _apply_umask(tmp)
        if output_dir.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
            os.replace(output_dir, trash / "old")
            os.replace(tmp, output_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _apply_umask(directory: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    for root, dirs, files in os.walk(directory):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~umask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~umask)
    os.chmod(directory, 0o777 & ~umask)


def export_dense(directory: str | Path, output_dir: str | Path, overwrite: bool = False) -> Path:
    """Write an ordinary HF checkpoint (every compressed Linear reconstructed as nn.Linear, MoE
    experts fused back into their 3-D stacks) for tools that know nothing of llmpress. The file is as big as the dense model: only the
    quality of the compression carries over, not its savings."""
    from transformers import AutoTokenizer

    from .targets import set_submodule

    output_dir = check_output_dir(output_dir, overwrite)
    model = load(directory, dtype="auto")
    embeddings = checkpoint_entry(model)
    if embeddings:
        dense_embeddings(model, embeddings)
    for name, module in compressed_modules(model).items():
        set_submodule(model, name, module.to_linear().to("cpu"))
    fuse_untouched_stacks(model)  # every expert is an nn.Linear again: the model's own fused stacks
    model._weight_conversions = None  # saved in the original layout, as transformers writes it
    model.config.quantization_config = None
    del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    with atomic_directory(output_dir) as tmp:
        model.save_pretrained(tmp)
        try:
            AutoTokenizer.from_pretrained(directory).save_pretrained(tmp)
        except (OSError, ValueError):
            pass  # a checkpoint saved without a tokenizer exports without one
    return output_dir


def load(
    directory: str | Path,
    device_map: str | dict | None = None,
    dtype: str | torch.dtype | None = "auto",
    with_tokenizer: bool = False,
):
    """Rebuild a compressed model (and optionally its tokenizer) from an llmpress checkpoint.

    This is `AutoModelForCausalLM.from_pretrained(directory)` with the llmpress quantizer
    registered; `device_map` is passed to accelerate for placement of models larger than a device.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import hf_quantizer  # noqa: F401

    directory = Path(directory)
    validate_checkpoint(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, device_map=device_map, dtype=dtype)
    model.eval()
    if not with_tokenizer:
        return model
    return model, AutoTokenizer.from_pretrained(directory)

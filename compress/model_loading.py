"""Load a causal LM and its tokenizer from a hub id, a local HF directory or a `.gguf` file.

GGUF files are dequantized by transformers' own GGUF loader; compressed llmpress checkpoints
load through the transformers quantizer that `import compress` registers.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .checkpoint_check import is_llmpress_checkpoint, validate_checkpoint
from .errors import LlmpressError
from .paths import ModelSource, resolve_model_source  # noqa: F401  (re-exported: the loaders' entry point)


DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """fp32 on CPU and bf16 on accelerators unless the user asks otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise LlmpressError(f"unknown dtype {dtype!r}; choose one of {sorted(set(DTYPES))} or 'auto'")
    return DTYPES[dtype]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str | torch.device | None) -> str:
    """The device to compute on (default: cuda if present), refusing ones this machine lacks."""
    if device is None:
        return default_device()
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise LlmpressError(f"unknown device {str(device)!r}; use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise LlmpressError(f"device {str(device)!r} requested but no CUDA GPU is available; use --device cpu")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise LlmpressError(f"device {str(device)!r} does not exist: {torch.cuda.device_count()} GPU(s) visible")
    return str(parsed)


def load_model(
    name_or_path: str | os.PathLike,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    **kwargs,
) -> nn.Module:
    """Load a causal LM onto `device` (default: CPU; the pipeline moves blocks itself)."""
    from transformers import AutoModelForCausalLM

    from . import hf_quantizer  # noqa: F401  (registers the llmpress quantizer)

    source = resolve_model_source(name_or_path)
    if source.kind == "dir" and is_llmpress_checkpoint(source.path):

        validate_checkpoint(source.path)  # a damaged checkpoint fails here in one line, not deep in a load
    torch_dtype = resolve_dtype(dtype, device or default_device())
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source.path, dtype=torch_dtype, **source.from_pretrained_kwargs(), **kwargs
        )
    except (OSError, ValueError) as exc:
        if source.kind == "hub":
            raise LlmpressError(
                f"could not load model {str(name_or_path)!r} from the Hugging Face Hub: {exc}. Check the hub id and "
                "your network (set HF_HUB_OFFLINE=1 to use only the local cache)"
            ) from exc
        raise LlmpressError(f"could not load model {str(name_or_path)!r} from {source}: {exc}") from exc
    model.eval()
    if device is not None:
        model.to(device)
    return model


def load_tokenizer(name_or_path: str | os.PathLike):
    """The tokenizer that belongs to a model source (GGUF files carry their own)."""
    from transformers import AutoTokenizer

    source = resolve_model_source(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, **source.from_pretrained_kwargs())
    except (OSError, ValueError) as exc:
        raise LlmpressError(f"could not load a tokenizer for {str(name_or_path)!r}: {exc}") from exc
    return tokenizer

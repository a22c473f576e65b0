"""Is a directory a complete, readable llmpress checkpoint? Checked before anything loads it.

`validate_checkpoint` reads only config.json and the safetensors headers (no tensor data): the
quantization config names a known format version and known module formats; every safetensors
file holds the bytes its header describes (a truncated copy or an interrupted write fails here,
not as a traceback deep in a load); every compressed module's tensors are present with the
shapes its spec implies. `eval`, `inspect`, `export` and `compress.load` all call it and
report the first problem in one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import LlmpressError

# the newest checkpoint layout this install reads (hf_quantizer writes it). 2: tensors under the
# model's own parameter names (no transformers weight conversion), per-expert MoE stacks listed;
# 3: quantized token embeddings and the output head reading their table (`embeddings`)
FORMAT_VERSION = 3
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def nbytes(shape: list[int], dtype: str) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count * ITEMSIZE.get(dtype, 1)


def read_safetensors_header(file: Path) -> dict[str, tuple[list[int], str]]:
    """name -> (shape, dtype) from a safetensors file's header, checking the file is complete."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        raw = handle.read(8)
        length = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        if length < 2 or length > size - 8:
            raise LlmpressError(f"{file} is truncated or not a safetensors file (unreadable header); write or copy the checkpoint again")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise LlmpressError(f"{file} has a corrupt safetensors header; write or copy the checkpoint again") from None
    header.pop("__metadata__", None)
    end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if 8 + length + end > size:
        raise LlmpressError(
            f"{file} is truncated: its header describes {8 + length + end:,} bytes but the file has {size:,}; "
            "the checkpoint was not completely written or copied: write or copy it again"
        )
    return {name: (entry["shape"], entry["dtype"]) for name, entry in header.items()}


def is_llmpress_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a directory whose config.json names the llmpress quantization method."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and (config.get("quantization_config") or {}).get("quant_method") == "llmpress"


def validate_checkpoint(directory: str | Path) -> tuple[dict[str, Any], dict[str, tuple[list[int], str]]]:
    """(quantization_config, tensor headers) of a valid llmpress checkpoint, else LlmpressError."""
    from .modules import FORMATS, build_module

    directory = Path(directory)
    if not directory.is_dir():
        raise LlmpressError(f"checkpoint directory {str(directory)!r} not found")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise LlmpressError(f"{str(directory)!r} is not a model directory (no config.json)")
    try:
        qconfig = json.loads(config_path.read_text()).get("quantization_config") or {}
    except json.JSONDecodeError as exc:
        raise LlmpressError(f"{config_path} is not valid JSON ({exc}); the checkpoint is damaged") from None
    if qconfig.get("quant_method") != "llmpress":
        raise LlmpressError(f"{str(directory)!r} is not an llmpress checkpoint (config.json has no llmpress quantization_config)")
    version = qconfig.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise LlmpressError(
            f"{str(directory)!r} uses llmpress checkpoint format version {version!r}; this install reads versions up "
            f"to {FORMAT_VERSION}: upgrade llmpress"
        )
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise LlmpressError(f"{str(directory)!r} has no .safetensors weights; write the checkpoint again")
    headers: dict[str, tuple[list[int], str]] = {}
    for file in files:
        headers.update(read_safetensors_header(file))
    for name, spec in (qconfig.get("modules") or {}).items():
        if spec.get("format") not in FORMATS:
            raise LlmpressError(f"module {name} has unknown format {spec.get('format')!r}; known: {sorted(FORMATS)} (upgrade llmpress?)")
        try:
            expected = build_module(spec, dtype=_float_dtype(), device="meta").state_dict()
        except (KeyError, TypeError) as exc:
            raise LlmpressError(f"module {name} has an invalid spec in config.json ({exc}); the checkpoint is damaged") from None
        except ValueError as exc:  # a layout this install does not read (it says why)
            raise LlmpressError(f"module {name}: {exc}") from None
        for key, tensor in expected.items():
            stored = headers.get(f"{name}.{key}")
            if stored is None:
                raise LlmpressError(f"{str(directory)!r} lacks tensor {name}.{key} that its config.json describes; the checkpoint is incomplete")
            if list(stored[0]) != list(tensor.shape):
                raise LlmpressError(
                    f"tensor {name}.{key} has shape {list(stored[0])} but config.json implies {list(tensor.shape)}; the checkpoint is damaged"
                )
    return qconfig, headers


def _float_dtype():
    import torch

    return torch.float32

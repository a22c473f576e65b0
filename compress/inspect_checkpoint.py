"""`llmpress inspect DIR`: per-layer formats and true sizes of a checkpoint, read from file headers."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from .errors import LlmpressError

_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def tensor_headers(directory: Path) -> dict[str, tuple[list[int], str]]:
    """name -> (shape, dtype) for every tensor in the checkpoint's safetensors files."""
    headers = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():
                piece = handle.get_slice(key)
                headers[key] = (piece.get_shape(), piece.get_dtype())
    return headers


def _nbytes(shape: list[int], dtype: str) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count * _ITEMSIZE[dtype]


def inspect_checkpoint(directory: str | Path) -> dict:
    """Per-module rows and totals; sizes come from the stored tensors, not from the specs."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise LlmpressError(f"{str(directory)!r} is not a model directory (no config.json)")
    qconfig = json.loads(config_path.read_text()).get("quantization_config") or {}
    if qconfig.get("quant_method") != "llmpress":
        raise LlmpressError(f"{str(directory)!r} is not an llmpress checkpoint (no llmpress quantization_config)")
    headers = tensor_headers(directory)
    rows = []
    for name, spec in qconfig["modules"].items():
        tensors = {k: v for k, v in headers.items() if k.startswith(name + ".")}
        stored = sum(_nbytes(shape, dtype) for shape, dtype in tensors.values())
        float_dtypes = [dtype for shape, dtype in tensors.values() if dtype in ("F32", "F16", "BF16", "F64")]
        itemsize = _ITEMSIZE[float_dtypes[0]] if float_dtypes else 2
        dense = (spec["in_features"] * spec["out_features"] + (spec["out_features"] if spec["bias"] else 0)) * itemsize
        detail = {k: v for k, v in spec.items() if k not in ("format", "in_features", "out_features", "bias")}
        rows.append(
            {
                "name": name,
                "format": spec["format"],
                "shape": f"{spec['out_features']}x{spec['in_features']}",
                "detail": detail,
                "dense_bytes": dense,
                "stored_bytes": stored,
                "ratio": stored / dense,
            }
        )
    total_file = sum(_nbytes(shape, dtype) for shape, dtype in headers.values())
    dense_sum = sum(r["dense_bytes"] for r in rows)
    stored_sum = sum(r["stored_bytes"] for r in rows)
    return {
        "directory": str(directory),
        "format_version": qconfig.get("format_version"),
        "recipe": qconfig.get("recipe"),
        "modules": rows,
        "compressed_dense_bytes": dense_sum,
        "compressed_stored_bytes": stored_sum,
        "checkpoint_tensor_bytes": total_file,
        "dense_equivalent_bytes": total_file - stored_sum + dense_sum,
    }


def inspect_table(info: dict) -> str:
    lines = [
        f"{info['directory']}  (llmpress format v{info['format_version']}, recipe {info['recipe']})",
        f"{'module':<44} {'format':<14} {'shape':<11} {'detail':<34} {'dense B':>11} {'stored B':>11} {'ratio':>6}",
    ]
    for r in info["modules"]:
        detail = ", ".join(f"{k}={v}" for k, v in r["detail"].items())
        lines.append(
            f"{r['name']:<44} {r['format']:<14} {r['shape']:<11} {detail:<34} "
            f"{r['dense_bytes']:>11,} {r['stored_bytes']:>11,} {r['ratio']:>6.3f}"
        )
    d, s = info["compressed_dense_bytes"], info["compressed_stored_bytes"]
    lines.append(f"compressed modules: {len(info['modules'])}, {d:,} -> {s:,} bytes ({s / max(d, 1):.3f} of dense)")
    lines.append(
        f"whole checkpoint tensors: {info['checkpoint_tensor_bytes']:,} bytes "
        f"(dense model: {info['dense_equivalent_bytes']:,}, {info['checkpoint_tensor_bytes'] / info['dense_equivalent_bytes']:.3f})"
    )
    return "\n".join(lines)

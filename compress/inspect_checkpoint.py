"""`llmpress inspect DIR`: per-layer formats and true sizes of a checkpoint, read from file headers.

MoE experts modules stored per expert (compress/experts.py) are listed as stacks: per stack and
projection one table line for all its experts, with their formats and summed sizes.
"""

from __future__ import annotations

import re
from pathlib import Path

from .checkpoint_check import ITEMSIZE, nbytes, validate_checkpoint


def inspect_checkpoint(directory: str | Path) -> dict:
    """Per-module rows and totals; sizes come from the stored tensors, not from the specs."""
    directory = Path(directory)
    qconfig, headers = validate_checkpoint(directory)
    rows = []
    for name, spec in sorted(qconfig["modules"].items(), key=lambda item: _natural_key(item[0])):
        tensors = {k: v for k, v in headers.items() if k.startswith(name + ".")}
        stored = sum(nbytes(shape, dtype) for shape, dtype in tensors.values())
        float_dtypes = [dtype for shape, dtype in tensors.values() if dtype in ("F32", "F16", "BF16", "F64")]
        itemsize = ITEMSIZE[float_dtypes[0]] if float_dtypes else 2
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
    total_file = sum(nbytes(shape, dtype) for shape, dtype in headers.values())
    dense_sum = sum(r["dense_bytes"] for r in rows)
    stored_sum = sum(r["stored_bytes"] for r in rows)
    stacks = [_stack_info(name, rows, headers) for name in qconfig.get("expert_stacks") or []]
    return {
        "directory": str(directory),
        "format_version": qconfig.get("format_version"),
        "recipe": qconfig.get("recipe"),
        "modules": rows,
        "expert_stacks": stacks,
        "embeddings": qconfig.get("embeddings"),
        "compressed_dense_bytes": dense_sum,
        "compressed_stored_bytes": stored_sum,
        "checkpoint_tensor_bytes": total_file,
        "dense_equivalent_bytes": total_file - stored_sum + dense_sum,
    }


def _stack_info(stack: str, rows: list[dict], headers: dict) -> dict:
    """One experts module stored per expert: its projections, formats and sizes (experts left
    dense inside it count at their stored size on both sides)."""
    inside = {k: v for k, v in headers.items() if k.startswith(stack + ".")}
    compressed = [r for r in rows if r["name"].startswith(stack + ".")]
    stored_all = sum(nbytes(shape, dtype) for shape, dtype in inside.values())
    compressed_stored = sum(r["stored_bytes"] for r in compressed)
    dense = stored_all - compressed_stored + sum(r["dense_bytes"] for r in compressed)
    experts = {int(k[len(stack) + 1 :].split(".")[1]) for k in inside}
    projections: dict[str, dict] = {}
    for r in compressed:
        projection = r["name"][len(stack) + 1 :].split(".")[0]
        entry = projections.setdefault(projection, {"experts": 0, "formats": {}, "shape": r["shape"], "dense_bytes": 0, "stored_bytes": 0})
        entry["experts"] += 1
        entry["formats"][r["format"]] = entry["formats"].get(r["format"], 0) + 1
        entry["dense_bytes"] += r["dense_bytes"]
        entry["stored_bytes"] += r["stored_bytes"]
    return {
        "name": stack,
        "experts": len(experts),
        "compressed_layers": len(compressed),
        "projections": projections,
        "dense_bytes": dense,
        "stored_bytes": stored_all,
        "ratio": stored_all / max(dense, 1),
    }


def _natural_key(name: str) -> list:
    """model.layers.2.x before model.layers.10.x: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def inspect_table(info: dict) -> str:
    lines = [
        f"{info['directory']}  (llmpress format v{info['format_version']}, recipe {info['recipe']})",
        f"{'module':<44} {'format':<14} {'shape':<11} {'detail':<34} {'dense B':>11} {'stored B':>11} {'ratio':>6}",
    ]
    stacks = [stack["name"] + "." for stack in info.get("expert_stacks", [])]
    for r in info["modules"]:
        if any(r["name"].startswith(prefix) for prefix in stacks):
            continue  # one line per stack and projection below
        detail = ", ".join(f"{k}={v}" for k, v in r["detail"].items())
        lines.append(
            f"{r['name']:<44} {r['format']:<14} {r['shape']:<11} {detail:<34} "
            f"{r['dense_bytes']:>11,} {r['stored_bytes']:>11,} {r['ratio']:>6.3f}"
        )
    for stack in info.get("expert_stacks", []):
        for projection, p in stack["projections"].items():
            formats = ", ".join(f"{n}x {f}" for f, n in p["formats"].items())
            name = f"{stack['name']}.{projection}.*"
            lines.append(
                f"{name:<44} {'experts':<14} {p['shape']:<11} {formats:<34} "
                f"{p['dense_bytes']:>11,} {p['stored_bytes']:>11,} {p['stored_bytes'] / max(p['dense_bytes'], 1):>6.3f}"
            )
    if info.get("expert_stacks"):
        stacks_dense = sum(s["dense_bytes"] for s in info["expert_stacks"])
        stacks_stored = sum(s["stored_bytes"] for s in info["expert_stacks"])
        experts = sum(s["experts"] for s in info["expert_stacks"])
        lines.append(
            f"expert stacks: {len(info['expert_stacks'])} ({experts} experts), {stacks_dense:,} -> {stacks_stored:,} bytes "
            f"({stacks_stored / max(stacks_dense, 1):.3f} of dense)"
        )
    embeddings = info.get("embeddings")
    if embeddings:
        table = embeddings["spec"]["table"]
        bits = 8 if table["format"] == "int8" else 4
        head = f"the output head {embeddings['tied_head']} reads the same table" if embeddings.get("tied_head") else "untied head listed above"
        lines.append(f"embeddings: {embeddings['embedding']}.table in W{bits}, groups of {table['group_size']}; {head}")
    d, s = info["compressed_dense_bytes"], info["compressed_stored_bytes"]
    lines.append(f"compressed modules: {len(info['modules'])}, {d:,} -> {s:,} bytes ({s / max(d, 1):.3f} of dense)")
    lines.append(
        f"whole checkpoint tensors: {info['checkpoint_tensor_bytes']:,} bytes "
        f"(dense model: {info['dense_equivalent_bytes']:,}, {info['checkpoint_tensor_bytes'] / info['dense_equivalent_bytes']:.3f})"
    )
    return "\n".join(lines)

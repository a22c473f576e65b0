"""Run reports: per-layer records -> report.json (everything) and report.md (a readable table)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from .modules import CompressedLinear
from .metrics import LayerRecord, tensor_bytes


def model_size(model: nn.Module) -> dict[str, int]:
    """Stored values and bytes of the whole model (as served within metrics.serving_dtype),
    counting tied tensors once."""
    seen, values, nbytes = set(), 0, 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.data_ptr() in seen and tensor.device.type != "meta":
            continue
        seen.add(tensor.data_ptr())
        nbytes += tensor_bytes(tensor)
        if tensor.is_floating_point():
            values += tensor.numel()
    return {"values": values, "bytes": nbytes}


def summarize(records: Sequence[LayerRecord], left_dense: Sequence[tuple[int, int]] = ()) -> dict[str, Any]:
    """Totals over the targeted Linears: nominal (values) and true-storage (bytes) ratios.

    A layer refined by a later stage (EoRA) has several records: its last one is what is stored.
    `left_dense`: (values, bytes) of targets the allocator chose to keep dense; they count as
    kept, so the ratios are of the whole target set, as the budget is.
    """
    records = list({r.name: r for r in records}.values())
    kept_values = sum(v for v, _ in left_dense)
    kept_bytes = sum(b for _, b in left_dense)
    params_before = sum(r.params_before for r in records) + kept_values
    values_after = sum(r.values_after for r in records) + kept_values
    bytes_before = sum(r.bytes_before for r in records) + kept_bytes
    bytes_after = sum(r.bytes_after for r in records) + kept_bytes
    return {
        "layers": len(records),
        "layers_left_dense": len(left_dense),
        "params_before": params_before,
        "values_after": values_after,
        "bytes_before": bytes_before,
        "bytes_after": bytes_after,
        "nominal_ratio_removed": 1 - values_after / params_before if params_before else 0.0,
        "storage_ratio_removed": 1 - bytes_after / bytes_before if bytes_before else 0.0,
        "mean_rel_error": sum(r.rel_error for r in records) / len(records) if records else 0.0,
        "mean_rel_weighted_error": _mean([r.rel_weighted_error for r in records]),
        "seconds_in_compressors": sum(r.seconds for r in records),
    }


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def build_report(
    records: Sequence[LayerRecord],
    *,
    recipe: dict[str, Any],
    model_source: str,
    model: nn.Module,
    dense_size: dict[str, int],
    calibration: dict[str, Any],
    block_log: list[dict[str, Any]],
    seconds: float,
    left_dense: Sequence[tuple[int, int]] = (),
) -> dict[str, Any]:
    return {
        "model": model_source,
        "recipe": recipe,
        "calibration": calibration,
        "summary": summarize(records, left_dense),
        "model_size": {"dense": dense_size, "compressed": model_size(model)},
        "wall_seconds": round(seconds, 2),
        "blocks": block_log,
        "layers": [r.as_dict() for r in records],
    }


# A layer whose output error reaches half its output norm on calibration data rarely leaves the
# model usable (plain SVD at 20% collapses SmolLM2 to perplexity 7e8; the usable rows stay far below).
COLLAPSE_WEIGHTED_ERROR = 0.5


def high_error_layers(report: dict[str, Any], threshold: float = COLLAPSE_WEIGHTED_ERROR) -> list[str]:
    """Warnings for the layers whose calibration-weighted error is at least `threshold`."""
    bad = [r for r in report["layers"] if (r["rel_weighted_error"] or 0.0) >= threshold]
    if not bad:
        return []
    worst = sorted(bad, key=lambda r: -r["rel_weighted_error"])[:3]
    names = ", ".join(f"{r['name']} ({r['rel_weighted_error']:.2f})" for r in worst)
    return [
        f"{len(bad)} layer(s) keep less than half of their output (calibration-weighted error >= {threshold}): {names}. "
        "The model will likely collapse: evaluate it before use, or compress less (a lower ratio, a data-aware method)"
    ]


def _fmt_err(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def report_markdown(report: dict[str, Any]) -> str:
    """A human-readable table of a compression run."""
    s = report["summary"]
    size = report["model_size"]
    serve = report.get("serve_dtype", "the stored dtype")
    lines = [
        f"# llmpress compression report: {report['recipe'].get('name', '')}",
        "",
        f"- model: `{report['model']}`",
        f"- calibration: {report['calibration']}",
        f"- wall time: {report['wall_seconds']} s",
        f"- compressed Linears: {s['layers']}"
        + (f" (+{s['layers_left_dense']} targets left dense by the allocation, counted as kept)" if s.get("layers_left_dense") else "")
        + f", values {s['params_before']:,} -> {s['values_after']:,} "
        + (
            f"({100 * s['nominal_ratio_removed']:.1f}% removed)"
            if s["nominal_ratio_removed"] >= 0
            else "(quantized: every 4-bit code, scale and zero point counts as a value; the bytes tell the size)"
        )
        + f", bytes {s['bytes_before']:,} -> {s['bytes_after']:,} "
        f"({100 * s['storage_ratio_removed']:.1f}% removed, as served in {serve}: every index, mask and scale counted)",
        f"- whole model bytes as served in {serve}: {size['dense']['bytes']:,} -> {size['compressed']['bytes']:,} "
        f"({100 * (1 - size['compressed']['bytes'] / max(size['dense']['bytes'], 1)):.1f}% removed, embeddings and head included)"
        + (f"; checkpoint tensors as stored: {size['stored']['bytes']:,}" if "stored" in size else ""),
        f"- mean relative error {_fmt_err(s['mean_rel_error'])}, calibration-weighted {_fmt_err(s['mean_rel_weighted_error'])}",
        *_embeddings_lines(report.get("embeddings"), serve),
        "",
        "| layer | method | format | shape | detail | values before | values after | bytes after/before | rel err | weighted err | s |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines[-2:-2] = _allocation_lines(report.get("allocation"))
    for r in report["layers"]:
        detail = ", ".join(f"{k}={v}" for k, v in r["detail"].items() if k != "bias")
        lines.append(
            f"| {r['name']} | {r['method']} | {r['format']} | {r['out_features']}x{r['in_features']} | {detail} | "
            f"{r['params_before']:,} | {r['values_after']:,} | {r['bytes_after'] / r['bytes_before']:.3f} | "
            f"{r['rel_error']:.4f} | {_fmt_err(r['rel_weighted_error'])} | {r['seconds']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def _embeddings_lines(section: dict[str, Any] | None, serve: str) -> list[str]:
    if not section:
        return []
    head = "the tied head reads the same table" if section["tied"] else (f"head {section['head']} too" if section["head"] else "head kept")
    return [
        f"- embeddings ({section['embedding']}): W{section['bits']} in groups of {section['group_size']}, {head}; "
        f"bytes {section['bytes_before']:,} -> {section['bytes_after']:,} as served in {serve}, "
        f"relative error {section['embedding_rel_error']:.4f}"
    ]


def allocation_grid(allocation: dict[str, Any], field: str = "level") -> tuple[dict[int, dict[str, Any]], list[str]]:
    """({block index: {layer within block: the choice's `field`}}, layer columns in order) of a
    knapsack plan; `field` "method" gives the chosen method (None: left dense)."""
    grid: dict[int, dict[str, Any]] = {}
    for layer in allocation["layers"]:
        parts = layer["name"].split(".")
        at = next((i for i, part in enumerate(parts) if part.isdigit()), len(parts) - 1)  # the block index
        grid.setdefault(int(parts[at]) if parts[at].isdigit() else -1, {})[".".join(parts[at + 1 :])] = layer.get(field)
    return grid, list(dict.fromkeys(c for row in grid.values() for c in row))


def across_methods(allocation: dict[str, Any]) -> bool:
    """Whether a plan chose among several methods (allocation.candidates)."""
    return len(allocation.get("stages") or []) > 1


def _allocation_lines(allocation: dict[str, Any] | None) -> list[str]:
    """The knapsack's chosen level per layer as a block x layer grid (0 = left dense)."""
    if not allocation:
        return []
    if allocation["strategy"] == "uniform":
        return [f"Allocation: uniform, ratio {allocation['ratio']} for every layer of stage {allocation['stage']}.", ""]
    budget = f"ratio {allocation['ratio']}" if allocation.get("ratio") is not None else f"max size {allocation.get('max_size')}"
    methods = across_methods(allocation)
    lines = [
        f"Allocation: knapsack over {len(allocation['layers'])} layers"
        + (f" and {len(allocation['stages'])} methods" if methods else "")
        + f", {allocation['unit']} {allocation['chosen_total']:,} of {allocation['budget']:,} allowed (dense "
        f"{allocation['dense_total']:,}; {budget}), total cost {allocation['total_cost']:.4f}"
        f"{' (' + allocation['cost'] + ')' if allocation.get('cost') else ''}, profiled in {allocation['seconds']:.1f} s."
        + (" Cells: the chosen method and its level." if methods else " Cells: the chosen level (0 = dense)."),
        "",
    ]
    grid, columns = allocation_grid(allocation)
    chosen, _ = allocation_grid(allocation, "method")
    stages, _ = allocation_grid(allocation, "stage")

    def cell(block: int, column: str) -> str:
        if column not in grid[block]:
            return ""
        if chosen[block][column] and stages[block][column] is None:  # an option outside the stages (embeddings)
            return chosen[block][column]
        if not methods:
            return f"{grid[block][column]:.2f}"
        method = chosen[block][column]
        return f"{method} {grid[block][column]:g}" if method else "dense"

    lines += ["| block | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for block in grid:
        lines.append(f"| {block} | " + " | ".join(cell(block, c) for c in columns) + " |")
    return lines + [""]


def write_report(report: dict[str, Any], directory: str | Path) -> None:
    directory = Path(directory)
    (directory / "report.json").write_text(json.dumps(report, indent=2))
    (directory / "report.md").write_text(report_markdown(report))


def compressed_modules(model: nn.Module) -> dict[str, CompressedLinear]:
    """The outermost compressed modules by name (an EoRA wrapper, not also the base inside it)."""
    found: dict[str, CompressedLinear] = {}
    for name, module in model.named_modules():
        if isinstance(module, CompressedLinear) and not any(name.startswith(f"{outer}.") for outer in found):
            found[name] = module
    return found

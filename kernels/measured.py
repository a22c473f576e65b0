"""Measured kernel speeds, and the rule dispatch takes from them: in `auto` mode a Triton kernel
measured slower than cuBLAS's dense product on this GPU, at this many tokens, is not used.

`python -m compress.eval.bench_kernels` on a GPU writes OUT/dispatch.json: per kernel and token
count, the worst speedup over dense fp16 `F.linear` across the benchmarked shapes and sparsities.
Tables committed under kernels/measured/ ship with the package; LLMPRESS_KERNEL_TABLES adds
others (paths separated by the OS path separator). A table applies to the GPU whose name it
records, for inputs of the dtype it records (`--dtype` of bench_kernels: fp16 or bf16). For n tokens the entry at the smallest measured count >= n is used (the largest
measured count beyond it), so every count in a dispatch token class gets the same answer.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

SHIPPED = Path(__file__).parent / "measured"


@lru_cache(maxsize=None)
def tables() -> tuple[dict, ...]:
    """Every readable table: the shipped ones, then LLMPRESS_KERNEL_TABLES."""
    paths = sorted(SHIPPED.glob("*.json")) if SHIPPED.is_dir() else []
    paths += [Path(p) for p in os.environ.get("LLMPRESS_KERNEL_TABLES", "").split(os.pathsep) if p]
    out = []
    for path in paths:
        try:
            table = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"kernel speed table {path} is unreadable ({error}); fix or remove it") from None
        if not isinstance(table, dict) or "device" not in table or not isinstance(table.get("entries"), list):
            raise ValueError(f"kernel speed table {path} has no 'device' and 'entries': write it with compress.eval.bench_kernels")
        out.append({**table, "source": str(path)})
    return tuple(out)


def forget_tables() -> None:
    """Re-read the tables on next use (after LLMPRESS_KERNEL_TABLES changed)."""
    tables.cache_clear()


def token_counts(kernel_names: set[str]) -> tuple[int, ...]:
    """The token counts measured for these kernels on any device (dispatch's class bounds)."""
    return tuple(sorted({e["tokens"] for t in tables() for e in t["entries"] if e["kernel"] in kernel_names}))


def measured(kernel: str, device_name: str, tokens: int, dtype: str | None = None) -> tuple[float, str] | None:
    """(speedup over dense, where it comes from) of `kernel` on `device_name` for `tokens`, or None.
    `dtype` ("torch.bfloat16"): only tables measured in that dtype apply (a kernel's fp16 and bf16
    paths differ: bf16 dequantizes differently); tables that record none apply to every dtype."""
    found = [
        (e, t)
        for t in tables()
        if t["device"] == device_name and (dtype is None or t.get("dtype") in (None, dtype))
        for e in t["entries"]
        if e["kernel"] == kernel
    ]
    if not found:
        return None
    above = [(e, t) for e, t in found if e["tokens"] >= tokens]
    entry, table = min(above, key=lambda et: et[0]["tokens"]) if above else max(found, key=lambda et: et[0]["tokens"])
    return float(entry["speedup"]), f"{table['source']}, N={entry['tokens']}"

"""Kernel selection for compressed modules (installed as `compress.kernels`).

Each format registers implementations: a PyTorch reference (priority 0, runs anywhere) and
Triton kernels, each declaring what it can serve: `supports(module, x)` (device, dtype, shape
divisibility; None = yes, else the reason) and `max_auto_tokens` (decode kernels leave longer
inputs, prefill, to cuBLAS through the reference in `auto` mode). Each kernel file holds the
kernel, its launcher and its reference together.

The choice is made once per module and (device, dtype, token class, mode), then cached on the
module (`dispatch`); moving the module (`.to()`) forgets it. On a GPU with a measured speed
table (kernels/measured.py, written by eval/bench_kernels.py), `auto` skips a Triton kernel
measured slower than the dense cuBLAS product at that token count; the next kernel serves. The mode comes from
`LLMPRESS_KERNEL` read once (`torch` forces the references, `triton` insists on a Triton kernel
and raises if none fits, saying why, `auto`, the default, picks the best that fits) or from
`set_kernel_mode`.
"""

from __future__ import annotations

import bisect
import os
from contextlib import contextmanager
from functools import lru_cache
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from .measured import forget_tables, measured, token_counts
from .runtime import (  # noqa: F401  (re-exported for the pipelines, modules and reports)
    cpu_cache_bytes,
    cpu_cache_limit,
    expanded_reference,
    expanded_weights_cached,
    forget_cpu_cache,
    set_cpu_cache_limit,
)

KERNEL_MODES = ("auto", "torch", "triton")
# the Triton kernels are tuned for decode; in `auto`, longer inputs (prefill) go to the PyTorch
# path, where cuBLAS runs compute-bound GEMMs better than these memory-bound designs
MAX_AUTO_TOKENS = 64


@dataclass(frozen=True)
class Kernel:
    format: str
    name: str
    fn: Callable
    priority: int
    # None = ok, else why not; it may look at x's device, dtype and width, not at its token count
    # (that is `max_auto_tokens`), since the choice is cached per token class
    supports: Callable[[torch.nn.Module, torch.Tensor], str | None]
    backend: str  # "torch" or "triton"
    max_auto_tokens: int | None = None  # tokens it serves in auto mode (None: any number)


_REGISTRY: dict[str, list[Kernel]] = {}
_TOKEN_LIMITS: dict[str, tuple[int, ...]] = {}  # per format: the max_auto_tokens its kernels declare
_MODE: list[str] = []  # the mode, once read


def _always(module, x) -> str | None:
    return None


def register_kernel(
    fmt: str, name: str, fn: Callable, priority: int, supports=_always, backend: str = "torch", max_auto_tokens: int | None = None
) -> None:
    kernels = [k for k in _REGISTRY.get(fmt, []) if k.name != name]
    kernels.append(Kernel(fmt, name, fn, priority, supports, backend, max_auto_tokens))
    _REGISTRY[fmt] = sorted(kernels, key=lambda k: -k.priority)
    _TOKEN_LIMITS[fmt] = tuple(sorted({k.max_auto_tokens for k in kernels if k.max_auto_tokens is not None}))
    _token_bounds.cache_clear()


def forget_measured() -> None:
    """Re-read the measured speed tables (LLMPRESS_KERNEL_TABLES changed); modules choose again
    on their next call only after `forget_kernel_choice`."""
    forget_tables()
    _token_bounds.cache_clear()


def _check_mode(mode: str, source: str) -> str:
    mode = mode.lower()
    if mode not in KERNEL_MODES:
        raise ValueError(f"{source}={mode!r} is not one of {KERNEL_MODES}")
    return mode


def kernel_mode() -> str:
    """auto, torch or triton: LLMPRESS_KERNEL when first asked, or what `set_kernel_mode` set."""
    if not _MODE:
        _MODE.append(_check_mode(os.environ.get("LLMPRESS_KERNEL", "auto"), "LLMPRESS_KERNEL"))
    return _MODE[0]


def set_kernel_mode(mode: str) -> None:
    _MODE[:] = [_check_mode(mode, "kernel mode")]


@contextmanager
def use_kernel_mode(mode: str) -> Iterator[None]:
    """Within the context, select kernels in `mode` (tests, benchmarks)."""
    before = kernel_mode()
    set_kernel_mode(mode)
    try:
        yield
    finally:
        set_kernel_mode(before)


def available(fmt: str) -> list[Kernel]:
    return list(_REGISTRY.get(fmt, []))


def _tokens(x: torch.Tensor) -> int:
    return x.numel() // max(1, x.shape[-1])


def measured_device(x: torch.Tensor) -> str | None:
    """The GPU name speed tables are keyed by (None off CUDA: nothing is measured there)."""
    return torch.cuda.get_device_name(x.device) if x.device.type == "cuda" else None


def refusal(kernel: Kernel, module: torch.nn.Module, x: torch.Tensor, mode: str) -> str | None:
    """Why `kernel` may not serve this call in `mode` (None: it may)."""
    if mode != "auto" and kernel.backend != mode:
        return f"mode {mode} excludes {kernel.backend} kernels"
    if mode == "auto" and kernel.max_auto_tokens is not None and _tokens(x) > kernel.max_auto_tokens:
        return f"{_tokens(x)} tokens (prefill): it serves at most {kernel.max_auto_tokens} in auto mode; cuBLAS does better here"
    device = measured_device(x)
    if mode == "auto" and kernel.backend == "triton" and device is not None:
        speed = measured(kernel.name, device, _tokens(x), str(x.dtype))
        if speed is not None and speed[0] < 1.0:
            return f"measured {speed[0]:.2f}x the dense cuBLAS product on {device} ({speed[1]}): slower than dense"
    return kernel.supports(module, x)


def select(fmt: str, module: torch.nn.Module, x: torch.Tensor) -> Kernel:
    """The kernel for this call: the highest-priority one that may serve it (not cached)."""
    mode = kernel_mode()
    kernels = _REGISTRY.get(fmt)
    if not kernels:
        raise KeyError(f"no kernel registered for format {fmt!r}")
    refusals = []
    for kernel in kernels:
        why = refusal(kernel, module, x, mode)
        if why is None:
            return kernel
        if mode == "auto" or kernel.backend == mode:
            refusals.append(f"{kernel.name}: {why}")
    raise RuntimeError(
        f"LLMPRESS_KERNEL={mode}: no {mode} kernel for format {fmt!r} fits this call "
        f"(x {tuple(x.shape)} {x.dtype} on {x.device}); " + ("; ".join(refusals) or "none registered")
    )


@lru_cache(maxsize=None)
def _token_bounds(fmt: str) -> tuple[int, ...]:
    """Where the format's token classes end: its kernels' max_auto_tokens and measured counts."""
    names = {k.name for k in _REGISTRY.get(fmt, [])}
    return tuple(sorted(set(_TOKEN_LIMITS.get(fmt, ())) | set(token_counts(names))))


def dispatch(fmt: str, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run the module's kernel for x, chosen on the first call of each (device, dtype, token class,
    mode) and remembered on the module. The token class is where x's token count falls among the
    format's declared `max_auto_tokens`, the only way the count enters the choice."""
    mode = kernel_mode()
    key = (x.device, x.dtype, bisect.bisect_left(_token_bounds(fmt), _tokens(x)), mode)
    chosen = module.__dict__.setdefault("_kernel_choice", {})
    kernel = chosen.get(key)
    if kernel is None:
        kernel = chosen[key] = select(fmt, module, x)
    return kernel.fn(module, x)


def serving_notes(formats: set[str]) -> list[str]:
    """One line per format: which kernels may serve it on this machine, with their measured speed
    against the dense cuBLAS product where a table exists for this GPU (`llmpress inspect`)."""
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    lines = []
    for fmt in sorted(formats):
        names = [k.name for k in available(fmt) if k.backend == "triton"]
        if device is None:
            lines.append(f"{fmt}: no CUDA device here, so the PyTorch reference (expanded weight, kept in the CPU cache); Triton: {', '.join(names)}")
            continue
        parts = []
        for name in names:
            speeds = {n: measured(name, device, n) for n in (1, 16)}
            if all(v is None for v in speeds.values()):
                parts.append(f"{name} not measured on {device}")
                continue
            said = [f"{v[0]:.2f}x at N={n}" + (" (skipped: slower than dense)" if v[0] < 1 else "") for n, v in speeds.items() if v]
            parts.append(f"{name} " + ", ".join(said))
        lines.append(f"{fmt} on {device}: " + "; ".join(parts))
    return lines


def forget_kernel_choice(module: torch.nn.Module) -> None:
    """Drop the cached choice (the module's storage moved: device, dtype)."""
    module.__dict__.pop("_kernel_choice", None)


def _register_kernels() -> None:
    """Each format's PyTorch reference, and its Triton kernels, preferred where they fit."""
    from .bitmap_matmul import sparse_forward_triton, sparse_refusal
    from .delta_matmul import delta_forward_triton, delta_refusal
    from .ell_matmul import dict_forward_triton, dict_reference, dict_refusal
    from .gqsa_matmul import gqsa_forward_triton, gqsa_refusal
    from .int4_matmul import int4_forward_triton, int4_refusal
    from .int8_matmul import int8_forward_triton, int8_refusal
    from .lowbit_matmul import lowbit_forward_triton, lowbit_refusal
    from .nm_matmul import nm24_forward_triton, nm24_refusal
    from .lowrank_matmul import eora_forward_triton, eora_reference, lowrank_forward_triton, lowrank_reference, lowrank_refusal
    from .tile_sparse_matmul import tile_sparse_forward_triton, tile_sparse_refusal

    for fmt, reference, name, fn, supports in (
        ("lowrank", lowrank_reference, "triton_lowrank", lowrank_forward_triton, lowrank_refusal),
        ("eora", eora_reference, "triton_eora", eora_forward_triton, lowrank_refusal),
        ("dict", dict_reference, "triton_dict", dict_forward_triton, dict_refusal),
        ("gqsa", expanded_reference, "triton_gqsa", gqsa_forward_triton, gqsa_refusal),
        ("int8", expanded_reference, "triton_int8", int8_forward_triton, int8_refusal),
        ("lowbit", expanded_reference, "triton_lowbit", lowbit_forward_triton, lowbit_refusal),
        ("sparse_bitmap", expanded_reference, "triton_bitmap", sparse_forward_triton, sparse_refusal),
        ("sparse_delta", expanded_reference, "triton_delta", delta_forward_triton, delta_refusal),
        ("tile_sparse", expanded_reference, "triton_tile_sparse", tile_sparse_forward_triton, tile_sparse_refusal),
    ):
        register_kernel(fmt, "torch", reference, priority=0)
        register_kernel(fmt, name, fn, priority=10, supports=supports, backend="triton", max_auto_tokens=MAX_AUTO_TOKENS)
    # exact 2:4 masks: a decode that needs no offsets, before the per-element bitmap kernel
    register_kernel(
        "sparse_bitmap", "triton_2of4", nm24_forward_triton, priority=20, supports=nm24_refusal, backend="triton",
        max_auto_tokens=MAX_AUTO_TOKENS,
    )  # fmt: skip
    # W4 with every group kept goes to tensor cores before the group-sparse gather kernel
    register_kernel(
        "gqsa", "triton_int4", int4_forward_triton, priority=20, supports=int4_refusal, backend="triton",
        max_auto_tokens=MAX_AUTO_TOKENS,
    )  # fmt: skip


_register_kernels()

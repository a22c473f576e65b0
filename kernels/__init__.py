"""Kernel selection for compressed modules (installed as `compress.kernels`).

Each format registers implementations with a priority and a `supports(module, x)` predicate
(device, dtype, shape divisibility). A module's forward calls `dispatch(format, module, x)`,
which runs the highest-priority implementation that supports the call. The PyTorch reference
of every format is registered with priority 0 and supports everything, so a call always has a
path. `LLMPRESS_KERNEL=torch` forces the references, `triton` insists on a Triton kernel (and
raises if none fits, saying why), `auto` (default) picks the best that fits.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

KERNEL_MODES = ("auto", "torch", "triton")


@dataclass(frozen=True)
class Kernel:
    format: str
    name: str
    fn: Callable
    priority: int
    supports: Callable[[torch.nn.Module, torch.Tensor], str | None]  # None = ok, else why not
    backend: str  # "torch" or "triton"


_REGISTRY: dict[str, list[Kernel]] = {}


def _always(module, x) -> str | None:
    return None


def register_kernel(fmt: str, name: str, fn: Callable, priority: int, supports=_always, backend: str = "torch") -> None:
    kernels = [k for k in _REGISTRY.get(fmt, []) if k.name != name]
    kernels.append(Kernel(fmt, name, fn, priority, supports, backend))
    _REGISTRY[fmt] = sorted(kernels, key=lambda k: -k.priority)


def kernel_mode() -> str:
    mode = os.environ.get("LLMPRESS_KERNEL", "auto").lower()
    if mode not in KERNEL_MODES:
        raise ValueError(f"LLMPRESS_KERNEL={mode!r} is not one of {KERNEL_MODES}")
    return mode


def available(fmt: str) -> list[Kernel]:
    return list(_REGISTRY.get(fmt, []))


def select(fmt: str, module: torch.nn.Module, x: torch.Tensor) -> Kernel:
    """The kernel `dispatch` would run for this call, honouring LLMPRESS_KERNEL."""
    mode = kernel_mode()
    kernels = _REGISTRY.get(fmt)
    if not kernels:
        raise KeyError(f"no kernel registered for format {fmt!r}")
    refusals = []
    for kernel in kernels:
        if mode != "auto" and kernel.backend != mode:
            continue
        why = kernel.supports(module, x)
        if why is None:
            return kernel
        refusals.append(f"{kernel.name}: {why}")
    raise RuntimeError(
        f"LLMPRESS_KERNEL={mode}: no {mode} kernel for format {fmt!r} fits this call "
        f"(x {tuple(x.shape)} {x.dtype} on {x.device}); " + ("; ".join(refusals) or "none registered")
    )


def dispatch(fmt: str, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return select(fmt, module, x).fn(module, x)


def _register_triton_kernels() -> None:
    """The Triton kernel of each format, preferred to its PyTorch reference where it fits."""
    from .bitmap_matmul import sparse_forward_triton, sparse_refusal
    from .ell_matmul import dict_forward_triton, dict_refusal
    from .gqsa_matmul import gqsa_forward_triton, gqsa_refusal
    from .int4_matmul import int4_forward_triton, int4_refusal
    from .lowrank_matmul import (
        eora_forward_triton,
        lowrank_forward_triton,
        lowrank_refusal,
    )
    from .tile_sparse_matmul import tile_sparse_forward_triton, tile_sparse_refusal

    for fmt, name, fn, supports in (
        ("lowrank", "triton_lowrank", lowrank_forward_triton, lowrank_refusal),
        ("eora", "triton_eora", eora_forward_triton, lowrank_refusal),
        ("dict", "triton_dict", dict_forward_triton, dict_refusal),
        ("gqsa", "triton_gqsa", gqsa_forward_triton, gqsa_refusal),
        ("sparse_bitmap", "triton_bitmap", sparse_forward_triton, sparse_refusal),
        ("tile_sparse", "triton_tile_sparse", tile_sparse_forward_triton, tile_sparse_refusal),
    ):
        register_kernel(fmt, name, fn, priority=10, supports=supports, backend="triton")
    # W4 with every group kept goes to tensor cores before the group-sparse gather kernel
    register_kernel("gqsa", "triton_int4", int4_forward_triton, priority=20, supports=int4_refusal, backend="triton")


_register_triton_kernels()

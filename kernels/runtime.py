"""Where a Triton launch may run, and the checks every launcher shares.

Triton kernels run on CUDA devices. On a CPU they run only under Triton's interpreter
(`TRITON_INTERPRET=1`, set before triton is imported) and only when asked for with
`LLMPRESS_KERNEL=triton`: the interpreter is a correctness tool, thousands of times slower than
the PyTorch path, so `auto` never picks it.
"""

from __future__ import annotations

import os
import weakref
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

try:
    import triton
    import triton.language as tl

    _IMPORT_ERROR: str | None = None
except Exception as error:  # pragma: no cover - ImportError, or a broken install raising anything else
    triton = tl = None
    _IMPORT_ERROR = f"triton is not importable ({error}); pip install triton"

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def launch_refusal(x: torch.Tensor, *tensors: torch.Tensor, dispatching: bool = True) -> str | None:
    """None when a Triton kernel may run on these tensors, else the reason it may not.
    `dispatching`: asked by the module dispatcher, which sends CPU calls to the interpreter only
    under LLMPRESS_KERNEL=triton; a launcher called directly runs there whenever interpreting."""
    from . import kernel_mode

    if _IMPORT_ERROR:
        return _IMPORT_ERROR
    devices = {t.device for t in (x, *tensors)}
    if len(devices) > 1:
        return f"tensors on several devices {sorted(map(str, devices))}; move the module to the input's device"
    if x.device.type == "cpu":
        if not interpreting():
            return "input on the CPU: Triton kernels need a CUDA device (TRITON_INTERPRET=1 runs them in the CPU interpreter, for tests)"
        if dispatching and kernel_mode() != "triton":
            return "the CPU interpreter runs only with LLMPRESS_KERNEL=triton (it is a correctness tool, not a fast path)"
    elif x.device.type != "cuda":
        return f"input on {x.device}: Triton kernels need a CUDA device"
    if x.dtype not in FLOAT_DTYPES:
        return f"input dtype {x.dtype} is not one of float16, bfloat16, float32"
    return None


def check_launch(x: torch.Tensor, *tensors: torch.Tensor) -> None:
    """Raise with the reason when a launcher is called on tensors no kernel can take."""
    if _IMPORT_ERROR:
        raise RuntimeError(_IMPORT_ERROR)
    why = launch_refusal(x, *tensors, dispatching=False)
    if why is not None:
        raise ValueError(why)


def check_group_codes(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> None:
    """The storage checks of the group-quantized launchers (W8, W3/W2): uint8 codes (M, groups, …),
    scales and uint8 zero points (M, groups), all contiguous."""
    m, groups = qweight.shape[:2]
    if scales.shape != (m, groups) or zeros.shape != (m, groups):
        raise ValueError("scales and zeros must be (out_features, groups)")
    if qweight.dtype != torch.uint8 or zeros.dtype != torch.uint8:
        raise ValueError("qweight and zeros must be uint8")
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Whether tiles are upcast to fp32 before `tl.dot`: always for fp32 inputs (exact IEEE
    products, not tf32), and in the interpreter, whose bf16 dot returns garbage."""
    return dtype == torch.float32 or interpreting()


def ptx_applies(x: torch.Tensor, stored: torch.dtype) -> bool:
    """Whether a kernel's inline-PTX dequantization serves x: fp16/bf16 inputs whose stored 16-bit
    floats (scales, values) have x's dtype, on a GPU (Triton's interpreter cannot run PTX)."""
    return not interpreting() and x.dtype in (torch.float16, torch.bfloat16) and stored == x.dtype


def choose_ptx(x: torch.Tensor, stored: torch.dtype, ptx: bool | None) -> bool:
    """Whether a tensor-core kernel dequantizes in PTX: `ptx` as asked (refused with the reason
    where the PTX cannot serve x), else `ptx_applies`."""
    if ptx is None:
        return ptx_applies(x, stored)
    if ptx and (x.dtype not in (torch.float16, torch.bfloat16) or stored != x.dtype):
        raise ValueError(f"the PTX dequantization needs fp16 or bf16 inputs and scales of the same dtype, got {x.dtype} and {stored}")
    return ptx


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_k_plan(steps: int, programs: int, device: torch.device, min_steps: int, requested: int | None = None) -> tuple[int, int]:
    """(splits, steps per split) for a K loop of `steps` steps run by `programs` output tiles:
    enough splits for about two waves of the SMs, each at least `min_steps` steps deep, a power of
    two (`requested` overrides the count); no split is left empty."""
    if requested is None:
        requested = max(1, min(2 * num_sms(device) // programs, steps // min_steps))
        requested = 1 << (requested.bit_length() - 1)
    per_split = triton.cdiv(steps, requested)
    return triton.cdiv(steps, per_split), per_split


def token_block(n: int) -> int:
    """BLOCK_N of the tensor-core kernels for n tokens: a power of two in [16, 64] (tl.dot's minimum
    is 16; more tokens take more programs)."""
    return min(64, max(16, next_pow2(n)))


def gemm_config(m: int, n: int, k: int, device: torch.device, block_m: int, block_k: int, min_steps: int, split_k: int | None = None) -> dict[str, int]:
    """Tiles and split-K of a K-looping kernel over an (m × k) weight and n tokens."""
    block_n = token_block(n)
    programs = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    splits, per_split = split_k_plan(triton.cdiv(k, block_k), programs, device, min_steps, split_k)
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "split_k": splits, "k_per_split": per_split * block_k}


def cached_on(module, name: str, key: tuple, compute: Callable[[], Any]) -> Any:
    """Data a kernel derives from a module's storage, kept on the module (never saved) and
    recomputed only when `key` (see `storage_key`) changes: decode steps reuse it."""
    slot = module.__dict__.get(name)
    if slot is None or slot[0] != key:
        slot = (key, compute())
        module.__dict__[name] = slot
    return slot[1]


_EXPANDED: list[dict] = []  # active `expanded_weights_cached` scopes, innermost last


@contextmanager
def expanded_weights_cached() -> Iterator[None]:
    """Within the context, the PyTorch references that expand a compressed weight to dense
    (sparse, tile-sparse, GQSA, a dictionary's coefficients) expand each module once and reuse it;
    the copies are dropped on exit. For many calls on the same unchanged modules: a pipeline runs
    every calibration batch through a compressed block (one dense copy per layer of one block at a
    time). Inside a scope the process-wide CPU cache below is not used."""
    scope: dict = {}
    _EXPANDED.append(scope)
    try:
        yield
    finally:
        _EXPANDED.remove(scope)
        scope.clear()


# Outside any scope, modules on the CPU keep their expansion for the life of the module (the
# references would otherwise rebuild the dense weight on every call: 26x the dense time for a
# generated token with 50% sparse layers). Bounded by LLMPRESS_CPU_WEIGHT_CACHE: `auto` (the
# default: 40% of physical memory), a size such as 8GB, or 0/off. A module past the bound expands
# per call, as before. Entries are invalidated when the module's storage changes and dropped when
# it is moved or garbage-collected.
_CPU_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()
_CPU_CACHE_LIMIT: list[int] = []  # the bound in bytes, once read


def cpu_cache_limit() -> int:
    """Bytes the process-wide CPU cache of expanded weights may hold (LLMPRESS_CPU_WEIGHT_CACHE)."""
    if not _CPU_CACHE_LIMIT:
        _CPU_CACHE_LIMIT.append(_parse_cache_limit(os.environ.get("LLMPRESS_CPU_WEIGHT_CACHE", "auto")))
    return _CPU_CACHE_LIMIT[0]


def set_cpu_cache_limit(limit: int | str) -> None:
    """Bound the CPU cache (bytes, a size string, `auto` or `off`); entries over it are dropped."""
    _CPU_CACHE_LIMIT[:] = [_parse_cache_limit(limit)]
    if cpu_cache_bytes() > _CPU_CACHE_LIMIT[0]:
        _CPU_CACHE.clear()


def _parse_cache_limit(value: int | str) -> int:
    if isinstance(value, int):
        return max(0, value)
    text = value.strip().lower()
    if text in ("0", "off", "no", "false", "none"):
        return 0
    if text == "auto":
        try:
            return int(0.4 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        except (ValueError, OSError, AttributeError):  # not a POSIX system
            return 8 * 2**30
    units = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "b": 1}
    for unit in sorted(units, key=len, reverse=True):
        if text.endswith(unit):
            number = text[: -len(unit)].strip()
            break
    else:
        unit, number = "b", text
    try:
        return int(float(number) * units[unit])
    except ValueError:
        raise ValueError(
            f"LLMPRESS_CPU_WEIGHT_CACHE={value!r} is not a size: use auto, off, or bytes such as 8GB or 500MiB"
        ) from None


def cpu_cache_bytes(model: torch.nn.Module | None = None) -> int:
    """Bytes of expanded weights the CPU cache holds (for `model`'s modules only, when given)."""
    modules = _CPU_CACHE.keys() if model is None else (m for m in model.modules() if m in _CPU_CACHE)
    return sum(t.numel() * t.element_size() for m in list(modules) for _, t in _CPU_CACHE.get(m, {}).values())


def forget_cpu_cache(module: torch.nn.Module) -> None:
    _CPU_CACHE.pop(module, None)


def _module_key(module: torch.nn.Module) -> tuple:
    """The storage keys of the module's own tensors (direct dict reads: this runs on every call)."""
    tensors = [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]
    return tuple((t.data_ptr(), t._version) for t in tensors)


def expanded_weight(module, dtype: torch.dtype, part: str = "weight", compute: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """`module.to_dense()` (or `compute()`, another dense `part` of it) in `dtype`, computed once per
    module inside `expanded_weights_cached`, or kept in the bounded CPU cache for a module on the
    CPU whose storage does not require grad; else computed per call."""
    build = (lambda: compute().to(dtype)) if compute is not None else (lambda: module.to_dense().to(dtype))
    if _EXPANDED:
        scope = _EXPANDED[-1]
        hit = scope.get((id(module), part, dtype))
        if hit is None or hit[0] is not module:
            hit = scope[(id(module), part, dtype)] = (module, build())
        return hit[1]
    params = [p for p in module._parameters.values() if p is not None]
    if not params or params[0].device.type != "cpu" or any(p.requires_grad for p in params) or not cpu_cache_limit():
        return build()
    entries = _CPU_CACHE.get(module)
    key = _module_key(module)
    hit = entries.get((part, dtype)) if entries else None
    if hit is not None and hit[0] == key:
        return hit[1]
    value = build()
    if cpu_cache_bytes() - (hit[1].numel() * hit[1].element_size() if hit else 0) + value.numel() * value.element_size() <= cpu_cache_limit():
        _CPU_CACHE.setdefault(module, {})[(part, dtype)] = (key, value)
    return value


def expanded_reference(module, x: torch.Tensor) -> torch.Tensor:
    """The PyTorch reference of a format whose module can expand to its dense weight (sparse,
    tile-sparse, delta, GQSA, W8, W3/W2): that weight (cached as `expanded_weight` says), then
    one dense product. The kernels never form it."""
    return torch.nn.functional.linear(x, expanded_weight(module, x.dtype), module.bias)


def storage_key(t: torch.Tensor) -> tuple:
    """What identifies a tensor's content for `cached_on`: its memory, version counter and device."""
    return (t.data_ptr(), t._version, str(t.device))


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def flat_tokens(x: torch.Tensor) -> torch.Tensor:
    """(..., K) -> (N, K) with unit stride along K (the kernels read rows of K)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def output_like(x: torch.Tensor, features: int) -> torch.Tensor:
    """The (..., features) output of a layer applied to x, in x's dtype, not yet written."""
    return torch.empty(*x.shape[:-1], features, dtype=x.dtype, device=x.device)


class SplitK:
    """Where a split-K launch writes: straight into y (N, M) when there is one split, else into an
    fp32 workspace of per-split partial sums that `finish` reduces (deterministic, no atomics)."""

    def __init__(self, y2: torch.Tensor, splits: int):
        self.y2 = y2
        self.single = splits == 1
        n, m = y2.shape
        self.target = y2 if self.single else torch.empty(splits, n, m, dtype=torch.float32, device=y2.device)
        self.split_stride = 0 if self.single else n * m

    def finish(self, bias: torch.Tensor | None, accumulate: bool = False) -> None:
        """Sum the partials, add the bias (and y's old content when accumulating) and write y.
        With one split the kernel has done all of this itself."""
        if self.single:
            return
        total = self.target.sum(0)
        if bias is not None:
            total += bias.float()
        if accumulate:
            total += self.y2.float()
        self.y2.copy_(total)


if triton is not None:

    @triton.jit
    def in_column_order(c0, c1, c2, c3):
        """(…, 4) from four tensors holding columns 0..3 of each position (a PTX program's outputs).
        tl.join adds its axis last, so the inner joins hold the outer index: (…, 2, 2) flattens to
        column 2k + l for the inner join's k and the outer's l. In this order the pairs (c0, c1) and
        (c2, c3) stay in the 32-bit registers the PTX wrote them to (no repacking before the tile
        goes to shared memory)."""
        return tl.join(tl.join(c0, c2), tl.join(c1, c3))


def launch_group_lanes(kernel, x2: torch.Tensor, out: torch.Tensor, qweight, scales, zeros, bias, block_n: int, block_m: int, **meta) -> None:
    """Launch a group-quantized CUDA-core kernel (W8 `_int8_kernel`: its arguments, plus the
    kernel's own constexprs in `meta`). Token tiles vary fastest in the grid,
    so the programs sharing a weight tile run together and it is read from HBM once."""
    m, n, k = out.shape[-1], x2.shape[0], x2.shape[1]
    block_m = 16 if interpreting() else block_m
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    kernel[grid](
        x2, qweight, scales, zeros, bias if bias is not None else scales, out,
        m, n, k, x2.stride(0), m,
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, **meta,
    )  # fmt: skip


def launch_group_dot(
    kernel, x: torch.Tensor, x2: torch.Tensor, out: torch.Tensor, qweight, scales, zeros, bias, group: int, split_k: int | None,
    step: int = 1, **meta: int,
) -> None:  # fmt: skip
    """Launch a group-quantized tensor-core kernel (W4 `_int4_kernel`, W8 `_int8_dot_kernel`, W3/W2
    `_lowbit_dot_kernel`: the same arguments, plus the kernel's own constexprs in `meta`) over
    (out_features × K/group) codes: 64-row tiles, split-K over the K steps of `step` groups each
    (`step` divides K/group)."""
    m, groups = scales.shape[0], x2.shape[1] // group
    n = x2.shape[0]
    block_m = 32 if interpreting() else 64
    block_n = token_block(n)
    programs = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    splits, steps_per_split = split_k_plan(groups // step, programs, x.device, 4, split_k)
    split = SplitK(out.view(n, m), splits)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), splits)
    kernel[grid](
        x2, qweight, scales, zeros, bias if bias is not None else scales, split.target,
        m, n, groups, steps_per_split * step, x2.stride(0), split.target.stride(-2), split.split_stride,
        HAS_BIAS=split.single and bias is not None, DOT_FP32=dot_in_fp32(x.dtype), GROUP=group,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4, num_stages=1, **meta,
    )  # fmt: skip
    split.finish(bias)

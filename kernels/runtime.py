"""Where a Triton launch may run, and the checks every launcher shares.

Triton kernels run on CUDA devices. On a CPU they run only under Triton's interpreter
(`TRITON_INTERPRET=1`, set before triton is imported) and only when asked for with
`LLMPRESS_KERNEL=triton`: the interpreter is a correctness tool, thousands of times slower than
the PyTorch path, so `auto` never picks it.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a dependency on Linux; launchers then refuse
    triton = tl = None

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# the kernels are tuned for decode; in `auto`, longer inputs (prefill) go to the PyTorch path,
# where cuBLAS runs compute-bound GEMMs better than these memory-bound designs
MAX_AUTO_TOKENS = 64


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as error:  # ImportError, or a broken install raising anything else
        return f"triton is not importable ({error}); pip install triton"
    return None


def launch_refusal(x: torch.Tensor, *tensors: torch.Tensor, dispatching: bool = True) -> str | None:
    """None when a Triton kernel may run on these tensors, else the reason it may not.
    `dispatching`: asked by the module dispatcher, which sends CPU calls to the interpreter only
    under LLMPRESS_KERNEL=triton; a launcher called directly runs there whenever interpreting."""
    from . import kernel_mode

    why = triton_import_error()
    if why:
        return why
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
    tokens = x.numel() // max(1, x.shape[-1])
    if dispatching and tokens > MAX_AUTO_TOKENS and kernel_mode() == "auto":
        return f"{tokens} tokens (prefill): the decode kernels serve at most {MAX_AUTO_TOKENS} in auto mode; cuBLAS does better here"
    return None


def check_launch(x: torch.Tensor, *tensors: torch.Tensor) -> None:
    """Raise with the reason when a launcher is called on tensors no kernel can take."""
    why = launch_refusal(x, *tensors, dispatching=False)
    if why is not None:
        raise ValueError(why)


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Whether tiles are upcast to fp32 before `tl.dot`: always for fp32 inputs (exact IEEE
    products, not tf32), and in the interpreter, whose bf16 dot returns garbage."""
    return dtype == torch.float32 or interpreting()


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


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

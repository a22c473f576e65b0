"""Kernel benchmark: each compressed format's Triton kernel against cuBLAS dense (F.linear),
torch.sparse CSR and torch's 2:4 semi-structured sparsity, at decode shapes.

    python -m compress.eval.bench_kernels --out runs/bench-kernels            # on a CUDA GPU

For every weight shape (out x in, Llama-3-8B/70B layers by default), token count N and sparsity it
builds the compressed module from a random fp16 weight, checks its output against the dense
product of its own `to_dense()` (relative error), and times it with `triton.testing.do_bench`
(median). Weight memory is cycled through enough copies that one pass reads more bytes than the
L2 cache holds, so each call reads its weight from HBM as decode does. Reported per row: µs,
speedup over dense, the byte limit (dense bytes / compressed bytes, metadata included) and the
fraction of it reached. Writes OUT/results.json and OUT/results.md. Without a GPU it runs tiny
shapes through the PyTorch references only (to check the script, not to measure anything).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from compress.compressors.masks import tile_mask
from compress.compressors.rtn import quantize_groups
from compress.modules import (
    CompressedLinear, DeltaSparseLinear, GQSALinear, Int8Linear, LowBitLinear, LowRankLinear, SparseLinear, TileSparseLinear,
)  # fmt: skip
from compress.modules.dictionary import DictLinear

SHAPES = ["4096x4096", "14336x4096", "4096x14336", "28672x8192", "8192x28672"]
L2_BYTES = 50 * 2**20  # H100; weights are cycled to read at least 3x this per pass


@dataclass
class Case:
    name: str  # e.g. "tile_sparse 75%"
    build: Callable[[torch.Tensor], CompressedLinear | torch.Tensor | Callable]
    kind: str  # "ours", "dense", "csr", "2:4"


def random_gqsa(weight: torch.Tensor, group: int, keep_fraction: float) -> GQSALinear:
    """Round-to-nearest asymmetric INT4 of the groups with the largest norms (a speed fixture,
    not the GQSA algorithm: the kernel reads the same bytes either way)."""
    out, inp = weight.shape
    groups = weight.float().view(out, inp // group, group)
    kept = max(1, round(keep_fraction * inp / group))
    index = groups.norm(dim=-1).topk(kept, dim=1).indices.sort(dim=1).values
    chosen = torch.gather(groups, 1, index[..., None].expand(-1, -1, group))
    lo, hi = chosen.amin(-1), chosen.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-8)
    zero = (-lo / scale).round().clamp(0, 15)
    codes = (chosen / scale[..., None] + zero[..., None]).round().clamp(0, 15)
    return GQSALinear.from_codes(codes, scale.to(weight.dtype), zero, index, inp, None)


class W4TensorCoresAtOneToken(GQSALinear):
    """Plain W4 served by the tensor-core kernel at every token count: int4_matmul sends one
    fp16/bf16 token to the one-token pair kernel instead (0.15 against 0.21 warp-instructions per
    weight byte on sm_90, a static estimate); this case times the path it does not take."""

    kernel_label = "triton_int4 (tensor cores at one token)"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from compress.kernels.int4_matmul import int4_matmul

        return int4_matmul(x, self.qweight, self.scales, self.zeros, self.bias, one_token=False)


def w4_tensor_cores(weight: torch.Tensor, group: int) -> W4TensorCoresAtOneToken:
    module = random_gqsa(weight, group, 1.0)
    module.__class__ = W4TensorCoresAtOneToken  # the same storage, the other kernel
    return module


class GQSAPairsAtEveryCount(GQSALinear):
    """Group-sparse W4 served by the pair kernel at every token count (token groups of up to four
    beyond four): from DOT_MIN_TOKENS tokens gqsa_matmul takes tensor cores instead (0.44 against
    1.1 warp-instructions per weight byte at 16 tokens, g = 16, a static estimate); this case
    times the path it does not take."""

    kernel_label = "triton_gqsa (pair kernel at every count)"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from compress.kernels.gqsa_matmul import gqsa_matmul

        return gqsa_matmul(x, self.qweight, self.scales, self.zeros, self.group_index, self.bias, dot=False)


def gqsa_pairs(weight: torch.Tensor, group: int, keep_fraction: float) -> GQSAPairsAtEveryCount:
    module = random_gqsa(weight, group, keep_fraction)
    module.__class__ = GQSAPairsAtEveryCount  # the same storage, the other kernel
    return module


def quantized(weight: torch.Tensor, bits: int, group: int) -> Int8Linear | LowBitLinear:
    """W8 or W3/W2 of the weight by round-to-nearest (one range per group: a speed fixture)."""
    grid = quantize_groups(weight.float(), bits, group, shrink_steps=1)
    scales = grid.scales.to(weight.dtype)
    if bits == 8:
        return Int8Linear.from_codes(grid.codes, scales, grid.zeros, None)
    return LowBitLinear.from_codes(grid.codes, scales, grid.zeros, bits, None)


def random_lowrank(weight: torch.Tensor, ratio: float) -> LowRankLinear:
    out, inp = weight.shape
    rank = max(1, int((1 - ratio) * out * inp / (out + inp)))
    up = torch.randn(out, rank, device=weight.device, dtype=weight.dtype) / math.sqrt(rank)
    down = torch.randn(rank, inp, device=weight.device, dtype=weight.dtype) / math.sqrt(inp)
    return LowRankLinear.from_factors(up, down, None)


def random_dict(weight: torch.Tensor, ratio: float, ks: float = 2.0) -> DictLinear:
    out, inp = weight.shape
    atoms = max(1, int((1 - ratio) * out * inp / (inp + out / ks)))
    nnz = max(1, int(atoms / ks))
    index = torch.rand(out, atoms, device=weight.device).topk(nnz, dim=1).indices
    d = torch.randn(atoms, inp, device=weight.device, dtype=weight.dtype) / math.sqrt(inp)
    values = torch.randn(out, nnz, device=weight.device, dtype=weight.dtype)
    return DictLinear.from_factors(d, values, index, None)


def cases(sparsities: list[float], tile: int) -> list[Case]:
    out: list[Case] = [Case("dense (cuBLAS)", lambda w: w, "dense")]
    for s in sparsities:
        out.append(Case(f"torch CSR {s:.0%}", lambda w, s=s: (w * (torch.rand_like(w) >= s)).to_sparse_csr(), "csr"))
        out.append(Case(f"bitmap {s:.0%}", lambda w, s=s: SparseLinear.from_dense(w, torch.rand_like(w) >= s, None), "ours"))
        out.append(Case(f"delta rows {s:.0%}", lambda w, s=s: _delta(w, torch.rand_like(w) >= s), "ours"))
        keep_cols = round((1 - s) * (tile if s < 0.85 else 2 * tile))
        cols = tile if s < 0.85 else 2 * tile

        def tiled(w, keep=keep_cols, cols=cols):
            return TileSparseLinear.from_dense(w, tile_mask(torch.rand_like(w, dtype=torch.float32), tile, cols, keep), None, tile, cols)

        out.append(Case(f"tile {tile}x{cols} {s:.0%}", tiled, "ours"))
    out.append(Case("torch 2:4 (cuSPARSELt)", _semi_structured, "2:4"))
    out.append(Case("2:4 (ours)", lambda w: SparseLinear.from_dense(w, _two_of_four(w), None, "2:4"), "ours"))
    out.append(Case("W4 g128", lambda w: random_gqsa(w, 128, 1.0), "ours"))
    out.append(Case("W4 g128 tensor cores", lambda w: w4_tensor_cores(w, 128), "ours"))
    out.append(Case("GQSA W4S50 g16", lambda w: random_gqsa(w, 16, 0.5), "ours"))
    out.append(Case("GQSA W4S50 g16 pair kernel", lambda w: gqsa_pairs(w, 16, 0.5), "ours"))
    for bits in (8, 3, 2):
        out.append(Case(f"W{bits} g64", lambda w, bits=bits: quantized(w, bits, 64), "ours"))
    out.append(Case("low-rank 30%", lambda w: random_lowrank(w, 0.3), "ours"))
    out.append(Case("dict 30% ks2", lambda w: random_dict(w, 0.3), "ours"))
    return out


def _delta(w: torch.Tensor, keep: torch.Tensor) -> DeltaSparseLinear:
    return DeltaSparseLinear.from_dense(w * keep, keep, None)


def _two_of_four(w: torch.Tensor) -> torch.Tensor:
    """The larger two of every four weights."""
    groups = w.abs().view(w.shape[0], -1, 4)
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(2, dim=-1).indices, True).view_as(w)


def _semi_structured(w: torch.Tensor):
    from torch.sparse import to_sparse_semi_structured

    keep = w.abs().view(w.shape[0], -1, 4).topk(2, dim=-1).indices
    mask = torch.zeros(w.shape[0], w.shape[1] // 4, 4, dtype=torch.bool, device=w.device).scatter_(-1, keep, True)
    return to_sparse_semi_structured(w * mask.view_as(w))


def nbytes(obj) -> int:
    if isinstance(obj, CompressedLinear):
        return obj.num_bytes()
    if isinstance(obj, torch.Tensor) and obj.layout == torch.sparse_csr:
        return sum(t.numel() * t.element_size() for t in (obj.values(), obj.crow_indices(), obj.col_indices()))
    if isinstance(obj, torch.Tensor) and obj.layout == torch.strided:
        return obj.numel() * obj.element_size()
    packed = getattr(obj, "packed", None)  # semi-structured: values + metadata in one buffer
    meta = getattr(obj, "meta", None)
    return sum(t.numel() * t.element_size() for t in (packed, meta) if t is not None)


def apply(obj, kind: str, x: torch.Tensor) -> torch.Tensor:
    if kind == "csr":
        return torch.mm(obj, x.T).T
    if kind in ("dense", "2:4"):
        return F.linear(x, obj)
    return obj(x)


def dense_of(obj, kind: str) -> torch.Tensor:
    return obj if kind == "dense" else obj.to_dense()


def time_us(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench

        return 1e3 * do_bench(fn, warmup=25, rep=max(50, repeats), return_mode="median")
    fn()
    times = []
    for _ in range(max(3, repeats // 10)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def serving_kernel(obj, kind: str, x: torch.Tensor) -> str | None:
    """The kernel our module runs for x (the benchmark runs in `triton` mode on a GPU)."""
    if kind != "ours":
        return None
    if hasattr(obj, "kernel_label"):
        return obj.kernel_label
    from compress import kernels

    return kernels.select(obj.format, obj, x).name


def dispatch_table(rows: list[dict], device_name: str, dtype: str) -> dict:
    """Per kernel and token count, the worst speedup over dense across shapes and cases: what
    dispatch needs to skip a kernel slower than cuBLAS (kernels/measured.py)."""
    worst: dict[tuple[str, int], float] = {}
    for r in rows:
        if r.get("kernel") and r["speedup"] == r["speedup"]:  # not NaN
            key = (r["kernel"], r["tokens"])
            worst[key] = min(worst.get(key, float("inf")), r["speedup"])
    entries = [{"kernel": k, "tokens": n, "speedup": s} for (k, n), s in sorted(worst.items())]
    return {"device": device_name, "dtype": dtype, "entries": entries}


def bench_shape(shape: str, tokens: list[int], case_list: list[Case], device, dtype, repeats: int) -> list[dict]:
    out_f, in_f = map(int, shape.split("x"))
    rows = []
    dense_us: dict[int, float] = {}
    dense_bytes = out_f * in_f * torch.finfo(dtype).bits // 8
    for case in case_list:
        try:
            weight = torch.randn(out_f, in_f, device=device, dtype=dtype) / math.sqrt(in_f)
            first = case.build(weight)
            size = nbytes(first)
            copies = max(1, math.ceil(3 * L2_BYTES / max(size, 1))) if device.type == "cuda" else 1
            objs = [first] + [case.build(torch.randn_like(weight) / math.sqrt(in_f)) for _ in range(copies - 1)]
            del weight
        except Exception as error:  # e.g. 2:4 unsupported on this GPU/build
            rows.append({"shape": shape, "case": case.name, "error": f"{type(error).__name__}: {error}"})
            continue
        for n in tokens:
            x = torch.randn(n, in_f, device=device, dtype=dtype)
            with torch.no_grad():
                y = apply(first, case.kind, x).float()
                ref = F.linear(x.float(), dense_of(first, case.kind).float())
                err = ((y - ref).norm() / ref.norm()).item()
                state = {"i": 0}

                def call(objs=objs, kind=case.kind, x=x):
                    state["i"] = (state["i"] + 1) % len(objs)
                    return apply(objs[state["i"]], kind, x)

                us = time_us(call, device, repeats)
            if case.kind == "dense":
                dense_us[n] = us
            speedup = dense_us[n] / us if n in dense_us else float("nan")
            limit = dense_bytes / size
            rows.append({
                "shape": shape, "case": case.name, "kind": case.kind, "tokens": n, "us": round(us, 2),
                "speedup": round(speedup, 3), "byte_limit": round(limit, 3),
                "of_limit": round(speedup / limit, 3), "bytes": size, "rel_err": err, "copies": len(objs),
                "kernel": serving_kernel(first, case.kind, x),
            })  # fmt: skip
            print(f"{shape:>11} N={n:<3} {case.name:<26} {us:9.1f} us  x{speedup:5.2f}  (limit x{limit:4.2f})  err {err:.1e}", flush=True)
        del objs, first
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def write_table(out: Path, rows: list[dict], device_name: str) -> str:
    lines = [f"Device: {device_name}. Speedup over cuBLAS fp16 F.linear at the same shape and N; "
             "limit = dense bytes / compressed bytes.", "",
             "| shape | case | N | µs | speedup | byte limit | of limit | rel err |", "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['case']} | - | - | - | - | - | {r['error'][:60]} |")
            continue
        lines.append(
            f"| {r['shape']} | {r['case']} | {r['tokens']} | {r['us']:.1f} | {r['speedup']:.2f} | "
            f"{r['byte_limit']:.2f} | {r['of_limit']:.2f} | {r['rel_err']:.1e} |"
        )
    table = "\n".join(lines) + "\n"
    (out / "results.md").write_text(table)
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bench-kernels")
    parser.add_argument("--shapes", nargs="+", default=None, help="OUTxIN, default Llama-3-8B/70B layers (tiny on CPU)")
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 8, 16, 32, 64])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.7, 0.75, 0.8, 0.9])
    parser.add_argument("--tile", type=int, default=64, help="tile rows and columns of the tile-sparse format")
    parser.add_argument("--cases", nargs="*", default=None, help="only cases whose name contains one of these")
    parser.add_argument("--repeats", type=int, default=100, help="do_bench repetition time in ms")
    parser.add_argument(
        "--dtype", choices=["float16", "bfloat16"], default="float16",
        help="activations and weights on a GPU (bfloat16: the default serving dtype, whose kernels dequantize "
        "differently; the dispatch table records it); the CPU runs float32",
    )  # fmt: skip
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if device.type == "cuda" else torch.float32
    shapes = args.shapes or (SHAPES if device.type == "cuda" else ["128x256"])
    case_list = cases(args.sparsities, args.tile)
    if args.cases:
        case_list = [c for c in case_list if c.kind == "dense" or any(p in c.name for p in args.cases)]
    if device.type == "cpu":
        case_list = [c for c in case_list if c.kind in ("dense", "ours")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    from compress import kernels

    # on a GPU every Triton kernel is measured, also those a speed table would make `auto` skip
    with kernels.use_kernel_mode("triton" if device.type == "cuda" else "auto"):
        for shape in shapes:
            rows += bench_shape(shape, args.tokens, case_list, device, dtype, args.repeats)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (PyTorch references; not a speed measurement)"
    (out / "results.json").write_text(json.dumps({"device": name, "dtype": str(dtype), "rows": rows}, indent=2))
    if device.type == "cuda":  # commit as kernels/measured/<gpu>.json for dispatch to use
        (out / "dispatch.json").write_text(json.dumps(dispatch_table(rows, name, str(dtype)), indent=2))
    print(write_table(out, rows, name))


if __name__ == "__main__":
    main()

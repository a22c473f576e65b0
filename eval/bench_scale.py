"""What each method costs on one decoder block at real model shapes, and what that projects to for
whole 8B and 70B models on one GPU.

    python -m compress.eval.bench_scale --scales 0.25 0.5 --out eval/results/scale

One decoder block of Llama-3-8B shape (hidden 4096, MLP 14336, 8 KV heads: q, k, v, o, gate, up,
down), every dimension times `scale`, random weights; its calibration statistics are synthetic
with a realistic spectrum: activations X = (Z·B)·diag(c) + noise with B of rank in/8 and channel
scales c decaying like a power law, so the Gram XᵀX has a few large and many small eigenvalues
(the factorizations' cost does not depend on the values, their conditioning is realistic). Each
method compresses the block's seven Linears in a fresh process; per Linear: seconds; per method:
the process's peak RSS above its state before compressing (the weights and statistics, which
the pipeline holds anyway, are counted separately and analytically), projected like the time
with its own exponent (at most 2: chunked temporaries, e.g. GQSA's scale refit, are capped).

Projection: each method's block time is fitted as t = c·scale^p over its two largest measured
scales (CoSpaDi is measured up to 0.125 only: an hour beyond on this CPU) and
extrapolated to the 8B block (scale 1) and the 70B block (hidden 8192, MLP 28672: scale 2 except
k/v, which keep 1024 outputs; the fit at scale 2 over-counts them slightly). GPU time divides the
CPU time by the ratio of the GPU's achievable fp64 rate to this CPU's measured fp64 GEMM rate:
an optimistic bound for factorizations (Cholesky, eigh, SVD run well below GEMM rate on GPUs),
stated as such. GPU memory per block is: the block's bf16 weights + its fp64 statistics (one
Gram per distinct input) + the method's working memory (the measured peak, scaled by scale^2;
M-FAC, counted analytically at m = 128: Z of its largest layer on the GPU, in fp64 and, as a
second row, with `precision: float32`; the block's gradient windows in host memory).
Writes results.json, results.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from compress.compressors import COMPRESSORS, LayerStats

LLAMA3_8B = {"hidden": 4096, "mlp": 14336, "kv": 1024, "blocks": 32}
LLAMA3_70B = {"hidden": 8192, "mlp": 28672, "kv": 1024, "blocks": 80}
H100_FP64_TFLOPS = 67.0  # H100/H200 SXM fp64 tensor-core peak; taken as achievable GEMM rate
GPU_MEMORY_GB = 141.0  # H200
MFAC_GRADS = 32  # gradients per layer measured here (memory is projected for m = 128 too)
# methods too slow on this CPU at larger fractions of the shape are measured at smaller ones only
MAX_SCALE = {"cospadi": 0.125}

# method -> (stage config, what it needs); eora refines a 50% magnitude-pruned base
METHODS: dict[str, dict] = {
    "whitened_svd": {"method": "whitened_svd", "ratio": 0.3},
    "fwsvd": {"method": "fwsvd", "ratio": 0.3},
    "rocket": {"method": "rocket", "ratio": 0.3},
    "rocket profile (4 levels)": {"method": "rocket", "ratio": 0.3, "profile": [0.2, 0.3, 0.4, 0.5]},
    "cospadi": {"method": "cospadi", "ratio": 0.3},
    "sparsegpt": {"method": "sparsegpt", "ratio": 0.5},
    "wanda": {"method": "wanda", "ratio": 0.5},
    "mfac": {"method": "mfac", "ratio": 0.5},
    "gqsa": {"method": "gqsa", "ratio": 0.5, "group_size": 16},
    "eora (rank 64 on magnitude 50%)": {"method": "eora", "rank": 64},
}


def block_shapes(hidden: int, mlp: int, kv: int) -> dict[str, tuple[int, int]]:
    """(out, in) of each Linear of a Llama block."""
    return {
        "q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, hidden),
        "gate_proj": (mlp, hidden), "up_proj": (mlp, hidden), "down_proj": (hidden, mlp),
    }  # fmt: skip


def scaled(shape: dict, scale: float) -> dict:
    def r(n: int) -> int:
        return max(128, int(round(n * scale / 128)) * 128)

    return {"hidden": r(shape["hidden"]), "mlp": r(shape["mlp"]), "kv": r(shape["kv"]), "blocks": shape["blocks"]}


def synthetic_gram(n: int, tokens: int, generator: torch.Generator) -> torch.Tensor:
    """XᵀX (fp64) of activations with a decaying spectrum: a rank-n/8 part plus isotropic noise."""
    rank = max(8, n // 8)
    channel = torch.arange(1, n + 1, dtype=torch.float32).pow(-0.5)[torch.randperm(n, generator=generator)]
    x = torch.randn(tokens, rank, generator=generator) @ torch.randn(rank, n, generator=generator) / math.sqrt(rank)
    x = x * channel + 0.05 * torch.randn(tokens, n, generator=generator)
    x64 = x.double()
    return x64.T @ x64


def layer_stats(method: str, out: int, inp: int, tokens: int, generator: torch.Generator, gram: torch.Tensor | None) -> LayerStats:
    tensors: dict[str, torch.Tensor] = {}
    if method == "mfac":
        tensors["grads"] = torch.randn(MFAC_GRADS, out * inp, generator=generator) * 1e-3
    elif method == "fwsvd":
        tensors["fisher_row"] = torch.rand(out, generator=generator, dtype=torch.float64) + 0.1
        tensors["fisher_col"] = torch.rand(inp, generator=generator, dtype=torch.float64) + 0.1
    elif method == "wanda":
        tensors["channel_norm_sq"] = gram.diagonal().clone()
    else:
        tensors["gram"] = gram
    return LayerStats(tensors, tokens, name=f"{out}x{inp}")


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def run_one(name: str, scale: float, tokens: int) -> dict:
    """In this process: compress one scaled 8B block with `name`; per-layer seconds, peak RSS."""
    spec = dict(METHODS[name])
    levels = spec.pop("profile", None)
    compressor = COMPRESSORS[spec["method"]]()
    config = compressor.config_class(**spec)
    shape = scaled(LLAMA3_8B, scale)
    generator = torch.Generator().manual_seed(0)
    grams: dict[int, torch.Tensor] = {}
    layers = {}
    for layer, (out, inp) in block_shapes(shape["hidden"], shape["mlp"], shape["kv"]).items():
        if spec["method"] not in ("mfac", "fwsvd") and inp not in grams:
            grams[inp] = synthetic_gram(inp, tokens, generator)
        weight = torch.randn(out, inp, generator=generator) / math.sqrt(inp)
        layers[layer] = (weight, layer_stats(spec["method"], out, inp, tokens, generator, grams.get(inp)))
    before = rss_gb()
    seconds = {}
    for layer, (weight, stats) in layers.items():
        start = time.perf_counter()
        if levels is not None:
            compressor.profile(weight, None, stats, config, levels)
        elif spec["method"] == "eora":
            base = COMPRESSORS["magnitude"]().compress(weight, None, LayerStats(), COMPRESSORS["magnitude"].config_class(ratio=0.5))
            compressor.compress(weight, None, stats, config, base=base)
        else:
            compressor.compress(weight, None, stats, config)
        seconds[layer] = round(time.perf_counter() - start, 3)
    return {"method": name, "scale": scale, "shape": shape, "seconds": seconds, "block_seconds": round(sum(seconds.values()), 2),
            "state_gb": round(before, 2), "peak_rss_gb": round(rss_gb(), 2), "working_gb": round(max(0.0, rss_gb() - before), 2)}  # fmt: skip


def cpu_fp64_gflops(n: int = 2048) -> float:
    a = torch.randn(n, n, dtype=torch.float64)
    a @ a
    start = time.perf_counter()
    for _ in range(3):
        a @ a
    return 3 * 2 * n**3 / (time.perf_counter() - start) / 1e9


def statistics_gb(shape: dict, method: str) -> float:
    """fp64 statistics one block holds: a Gram per distinct input (q/k/v share, gate/up share, o, down)."""
    h, m = shape["hidden"], shape["mlp"]
    if method == "mfac" or method == "fwsvd":
        return 0.0
    if method == "wanda":
        return 8 * (3 * h + m) / 1e9
    return 8 * (3 * h * h + m * m) / 1e9


def weights_gb(shape: dict) -> float:
    h, m, kv = shape["hidden"], shape["mlp"], shape["kv"]
    return 2 * (2 * h * h + 2 * kv * h + 3 * h * m) / 1e9


def mfac_gpu_gb(shape: dict, grads: int, bits: int = 64) -> float:
    """M-FAC's GPU memory at its largest layer: Z = L⁻¹G, m values per weight in `bits` (the
    gradients stay in host memory and stream to the GPU a chunk of blocks at a time)."""
    return grads * shape["hidden"] * shape["mlp"] * bits / 8 / 1e9


def mfac_host_gb(shape: dict, grads: int) -> float:
    """The gradient windows of one block, fp32 in host memory, during M-FAC's backward walk."""
    h, m, kv = shape["hidden"], shape["mlp"], shape["kv"]
    return grads * (2 * h * h + 2 * kv * h + 3 * h * m) * 4 / 1e9


def project(rows: list[dict], gflops: float) -> list[dict]:
    out = []
    for name in METHODS:
        mine = sorted((r for r in rows if r["method"] == name), key=lambda r: r["scale"])
        if not mine:
            continue
        p, q = 3.0, 2.0  # one scale measured: time cubic (factorizations), memory quadratic
        if len(mine) >= 2 and mine[-2]["block_seconds"] > 0:
            a, b = mine[-2], mine[-1]  # the two largest scales: the least overhead-dominated
            step = math.log(b["scale"] / a["scale"])
            p = math.log(b["block_seconds"] / a["block_seconds"]) / step
            if a["working_gb"] > 0.01 and b["working_gb"] > 0:  # chunked temporaries grow slower than in²
                q = min(2.0, max(0.0, math.log(b["working_gb"] / a["working_gb"]) / step))
        last = mine[-1]
        method = METHODS[name]["method"]
        variants = [(name, 64)] + ([(f"{name}, precision float32", 32)] if method == "mfac" else [])
        for label, bits in variants:
            row = {"method": label, "exponent": round(p, 2), "memory_exponent": round(q, 2), "measured_scale": last["scale"]}
            for model, shape, factor in (("8B", LLAMA3_8B, 1.0), ("70B", LLAMA3_70B, 2.0)):
                block_cpu = last["block_seconds"] * (factor / last["scale"]) ** p
                block_gpu = block_cpu * gflops / (H100_FP64_TFLOPS * 1e3)
                working = last["working_gb"] * (factor / last["scale"]) ** q
                host = 0.0
                if method == "mfac":
                    working, host = mfac_gpu_gb(shape, 128, bits), mfac_host_gb(shape, 128)
                memory = weights_gb(shape) + statistics_gb(shape, method) + working
                row[model] = {
                    "block_cpu_s": round(block_cpu, 1), "model_cpu_h": round(block_cpu * shape["blocks"] / 3600, 2),
                    "block_gpu_s_lower_bound": round(block_gpu, 2), "model_gpu_min_lower_bound": round(block_gpu * shape["blocks"] / 60, 1),
                    "gpu_memory_per_block_gb": round(memory, 1), "fits_141gb": memory <= GPU_MEMORY_GB,
                    "host_gb_beyond_the_model": round(host, 1),
                }  # fmt: skip
            out.append(row)
    return out


def write_tables(out: Path, rows: list[dict], projection: list[dict], gflops: float) -> str:
    lines = [f"This CPU: {os.cpu_count()} cores, fp64 GEMM {gflops:.0f} GFLOP/s; torch {torch.__version__}", ""]
    lines += ["## Measured: one block at a fraction of the Llama-3-8B shape", "",
              "| method | scale | hidden / MLP | block s | slowest Linear (s) | working memory GB |", "|---|---:|---|---:|---|---:|"]  # fmt: skip
    for r in rows:
        slowest = max(r["seconds"], key=r["seconds"].get)
        lines.append(
            f"| {r['method']} | {r['scale']} | {r['shape']['hidden']} / {r['shape']['mlp']} | {r['block_seconds']:.1f} "
            f"| {slowest} ({r['seconds'][slowest]:.1f}) | {r['working_gb']:.2f} |"
        )
    lines += ["", "## Projected: whole models, one GPU (weights offloaded, one block on the GPU)", "",
              f"GPU time is a lower bound: CPU time x (this CPU's fp64 GEMM rate / {H100_FP64_TFLOPS:.0f} TFLOP/s). "
              f"Memory: the block's bf16 weights + fp64 statistics + the method's working memory (M-FAC: m = 128, Z on the GPU, gradients in host memory).", "",
              "| method | time ~ scale^p | 8B CPU h | 8B GPU min (>=) | 8B GPU GB / block | 70B CPU h | 70B GPU min (>=) | 70B GPU GB / block | fits 141 GB at 70B | 70B host GB beyond the model |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]  # fmt: skip
    for p in projection:
        a, b = p["8B"], p["70B"]
        lines.append(
            f"| {p['method']} | {p['exponent']:.2f} | {a['model_cpu_h']:.1f} | {a['model_gpu_min_lower_bound']:.1f} | {a['gpu_memory_per_block_gb']:.1f} "
            f"| {b['model_cpu_h']:.1f} | {b['model_gpu_min_lower_bound']:.1f} | {b['gpu_memory_per_block_gb']:.1f} | {'yes' if b['fits_141gb'] else 'NO'} "
            f"| {b['host_gb_beyond_the_model']:.0f} |"
        )
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scales", nargs="+", type=float, default=[0.125, 0.25, 0.5])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--tokens", type=int, default=2048, help="calibration tokens behind the synthetic Grams")
    parser.add_argument("--out", default="runs/bench-scale")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child process: one method at one scale
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one, args.scales[0], args.tokens)))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "results.json"
    rows = json.loads(saved.read_text())["rows"] if saved.exists() else []
    done = {(r["method"], r["scale"]) for r in rows}
    for scale in args.scales:
        for name in args.methods:
            if (name, scale) in done or scale > MAX_SCALE.get(METHODS[name]["method"], scale):
                continue
            command = [sys.executable, "-m", "compress.eval.bench_scale", "--one", name, "--scales", str(scale), "--tokens", str(args.tokens)]
            child = subprocess.run(command, capture_output=True, text=True)
            if child.returncode:
                print(f"{name} at scale {scale} failed:\n{child.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
            saved.write_text(json.dumps({"rows": rows}, indent=2))  # an interrupted run resumes
    gflops = cpu_fp64_gflops()
    projection = project(rows, gflops)
    saved.write_text(json.dumps({"rows": rows, "cpu_fp64_gflops": gflops, "projection": projection}, indent=2))
    print(write_tables(out, rows, projection, gflops))


if __name__ == "__main__":
    main()

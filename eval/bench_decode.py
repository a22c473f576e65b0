"""End-to-end decode benchmark: tokens/s and peak memory of a Llama-3-8B-shaped model (random
weights from the config, nothing downloaded) in each compressed format.

    python -m compress.eval.bench_decode --out runs/bench-decode              # on a CUDA GPU

Every decoder Linear is replaced by the format's module built from its random fp16 weight (the
same builders as eval/bench_kernels.py: the kernels read the same bytes whatever the values). Decode
speed is measured with `generate` (greedy, a fixed number of new tokens): a logits processor stamps
the clock once per generated token, and a step is the median interval between stamps, so the
prefill is left out and tokens/s counts decode steps only (differencing two runs' totals instead
went negative on a busy CPU). Peak memory
is torch.cuda.max_memory_allocated over the run. Writes OUT/results.json and results.md. Without a
GPU it runs a tiny config on the PyTorch references (a check of the script, not a measurement).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LogitsProcessor, LogitsProcessorList

from compress.compressors.masks import tile_mask
from compress.modules import CompressedLinear, DeltaSparseLinear, SparseLinear, TileSparseLinear
from compress.report import compressed_modules
from compress.targets import match_linears, set_submodule

from .bench_kernels import quantized, random_gqsa, random_lowrank

LLAMA3_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
)  # fmt: skip
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=512)


def _tile(weight: torch.Tensor, sparsity: float, tile: int = 64) -> TileSparseLinear:
    keep = round((1 - sparsity) * tile)
    mask = tile_mask(torch.rand_like(weight, dtype=torch.float32), tile, tile, keep)
    return TileSparseLinear.from_dense(weight, mask, None, tile, tile)


def _delta(weight: torch.Tensor, keep: torch.Tensor) -> DeltaSparseLinear:
    return DeltaSparseLinear.from_dense(weight * keep, keep, None)


VARIANTS: dict[str, Callable[[torch.Tensor], CompressedLinear] | None] = {
    "dense": None,
    "bitmap 50%": lambda w: SparseLinear.from_dense(w, torch.rand_like(w) >= 0.5, None),
    "delta rows 50%": lambda w: _delta(w, torch.rand_like(w) >= 0.5),
    "tile 50%": lambda w: _tile(w, 0.5),
    "tile 75%": lambda w: _tile(w, 0.75),
    "W4 g128": lambda w: random_gqsa(w, 128, 1.0),
    "GQSA W4S50 g16": lambda w: random_gqsa(w, 16, 0.5),
    "W8 g64": lambda w: quantized(w, 8, 64),
    "W3 g64": lambda w: quantized(w, 3, 64),
    "low-rank 30%": lambda w: random_lowrank(w, 0.3),
}


def build_model(config: LlamaConfig, variant: str, device: torch.device, dtype: torch.dtype):
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    build = VARIANTS[variant]
    if build is not None:
        for name, linear in match_linears(model, ["re:.*layers\\..*"], []).items():
            set_submodule(model, name, build(linear.weight.data))
            del linear
    return model


class _StepClock(LogitsProcessor):
    """Stamps the clock each time generate has the next token's logits (once per decode step)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())
        return scores


def decode_speed(model, batch: int, prompt: int, new_tokens: int, vocab: int, device) -> dict[str, float]:
    if new_tokens < 2:
        raise ValueError("decode speed needs --new-tokens >= 2 (a step is the time between two tokens)")
    ids = torch.randint(0, vocab, (batch, prompt), device=device)
    kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def steps(n: int) -> list[float]:
        clock = _StepClock(device)
        out = model.generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, logits_processor=LogitsProcessorList([clock]), **kwargs)
        assert out.shape[1] == prompt + n and len(clock.stamps) == n
        return [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]

    steps(2)  # warm-up: compile kernels, allocate the cache
    step = statistics.median(steps(new_tokens) + steps(new_tokens))
    return {"ms_per_step": 1e3 * step, "tokens_per_s": batch / step}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bench-decode")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--layers", type=int, default=None, help="fewer decoder layers (quick runs)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    config = LlamaConfig(**(LLAMA3_8B if device.type == "cuda" else TINY))
    if args.layers:
        config.num_hidden_layers = args.layers
    rows = []
    for variant in args.variants:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        model = build_model(config, variant, device, dtype)
        weights = sum(m.num_bytes() for m in compressed_modules(model).values())
        if variant == "dense":
            weights = sum(
                m.weight.numel() * m.weight.element_size() for m in match_linears(model, ["re:.*layers\\..*"], []).values()
            )
        for batch in args.batches:
            speed = decode_speed(model, batch, args.prompt, args.new_tokens, config.vocab_size, device)
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
            row = {"variant": variant, "batch": batch, "decoder_linear_gib": weights / 2**30, "peak_gib": peak, **speed}
            rows.append(row)
            print(f"{variant:<16} batch {batch:>3}: {speed['tokens_per_s']:9.1f} tok/s  {speed['ms_per_step']:7.2f} ms/step  "
                  f"linears {weights / 2**30:6.2f} GiB  peak {peak:6.2f} GiB", flush=True)  # fmt: skip
        del model
        gc.collect()
    dense = {r["batch"]: r["tokens_per_s"] for r in rows if r["variant"] == "dense"}
    lines = [
        "| variant | batch | tokens/s | ms/step | vs dense | decoder Linear GiB | peak GiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = r["tokens_per_s"] / dense[r["batch"]] if r["batch"] in dense else float("nan")
        lines.append(
            f"| {r['variant']} | {r['batch']} | {r['tokens_per_s']:.1f} | {r['ms_per_step']:.2f} | {ratio:.2f} | "
            f"{r['decoder_linear_gib']:.2f} | {r['peak_gib']:.2f} |"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU, tiny config (not a measurement)"
    (out / "results.json").write_text(json.dumps({"device": name, "config": config.to_dict(), "rows": rows}, indent=2, default=str))
    table = f"Device: {name}\n\n" + "\n".join(lines) + "\n"
    (out / "results.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()

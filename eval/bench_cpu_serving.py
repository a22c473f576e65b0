"""CPU evaluation and generation speed of compressed models against the dense one.

    python -m compress.eval.bench_cpu_serving --model models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --text ../shared/data/wikitext2/test.txt --out eval/results/cpu-serving

On a CPU no Triton kernel runs: the compressed modules' PyTorch paths serve. Those of the sparse,
GQSA/INT4 and dictionary formats expand the weight (or the coefficient matrix) to dense; without
the CPU cache of expanded weights (`LLMPRESS_CPU_WEIGHT_CACHE`) they do it on every call. Each
variant is timed twice, cache on (the default) and off:
- `eval`: `perplexity` over a few windows of the text (what `llmpress eval --ppl` runs);
- `generate`: greedy `generate`, the median time per decode step (prefill left out).

The variants are built from the model's own weights in the formats the recipes produce: `sparse 50%`
(the bitmap format of sparsegpt-50, magnitude mask), `W4 g16` (every group kept, as w4-g16,
round-to-nearest), `dict 30%` (ROCKET's format, random factors), `W8 g64` and `W3 g64` (the auto
recipes' int8 and lowbit formats, round-to-nearest). The serving path reads the same
bytes whatever the values, so no calibration is spent here. Speed is measured, never asserted.
Writes OUT/results.json and OUT/results.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path
from typing import Callable

import torch

from compress.kernels import cpu_cache_bytes, cpu_cache_limit, set_cpu_cache_limit
from compress.model_loading import load_model, load_tokenizer
from compress.modules import CompressedLinear, SparseLinear
from compress.report import compressed_modules
from compress.targets import match_linears, set_submodule

from .bench_decode import decode_speed
from .bench_kernels import quantized, random_dict, random_gqsa
from .perplexity import perplexity


def _magnitude_sparse(weight: torch.Tensor) -> SparseLinear:
    threshold = weight.abs().flatten().kthvalue(weight.numel() // 2).values
    return SparseLinear.from_dense(weight, weight.abs() > threshold, None, "unstructured")


VARIANTS: dict[str, Callable[[torch.Tensor], CompressedLinear] | None] = {
    "dense": None,
    "sparse 50%": _magnitude_sparse,
    "W4 g16": lambda w: random_gqsa(w, 16, 1.0),
    "dict 30%": lambda w: random_dict(w, 0.3),
    "W8 g64": lambda w: quantized(w, 8, 64),
    "W3 g64": lambda w: quantized(w, 3, 64),
}


def build_variant(dense_model: torch.nn.Module, variant: str) -> torch.nn.Module:
    """A copy of the model whose decoder Linears are in the variant's format."""
    model = copy.deepcopy(dense_model)
    build = VARIANTS[variant]
    if build is not None:
        torch.manual_seed(0)
        for name, linear in match_linears(model, ["re:.*layers\\..*"], []).items():
            set_submodule(model, name, build(linear.weight.data))
    return model.eval()


def time_variant(model, tokenizer, text: str, windows: int, seq_len: int, new_tokens: int) -> dict:
    start = time.perf_counter()
    ppl = perplexity(model, tokenizer, text, seq_len=seq_len, max_windows=windows, progress=False)
    eval_s = time.perf_counter() - start
    with torch.no_grad():
        step = decode_speed(model, 1, 64, new_tokens, model.config.vocab_size, torch.device("cpu"))
    return {
        "eval_seconds": round(eval_s, 2), "perplexity": round(ppl.perplexity, 3),
        "generate_ms_per_token": round(step["ms_per_step"], 1), "cache_bytes": cpu_cache_bytes(model),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--text", default="../shared/data/wikitext2/test.txt")
    parser.add_argument("--out", default="runs/bench-cpu-serving")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--uncached-new-tokens", type=int, default=4, help="decode steps timed with the cache off (slow)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    dense = load_model(args.model, dtype="float32", device="cpu")
    tokenizer = load_tokenizer(args.model)
    limit = cpu_cache_limit()
    rows = []
    for variant in args.variants:
        model = build_variant(dense, variant)
        formats = sorted({m.format for m in compressed_modules(model).values()}) or ["dense"]
        for cache in ("on", "off") if variant != "dense" else ("-",):
            set_cpu_cache_limit(0 if cache == "off" else limit)
            tokens = args.uncached_new_tokens if cache == "off" else args.new_tokens
            row = {"variant": variant, "formats": formats, "cache": cache, "new_tokens": tokens}
            row.update(time_variant(model, tokenizer, args.text, args.windows, args.seq_len, tokens))
            rows.append(row)
            print(row, flush=True)
        del model
    set_cpu_cache_limit(limit)
    base = rows[0] if rows and rows[0]["variant"] == "dense" else None
    lines = [
        f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; torch {torch.__version__}; "
        f"{args.windows} windows x {args.seq_len} tokens; greedy decode after a 64-token prompt",
        "",
        "| variant | CPU cache | eval s | x dense | ms / token | x dense | cache MiB |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        eval_x = f"{r['eval_seconds'] / base['eval_seconds']:.2f}" if base else "-"
        gen_x = f"{r['generate_ms_per_token'] / base['generate_ms_per_token']:.2f}" if base else "-"
        lines.append(
            f"| {r['variant']} | {r['cache']} | {r['eval_seconds']:.1f} | {eval_x} | {r['generate_ms_per_token']:.0f} | {gen_x} "
            f"| {r['cache_bytes'] / 2**20:.0f} |"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"model": args.model, "rows": rows}, indent=2))
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

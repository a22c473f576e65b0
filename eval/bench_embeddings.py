"""Token embeddings and output head in W8/W4: perplexity against bytes, alone and on a compressed model.

    python -m compress.eval.bench_embeddings --model models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --eval ../shared/data/wikitext2/test.txt --out eval/results/embeddings \\
        --checkpoint out/w4-noemb

Rows: the model as loaded (`--model`, every Linear dense) and, with `--checkpoint`, an llmpress
checkpoint (e.g. the decoder in W4), each with its embeddings kept and quantized at every
(bits, group size) of `--settings`. Quantization is data-free (compress/embeddings.py), so a row
needs no calibration. Bytes are as served in bf16: the embedding table (stored once when tied to
the head) and the whole model. Perplexity on the first `--windows` windows of `--seq-len` tokens.
Writes OUT/results.json and OUT/results.md and prints the table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

DEFAULT_SETTINGS = ["8:64", "8:576", "4:16", "4:32", "4:64"]


def measure(source: str, setting: str | None, tokenizer, args) -> dict:
    """Perplexity and bf16 bytes of `source` with its embeddings quantized as `setting` ('bits:group')."""
    from compress.eval.perplexity import perplexity

    from compress.embeddings import EmbeddingsConfig, quantize_embeddings
    from compress.metrics import serving_dtype
    from compress.model_loading import load_model
    from compress.report import model_size

    model = load_model(source, dtype=torch.float32, device="cpu")
    row: dict = {"model": source, "embeddings": setting or "kept"}
    with serving_dtype("bfloat16"):
        before = model_size(model)["bytes"]
        if setting:
            bits, group = map(int, setting.split(":"))
            start = time.perf_counter()
            section = quantize_embeddings(model, EmbeddingsConfig(bits=bits, group_size=group))
            row.update(
                quantize_seconds=round(time.perf_counter() - start, 1),
                embedding_bytes=section["bytes_after"],
                embedding_bytes_before=section["bytes_before"],
                embedding_rel_error=round(section["embedding_rel_error"], 5),
                tied=section["tied"],
            )
        row["model_bytes_before"] = before
        row["model_bytes"] = model_size(model)["bytes"]
    result = perplexity(model, tokenizer, args.eval, seq_len=args.seq_len, max_windows=args.windows, progress=False)
    row["perplexity"] = round(result.perplexity, 4)
    print(json.dumps(row), flush=True)
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| model | embeddings (bits:group) | embedding bytes (bf16) | relative error | whole model bytes (bf16) | perplexity |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        emb = f"{r.get('embedding_bytes_before', 0) / 1e6:.1f} MB → {r['embedding_bytes'] / 1e6:.1f} MB" if "embedding_bytes" in r else "kept"
        err = f"{r['embedding_rel_error']:.4f}" if "embedding_rel_error" in r else "-"
        lines.append(f"| {r['model']} | {r['embeddings']} | {emb} | {err} | {r['model_bytes'] / 1e6:.1f} MB | {r['perplexity']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the dense model (hub id, HF directory or .gguf)")
    parser.add_argument("--checkpoint", nargs="*", default=[], help="llmpress checkpoints to quantize the embeddings of")
    parser.add_argument("--eval", required=True, help="perplexity text")
    parser.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, help="bits:group_size")
    parser.add_argument("--checkpoint-settings", nargs="*", default=["8:64", "4:32"], help="settings for the checkpoints")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--out", default="runs/bench-embeddings")
    args = parser.parse_args(argv)
    from compress.model_loading import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    rows = [measure(args.model, None, tokenizer, args)] + [measure(args.model, s, tokenizer, args) for s in args.settings]
    for checkpoint in args.checkpoint:
        rows += [measure(checkpoint, None, tokenizer, args)] + [measure(checkpoint, s, tokenizer, args) for s in args.checkpoint_settings]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = table(rows)
    (out / "results.json").write_text(json.dumps({"eval": args.eval, "seq_len": args.seq_len, "windows": args.windows, "rows": rows}, indent=2))
    (out / "results.md").write_text(f"# Embeddings and head in W8/W4 (perplexity on {args.windows} x {args.seq_len} tokens of {args.eval})\n\n{text}\n")
    print(text)


if __name__ == "__main__":
    main()

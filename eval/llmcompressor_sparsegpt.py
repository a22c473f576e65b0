"""Side by side with llm-compressor: its SparseGPTModifier on the same model, the same calibration
windows and the same perplexity protocol as our `sparsegpt`.

llm-compressor pins other transformers versions, so it runs in its own virtual environment; this
file is three steps, the middle one run by that environment's Python (it imports only torch,
transformers, datasets and llmcompressor):

    python -m compress.eval.llmcompressor_sparsegpt prepare --model GGUF --calib valid.txt --out runs/llmc
    VENV/bin/python eval/llmcompressor_sparsegpt.py prune --dir runs/llmc --pattern 0:0 --sparsity 0.5
    VENV/bin/python eval/llmcompressor_sparsegpt.py prune --dir runs/llmc --pattern 2:4
    python -m compress.eval.llmcompressor_sparsegpt evaluate --dir runs/llmc --eval test.txt

`prepare` saves the dense model as a plain HF checkpoint plus our calibration windows (token ids);
`prune` runs llm-compressor's oneshot SparseGPT on those windows and saves a dense checkpoint with
zeros; `evaluate` measures each pruned checkpoint's sparsity and perplexity (our protocol) and
writes DIR/results.json and results.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def prepare(args: argparse.Namespace) -> None:
    import torch

    from compress.data import calibration_windows
    from compress.model_loading import load_model, load_tokenizer

    out = Path(args.out)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, dtype="float32")
    model.hf_quantizer, model.is_quantized = None, False  # a dequantized GGUF saves as plain fp32
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.save_pretrained(out / "dense")
    tokenizer.save_pretrained(out / "dense")
    ids = calibration_windows(tokenizer, args.calib, args.num_samples, args.seq_len, args.seed)
    torch.save(ids, out / "calib_ids.pt")
    print(f"saved {out / 'dense'} and {tuple(ids.shape)} calibration ids")


def prune(args: argparse.Namespace) -> None:
    """Runs in llm-compressor's environment."""
    import time

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = Path(args.dir)
    ids = torch.load(root / "calib_ids.pt")
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(root / "dense", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(root / "dense")
    sparsity = 0.5 if args.pattern != "0:0" else args.sparsity
    modifier = SparseGPTModifier(
        sparsity=sparsity, mask_structure=args.pattern, block_size=128, dampening_frac=0.01,
        targets=["Linear"], ignore=["re:.*lm_head"],
    )  # fmt: skip
    start = time.perf_counter()
    oneshot(
        model=model, tokenizer=tokenizer, dataset=data, recipe=modifier, num_calibration_samples=len(ids),
        max_seq_length=ids.shape[1], shuffle_calibration_samples=False,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    name = f"llmcompressor-sparsegpt-{args.pattern.replace(':', 'of') if args.pattern != '0:0' else f'{round(100 * sparsity)}'}"
    model.save_pretrained(root / name, save_compressed=False)
    tokenizer.save_pretrained(root / name)
    (root / name / "llmpress_timing.json").write_text(json.dumps({"compress_seconds": round(seconds, 1)}))
    print(f"saved {root / name} ({seconds:.0f} s)")


def evaluate(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from compress.model_loading import load_tokenizer

    from .perplexity import perplexity

    root = Path(args.dir)
    tokenizer = load_tokenizer(str(root / "dense"))
    rows = []
    for path in sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("llmcompressor-")):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
        zeros = sum(int((m.weight == 0).sum()) for m in linears)
        total = sum(m.weight.numel() for m in linears)
        result = perplexity(model, tokenizer, args.eval, seq_len=args.eval_seq_len, max_windows=args.max_windows, progress=False)
        timing = json.loads((path / "llmpress_timing.json").read_text()) if (path / "llmpress_timing.json").exists() else {}
        rows.append({"name": path.name, "sparsity": zeros / total, "perplexity": result.perplexity, **timing})
        print(f"{path.name:<36} sparsity {zeros / total:.4f}  ppl {result.perplexity:.2f}", flush=True)
    (root / "results.json").write_text(json.dumps({"eval": args.eval, "rows": rows}, indent=2))
    lines = ["| llm-compressor run | decoder sparsity | perplexity | compress s |", "|---|---:|---:|---:|"]
    lines += [f"| {r['name']} | {100 * r['sparsity']:.2f}% | {r['perplexity']:.2f} | {r.get('compress_seconds', '')} |" for r in rows]
    (root / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--model", required=True)
    p.add_argument("--calib", required=True)
    p.add_argument("--out", default="runs/llmc")
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("prune")
    p.add_argument("--dir", default="runs/llmc")
    p.add_argument("--pattern", default="0:0", help="'0:0' unstructured, or N:M")
    p.add_argument("--sparsity", type=float, default=0.5)
    p = sub.add_parser("evaluate")
    p.add_argument("--dir", default="runs/llmc")
    p.add_argument("--eval", required=True)
    p.add_argument("--max-windows", type=int, default=8)
    p.add_argument("--eval-seq-len", type=int, default=2048)
    args = parser.parse_args(argv)
    {"prepare": prepare, "prune": prune, "evaluate": evaluate}[args.step](args)


if __name__ == "__main__":
    main()

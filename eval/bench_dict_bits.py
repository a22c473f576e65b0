"""Dictionary layers with float or int8 coefficients and float or W8 atoms: bytes as served against perplexity.

    python -m compress.eval.bench_dict_bits --model models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --calib ../shared/data/wikitext2/valid.txt --eval ../shared/data/wikitext2/test.txt \\
        --out eval/results/dictionary/int8-coefficients

For each method (rocket, cospadi) and ratio of values removed, one run per storage: coefficients
and atoms in bf16; int8 coefficients (codes with a scale per row, the dictionary refit to them);
int8 coefficients and W8 atoms (`atom_bits: 8`: groups of 64 columns with a scale and zero point);
dense statistics from `--num-samples` × `--seq-len` calibration tokens, every decoder Linear.
Bytes are the decoder Linears' as served in bf16 (atoms, coefficients, scales, packed indices).
Writes OUT/results.json and OUT/results.md and prints the table.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch


# (coefficient_bits, atom_bits) of each run
STORAGES = ((16, 16), (8, 16), (8, 8))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--calib", required=True, help="calibration text")
    parser.add_argument("--eval", required=True, help="perplexity text")
    parser.add_argument("--methods", nargs="+", default=["rocket"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.3])
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-seq-len", type=int, default=2048)
    parser.add_argument("--max-windows", type=int, default=8)
    parser.add_argument("--out", default="runs/bench-dict-bits")
    args = parser.parse_args(argv)

    from compress.api import compress_model
    from compress.eval.perplexity import perplexity
    from compress.model_loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(args.model)
    dense = load_model(args.model, dtype=torch.float32, device="cpu")
    calibration = {"num_samples": args.num_samples, "seq_len": args.seq_len, "statistics": "dense"}
    rows = []
    for method in args.methods:
        for ratio in args.ratios:
            for bits, atom_bits in STORAGES:
                stage = {"method": method, "ratio": ratio, "coefficient_bits": bits, "atom_bits": atom_bits, "targets": ["Linear"], "ignore": ["lm_head"]}
                recipe = {"name": f"{method}-{round(100 * ratio)}-c{bits}-a{atom_bits}", "calibration": calibration, "stages": [stage]}
                start = time.perf_counter()
                model, report = compress_model(copy.deepcopy(dense), recipe, dataset=args.calib, tokenizer=tokenizer, progress=False)
                seconds = time.perf_counter() - start
                ppl = perplexity(model, tokenizer, args.eval, seq_len=args.eval_seq_len, max_windows=args.max_windows, progress=False)
                s = report["summary"]
                row = {
                    "method": method, "ratio": ratio, "coefficient_bits": bits, "atom_bits": atom_bits, "perplexity": round(ppl.perplexity, 4),
                    "values_removed": round(s["nominal_ratio_removed"], 4), "bytes_before": s["bytes_before"],
                    "bytes_after": s["bytes_after"], "bytes_removed": round(s["storage_ratio_removed"], 4),
                    "mean_weighted_error": s["mean_rel_weighted_error"], "compress_seconds": round(seconds, 1),
                }  # fmt: skip
                print(json.dumps(row), flush=True)
                rows.append(row)
    lines = [
        "| method | values removed | coefficients | atoms | bf16 bytes (decoder Linears) | bytes removed | weighted error | perplexity | s |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        kind = "int8 + row scale" if r["coefficient_bits"] == 8 else "bf16"
        atoms = "W8 g64" if r.get("atom_bits", 16) == 8 else "bf16"
        lines.append(
            f"| {r['method']} | {100 * r['values_removed']:.1f}% | {kind} | {atoms} | {r['bytes_before'] / 1e6:.1f} → {r['bytes_after'] / 1e6:.1f} MB "
            f"| {100 * r['bytes_removed']:.1f}% | {r['mean_weighted_error']:.4f} | {r['perplexity']:.2f} | {r['compress_seconds']:.0f} |"
        )
    table = "\n".join(lines)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    (out / "results.md").write_text(f"# Dictionary coefficients and atoms in bf16 or 8 bits (perplexity on {args.max_windows} x {args.eval_seq_len} tokens)\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()

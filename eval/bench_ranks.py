"""Wall time of one compression run on 1 rank and on N ranks (torchrun), and the perplexity of
each checkpoint: the data-parallel calibration and weight-parallel optimization of
compress/distributed.py, measured.

    python -m compress.eval.bench_ranks --model models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --recipe recipes/sparsegpt-50.yaml --ranks 1 2 --threads 2 \\
        --text ../shared/data/wikitext2/test.txt --out eval/results/scale/ranks

Each run is `torchrun --nproc-per-node R -m compress compress ...` on the CPU (gloo), with the
machine's `--threads` split evenly between the ranks (OMP_NUM_THREADS), so every row uses the same
cores. Perplexity: `llmpress eval --ppl` over `--windows` windows of 2048 tokens. Writes OUT/results.json
and OUT/results.md; speed is measured here, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(ranks: int, args: list[str], threads_per_rank: int = 1, timeout: float | None = None) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node RANKS -m compress ARGS` on this machine (gloo on the CPU)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads_per_rank), "TOKENIZERS_PARALLELISM": "false"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-addr", "127.0.0.1",
        "--master-port", str(_free_port()), "-m", "compress", *args,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)


def compress_with_ranks(ranks: int, threads: int, model: str, recipe: str, out: Path, extra: list[str]) -> float:
    args = ["compress", model, "--recipe", recipe, "--device", "cpu", "--output-dir", str(out), "--overwrite", "--quiet", *extra]
    start = time.perf_counter()
    done = torchrun(ranks, args, threads_per_rank=max(1, threads // ranks))
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{ranks} ranks failed:\n{done.stderr[-4000:]}")
    return seconds


def perplexity_of(checkpoint: Path, text: str, windows: int) -> float:
    result = checkpoint / "bench-eval.json"
    command = [
        sys.executable, "-m", "compress", "eval", str(checkpoint), "--ppl", text, "--max-windows", str(windows),
        "--device", "cpu", "--quiet", "--json", str(result),
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(result.read_text())["perplexity"]["perplexity"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--recipe", default="recipes/sparsegpt-50.yaml")
    parser.add_argument("--ranks", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="cores shared by the ranks of a row")
    parser.add_argument("--text", default="../shared/data/wikitext2/test.txt")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--dataset", default=None, help="calibration text (default: the recipe's)")
    parser.add_argument("--out", default="runs/bench-ranks")
    parser.add_argument("--work", default="runs/bench-ranks-checkpoints", help="where the checkpoints are written")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = ["--dataset", args.dataset] if args.dataset else []
    rows = []
    for ranks in args.ranks:
        checkpoint = Path(args.work) / f"{ranks}-ranks-{args.threads}-threads"
        seconds = compress_with_ranks(ranks, args.threads, args.model, args.recipe, checkpoint, extra)
        report = json.loads((checkpoint / "report.json").read_text())
        ppl = perplexity_of(checkpoint, args.text, args.windows)
        rows.append({"ranks": ranks, "threads_per_rank": max(1, args.threads // ranks), "wall_seconds": round(seconds, 1),
                     "compress_seconds": report["wall_seconds"], "perplexity": round(ppl, 4)})  # fmt: skip
        print(rows[-1], flush=True)
    base = rows[0]
    lines = [
        f"{args.model}, {args.recipe}, CPU (gloo), {args.threads} threads shared by the ranks; perplexity over {args.windows} windows of 2048",
        "",
        "| ranks | threads / rank | wall s (incl. loading) | speed-up | compress s (rank 0) | perplexity | vs 1st row |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['ranks']} | {r['threads_per_rank']} | {r['wall_seconds']:.0f} | {base['wall_seconds'] / r['wall_seconds']:.2f}x "
            f"| {r['compress_seconds']:.0f} | {r['perplexity']:.3f} | {100 * (r['perplexity'] / base['perplexity'] - 1):+.2f}% |"
        )
    (out / "results.json").write_text(json.dumps({"model": args.model, "recipe": args.recipe, "rows": rows}, indent=2))
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""How fast the CLI answers before any real work: help, and the errors a user meets first.

    python -m compress.eval.bench_cli --out runs/bench-cli

Each case runs `llmpress ...` in a fresh process a few times (median wall time) and records the
exit code; a table is printed and `results.json` written. Speed is measured here, never asserted
in a timed test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

CASES = {
    "llmpress --help": ["--help"],
    "llmpress compress --help": ["compress", "--help"],
    "compress: model not found": ["compress", "/no/such/model", "--recipe", "recipes/w4-g16.yaml"],
    "compress: recipe not found": ["compress", "HuggingFaceTB/SmolLM2-135M", "--recipe", "no-such-recipe.yaml"],
    "compress: calibration file not found": ["compress", "HuggingFaceTB/SmolLM2-135M", "--dataset", "missing.txt"],
    "eval: model not found": ["eval", "/no/such/model", "--ppl", "test.txt"],
}


def run_case(argv: list[str], repeats: int) -> dict:
    times, code = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "compress", *argv], capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        code = done.returncode
    return {"seconds_median": round(statistics.median(times), 3), "seconds_max": round(max(times), 3), "exit_code": code}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bench-cli")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    rows = {name: run_case(case, args.repeats) for name, case in CASES.items()}
    lines = ["| case | median s | max s | exit code |", "|---|---:|---:|---:|"]
    lines += [f"| {n} | {r['seconds_median']:.2f} | {r['seconds_max']:.2f} | {r['exit_code']} |" for n, r in rows.items()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"repeats": args.repeats, "rows": rows}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

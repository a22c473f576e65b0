"""Peak host memory (RSS) of a compression run, phase by phase, against the model's own size.

    python -m compress.eval.bench_host_memory --model models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --recipe recipes/sparsegpt-50.yaml --out eval/results/scale/host-memory

A thread samples this process's resident memory (/proc/self/status) every 20 ms; each phase
(imports, loading the model, compressing, saving) records its peak, in all and anonymous only:
safetensors are memory-mapped, so the file-backed pages of the weights count in RSS when touched
but are clean page cache the kernel reclaims under pressure; anonymous memory is what the run
really allocates. The goal:
the peak is the model plus one block's working set, not two copies of the model; saving streams
shard by shard (`save_pretrained(max_shard_size=...)`) and adds no copy. Writes OUT/results.json
and OUT/results.md. Linux only (reads /proc).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path


class RssSampler:
    """Peak resident bytes per phase, sampled in a background thread."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.phase = "start"
        self.peaks: dict[str, int] = {}
        self.anon_peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss() -> tuple[int, int]:
        """(resident bytes, anonymous resident bytes)."""
        fields = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon"):
                    fields[key] = int(value.split()[0]) * 1024
        return fields["VmRSS"], fields["RssAnon"]

    def sample(self) -> None:
        total, anon = self.rss()
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), total)
        self.anon_peaks[self.phase] = max(self.anon_peaks.get(self.phase, 0), anon)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval)

    @contextmanager
    def running(self):
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()

    @contextmanager
    def during(self, phase: str):
        self.phase = phase
        self.sample()
        yield
        self.sample()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--recipe", default="recipes/sparsegpt-50.yaml")
    parser.add_argument("--dataset", default=None)
    parser.add_argument("--max-shard-size", default="50MB", help="small shards show that saving streams")
    parser.add_argument("--out", default="runs/bench-host-memory")
    args = parser.parse_args(argv)
    sampler = RssSampler()
    with sampler.running():
        with sampler.during("imports"):
            import torch

            from compress.api import compress_model
            from compress.checkpoint import save_compressed
            from compress.model_loading import load_model, load_tokenizer
            from compress.report import model_size
        with sampler.during("load model"):
            tokenizer = load_tokenizer(args.model)
            model = load_model(args.model, dtype="float32", device="cpu")
        dense_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        with sampler.during("compress"):
            model, report = compress_model(model, args.recipe, dataset=args.dataset, tokenizer=tokenizer, device="cpu", progress=False)
        stored = model_size(model)["bytes"]
        with sampler.during("save"), tempfile.TemporaryDirectory() as tmp:
            save_compressed(model, Path(tmp) / "ckpt", tokenizer=tokenizer, report=report, max_shard_size=args.max_shard_size)
            shards = len(list((Path(tmp) / "ckpt").glob("*.safetensors")))
    after_import = sampler.anon_peaks["imports"]
    rows = {phase: {"peak_rss_mb": round(peak / 2**20, 1), "peak_anon_mb": round(sampler.anon_peaks[phase] / 2**20, 1),
                    "anon_above_imports_mb": round((sampler.anon_peaks[phase] - after_import) / 2**20, 1)}
            for phase, peak in sampler.peaks.items() if phase != "start"}  # fmt: skip
    result = {"model": args.model, "recipe": args.recipe, "dense_model_mb": round(dense_bytes / 2**20, 1),
              "compressed_model_mb": round(stored / 2**20, 1), "shards": shards, "torch": torch.__version__, "phases": rows}  # fmt: skip
    lines = [
        f"{args.model} (fp32 in memory: {result['dense_model_mb']:.0f} MiB; compressed {result['compressed_model_mb']:.0f} MiB), "
        f"{args.recipe}; saved in {shards} shards of <= {args.max_shard_size}",
        "",
        "| phase | peak RSS MiB | peak anonymous MiB | anonymous above the imports MiB | x the dense model |",
        "|---|---:|---:|---:|---:|",
    ]
    for phase, row in rows.items():
        above = row["anon_above_imports_mb"]
        lines.append(f"| {phase} | {row['peak_rss_mb']:.0f} | {row['peak_anon_mb']:.0f} | {above:.0f} | {above / result['dense_model_mb']:.2f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

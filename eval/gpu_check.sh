#!/usr/bin/env bash
# One GPU session's kernel work in one command: kernel tests on the GPU, then both benchmarks.
#
#   bash eval/gpu_check.sh OUT_DIR [--quick]
#
# On a bare machine with PyTorch and Triton but not llmpress's other dependencies, install the
# package without them (`pip install --no-deps --no-build-isolation -e .`) and provide pydantic,
# pyyaml, tqdm and psutil (e.g. as wheels). --quick runs two shapes and fewer tokens so the whole
# script fits a 10-minute command.
set -uo pipefail
out=${1:?usage: eval/gpu_check.sh OUT_DIR [--quick]}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tail -n 30 | tee "$out/kernel_tests.txt"
if [[ "${2:-}" == "--quick" ]]; then
    python3 -m compress.eval.bench_kernels --out "$out/kernels" --shapes 4096x4096 14336x4096 --tokens 1 16 64 \
        --sparsities 0.5 0.75 --repeats 50 2>&1 | tail -n 80 | tee "$out/bench_kernels.txt"
    python3 -m compress.eval.bench_decode --out "$out/decode" --layers 8 --batches 1 16 --new-tokens 32 2>&1 | tail -n 30 | tee "$out/bench_decode.txt"
else
    python3 -m compress.eval.bench_kernels --out "$out/kernels" 2>&1 | tail -n 200 | tee "$out/bench_kernels.txt"
    python3 -m compress.eval.bench_decode --out "$out/decode" 2>&1 | tail -n 30 | tee "$out/bench_decode.txt"
fi

#!/usr/bin/env bash
# Issue 7 measurements: three compressed checkpoints + dense, perplexity and lm-eval tasks, one report.
set -euo pipefail
cd /work/main
export OMP_NUM_THREADS=2 TQDM_DISABLE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
M=models/SmolLM2-135M-Instruct.Q4_1.gguf
CAL=../shared/data/wikitext2/valid.txt
TEST=../shared/data/wikitext2/test.txt
TASKS=local_arc_easy,local_piqa,local_hellaswag
INC=../shared/data/lm_eval_tasks
for r in whitened-svd-30-knapsack magnitude-2of4-eora64 sparsegpt-50; do
  [ -f out/$r/report.json ] || llmpress compress $M --recipe recipes/$r.yaml --dataset $CAL --output-dir out/$r --overwrite --quiet
done
mkdir -p out/dense
for d in dense whitened-svd-30-knapsack magnitude-2of4-eora64 sparsegpt-50; do
  src=out/$d; [ $d = dense ] && src=$M
  [ -f out/$d/eval.json ] || llmpress eval $src --ppl $TEST --max-windows 8 --tasks $TASKS --include-path $INC --limit 100 --batch-size 8 --quiet --json out/$d/eval.json
done
llmpress report out/dense out/whitened-svd-30-knapsack out/magnitude-2of4-eora64 out/sparsegpt-50 --output-dir eval/results/issue7

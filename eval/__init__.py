"""Evaluation (installed as `compress.eval`): perplexity, lm-eval tasks, benchmarks."""

from .harness import evaluate, results_table
from .perplexity import PerplexityResult, load_eval_text, perplexity

__all__ = ["PerplexityResult", "evaluate", "load_eval_text", "perplexity", "results_table"]

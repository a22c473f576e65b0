"""Evaluation (installed as `compress.eval`): perplexity now; lm-eval tasks, speed and memory next."""

from .perplexity import PerplexityResult, load_eval_text, perplexity

__all__ = ["PerplexityResult", "load_eval_text", "perplexity"]

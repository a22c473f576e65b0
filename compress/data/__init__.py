"""Calibration data: text sources and seeded token windows."""

from .calibration import BUILTIN_CORPUS, calibration_windows, load_texts, tokenize_texts

__all__ = ["BUILTIN_CORPUS", "calibration_windows", "load_texts", "tokenize_texts"]

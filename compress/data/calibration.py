"""Calibration text -> `num_samples` token windows of `seq_len`, seeded and reproducible.

Sources: a list of strings, a local .txt (one document), .jsonl/.json (a text field per record)
or .parquet file, a Hugging Face dataset id (`name` or `name:config`, when online), or None for
the built-in WikiText-2 validation excerpt. Documents are joined with blank lines, tokenized
once, and windows are cut at seeded random offsets (as GPTQ/SparseGPT do).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from ..errors import LlmpressError
from ..paths import local_dataset_path

BUILTIN_CORPUS = Path(__file__).with_name("wikitext2_valid_excerpt.txt")


def _from_file(path: Path, text_field: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix in (".txt", ".md", ".raw"):
        return [path.read_text(encoding="utf-8")]
    if suffix in (".jsonl", ".json"):
        if suffix == ".json":
            records = json.loads(path.read_text(encoding="utf-8"))
            records = records if isinstance(records, list) else [records]
        else:
            lines = path.read_text(encoding="utf-8").splitlines()
            records = [json.loads(line) for line in lines if line.strip()]
        missing = [i for i, r in enumerate(records) if not isinstance(r, dict) or text_field not in r]
        if missing:
            raise LlmpressError(
                f"{path}: record {missing[0]} has no {text_field!r} field; set calibration.text_field "
                "(--set calibration.text_field=NAME) to the field that holds the text"
            )
        return [str(r[text_field]) for r in records]
    if suffix == ".parquet":
        import datasets

        table = datasets.load_dataset("parquet", data_files=str(path), split="train")
        if text_field not in table.column_names:
            raise LlmpressError(f"{path}: no column {text_field!r}; columns are {table.column_names}")
        return list(table[text_field])
    raise LlmpressError(f"calibration file {path} has unsupported type {suffix!r}; use .txt, .jsonl, .json or .parquet")


def _from_hub(dataset_id: str, split: str, text_field: str) -> list[str]:
    import datasets

    name, _, config = dataset_id.partition(":")
    try:
        table = datasets.load_dataset(name, config or None, split=split)
    except Exception as exc:  # datasets raises many types for missing/offline datasets
        raise LlmpressError(
            f"calibration dataset {dataset_id!r} is neither a local file nor loadable from the Hugging Face Hub "
            f"({type(exc).__name__}: {exc}). Pass an existing .txt/.jsonl/.parquet path, or omit --dataset to use "
            "the built-in WikiText-2 excerpt"
        ) from None
    if text_field not in table.column_names:
        raise LlmpressError(f"dataset {dataset_id!r} has no column {text_field!r}; columns are {table.column_names}")
    return list(table[text_field])


def load_texts(
    dataset: str | Path | Sequence[str] | None, split: str = "train", text_field: str = "text"
) -> list[str]:
    """Documents from any supported source (see module docstring)."""
    if dataset is None:
        return [BUILTIN_CORPUS.read_text(encoding="utf-8")]
    if isinstance(dataset, (list, tuple)):
        if not all(isinstance(t, str) for t in dataset):
            raise LlmpressError("a calibration dataset given as a list must contain only strings")
        return list(dataset)
    path = local_dataset_path(dataset)
    if path is not None:
        return _from_file(path, text_field)
    return _from_hub(str(dataset), split, text_field)


def tokenize_texts(tokenizer, texts: list[str], chat_template: bool = False) -> torch.Tensor:
    """One long 1-D tensor of token ids for the documents joined by blank lines."""
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise LlmpressError("calibration.chat_template is set but the tokenizer has no chat template")
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False) for t in texts
        ]
    joined = "\n\n".join(t for t in texts if t.strip())
    if not joined:
        raise LlmpressError("the calibration data is empty: every document is blank")
    ids = tokenizer(joined, return_tensors="pt", add_special_tokens=False, verbose=False)["input_ids"][0]
    return ids


def calibration_windows(
    tokenizer,
    dataset: str | Path | Sequence[str] | None,
    num_samples: int,
    seq_len: int,
    seed: int = 0,
    chat_template: bool = False,
    split: str = "train",
    text_field: str = "text",
) -> torch.Tensor:
    """(num_samples, seq_len) int64 token windows at seeded random offsets."""
    ids = tokenize_texts(tokenizer, load_texts(dataset, split, text_field), chat_template)
    if ids.numel() < seq_len:
        raise LlmpressError(
            f"the calibration data has {ids.numel()} tokens, fewer than one window of seq_len={seq_len}; "
            "give more text or lower --seq-len"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (num_samples,), generator=generator)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])

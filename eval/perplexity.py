"""Perplexity with the papers' protocol (GPTQ / SparseGPT / SVD-LLM).

Concatenate the evaluation text, tokenize it once (no special tokens), cut non-overlapping
windows of `seq_len` tokens, and report exp(mean token NLL) over every predicted token
(seq_len - 1 per window). Token-level, so numbers compare across methods of one tokenizer,
not with lm-eval's word perplexity.

BOS: models whose tokenizer puts a BOS token first (Gemma, Llama-3) are far off without it
(one held-out Gemma model: window 0 scored 43.66 without BOS, 28.67 with it), so by default each
window starts with BOS exactly when the tokenizer adds one: [BOS] + seq_len - 1 text tokens, all
of them predicted. `bos=False` is the GPTQ-style protocol (no special tokens anywhere); the
result records which was used.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from compress.errors import LlmpressError


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float
    tokens: int
    windows: int
    seq_len: int
    seconds: float
    source: str
    bos: bool  # whether each window started with the tokenizer's BOS token

    def as_dict(self) -> dict:
        return asdict(self)


def load_eval_text(source: str | Path) -> str:
    """A local text file, or `wikitext2` (the raw WikiText-2 test split, needs the Hub)."""
    path = Path(source).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if str(source) in ("wikitext2", "wikitext-2"):
        import datasets

        try:
            rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
        except Exception as exc:
            raise LlmpressError(
                f"could not load WikiText-2 from the Hugging Face Hub ({type(exc).__name__}); "
                "pass a local text file to --ppl instead"
            ) from None
        return "\n\n".join(rows)
    raise LlmpressError(f"perplexity text {str(source)!r} not found: pass a text file or 'wikitext2'")


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the tokenizer's own encoding starts with its BOS token."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos_id


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer,
    text: str | Path,
    seq_len: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    progress: bool = True,
    bos: bool | None = None,
) -> PerplexityResult:
    """Token-level perplexity of `model` on `text` (a string, or a path / 'wikitext2').

    `bos`: start every window with the BOS token; None (default) does what the tokenizer does.
    """
    start = time.perf_counter()
    source = "<string>"
    if isinstance(text, Path) or (isinstance(text, str) and len(text) < 4096 and "\n" not in text):
        source = str(text)
        text = load_eval_text(text)
    bos = tokenizer_adds_bos(tokenizer) if bos is None else bos
    if bos and getattr(tokenizer, "bos_token_id", None) is None:
        raise LlmpressError("bos=True but the tokenizer has no BOS token; evaluate without BOS")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False, verbose=False)["input_ids"][0]
    text_len = seq_len - 1 if bos else seq_len  # text tokens per window
    windows = ids.numel() // text_len
    if windows == 0:
        raise LlmpressError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    if max_windows is not None:
        windows = min(windows, max_windows)
    ids = ids[: windows * text_len].view(windows, text_len)
    if bos:
        ids = torch.cat([torch.full((windows, 1), tokenizer.bos_token_id, dtype=ids.dtype), ids], dim=1)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for batch in tqdm(ids.split(batch_size), desc="Perplexity", disable=not progress, unit="batch"):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        nll = nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum"
        )
        total_nll += float(nll)
        total_tokens += batch[:, 1:].numel()
    mean_nll = total_nll / total_tokens
    return PerplexityResult(
        perplexity=math.exp(mean_nll),
        nll=mean_nll,
        tokens=total_tokens,
        windows=windows,
        seq_len=seq_len,
        seconds=time.perf_counter() - start,
        source=source,
        bos=bos,
    )

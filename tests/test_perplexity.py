"""Perplexity windows: the tokenizer's BOS behaviour by default, the GPTQ protocol on request."""

import copy
import math

import pytest
import torch
from tokenizers import processors

from compress.eval import perplexity
from compress.eval.perplexity import tokenizer_adds_bos
from conftest import tiny_model

TEXT = "The quick brown fox jumps over the lazy dog.\n" * 40


def _reference(model, rows: torch.Tensor) -> float:
    """exp(mean NLL) of every token after the first of each row, computed directly."""
    logits = model(input_ids=rows).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), rows[:, 1:].flatten())
    return math.exp(float(nll))


def _with_bos(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    return tok


def test_windows_follow_the_tokenizer_bos(tokenizer):
    model = tiny_model("llama")
    ids = tokenizer(TEXT, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    assert not tokenizer_adds_bos(tokenizer)
    plain = perplexity(model, tokenizer, TEXT, seq_len=32, max_windows=3, progress=False)
    assert not plain.bos and plain.tokens == 3 * 31
    assert plain.perplexity == pytest.approx(_reference(model, ids[:96].view(3, 32)), rel=1e-5)

    bos_tokenizer = _with_bos(tokenizer)
    assert tokenizer_adds_bos(bos_tokenizer)
    with_bos = perplexity(model, bos_tokenizer, TEXT, seq_len=32, max_windows=3, progress=False)
    rows = torch.cat([torch.full((3, 1), tokenizer.bos_token_id), ids[:93].view(3, 31)], dim=1)
    assert with_bos.bos and with_bos.tokens == 3 * 31
    assert with_bos.perplexity == pytest.approx(_reference(model, rows), rel=1e-5)
    assert with_bos.perplexity != pytest.approx(plain.perplexity, rel=1e-3)
    gptq = perplexity(model, bos_tokenizer, TEXT, seq_len=32, max_windows=3, progress=False, bos=False)
    assert not gptq.bos and gptq.perplexity == pytest.approx(plain.perplexity, rel=1e-6)

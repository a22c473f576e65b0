"""Shared fixtures: tiny random models from configs and a tiny BPE tokenizer, all made offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402  (torch does not import triton)

# Without a GPU, Triton kernels run in Triton's CPU interpreter, which reads this variable when
# triton is imported (importing compress imports it): set it first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

from compress.data import BUILTIN_CORPUS

VOCAB = 384


def tiny_config(kind: str = "llama", layers: int = 2):
    common = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    if kind == "llama":
        return LlamaConfig(**common)
    if kind == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(kind)


def tiny_model(kind: str = "llama", layers: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, layers), dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer():
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = BUILTIN_CORPUS.read_text()[:60_000]
    backend.train_from_iterator([text[i : i + 2000] for i in range(0, len(text), 2000)], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


@pytest.fixture(params=["llama", "qwen2"])
def model_kind(request):
    return request.param


@pytest.fixture
def tiny_model_dir(tmp_path, tokenizer, model_kind):
    """A saved tiny model + tokenizer directory, as a user's local HF checkpoint."""
    directory = tmp_path / f"tiny-{model_kind}"
    tiny_model(model_kind).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture
def calib_text(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(BUILTIN_CORPUS.read_text()[60_000:120_000])
    return path

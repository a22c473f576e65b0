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


# Every family the README names, plus those that hand layers of different attention types their
# own mask and RoPE (sliding windows shorter than the test sequences, which are 24+ tokens).
FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3", "opt", "gpt_neox")


def family_config(kind: str, layers: int = 3):
    """A tiny random config of one architecture family."""
    import transformers as tf

    head = dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, vocab_size=VOCAB, **head)
    special = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if kind in ("llama", "qwen2"):
        return tiny_config(kind, layers)
    if kind == "qwen3":
        return tf.Qwen3Config(**common, **special, head_dim=16)
    if kind == "mistral":
        return tf.MistralConfig(**common, **special, sliding_window=8)
    if kind == "gemma2":  # alternating sliding/full layers, soft-capping
        return tf.Gemma2Config(**common, **special, head_dim=16, sliding_window=8, query_pre_attn_scalar=16)
    if kind == "gemma3":  # mixed layer types with a RoPE base per type, as in the held-out model
        return tf.Gemma3TextConfig(
            **common, **special, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
            layer_types=(["sliding_attention", "sliding_attention", "full_attention"] * layers)[:layers],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            },
        )  # fmt: skip
    if kind == "phi3":
        return tf.Phi3Config(**common, **special)
    if kind == "opt":
        return tf.OPTConfig(
            hidden_size=64, ffn_dim=128, num_hidden_layers=layers, num_attention_heads=4, vocab_size=VOCAB,
            max_position_embeddings=256, word_embed_proj_dim=64, **special,
        )  # fmt: skip
    if kind == "gpt_neox":
        return tf.GPTNeoXConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4, vocab_size=VOCAB,
            max_position_embeddings=256, rotary_pct=0.5, **special,
        )  # fmt: skip
    raise ValueError(kind)


MOE_FAMILIES = ("qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3", "qwen2_moe")


def moe_config(kind: str, layers: int = 3):
    """A tiny random mixture-of-experts config (experts as fused 3-D parameters, transformers v5)."""
    import transformers as tf

    common = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=layers, vocab_size=VOCAB, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    if kind == "qwen3_moe":
        return tf.Qwen3MoeConfig(**common, head_dim=16, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
    if kind == "mixtral":
        return tf.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2, sliding_window=8)
    if kind == "gpt_oss":  # alternating sliding/full attention plus experts
        types = (["sliding_attention", "full_attention"] * layers)[:layers]
        return tf.GptOssConfig(**common, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=8, layer_types=types)
    if kind == "deepseek_v3":  # multi-head latent attention, a dense first block, shared experts, grouped routing
        return tf.DeepseekV3Config(
            **common, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
            first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
            v_head_dim=16, n_group=2, topk_group=1,
        )  # fmt: skip
    if kind == "qwen2_moe":  # a shared expert whose gate is an nn.Linear (a router)
        return tf.Qwen2MoeConfig(
            **common, moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2
        )
    raise ValueError(kind)


def family_model(kind: str, layers: int = 3, seed: int = 0, dtype: torch.dtype = torch.float64):
    """A tiny random model of one family, in float64 so that block-by-block runs can be compared
    with a plain forward to near machine precision."""
    torch.manual_seed(seed)
    if kind in MOE_FAMILIES:  # their expert kernels (grouped GEMMs) take float32 at most
        return AutoModelForCausalLM.from_config(moe_config(kind, layers), dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_config(family_config(kind, layers), dtype=dtype).eval()


@pytest.fixture(autouse=True)
def _kernel_mode_restored():
    """Tests may switch the kernel mode (kernels.set_kernel_mode); each starts from the default."""
    from compress import kernels

    before = kernels.kernel_mode()
    yield
    kernels.set_kernel_mode(before)


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


def check_bench_perplexities(rows: dict, names, model_dir, text_path, seq_len: int, windows: int) -> None:
    """A benchmark's dense row equals a direct perplexity of the dense model; compressed rows are
    finite and differ from it (the compression changed the model)."""
    import math

    from transformers import AutoTokenizer

    from compress.eval import perplexity

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    direct = perplexity(model, AutoTokenizer.from_pretrained(model_dir), text_path, seq_len=seq_len, max_windows=windows, progress=False)
    dense = rows["dense"]["perplexity"]
    assert dense == pytest.approx(direct.perplexity, rel=1e-6)
    for name in names:
        assert math.isfinite(rows[name]["perplexity"]) and rows[name]["perplexity"] != pytest.approx(dense, rel=1e-6), name

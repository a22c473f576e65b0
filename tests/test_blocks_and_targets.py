import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, Gemma2Config, GPTNeoXConfig, OPTConfig, Phi3Config

from compress.blocks import find_decoder_blocks
from compress.errors import LlmpressError
from compress.targets import match_linears
from conftest import tiny_model

SMALL = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, vocab_size=100, max_position_embeddings=64)


@pytest.mark.parametrize(
    "make, path",
    [
        (lambda: tiny_model("llama", 3), "model.layers"),
        (lambda: tiny_model("qwen2", 3), "model.layers"),
        (lambda: OPTConfig(ffn_dim=64, word_embed_proj_dim=32, **SMALL), "model.decoder.layers"),
        (lambda: GPTNeoXConfig(intermediate_size=64, **SMALL), "gpt_neox.layers"),
        (lambda: Gemma2Config(intermediate_size=64, head_dim=8, num_key_value_heads=2, **SMALL), "model.layers"),
        (lambda: Phi3Config(intermediate_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, **SMALL), "model.layers"),
    ],
)
def test_block_discovery(make, path):
    made = make()
    model = made if isinstance(made, nn.Module) else AutoModelForCausalLM.from_config(made)
    found_path, blocks = find_decoder_blocks(model)
    assert found_path == path
    assert len(blocks) == 3


def test_block_discovery_without_no_split_modules_uses_homogeneous_list():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stack = nn.ModuleList([Block() for _ in range(5)])
            self.head = nn.ModuleList([nn.Linear(4, 4)])

    path, blocks = find_decoder_blocks(Net())
    assert path == "stack" and len(blocks) == 5


def test_block_discovery_error_names_the_model():
    with pytest.raises(LlmpressError, match="could not find the decoder blocks of Linear"):
        find_decoder_blocks(nn.Linear(2, 2))


def test_targets_class_name_exact_and_regex():
    model = tiny_model("llama", 2)
    all_linears = match_linears(model, ["Linear"], ["lm_head"])
    assert len(all_linears) == 2 * 7 and "lm_head" not in all_linears
    exact = match_linears(model, ["model.layers.1.mlp.down_proj"], [])
    assert list(exact) == ["model.layers.1.mlp.down_proj"]
    regex = match_linears(model, [r"re:.*\.(q|k)_proj$"], ["re:model\\.layers\\.0\\..*"])
    assert sorted(regex) == ["model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.q_proj"]
    assert "lm_head" in match_linears(model, ["lm_head"], [])
    assert match_linears(model, ["Conv2d"], []) == {}
    assert isinstance(next(iter(all_linears.values())), torch.nn.Linear)

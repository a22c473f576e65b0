"""Loading compressed checkpoints where users load models: every format round-trips through
from_pretrained, device_map placement, generate, and export to a plain dense HF checkpoint."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

import compress
from compress.errors import LlmpressError
from compress.modules import FORMATS, CompressedLinear
from compress.report import compressed_modules
from conftest import tiny_model

RECIPE = {  # one stage per format: gqsa, dict (W8 atoms), tile_sparse (one layer each), lowrank (attention), sparse_delta (one layer), lowbit (W3, one layer), sparse_bitmap (mlp), eora on block 1's attention;
    # int8: the (tied) embedding table, which the head reads
    "calibration": {"num_samples": 3, "seq_len": 32},
    "embeddings": {"bits": 8, "group_size": 32},
    "stages": [
        {"method": "sparsegpt", "ratio": 0.5, "pattern": "tile", "tile_rows": 16, "tile_cols": 32, "targets": ["model.layers.0.self_attn.o_proj"]},
        {"method": "gqsa", "ratio": 0.5, "group_size": 16, "targets": ["model.layers.0.mlp.down_proj"]},
        {"method": "rocket", "ratio": 0.3, "atom_bits": 8, "targets": ["model.layers.0.mlp.up_proj"]},  # W8 atoms
        {"method": "whitened_svd", "ratio": 0.4, "targets": ["re:.*self_attn\\..*"]},
        {"method": "sparsegpt", "ratio": 0.5, "sparse_format": "delta", "targets": ["model.layers.0.mlp.gate_proj"]},
        {"method": "gptq", "bits": 3, "group_size": 32, "blocksize": 32, "targets": ["model.layers.1.mlp.down_proj"]},
        {"method": "wanda", "pattern": "2:4", "targets": ["re:.*mlp\\..*"]},
        {"method": "eora", "rank": 4, "targets": ["re:.*layers\\.1\\.self_attn\\..*"]},
    ],
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    from conftest import BUILTIN_CORPUS

    text = tmp_path_factory.mktemp("calib") / "calib.txt"
    text.write_text(BUILTIN_CORPUS.read_text()[60_000:100_000])
    model, report = compress.compress_model(tiny_model("llama"), RECIPE, dataset=str(text), tokenizer=tokenizer, progress=False)
    out = compress.save_compressed(model, tmp_path_factory.mktemp("ckpt") / "ckpt", tokenizer=tokenizer, report=report)
    return model, out


def test_every_format_round_trips_through_from_pretrained(checkpoint):
    model, out = checkpoint
    formats = {m.format for m in compressed_modules(model).values()}
    assert formats == set(FORMATS) == {"gqsa", "dict", "lowrank", "sparse_bitmap", "eora", "tile_sparse", "sparse_delta", "int8", "lowbit"}
    assert model.get_submodule("model.layers.0.mlp.up_proj").atom_bits == 8  # the dictionary's atoms as W8 codes
    ids = torch.randint(0, 300, (2, 16))
    auto = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(auto(input_ids=ids).logits, model(input_ids=ids).logits)
    for name, module in compressed_modules(model).items():
        assert torch.equal(auto.get_submodule(name).to_dense(), module.to_dense()), name


class EarlierCheckpoint:
    """A copy of a saved checkpoint to rewrite into an earlier layout: one module's spec in
    config.json and the tensors of its weights file, written back by `save`."""

    def __init__(self, out, tmp_path, name: str):
        self.dir = tmp_path / "old"
        shutil.copytree(out, self.dir)
        self.config = json.loads((self.dir / "config.json").read_text())
        self.spec = self.config["quantization_config"]["modules"][name]
        [self.weights_file] = self.dir.glob("*.safetensors")
        self.tensors = load_file(self.weights_file)

    def save(self) -> None:
        (self.dir / "config.json").write_text(json.dumps(self.config))
        save_file(self.tensors, self.weights_file, metadata={"format": "pt"})


def test_w3_codes_of_the_earlier_layout_load_rewritten(checkpoint, tmp_path):
    """A checkpoint written before W3 codes became 32-bit words (spec packing "planes": third bits
    by byte, the group's halves paired) loads with the same weights; a layout it cannot rewrite
    is refused with the fix."""
    from compress.modules.lowbit import pack_codes, unpack_codes

    model, out = checkpoint
    name = "model.layers.1.mlp.down_proj"
    old = EarlierCheckpoint(out, tmp_path, name)
    spec, tensors = old.spec, old.tensors
    assert spec["packing"] == "words" and spec["bits"] == 3
    spec["packing"] = "planes"
    key = f"{name}.qweight"
    codes = unpack_codes(tensors[key], 3)
    group = codes.shape[-1]
    low = pack_codes(codes, 2)  # the low plane is the same in both layouts
    third = ((codes >> 2) & 1).unflatten(-1, (2, -1, 4))  # the earlier third plane: (half, byte, p)
    high = (third[..., 0, :, :] << torch.arange(4)).sum(-1) | (third[..., 1, :, :] << (4 + torch.arange(4))).sum(-1)
    tensors[key] = torch.cat([low, high.to(torch.uint8)], dim=-1)
    assert not torch.equal(tensors[key], pack_codes(codes, 3)) and group % 32 == 0
    old.save()
    loaded = AutoModelForCausalLM.from_pretrained(old.dir)
    assert torch.equal(loaded.get_submodule(name).to_dense(), model.get_submodule(name).to_dense())
    spec["group_size"] = 16
    old.save()
    with pytest.raises(LlmpressError, match="compress the model again"):
        AutoModelForCausalLM.from_pretrained(old.dir)


def test_dictionary_index_rows_of_the_earlier_layout_load_padded(checkpoint, tmp_path):
    """A checkpoint written before dictionary index rows were whole 32-bit words (no spec
    "index_rows": rows of ceil(s·b/8) bytes) loads, its rows padded, with the same weights."""
    model, out = checkpoint
    name = "model.layers.0.mlp.up_proj"
    old = EarlierCheckpoint(out, tmp_path, name)
    assert old.spec["format"] == "dict" and old.spec.pop("index_rows") == "words"
    key = f"{name}.coef_index"
    byte_rows = (old.spec["nnz_per_row"] * old.spec["index_bits"] + 7) // 8
    assert old.tensors[key].shape[1] > byte_rows  # the words' padding this test removes
    old.tensors[key] = old.tensors[key][:, :byte_rows].contiguous()
    old.save()
    loaded = AutoModelForCausalLM.from_pretrained(old.dir).get_submodule(name)
    assert loaded.coef_index.shape == model.get_submodule(name).coef_index.shape
    assert torch.equal(loaded.to_dense(), model.get_submodule(name).to_dense())


def test_an_offloaded_tensor_of_an_earlier_layout_is_refused(checkpoint):
    """A tensor left on the meta device (a device_map offloaded it) cannot be rewritten on load:
    the loader says so and how to fix it, instead of serving the old layout."""
    from compress.modules import build_module

    model, _ = checkpoint
    spec = model.get_submodule("model.layers.0.mlp.up_proj").spec()
    del spec["index_rows"]
    module = build_module(spec, torch.float32, device="meta")
    with pytest.raises(LlmpressError, match="offloaded by the device_map.*save it again"):
        module.after_loading()
    spec = {**model.get_submodule("model.layers.1.mlp.down_proj").spec(), "packing": "planes"}
    with pytest.raises(LlmpressError, match="offloaded by the device_map"):
        build_module(spec, torch.float32, device="meta").after_loading()


def test_device_map_and_generate(checkpoint):
    model, out = checkpoint
    placed = compress.load(out, device_map="auto")
    assert {p.device.type for p in placed.parameters()} == {"cpu"}
    ids = torch.tensor([[5, 17, 42, 99]])
    generated = placed.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    assert generated.shape == (1, 10)
    # greedy decoding with the KV cache gives the same tokens as re-running the full prefix
    tokens = ids
    for _ in range(6):
        nxt = model(input_ids=tokens).logits[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], dim=1)
    assert torch.equal(generated, tokens)


def test_export_dense_equals_to_dense(checkpoint, tmp_path):
    model, out = checkpoint
    dense_dir = compress.export_dense(out, tmp_path / "dense")
    dense = AutoModelForCausalLM.from_pretrained(dense_dir)
    assert getattr(dense.config, "quantization_config", None) is None
    assert not any(isinstance(m, CompressedLinear) for m in dense.modules())
    for name, module in compressed_modules(model).items():
        if name == "model.embed_tokens.table":  # the quantized embedding: a plain nn.Embedding again, tied to the head
            assert type(dense.model.embed_tokens) is nn.Embedding and dense.lm_head.weight is dense.model.embed_tokens.weight
            assert torch.equal(dense.model.embed_tokens.weight, module.to_dense())
            continue
        layer = dense.get_submodule(name)
        assert type(layer) is nn.Linear and torch.equal(layer.weight, module.to_dense()), name
    ids = torch.randint(0, 300, (1, 12))
    torch.testing.assert_close(dense(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    with pytest.raises(LlmpressError, match="already exists"):
        compress.export_dense(out, dense_dir)

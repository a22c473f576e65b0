"""Token embeddings and output head in W8/W4 (compress/embeddings.py): the quantizer, the Int8
format and its kernel, the module swap on tied and untied families, checkpoints and export."""

from __future__ import annotations

import json

import pytest
import torch
from compress.kernels import set_kernel_mode
from compress.kernels.int8_matmul import int8_matmul
from conftest import VOCAB, family_model
from transformers import AutoModelForCausalLM

from compress.checkpoint import export_dense, load, save_compressed
from compress.compressors.rtn import quantize_groups
from compress.embeddings import EmbeddingsConfig, quantize_embeddings
from compress.errors import LlmpressError
from compress.metrics import serving_dtype
from compress.modules import GQSALinear, Int8Linear, QuantizedEmbedding, TiedOutputHead
from compress.recipe import load_recipe


@pytest.mark.parametrize("bits", [4, 8])
def test_clipping_search_never_loses_to_min_max_and_codes_fit_their_bits(bits):
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    searched = quantize_groups(w, bits, 32)
    minmax = quantize_groups(w, bits, 32, shrink_steps=1)
    err = lambda grid: (grid.dequantize() - w).square().reshape(64, 4, 32).sum(-1)
    assert (err(searched) <= err(minmax) + 1e-6).all()  # per group: the min-max grid is among the candidates
    # at 4 bits a Gaussian group's extremes waste levels: a narrower grid rounds the rest finer
    assert err(searched).sum() <= (0.95 if bits == 4 else 1.0) * err(minmax).sum()
    assert int(searched.codes.max()) <= 2**bits - 1 and int(searched.zeros.max()) <= 2**bits - 1
    rel = float((searched.dequantize() - w).norm() / w.norm())
    assert rel < (0.1 if bits == 4 else 0.006)


def test_quantizer_refuses_bad_input_with_the_reason():
    with pytest.raises(ValueError, match="divide"):
        quantize_groups(torch.randn(4, 30), 8, 16)
    with pytest.raises(ValueError, match="non-finite"):
        quantize_groups(torch.tensor([[1.0, float("nan")]]), 8, 2)
    with pytest.raises(ValueError, match="2, 3, 4 or 8"):
        quantize_groups(torch.randn(4, 32), 5, 16)


def _int8_layer(out: int, inp: int, group: int, bias: bool, dtype=torch.float32) -> Int8Linear:
    grid = quantize_groups(torch.randn(out, inp), 8, group)
    b = torch.randn(out) if bias else None
    return Int8Linear.from_codes(grid.codes, grid.scales.to(dtype), grid.zeros, None if b is None else b.to(dtype))


def test_int8_linear_reference_is_the_dequantized_matmul_and_counts_its_bytes():
    layer = _int8_layer(48, 64, 16, bias=True)
    x = torch.randn(3, 5, 64)
    ref = x @ layer.to_dense().T + layer.bias
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    with serving_dtype("bfloat16"):  # 1 byte per code + (bf16 scale + uint8 zero) per group + bf16 bias
        assert layer.num_bytes() == 48 * 64 + 48 * 4 * 3 + 48 * 2
    rows = torch.tensor([3, 0, 47])
    torch.testing.assert_close(layer.dequantize_rows(rows), layer.to_dense()[rows])


@pytest.mark.parametrize("tokens", [1, 5, 16])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_int8_kernel_matches_the_reference_in_the_interpreter(tokens, dtype, tol):
    layer = _int8_layer(40, 128, 64, bias=True, dtype=dtype)
    x = torch.randn(tokens, 128).to(dtype)
    ref = (x.double() @ layer.to_dense().double().T + layer.bias.double()).to(dtype)
    y = int8_matmul(x, layer.qweight, layer.scales, layer.zeros, layer.bias)
    assert float((y.double() - ref.double()).norm() / ref.double().norm()) < tol
    set_kernel_mode("triton")  # the module dispatches to the same kernel
    torch.testing.assert_close(layer(x), y)


def _with_dense_table(model, table: torch.Tensor):
    """The same model with its embedding matrix replaced by `table` (dense): what a quantized
    embedding must compute exactly."""
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(table)
    return model


@pytest.mark.parametrize("kind,bits", [("llama", 8), ("llama", 4), ("gemma3", 8), ("gpt_neox", 4), ("opt", 8)])
def test_quantized_embeddings_compute_the_model_with_the_dequantized_table(kind, bits):
    ids = torch.randint(3, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    model = family_model(kind, dtype=torch.float32)
    reference = family_model(kind, dtype=torch.float32)
    embedding = model.get_input_embeddings()
    tied = model.get_output_embeddings().weight is embedding.weight
    dense_bytes = sum(t.numel() * 2 for t in {id(p): p for p in (embedding.weight, model.get_output_embeddings().weight)}.values())
    with serving_dtype("bfloat16"):
        section = quantize_embeddings(model, EmbeddingsConfig(bits=bits, group_size=16))
    assert section["tied"] == tied and section["bytes_before"] == dense_bytes
    quantized = model.get_input_embeddings()
    assert isinstance(quantized, QuantizedEmbedding)
    assert isinstance(quantized.table, Int8Linear if bits == 8 else GQSALinear)
    head = model.get_output_embeddings()
    if tied:  # the head reads the embedding's table: no tensor of its own
        assert isinstance(head, TiedOutputHead) and not list(head.parameters()) and not list(head.buffers())
    else:
        assert isinstance(head, Int8Linear if bits == 8 else GQSALinear)
        with torch.no_grad():
            reference.get_output_embeddings().weight.copy_(head.to_dense())
    # bytes as served (bf16): codes + a bf16 scale and uint8 zero per group of 16, for each stored table
    per_table = VOCAB * 64 * bits // 8 + VOCAB * 4 * 3
    assert section["bytes_after"] == per_table * (1 if tied else 2)
    expected = _with_dense_table(reference, quantized.to_dense())(ids).logits
    torch.testing.assert_close(model(ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_tied_checkpoint_stores_the_table_once_loads_bit_exact_and_exports(tmp_path):
    ids = torch.randint(3, VOCAB, (1, 16))
    model = family_model("gemma3", dtype=torch.float32)  # tied, with Gemma's scaled embedding
    quantize_embeddings(model, EmbeddingsConfig(bits=8, group_size=32))
    logits = model(ids).logits
    save_compressed(model, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    entry = config["quantization_config"]["embeddings"]
    assert entry["tied_head"] == "lm_head" and entry["spec"]["embed_scale"] == pytest.approx(64**0.5)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.table.qweight" in keys and not any(k.startswith("lm_head") for k in keys)
    loaded = load(tmp_path / "ckpt")
    assert isinstance(loaded.lm_head, TiedOutputHead)
    torch.testing.assert_close(loaded(ids).logits, logits, rtol=0, atol=0)
    export_dense(tmp_path / "ckpt", tmp_path / "dense")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)
    assert plain.lm_head.weight is plain.get_input_embeddings().weight  # tied again
    torch.testing.assert_close(plain(ids).logits, logits, rtol=1e-5, atol=1e-5)


def test_recipe_embeddings_section_and_its_errors(tiny_model_dir, tmp_path):
    from compress.api import compress_model

    recipe = {
        "name": "w8-emb",
        "calibration": {"num_samples": 2, "seq_len": 32},
        "embeddings": {"bits": 8, "group_size": 32},
        "stages": [{"method": "gqsa", "ratio": 0.0, "group_size": 16, "targets": ["Linear"], "ignore": ["lm_head"]}],
    }
    model, report = compress_model(str(tiny_model_dir), recipe, output_dir=tmp_path / "out")
    assert report["embeddings"]["bits"] == 8 and report["embeddings"]["tied"]
    text = (tmp_path / "out" / "report.md").read_text()
    assert "embeddings (model.embed_tokens): W8 in groups of 32" in text
    dense, compressed = report["model_size"]["dense"]["bytes"], report["model_size"]["compressed"]["bytes"]
    assert dense - compressed > VOCAB * 64 * 2 - VOCAB * 64 * 1.2  # the table's bf16 bytes went to ~1 byte per value
    with pytest.raises(LlmpressError, match="embeddings.bits"):
        load_recipe({**recipe, "embeddings": {"bits": 3}})
    with pytest.raises(LlmpressError, match="unknown key"):
        load_recipe({**recipe, "embeddings": {"bitz": 8}})
    model = family_model("llama", dtype=torch.float32)
    with pytest.raises(LlmpressError, match="must divide the hidden size 64; try 64"):
        quantize_embeddings(model, EmbeddingsConfig(bits=8, group_size=48))
    quantize_embeddings(model, EmbeddingsConfig())
    with pytest.raises(LlmpressError, match="already quantized"):
        quantize_embeddings(model, EmbeddingsConfig())


@pytest.mark.parametrize("model_kind", ["llama"])
def test_embeddings_benchmark_writes_its_table(tiny_model_dir, calib_text, tmp_path):
    from compress.eval.bench_embeddings import main

    main(["--model", str(tiny_model_dir), "--eval", str(calib_text), "--settings", "8:32", "4:16", "--seq-len", "32",
          "--windows", "2", "--out", str(tmp_path)])  # fmt: skip
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["embeddings"] for r in rows] == ["kept", "8:32", "4:16"]
    kept, w8, w4 = rows
    assert w8["model_bytes"] < kept["model_bytes"] and w4["model_bytes"] < w8["model_bytes"]
    assert w8["embedding_bytes_before"] == VOCAB * 64 * 2 and w8["tied"]  # the tied table, once, in bf16
    assert abs(w8["perplexity"] - kept["perplexity"]) < 0.01 * kept["perplexity"]
    assert "| 4:16 |" in (tmp_path / "results.md").read_text()


def test_inspect_names_the_quantized_embeddings(tmp_path, capsys):
    from compress.cli import main

    model = family_model("llama", dtype=torch.float32)
    quantize_embeddings(model, EmbeddingsConfig(bits=4, group_size=16))
    save_compressed(model, tmp_path / "ckpt")
    assert main(["inspect", str(tmp_path / "ckpt")]) == 0
    text = capsys.readouterr().out
    assert "model.embed_tokens.table" in text and "gqsa" in text
    assert "embeddings: model.embed_tokens.table in W4, groups of 16; the output head lm_head reads the same table" in text

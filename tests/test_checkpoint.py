import os

import pytest
import torch
from transformers import AutoModelForCausalLM

import compress
from compress.errors import LlmpressError
from compress.modules import LowRankLinear, SparseLinear
from conftest import tiny_model

RECIPE = {
    "calibration": {"num_samples": 4, "seq_len": 32, "weighted_errors": True},
    "stages": [
        {"method": "svd", "ratio": 0.3, "targets": ["re:.*self_attn\\..*"]},
        {"method": "magnitude", "pattern": "2:4", "targets": ["re:.*mlp\\..*"]},
    ],
}


@pytest.fixture
def compressed(model_kind, tokenizer, calib_text):
    model = tiny_model(model_kind, layers=2)
    model, report = compress.compress_model(model, RECIPE, dataset=str(calib_text), tokenizer=tokenizer, progress=False)
    return model, report


def test_compress_model_report(compressed):
    model, report = compressed
    layers = report["layers"]
    assert len(layers) == 14
    assert {r["format"] for r in layers} == {"lowrank", "sparse_bitmap"}
    assert all(r["rel_weighted_error"] is not None for r in layers)
    s = report["summary"]
    assert 0 < s["storage_ratio_removed"] < s["nominal_ratio_removed"] < 1  # bitmap bytes are counted
    assert report["calibration"]["tokens"] == 4 * 32
    assert report["not_compressed"] is None  # a dense model: no expert stacks left behind
    assert isinstance(model.model.layers[0].self_attn.q_proj, LowRankLinear)
    assert isinstance(model.model.layers[1].mlp.down_proj, SparseLinear)


def test_data_free_recipe_skips_calibration_unless_weighted_errors_are_asked(tokenizer, calib_text):
    recipe = {**RECIPE, "calibration": {"num_samples": 4, "seq_len": 32}}
    _, report = compress.compress_model(tiny_model("llama"), recipe, dataset=str(calib_text), tokenizer=tokenizer, progress=False)
    assert report["calibration"]["tokens"] == 0
    assert all(r["rel_weighted_error"] is None for r in report["layers"]) and len(report["layers"]) == 14


def test_save_load_round_trip_is_bit_exact(compressed, tmp_path, tokenizer):
    model, report = compressed
    ids = torch.randint(0, 300, (2, 20))
    expected = model(ids, use_cache=False).logits
    out = compress.save_compressed(model, tmp_path / "ckpt", tokenizer=tokenizer, recipe=compress.load_recipe(RECIPE), report=report)
    names = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "recipe.yaml", "report.json", "report.md", "tokenizer.json"} <= names
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.self_attn.q_proj.up" in keys and "model.layers.0.self_attn.q_proj.weight" not in keys
    assert "model.layers.0.mlp.up_proj.bitmap" in keys
    loaded = compress.load(out)
    assert torch.equal(loaded(ids, use_cache=False).logits, expected)
    auto = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(auto(ids, use_cache=False).logits, expected)
    assert auto.model.layers[0].mlp.up_proj.bitmap.dtype == torch.uint8
    # loaded model can be saved again
    compress.save_compressed(loaded, tmp_path / "again")
    assert torch.equal(compress.load(tmp_path / "again")(ids, use_cache=False).logits, expected)
    # a fresh process: `import compress` before transformers registers the quantizer lazily
    import subprocess
    import sys

    torch.save(ids, tmp_path / "ids.pt")
    torch.save(expected, tmp_path / "expected.pt")
    script = (
        "import sys, torch, compress\n"
        "assert 'transformers' not in sys.modules\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
        f"ids, expected = torch.load({str(tmp_path / 'ids.pt')!r}), torch.load({str(tmp_path / 'expected.pt')!r})\n"
        "assert torch.equal(m(ids, use_cache=False).logits, expected)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]


def test_output_dir_rules_and_atomic_write(compressed, tmp_path, tokenizer, monkeypatch):
    model, _ = compressed
    target = tmp_path / "ckpt"
    target.mkdir()  # an empty directory may be written into
    compress.save_compressed(model, target)
    with pytest.raises(LlmpressError, match="already exists.*--overwrite"):
        compress.save_compressed(model, target)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tokenizer, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        compress.save_compressed(model, tmp_path / "fresh", tokenizer=tokenizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "ckpt"]  # nothing half-written
    monkeypatch.undo()
    compress.save_compressed(model, target, overwrite=True)
    assert (target / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "ckpt"]


def test_load_rejects_non_checkpoints(tmp_path):
    with pytest.raises(LlmpressError, match="not found"):
        compress.load(tmp_path / "missing")
    tiny_model("llama").save_pretrained(tmp_path / "dense")
    with pytest.raises(LlmpressError, match="not an llmpress checkpoint"):
        compress.load(tmp_path / "dense")


def test_api_checks_the_output_directory_before_compressing(tokenizer, calib_text, tmp_path, monkeypatch):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep")
    ran = []
    monkeypatch.setattr("compress.api.CompressionRunner.run", lambda *a, **k: ran.append(1))
    with pytest.raises(LlmpressError, match="not a model checkpoint"):
        compress.compress_model(tiny_model("llama"), RECIPE, dataset=str(calib_text), tokenizer=tokenizer,
                                output_dir=precious, overwrite=True, progress=False)  # fmt: skip
    assert ran == [] and (precious / "notes.txt").read_text() == "keep"
    monkeypatch.undo()
    model, _ = compress.compress_model(tiny_model("llama"), RECIPE, dataset=str(calib_text), tokenizer=tokenizer,
                                       output_dir=tmp_path / "saved", progress=False)  # fmt: skip
    assert (tmp_path / "saved" / "recipe.yaml").is_file() and compress.load(tmp_path / "saved") is not None

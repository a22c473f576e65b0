import json

import pytest
import torch

from compress.compressors import MagnitudeConfig, SVDConfig
from compress.data import calibration_windows, load_texts
from compress.errors import LlmpressError
from compress.recipe import load_recipe


def test_example_recipes_validate():
    from pathlib import Path

    recipes = sorted(Path(__file__).parents[1].joinpath("recipes").glob("*.yaml"))
    assert recipes
    for path in recipes:
        assert load_recipe(path).stages


def test_stage_configs_by_method():
    recipe = load_recipe({"stages": [{"method": "svd", "ratio": 0.3}, {"method": "magnitude", "pattern": "2:4"}]})
    assert isinstance(recipe.stages[0], SVDConfig) and recipe.stages[0].targets == ["Linear"]
    assert isinstance(recipe.stages[1], MagnitudeConfig)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(LlmpressError, match=r"stages\.0\.ratoi: unknown key; valid keys here: .*'ratio'"):
        load_recipe({"stages": [{"method": "svd", "ratoi": 0.2}]})
    with pytest.raises(LlmpressError, match=r"calibration\.samples: unknown key.*num_samples"):
        load_recipe({"calibration": {"samples": 3}, "stages": [{"method": "svd", "ratio": 0.2}]})
    with pytest.raises(LlmpressError, match=r"stagse: unknown key"):
        load_recipe({"stagse": []})


def test_unknown_method_lists_methods():
    with pytest.raises(LlmpressError, match=r"unknown method 'svdd'; valid methods: \[.*'magnitude'.*'svd'"):
        load_recipe({"stages": [{"method": "svdd", "ratio": 0.2}]})


@pytest.mark.parametrize("ratio", [0, 1, 1.5, -0.1])
def test_ratio_out_of_range(ratio):
    with pytest.raises(LlmpressError, match=r"stages\.0\.ratio"):
        load_recipe({"stages": [{"method": "svd", "ratio": ratio}]})


def test_nm_pattern_rules():
    with pytest.raises(LlmpressError, match="removes 0.5 of the weights"):
        load_recipe({"stages": [{"method": "magnitude", "pattern": "2:4", "ratio": 0.3}]})
    with pytest.raises(LlmpressError, match="needs 'ratio'"):
        load_recipe({"stages": [{"method": "magnitude"}]})
    with pytest.raises(LlmpressError, match="0 < N < M"):
        load_recipe({"stages": [{"method": "magnitude", "pattern": "4:2"}]})


def test_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("stages:\n  - method: svd\n    ratio: 0.2\n")
    recipe = load_recipe(path, ["stages.0.ratio=0.35", "calibration.num_samples=7", "name=x"])
    assert recipe.stages[0].ratio == 0.35 and recipe.calibration.num_samples == 7 and recipe.name == "x"
    with pytest.raises(LlmpressError, match="key=value"):
        load_recipe(path, ["stages.0.ratio"])
    with pytest.raises(LlmpressError, match="has 1 entries"):
        load_recipe(path, ["stages.3.ratio=0.1"])
    with pytest.raises(LlmpressError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("stages: [\n")
    with pytest.raises(LlmpressError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")


def test_calibration_windows_are_seeded(tokenizer, calib_text):
    a = calibration_windows(tokenizer, calib_text, 4, 64, seed=0)
    b = calibration_windows(tokenizer, calib_text, 4, 64, seed=0)
    c = calibration_windows(tokenizer, calib_text, 4, 64, seed=1)
    assert a.shape == (4, 64) and a.dtype == torch.int64
    assert torch.equal(a, b) and not torch.equal(a, c)
    builtin = calibration_windows(tokenizer, None, 2, 64)
    assert builtin.shape == (2, 64)


def test_calibration_sources(tmp_path, tokenizer):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"document number {i}"}) for i in range(3)))
    assert load_texts(jsonl) == [f"document number {i}" for i in range(3)]
    with pytest.raises(LlmpressError, match="no 'body' field"):
        load_texts(jsonl, text_field="body")
    assert load_texts(["a", "b"]) == ["a", "b"]
    with pytest.raises(LlmpressError, match="not found"):
        load_texts(tmp_path / "nope.txt")
    with pytest.raises(LlmpressError, match="unsupported type"):
        (tmp_path / "x.csv").write_text("a,b")
        load_texts(tmp_path / "x.csv")


def test_calibration_data_errors(tmp_path, tokenizer):
    with pytest.raises(LlmpressError, match="empty"):
        calibration_windows(tokenizer, ["   ", ""], 2, 16)
    with pytest.raises(LlmpressError, match="fewer than one window of seq_len=512"):
        calibration_windows(tokenizer, ["a short text"], 2, 512)


def test_recipe_round_trips_through_yaml(tmp_path):
    recipe = load_recipe({"name": "r", "stages": [{"method": "magnitude", "pattern": "2:4"}, {"method": "svd", "ratio": 0.3}]})
    path = tmp_path / "saved.yaml"
    path.write_text(recipe.to_yaml())
    again = load_recipe(path)
    assert again == recipe and again.stages[1].ratio == 0.3 and again.stages[0].pattern == "2:4"


def test_nm_patterns_are_strings_without_quotes(tmp_path):
    """YAML 1.1 reads 2:4 as the base-60 integer 124; recipes and --set read it as "2:4"."""
    path = tmp_path / "r.yaml"
    path.write_text("stages:\n  - method: magnitude\n    pattern: 2:4\n")
    assert load_recipe(path).stages[0].pattern == "2:4"
    recipe = load_recipe(path, ["stages.0.pattern=4:8", "calibration.seq_len=64"])
    assert recipe.stages[0].pattern == "4:8" and recipe.calibration.seq_len == 64
    sg = load_recipe({"stages": [{"method": "sparsegpt", "ratio": 0.5}]}, ["stages.0.percdamp=1e-3"])
    assert sg.stages[0].percdamp == pytest.approx(1e-3)  # YAML 1.2 float (1.1 read the string "1e-3")


def test_recipes_are_immutable_and_overrides_build_new_ones(tmp_path):
    from pydantic import ValidationError

    from compress.recipe import with_calibration

    recipe = load_recipe({"stages": [{"method": "svd", "ratio": 0.2}]})
    with pytest.raises(ValidationError):
        recipe.calibration.num_samples = 3
    with pytest.raises(ValidationError):
        recipe.stages[0].ratio = 0.5
    changed = with_calibration(recipe, num_samples=3, seq_len=None)
    assert changed.calibration.num_samples == 3 and recipe.calibration.num_samples == 32
    assert with_calibration(recipe) is recipe
    with pytest.raises(LlmpressError, match="calibration.num_samples"):
        with_calibration(recipe, num_samples=-1)


def test_dtype_auto_follows_the_compute_device():
    import torch

    from compress.model_loading import resolve_dtype

    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float16


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7, 0.8])
def test_auto_recipes_are_the_auto_recipe(ratio):
    """recipes/auto-*.yaml and `--max-size` (compress.recipe.auto_recipe) describe one recipe."""
    from pathlib import Path

    from compress.recipe import auto_recipe

    path = Path(__file__).parents[1] / "recipes" / f"auto-{round(100 * ratio)}.yaml"
    assert load_recipe(path).model_dump() == load_recipe(auto_recipe(ratio)).model_dump()

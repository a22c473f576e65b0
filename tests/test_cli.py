"""The CLI on a tiny local model: the main job, and every bad input giving exit code 2."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from compress.cli import main


def _recipe(tmp_path, body: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(body)
    return str(path)


GOOD = "calibration: {num_samples: 4, seq_len: 32, weighted_errors: true}\nstages:\n  - method: svd\n    ratio: 0.25\n"


def test_compress_eval_inspect(tiny_model_dir, tmp_path, calib_text, capsys):
    out = tmp_path / "out"
    rc = main(["compress", str(tiny_model_dir), "--recipe", _recipe(tmp_path, GOOD), "--dataset", str(calib_text),
               "--output-dir", str(out), "--set", "stages.0.ratio=0.4", "--quiet"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["recipe"]["stages"][0]["ratio"] == 0.4
    assert report["summary"]["layers"] == 14 and report["calibration"]["tokens"] == 128
    assert "| layer |" in (out / "report.md").read_text()
    capsys.readouterr()

    text = tmp_path / "eval.txt"
    text.write_text(calib_text.read_text()[:20_000])
    rc = main(["eval", str(out), "--ppl", str(text), "--seq-len", "64", "--max-windows", "3", "--quiet",
               "--json", str(out / "eval.json"), "--baseline", str(tiny_model_dir)])
    assert rc == 0
    assert "perplexity" in capsys.readouterr().out
    result = json.loads((out / "eval.json").read_text())
    ppl, dense_ppl = result["model"]["perplexity"], result["baseline"]["perplexity"]
    assert ppl["windows"] == 3 and ppl["tokens"] == 3 * 63 and not ppl["bos"]
    assert ppl["perplexity"] == pytest.approx(math.exp(ppl["nll"])) and ppl["perplexity"] != pytest.approx(dense_ppl["perplexity"])

    assert main(["report", str(out), "--output-dir", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| out | svd |"))
    assert f"{ppl['perplexity']:.2f}" in row and "%" in row
    assert (tmp_path / "report" / "ppl_vs_ratio.png").stat().st_size > 1000
    _fails(["report", str(tmp_path / "nothing")], capsys, "neither report.json nor eval.json")
    _fails(["eval", str(out)], capsys, "nothing to evaluate")

    assert main(["export", str(out), str(tmp_path / "dense")]) == 0
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert type(dense.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    capsys.readouterr()

    assert main(["inspect", str(out)]) == 0
    table = capsys.readouterr().out
    assert "lowrank" in table and "model.layers.1.mlp.down_proj" in table
    assert "kernels (decode, this machine):" in table and "lowrank" in table.split("kernels (decode")[1]
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert len(info["modules"]) == 14 and all(m["ratio"] < 1 for m in info["modules"])


def _fails(args, capsys, match):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert match in err, err
    return err


def test_bad_inputs_exit_2(tiny_model_dir, tmp_path, calib_text, capsys):
    model, good = str(tiny_model_dir), _recipe(tmp_path, GOOD)
    base = ["--dataset", str(calib_text), "--quiet"]
    _fails(["compress", str(tmp_path / "nope"), "--recipe", good, *base], capsys, "not found")
    _fails(["compress", "missing.gguf", "--recipe", good, *base], capsys, "not found")
    _fails(["compress", model, "--recipe", str(tmp_path / "none.yaml"), *base], capsys, "recipe file")
    _fails(["compress", model, "--recipe", good, "--device", "tpu9", *base], capsys, "unknown device")
    if not torch.cuda.is_available():
        _fails(["compress", model, "--recipe", good, "--device", "cuda", *base], capsys, "no CUDA GPU")
    _fails(["compress", model, "--recipe", good, "--set", "stages.0.ratoi=0.3", *base], capsys, "unknown key")
    _fails(["compress", model, "--recipe", good, "--set", "stages.0.method=foo", *base], capsys, "unknown method 'foo'")
    _fails(["compress", model, "--recipe", good, "--set", "stages.0.ratio=1.2", *base], capsys, "(from --set stages.0.ratio=1.2)")
    _fails(["compress", model, "--recipe", good, "--set", "stages.0.targets=[Conv1d]", *base,
            "--output-dir", str(tmp_path / "o1")], capsys, "match no Linear")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    _fails(["compress", model, "--recipe", good, "--dataset", str(empty), "--quiet", "--output-dir", str(tmp_path / "o2")],
           capsys, "calibration data is empty")
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    _fails(["compress", model, "--recipe", good, "--dataset", str(short), "--quiet", "--output-dir", str(tmp_path / "o3")],
           capsys, "fewer than one window")
    _fails(["compress", model, "--recipe", good, "--dataset", str(tmp_path / "nodata.txt"), "--quiet",
            "--output-dir", str(tmp_path / "o4")], capsys, "calibration file")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "precious.txt").write_text("keep me")
    for extra in ([], ["--overwrite"]):  # --overwrite replaces only llmpress checkpoints
        _fails(["compress", model, "--recipe", good, *base, "--output-dir", str(precious), *extra], capsys, "not a model checkpoint")
    assert (precious / "precious.txt").read_text() == "keep me"
    _fails(["eval", str(tmp_path / "nope"), "--ppl", str(calib_text)], capsys, "not found")
    _fails(["inspect", model], capsys, "not an llmpress checkpoint")


@pytest.mark.parametrize("model_kind", ["llama"])
def test_output_directory_problems_fail_before_compressing(tiny_model_dir, tmp_path, calib_text, capsys, monkeypatch):
    import os
    import shutil
    from collections import namedtuple

    model, good = str(tiny_model_dir), _recipe(tmp_path, GOOD)
    base = ["--dataset", str(calib_text), "--quiet"]
    compressed = []
    monkeypatch.setattr("compress.api.CompressionRunner.run", lambda *a, **k: compressed.append(1))
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        _fails(["compress", model, "--recipe", good, *base, "--output-dir", str(locked / "out")], capsys, "permission denied")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))  # a full disk
    _fails(["compress", model, "--recipe", good, *base, "--output-dir", str(tmp_path / "full")], capsys, "not enough free space")
    assert compressed == [] and not (tmp_path / "full").exists()


@pytest.mark.parametrize("model_kind", ["llama"])
def test_checkpoints_get_umask_permissions_and_stale_temporaries_are_removed(tiny_model_dir, tmp_path, calib_text, capsys):
    import os
    import stat

    out = tmp_path / "ckpt"
    stale = tmp_path / ".ckpt.tmp-abc123"  # what a save killed with -9 leaves behind
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    old_umask = os.umask(0o022)
    try:
        assert main(["compress", str(tiny_model_dir), "--recipe", _recipe(tmp_path, GOOD), "--dataset", str(calib_text),
                     "--quiet", "--output-dir", str(out)]) == 0
    finally:
        os.umask(old_umask)
    assert not stale.exists() and not list(tmp_path.glob(".ckpt.*"))
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}
    assert not any(p.name.startswith("o") and p.is_dir() for p in tmp_path.iterdir())  # nothing half-written


def test_non_finite_activations_are_reported(tmp_path, tokenizer, calib_text, capsys):
    from conftest import tiny_model

    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[3] = float("nan")
    model.save_pretrained(tmp_path / "nan-model")
    tokenizer.save_pretrained(tmp_path / "nan-model")
    err = _fails(["compress", str(tmp_path / "nan-model"), "--recipe", _recipe(tmp_path, GOOD), "--dataset",
                  str(calib_text), "--quiet", "--output-dir", str(tmp_path / "o")], capsys, "non-finite")
    assert "model.layers.1.mlp" in err
    assert not (tmp_path / "o").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "nan-model")  # the model itself is broken, not its loading
    assert torch.isnan(reloaded.model.layers[1].post_attention_layernorm.weight).any()


@pytest.mark.parametrize("model_kind", ["qwen2"])
def test_knapsack_recipe_from_the_cli_round_trips(tiny_model_dir, tmp_path, calib_text):
    from pathlib import Path

    import compress

    recipe = Path(__file__).parents[1] / "recipes" / "whitened-svd-30-knapsack.yaml"
    out = tmp_path / "knap"
    rc = main(["compress", str(tiny_model_dir), "--recipe", str(recipe), "--dataset", str(calib_text),
               "--num-samples", "3", "--seq-len", "32", "--output-dir", str(out), "--quiet",
               "--set", "allocation.ratio=0.5"])  # fmt: skip
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["allocation"]["ratio"] == 0.5 and report["allocation"]["chosen_total"] <= report["allocation"]["budget"]
    assert "| block |" in (out / "report.md").read_text()
    model = compress.load(out)
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.randint(0, 300, (1, 12))
    assert torch.isfinite(model(input_ids=ids).logits).all()
    assert not torch.allclose(model(input_ids=ids).logits, original(input_ids=ids).logits)


def test_default_recipe_is_the_shipped_w4_recipe():
    from pathlib import Path

    from compress.recipe import DEFAULT_RECIPE, load_recipe

    shipped = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "w4-g16.yaml")
    default = load_recipe(DEFAULT_RECIPE)
    assert default.model_dump(exclude={"description"}) == shipped.model_dump(exclude={"description"})


@pytest.mark.parametrize("model_kind", ["llama"])
def test_compress_without_a_recipe_uses_w4_and_says_what_it_saved(tiny_model_dir, tmp_path, calib_text, capsys):
    out = tmp_path / "w4"
    assert main(["compress", str(tiny_model_dir), "--dataset", str(calib_text), "--num-samples", "2", "--seq-len", "32",
                 "--output-dir", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "w4-g16:" in printed and "% smaller" in printed and f"llmpress eval {out}" in printed
    report = json.loads((out / "report.json").read_text())
    assert {r["format"] for r in report["layers"]} == {"gqsa"} and report["recipe"]["name"] == "w4-g16"
    capsys.readouterr()
    assert main(["report", str(out), "--output-dir", str(tmp_path / "r0")]) == 0
    assert "no plots" in capsys.readouterr().out and not list((tmp_path / "r0").glob("*.png"))  # nothing evaluated yet
    assert main(["eval", str(out), "--ppl", str(calib_text), "--seq-len", "32", "--max-windows", "1", "--quiet"]) == 0
    assert json.loads((out / "eval.json").read_text())["perplexity"]["windows"] == 1  # no --json: kept beside the report
    assert main(["report", str(out), "--output-dir", str(tmp_path / "r1")]) == 0
    assert (tmp_path / "r1" / "ppl_vs_ratio.png").is_file()


@pytest.mark.parametrize("model_kind", ["llama"])
def test_layers_that_lose_their_output_are_warned_about(tiny_model_dir, tmp_path, calib_text, capsys):
    harsh = "calibration: {num_samples: 2, seq_len: 32, weighted_errors: true}\nstages:\n  - method: svd\n    ratio: 0.95\n"
    assert main(["compress", str(tiny_model_dir), "--recipe", _recipe(tmp_path, harsh), "--dataset", str(calib_text),
                 "--output-dir", str(tmp_path / "harsh"), "--quiet"]) == 0
    assert "will likely collapse" in capsys.readouterr().err
    mild = "calibration: {num_samples: 2, seq_len: 32, weighted_errors: true}\nstages:\n  - method: magnitude\n    ratio: 0.05\n"
    assert main(["compress", str(tiny_model_dir), "--recipe", _recipe(tmp_path, mild), "--dataset", str(calib_text),
                 "--output-dir", str(tmp_path / "mild"), "--quiet"]) == 0
    assert "will likely collapse" not in capsys.readouterr().err


@pytest.mark.parametrize("model_kind", ["llama"])
def test_damaged_checkpoints_are_refused_by_every_command(tiny_model_dir, tmp_path, calib_text, capsys):
    import shutil

    good = tmp_path / "good"
    assert main(["compress", str(tiny_model_dir), "--recipe", _recipe(tmp_path, GOOD), "--dataset", str(calib_text),
                 "--output-dir", str(good), "--quiet"]) == 0
    capsys.readouterr()

    def damaged(name, change):
        path = tmp_path / name
        shutil.copytree(good, path)
        change(path)
        return path

    weights = "model.safetensors"
    truncated = damaged("truncated", lambda p: (p / weights).write_bytes((p / weights).read_bytes()[:-1000]))

    def config_edit(edit):
        def change(path):
            config = json.loads((path / "config.json").read_text())
            edit(config["quantization_config"])
            (path / "config.json").write_text(json.dumps(config))
        return change

    future = damaged("future", config_edit(lambda q: q.update(format_version=99)))
    bogus = damaged("bogus", config_edit(lambda q: q["modules"]["model.layers.0.self_attn.q_proj"].update(format="bogus")))
    reshaped = damaged("reshaped", config_edit(lambda q: q["modules"]["model.layers.0.self_attn.q_proj"].update(rank=5)))
    text = str(calib_text)
    for path, why in [(truncated, "truncated"), (future, "format version 99"), (bogus, "unknown format 'bogus'"), (reshaped, "shape")]:
        for command in (["inspect", str(path)], ["eval", str(path), "--ppl", text, "--seq-len", "32", "--max-windows", "1"],
                        ["export", str(path), str(tmp_path / f"dense-{path.name}")]):
            err = _fails(command, capsys, why)
            assert "Traceback" not in err and "huggingface.co" not in err and "network" not in err, (command, err)
    assert main(["inspect", str(good)]) == 0


def test_help_lists_every_method_without_importing_torch():
    import subprocess
    import sys

    from compress.cli import METHODS
    from compress.compressors import COMPRESSORS

    assert sorted(METHODS) == sorted(COMPRESSORS)
    run = subprocess.run(
        [sys.executable, "-c", "import sys; from compress.cli import main\ntry: main(['--help'])\nexcept SystemExit: pass\n"
         "print('torch' in sys.modules, 'transformers' in sys.modules)"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert run.stdout.strip().endswith("False False"), run.stdout[-500:] + run.stderr[-500:]
    assert "methods: cospadi" in run.stdout and "w4-g16.yaml" in run.stdout


def test_bench_cli_cases_exit_as_expected(tmp_path, monkeypatch):
    from pathlib import Path

    from compress.eval.bench_cli import main as bench

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    bench(["--out", str(tmp_path), "--repeats", "1"])
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert {name: row["exit_code"] for name, row in rows.items()} == {
        name: 0 if "help" in name else 2 for name in rows
    }  # fmt: skip


@pytest.mark.parametrize(
    "recipe, max_expert_ratio",
    [("recipes/sparsegpt-50.yaml", 0.6), ("recipes/whitened-svd-20.yaml", 0.85), ("recipes/w4-g16.yaml", 0.35)],
)
def test_moe_experts_are_compressed_listed_and_exported(recipe, max_expert_ratio, tmp_path, tokenizer, calib_text, capsys):
    """The issue's bar: on a tiny MoE model the shipped recipes compress the experts, whose stored
    bytes fall with the ratio; inspect lists the stacks; export gives a plain transformers model."""
    from conftest import family_model

    directory = tmp_path / "tiny-moe"
    family_model("qwen3_moe", layers=2).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    out = tmp_path / "moe-out"
    assert main(["compress", str(directory), "--recipe", recipe, "--dataset", str(calib_text), "--num-samples", "4",
                 "--seq-len", "64", "--output-dir", str(out), "--quiet"]) == 0  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert report["not_compressed"] is None and report["experts"]["stacks"] == 2
    assert report["experts"]["compressed_expert_layers"] == 2 * 2 * 4  # 2 blocks x 2 projections x 4 experts
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [s["name"] for s in info["expert_stacks"]] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    for stack in info["expert_stacks"]:
        assert stack["experts"] == 4 and stack["ratio"] <= max_expert_ratio, stack
    assert main(["inspect", str(out)]) == 0
    table = capsys.readouterr().out
    assert "model.layers.0.mlp.experts.down_proj.*" in table and "expert stacks: 2 (8 experts)" in table
    assert main(["export", str(out), str(tmp_path / "dense")]) == 0
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert dense.model.layers[0].mlp.experts.gate_up_proj.shape == (4, 64, 64)  # fused again, as transformers has it


def test_targeting_experts_of_a_dense_model_exits_2(tiny_model_dir, tmp_path, calib_text, capsys):
    recipe = "stages:\n  - method: magnitude\n    ratio: 0.5\n    targets: [experts]\n"
    _fails(["compress", str(tiny_model_dir), "--recipe", _recipe(tmp_path, recipe), "--output-dir", str(tmp_path / "o")],
           capsys, "has no mixture-of-experts layers")  # fmt: skip


def test_max_size_compresses_to_a_size_across_methods(tiny_model_dir, tmp_path, calib_text, capsys):
    from compress.metrics import serving_dtype
    from compress.recipe import auto_recipe
    from compress.report import model_size

    with serving_dtype(torch.bfloat16):
        dense = model_size(AutoModelForCausalLM.from_pretrained(tiny_model_dir))["bytes"]
    out = tmp_path / "sized"
    limit = int(0.45 * dense)
    assert main(["compress", str(tiny_model_dir), "--max-size", str(limit), "--dataset", str(calib_text),
                 "--num-samples", "4", "--seq-len", "32", "--output-dir", str(out), "--quiet"]) == 0  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    stages = len(auto_recipe(0.5)["stages"])  # the auto recipe's candidate stages
    assert report["model_size"]["compressed"]["bytes"] <= limit and report["allocation"]["stages"] == list(range(stages))
    assert report["recipe"]["name"] == f"auto-{limit}"
    assert (out / "allocation.png").stat().st_size > 1000 and f"and {stages} methods" in (out / "report.md").read_text()
    assert "as served in bfloat16" in capsys.readouterr().out
    _fails(["compress", str(tiny_model_dir), "--max-size", "1MB", "--recipe", _recipe(tmp_path, GOOD),
            "--output-dir", str(tmp_path / "x")], capsys, "needs a recipe with a knapsack allocation")  # fmt: skip

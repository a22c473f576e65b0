"""A killed sequential run resumes from its last finished block and ends as an uninterrupted one."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from compress.api import compress_model
from compress.errors import LlmpressError
from compress.pipelines import SequentialPipeline
from compress.progress import progress_dir


class Killed(Exception):
    """Stands for kill -9 (nothing after it runs)."""


def _recipe(method: dict) -> dict:
    return {"calibration": {"num_samples": 3, "seq_len": 32}, "stages": [method]}


def _compress(tokenizer, calib_text, out, method, **kwargs):
    return compress_model(
        tiny_model("llama", layers=3), _recipe(method), dataset=str(calib_text), tokenizer=tokenizer,
        progress=False, output_dir=out, **kwargs,
    )  # fmt: skip


BQPO = {"method": "gqsa", "ratio": 0.5, "group_size": 16, "optimize": ["bqpo"], "bqpo_epochs": 1}  # carries the dense stream too


@pytest.mark.parametrize("method", [{"method": "sparsegpt", "ratio": 0.5}, {"method": "fwsvd", "ratio": 0.3}, BQPO])
def test_a_killed_run_resumes_to_the_same_checkpoint(method, tokenizer, calib_text, tmp_path, monkeypatch):
    whole, _ = _compress(tokenizer, calib_text, tmp_path / "whole", method)
    assert not progress_dir(tmp_path / "whole").exists()  # removed once the checkpoint is complete

    original = SequentialPipeline._compress_calibrated

    def killed_at_block_2(self, block, index, *args):
        if index == 2:
            raise Killed
        return original(self, block, index, *args)

    monkeypatch.setattr(SequentialPipeline, "_compress_calibrated", killed_at_block_2)
    with pytest.raises(Killed):
        _compress(tokenizer, calib_text, tmp_path / "resumed", method)
    assert (progress_dir(tmp_path / "resumed") / "block_1.pt").exists()
    assert not (tmp_path / "resumed").exists()  # no half-written checkpoint
    monkeypatch.setattr(SequentialPipeline, "_compress_calibrated", original)

    with pytest.raises(LlmpressError, match="cannot resume"):  # another recipe must not pick up this progress
        _compress(tokenizer, calib_text, tmp_path / "resumed", {**method, "ratio": 0.2}, resume=True)
    resumed, report = _compress(tokenizer, calib_text, tmp_path / "resumed", method, resume=True)
    expected = whole.state_dict()
    got = resumed.state_dict()
    assert set(got) == set(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    assert len(report["layers"]) == 3 * 7 and len(report["blocks"]) == 3
    assert not progress_dir(tmp_path / "resumed").exists()


def test_without_resume_an_old_progress_is_discarded(tokenizer, calib_text, tmp_path, monkeypatch):
    method = {"method": "sparsegpt", "ratio": 0.5}
    original = SequentialPipeline._compress_calibrated
    calls = []

    def killed_at_block_1(self, block, index, *args):
        calls.append(index)
        if index == 1 and len(calls) == 2:
            raise Killed
        return original(self, block, index, *args)

    monkeypatch.setattr(SequentialPipeline, "_compress_calibrated", killed_at_block_1)
    with pytest.raises(Killed):
        _compress(tokenizer, calib_text, tmp_path / "out", method)
    _compress(tokenizer, calib_text, tmp_path / "out", method)  # no --resume: starts over at block 0
    assert calls == [0, 1, 0, 1, 2]


def test_cli_resume(tiny_model_dir, tmp_path, calib_text, capsys):
    from compress.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text("calibration: {num_samples: 2, seq_len: 32}\nstages:\n  - {method: sparsegpt, ratio: 0.5}\n")
    args = ["compress", str(tiny_model_dir), "--recipe", str(recipe), "--dataset", str(calib_text), "--quiet"]
    assert main([*args, "--output-dir", str(tmp_path / "a"), "--resume"]) == 0  # nothing to resume: starts at block 0
    assert (tmp_path / "a" / "model.safetensors").exists() and not progress_dir(tmp_path / "a").exists()
    assert main([*args, "--output-dir", str(tmp_path / "b"), "--resume", "--set", "calibration.statistics=dense"]) == 2
    assert "sequential" in capsys.readouterr().err

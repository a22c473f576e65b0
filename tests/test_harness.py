"""lm-eval through the real harness on a tiny model and a tiny local task."""

import json

import pytest

import compress
from compress.errors import LlmpressError
from compress.eval import evaluate, results_table
from conftest import tiny_model

TASK = """task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_target: gold
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture
def task_dir(tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    data = folder / "tiny.jsonl"
    rows = [{"query": f"Item {i}: the sky is", "choices": ["blue", "green", "very loud"], "gold": i % 3} for i in range(6)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    (folder / "tiny.yaml").write_text(TASK.format(data=data))
    return folder


def test_evaluate_compressed_model_object(tokenizer, task_dir, calib_text):
    recipe = {"calibration": {"num_samples": 2, "seq_len": 32}, "stages": [{"method": "svd", "ratio": 0.3}]}
    model, _ = compress.compress_model(tiny_model("llama"), recipe, dataset=str(calib_text), tokenizer=tokenizer, progress=False)
    result = evaluate(model, ["tiny_choice"], tokenizer=tokenizer, include_path=task_dir, limit=4)
    acc = result["tasks"]["tiny_choice"]["acc"]
    assert 0.0 <= acc <= 1.0 and result["config"]["limit"] == 4
    assert "| tiny_choice acc |" in results_table([result]).replace("| model | ", "| ")


def test_evaluate_errors(tokenizer, task_dir, tmp_path):
    model = tiny_model("llama")
    with pytest.raises(LlmpressError, match="did you mean.*tiny_choice"):
        evaluate(model, ["tiny_choise"], tokenizer=tokenizer, include_path=task_dir)
    with pytest.raises(LlmpressError, match="not a directory"):
        evaluate(model, ["tiny_choice"], tokenizer=tokenizer, include_path=tmp_path / "missing")
    with pytest.raises(LlmpressError, match="no tasks"):
        evaluate(model, [], tokenizer=tokenizer)

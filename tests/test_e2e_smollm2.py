"""End to end on the real pretrained SmolLM2-135M (GGUF): compress, evaluate, save, reload.

Slow (minutes on 2 CPU cores). It needs the demo model in models/ (`llmpress fetch-demo models`,
which .ci/run does) and WikiText-2 test text in ../shared/data.
"""

from pathlib import Path

import pytest
import torch

import compress
from compress.eval import perplexity

ROOT = Path(__file__).resolve().parents[1]
GGUF = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TEST_TEXT = ROOT.parent / "shared" / "data" / "wikitext2" / "test.txt"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not GGUF.is_file(), reason="demo model missing: run `llmpress fetch-demo models`"),
    pytest.mark.skipif(not TEST_TEXT.is_file(), reason="../shared/data/wikitext2/test.txt missing"),
]


def test_svd_compress_eval_and_reload(tmp_path):
    tokenizer = compress.load_tokenizer(GGUF)
    model = compress.load_model(GGUF, device="cpu")
    text = TEST_TEXT.read_text()[:200_000]
    dense = perplexity(model, tokenizer, text, seq_len=512, max_windows=3, progress=False)
    # the pretrained model as loaded from the GGUF (17.05 on the README's 8 windows of 2048)
    assert dense.perplexity == pytest.approx(23.1918, rel=1e-3)

    # Whitened SVD: plain SVD collapses this model even at 10% (perplexity in the millions, as
    # SVD-LLM reports for plain SVD on LLaMA), so it would not tell a broken pipeline from the method.
    recipe = {"calibration": {"num_samples": 8, "seq_len": 256}, "stages": [{"method": "whitened_svd", "ratio": 0.1}]}
    model, report = compress.compress_model(model, recipe, tokenizer=tokenizer, progress=False)
    assert report["summary"]["layers"] == 30 * 7
    assert 0.09 < report["summary"]["storage_ratio_removed"] < 0.11
    compressed = perplexity(model, tokenizer, text, seq_len=512, max_windows=3, progress=False)
    assert dense.perplexity < compressed.perplexity < 3 * dense.perplexity

    out = compress.save_compressed(model, tmp_path / "ckpt", tokenizer=tokenizer, report=report)
    reloaded = compress.load(out)
    ids = torch.randint(0, 49152, (1, 64))
    assert torch.equal(reloaded(ids).logits, model(ids).logits)

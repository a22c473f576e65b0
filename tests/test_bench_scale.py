"""The scale and serving benchmark scripts run end to end on tiny shapes (their numbers are
measured by running them, never asserted here)."""

import json

import pytest
import torch
from conftest import tiny_model

from compress.eval import bench_cpu_serving, bench_host_memory, bench_scale


def test_bench_scale_measures_a_block_and_projects_it(monkeypatch):
    small = {"hidden": 256, "mlp": 512, "kv": 128, "blocks": 4}
    monkeypatch.setattr(bench_scale, "LLAMA3_8B", small)
    rows = [bench_scale.run_one(method, scale, tokens=64) for method in ("sparsegpt", "whitened_svd") for scale in (0.5, 1.0)]
    for row in rows:
        assert set(row["seconds"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        assert row["block_seconds"] > 0 and row["working_gb"] >= 0
    assert rows[1]["shape"] == {**small, "hidden": 256, "mlp": 512}  # scale 1 is the shape itself
    projection = bench_scale.project(rows, gflops=10.0)
    assert [p["method"] for p in projection] == ["whitened_svd", "sparsegpt"]  # METHODS order
    for p in projection:
        assert p["70B"]["block_cpu_s"] > p["8B"]["block_cpu_s"] > 0
        assert p["70B"]["gpu_memory_per_block_gb"] > bench_scale.weights_gb(bench_scale.LLAMA3_70B)  # weights + statistics + work


def test_mfac_memory_projection_needs_float32_at_70b():
    """The cost model's M-FAC rows: Z in fp64 fits one 141 GB GPU at 8B, not at 70B; fp32 fits both."""
    z = {(model, bits): bench_scale.mfac_gpu_gb(shape, 128, bits) for model, shape in (("8B", bench_scale.LLAMA3_8B), ("70B", bench_scale.LLAMA3_70B)) for bits in (64, 32)}  # fmt: skip
    assert z["8B", 64] < 141 < z["70B", 64] and z["70B", 32] < 141


def test_gram_is_spd_with_a_decaying_spectrum():
    gram = bench_scale.synthetic_gram(64, 256, torch.Generator().manual_seed(0))
    eig = torch.linalg.eigvalsh(gram)
    assert eig.min() > 0 and eig.max() / eig.median() > 10


def test_cpu_serving_variants_keep_the_model_and_cache_their_expansion(tokenizer, calib_text):
    dense = tiny_model("llama").eval()
    dense.config.vocab_size = dense.get_input_embeddings().num_embeddings
    for variant in ("sparse 50%", "W4 g16"):
        model = bench_cpu_serving.build_variant(dense, variant)
        assert type(model.model.layers[0].mlp.down_proj).__name__ != "Linear"
        row = bench_cpu_serving.time_variant(model, tokenizer, str(calib_text), windows=1, seq_len=32, new_tokens=3)
        assert row["eval_seconds"] > 0 and row["generate_ms_per_token"] > 0 and row["perplexity"] > 1
        assert row["cache_bytes"] > 0  # the CPU cache held the expansions


@pytest.mark.skipif(not bench_host_memory.Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_host_memory_sampler_sees_an_allocation():
    sampler = bench_host_memory.RssSampler(interval=0.005)
    with sampler.running():
        with sampler.during("idle"):
            pass
        with sampler.during("allocate"):
            block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
            sampler.sample()  # the background thread may miss a short-lived block; the phase's own sample does not
            del block
    assert sampler.anon_peaks["allocate"] - sampler.anon_peaks["idle"] > 50 * 2**20
    assert json.dumps(sampler.peaks)

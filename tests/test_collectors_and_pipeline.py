import pytest
import torch

from compress.blocks import capture_block_inputs, find_decoder_blocks, run_block
from compress.collectors import ChannelNormCollector, GramCollector, LinearInputHooks
from compress.compressors import COMPRESSORS, Compressor, StageConfig, register_compressor
from compress.errors import LlmpressError
from compress.modules import LowRankLinear
from compress.metrics import relative_errors
from compress.pipelines import SequentialPipeline
from conftest import tiny_model


def test_gram_collector_equals_xtx():
    torch.manual_seed(0)
    batches = [torch.randn(3, 7, 16) for _ in range(4)]
    gram = GramCollector("layer", 16, torch.device("cpu"))
    norms = ChannelNormCollector("layer", 16, torch.device("cpu"))
    for x in batches:
        gram.add(x)
        norms.add(x)
    X = torch.cat([x.reshape(-1, 16) for x in batches]).double()
    assert gram.num_tokens == 4 * 3 * 7
    torch.testing.assert_close(gram.result(), X.T @ X, rtol=1e-12, atol=1e-10)
    assert gram.result().dtype == torch.float64
    torch.testing.assert_close(norms.result(), (X * X).sum(0), rtol=1e-12, atol=1e-10)


def test_collector_rejects_non_finite_activations():
    gram = GramCollector("model.layers.0.mlp.up_proj", 4, torch.device("cpu"))
    gram.add(torch.tensor([[1.0, float("nan"), 0.0, 0.0]]))  # no host sync per batch: checked at the end
    with pytest.raises(LlmpressError, match="non-finite.*model.layers.0.mlp.up_proj"):
        gram.result()


def test_hooks_collect_gram_of_each_linear_input():
    layer = torch.nn.Linear(5, 3)
    x = torch.randn(2, 4, 5)
    with LinearInputHooks({"fc": layer}, {"gram"}) as hooks:
        layer(x)
    X = x.reshape(-1, 5).double()
    torch.testing.assert_close(hooks.collectors["fc"]["gram"].result(), X.T @ X)
    layer(x)  # hooks removed: nothing more is collected
    assert hooks.collectors["fc"]["gram"].num_tokens == 8


def test_block_by_block_propagation_equals_plain_forward(model_kind):
    model = tiny_model(model_kind, layers=3)
    ids = torch.randint(0, 300, (4, 32))
    reference = model(ids, output_hidden_states=True, use_cache=False).hidden_states
    _, blocks = find_decoder_blocks(model)
    inputs = capture_block_inputs(model, blocks, ids, 2, "cpu", "cpu")
    hiddens = inputs.hiddens
    torch.testing.assert_close(torch.cat(hiddens), reference[0], rtol=0, atol=0)
    for index, block in enumerate(blocks[:-1]):
        hiddens = run_block(block, hiddens, inputs.kwargs[index], "cpu", "cpu", keep=True)
        torch.testing.assert_close(torch.cat(hiddens), reference[index + 1], rtol=1e-6, atol=1e-6)


class _DenseCopyConfig(StageConfig):
    method: str = "test-dense-copy"


class _DenseCopy(Compressor):
    """A lossless 'compressor' (full-rank factors W = I·W) to test the plumbing end to end."""

    method = "test-dense-copy"
    config_class = _DenseCopyConfig
    needs = ("channel_norm_sq",)
    seen_tokens: list[int] = []

    def compress(self, weight, bias, stats, config, base=None):
        _DenseCopy.seen_tokens.append(stats.num_tokens)
        assert stats["channel_norm_sq"].shape == (weight.shape[1],)
        eye = torch.eye(weight.shape[0], dtype=weight.dtype)
        return LowRankLinear.from_factors(eye, weight.clone(), bias)


@pytest.fixture
def dense_copy_method():
    register_compressor(_DenseCopy)
    yield _DenseCopy
    COMPRESSORS.pop(_DenseCopy.method)


def test_pipeline_with_lossless_method_keeps_outputs(model_kind, dense_copy_method):
    model = tiny_model(model_kind, layers=2)
    ids = torch.randint(0, 300, (3, 24))
    before = model(ids, use_cache=False).logits
    dense_copy_method.seen_tokens.clear()
    pipeline = SequentialPipeline(model, [_DenseCopyConfig()], batch_size=2, progress=False)
    records = pipeline.run(ids)
    assert len(records) == 14 and all(r.format == "lowrank" for r in records)
    assert set(dense_copy_method.seen_tokens) == {3 * 24}
    assert max(r.rel_error for r in records) < 1e-6
    assert all(r.rel_weighted_error is not None and r.rel_weighted_error < 1e-6 for r in records)
    after = model(ids, use_cache=False).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_weighted_error_matches_definition():
    torch.manual_seed(1)
    W, What, X = torch.randn(6, 5), torch.randn(6, 5), torch.randn(40, 5)
    rel, weighted = relative_errors(W, What, (X.T @ X).double())
    assert rel == pytest.approx(float((W - What).norm() / W.norm()), rel=1e-6)
    expected = ((W - What) @ X.T).norm() / (W @ X.T).norm()
    assert weighted == pytest.approx(float(expected), rel=1e-5)


def test_pipeline_rejects_targets_matching_nothing():
    from compress.compressors import SVDConfig

    model = tiny_model("llama", 2)
    with pytest.raises(LlmpressError, match="match no Linear module.*model.layers.0.self_attn.q_proj"):
        SequentialPipeline(model, [SVDConfig(ratio=0.2, targets=["re:.*nothing"])], progress=False)
    with pytest.raises(LlmpressError, match="outside the decoder blocks"):
        SequentialPipeline(model, [SVDConfig(ratio=0.2, targets=["lm_head"], ignore=[])], progress=False)


def test_layers_reading_one_input_share_one_gram():
    """q/k/v read the same hidden state, gate/up the same normed input: one Gram each."""
    model = tiny_model("llama", layers=1)
    _, blocks = find_decoder_blocks(model)
    layers = {n: m for n, m in blocks[0].named_modules() if isinstance(m, torch.nn.Linear)}
    with LinearInputHooks(layers, {"gram"}) as hooks:
        model(torch.randint(0, 300, (2, 16)))
        model(torch.randint(0, 300, (2, 16)))  # a second batch keeps the same sharing
    assert hooks.shared_with == {
        "self_attn.k_proj": "self_attn.q_proj", "self_attn.v_proj": "self_attn.q_proj", "mlp.up_proj": "mlp.gate_proj",
    }  # fmt: skip
    assert hooks.collectors["self_attn.v_proj"] is hooks.collectors["self_attn.q_proj"]
    assert hooks.collectors["self_attn.o_proj"] is not hooks.collectors["self_attn.q_proj"]
    assert hooks.collectors["self_attn.q_proj"]["gram"].num_tokens == 2 * 2 * 16


def test_default_knapsack_runs_the_fisher_backward_pass_once(tokenizer, calib_text, monkeypatch):
    import compress
    import compress.fisher as fisher

    calls = []
    original = fisher.collect_fisher
    monkeypatch.setattr(fisher, "collect_fisher", lambda *a, **k: calls.append(1) or original(*a, **k))
    recipe = {"calibration": {"num_samples": 2, "seq_len": 32}, "stages": [{"method": "fwsvd"}],
              "allocation": {"ratio": 0.3, "levels": [0.0, 0.3, 0.6]}}  # fmt: skip  (cost: fisher, the default)
    _, report = compress.compress_model(tiny_model("llama"), recipe, dataset=str(calib_text), tokenizer=tokenizer, progress=False)
    assert report["allocation"]["cost"] == "fisher" and len(calls) == 1  # shared by profiling and FWSVD itself

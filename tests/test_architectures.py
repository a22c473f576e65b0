"""Every family users bring is calibrated on the activations a plain forward produces.

Layers of different attention types get different masks (sliding window or full) and RoPE bases
(Gemma-2/3, Mistral); a pipeline that reused block 0's keyword arguments for every block would
calibrate most blocks on wrong inputs. The references below come from hooks on a plain forward
of the whole model (float64): block inputs and outputs, every Linear's input Gram, and the
per-sequence squared gradients of the LM loss.
"""

from __future__ import annotations

import pytest
import torch

from compress.blocks import capture_block_inputs, find_decoder_blocks, run_block
from compress.compressors import COMPRESSORS, Compressor, StageConfig, register_compressor
from compress.fisher import collect_fisher
from compress.modules import LowRankLinear
from compress.pipelines import build_pipeline
from compress.targets import match_linears
from conftest import FAMILIES, MOE_FAMILIES, family_model

SEQ = 24  # longer than the sliding windows (8) of the tiny configs


def _ids(batches: int = 3) -> torch.Tensor:
    return torch.randint(3, 300, (batches, SEQ), generator=torch.Generator().manual_seed(1))


def _plain_forward_records(model, ids):
    """(inputs, outputs) of every block and the input Gram of every block Linear, from one plain forward."""
    _, blocks = find_decoder_blocks(model)
    ins, outs, grams, handles = {}, {}, {}, []
    for i, block in enumerate(blocks):

        def pre(module, args, kwargs, _i=i):
            ins[_i] = (args[0] if args else kwargs["hidden_states"]).detach()

        def post(module, args, kwargs, output, _i=i):
            outs[_i] = (output[0] if isinstance(output, tuple) else output).detach()

        handles += [block.register_forward_pre_hook(pre, with_kwargs=True), block.register_forward_hook(post, with_kwargs=True)]
    for name, linear in match_linears(model, ["Linear"], ["lm_head"]).items():

        def gram(module, args, _name=name):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            grams[_name] = grams.get(_name, 0) + x.T @ x

        handles.append(linear.register_forward_pre_hook(gram))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return ins, outs, grams


def _check_blocks_one_at_a_time(model, ids, ins, outs, tol: float) -> None:
    """Block 0's captured input is the embedding output exactly; each block run alone, with its
    own captured kwargs, gives what it gave in the plain forward (within `tol`)."""
    _, blocks = find_decoder_blocks(model)
    captured = capture_block_inputs(model, blocks, ids, 2, "cpu", "cpu")
    hiddens = captured.hiddens
    torch.testing.assert_close(torch.cat(hiddens), ins[0], rtol=0, atol=0)
    for index, block in enumerate(blocks):
        hiddens = run_block(block, hiddens, captured.kwargs[index], "cpu", "cpu", keep=True)
        torch.testing.assert_close(torch.cat(hiddens), outs[index], rtol=tol, atol=tol, msg=f"block {index}")


@pytest.mark.parametrize("kind", FAMILIES)
def test_blocks_run_one_at_a_time_equal_a_plain_forward(kind):
    model = family_model(kind)
    ids = _ids()
    ins, outs, _ = _plain_forward_records(model, ids)
    _check_blocks_one_at_a_time(model, ids, ins, outs, tol=1e-10)


class _RecordingCopyConfig(StageConfig):
    method: str = "test-recording-copy"


class _RecordingCopy(Compressor):
    """Lossless (W = I·W, exact in floating point); keeps the Gram it was given per layer."""

    method = "test-recording-copy"
    config_class = _RecordingCopyConfig
    needs = ("gram",)
    grams: dict[str, torch.Tensor] = {}

    def compress(self, weight, bias, stats, config, base=None):
        _RecordingCopy.grams[stats.name] = stats["gram"].clone()
        eye = torch.eye(weight.shape[0], dtype=weight.dtype)
        return LowRankLinear.from_factors(eye, weight.clone(), bias)


@pytest.fixture
def recording_copy():
    register_compressor(_RecordingCopy)
    _RecordingCopy.grams = {}
    yield _RecordingCopy
    COMPRESSORS.pop(_RecordingCopy.method)


@pytest.mark.parametrize("statistics", ["sequential", "dense"])
@pytest.mark.parametrize("kind", FAMILIES)
def test_pipeline_calibrates_every_layer_on_plain_forward_inputs(kind, statistics, recording_copy):
    model = family_model(kind)
    ids = _ids()
    _, _, reference = _plain_forward_records(model, ids)
    before = model(input_ids=ids).logits
    pipeline = build_pipeline(model, [_RecordingCopyConfig()], statistics, batch_size=2, progress=False)
    records = pipeline.run(ids)
    assert set(recording_copy.grams) == set(reference) and len(records) == len(reference)
    for name, gram in reference.items():
        torch.testing.assert_close(recording_copy.grams[name], gram, rtol=1e-9, atol=1e-9, msg=name)
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", FAMILIES)
def test_fisher_walk_equals_full_model_gradients(kind):
    model = family_model(kind)
    ids = _ids(2)
    linears = match_linears(model, ["Linear"], ["lm_head"])
    rows = {n: torch.zeros(m.out_features, dtype=torch.float64) for n, m in linears.items()}
    cols = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in linears.items()}
    for seq in ids:  # the empirical Fisher: squared gradients per sequence
        model.zero_grad()
        model(input_ids=seq[None], labels=seq[None]).loss.backward()
        for n, m in linears.items():
            rows[n] += m.weight.grad.square().sum(1)
            cols[n] += m.weight.grad.square().sum(0)
    model.zero_grad()
    _, blocks = find_decoder_blocks(model)
    fisher = collect_fisher(model, blocks, linears, ids, torch.device("cpu"), torch.device("cpu"), chunk_size=1, progress=False)
    for n in linears:
        torch.testing.assert_close(fisher[n]["fisher_row"], rows[n], rtol=1e-8, atol=1e-14, msg=n)
        torch.testing.assert_close(fisher[n]["fisher_col"], cols[n], rtol=1e-8, atol=1e-14, msg=n)


@pytest.mark.parametrize("kind", MOE_FAMILIES)
def test_moe_blocks_and_statistics_equal_a_plain_forward(kind, recording_copy):
    """Mixture-of-experts models (float32: their expert kernels take nothing wider): blocks run one
    at a time and the attention Linears' Grams match a plain forward."""
    model = family_model(kind)
    ids = _ids()
    ins, outs, reference = _plain_forward_records(model, ids)
    _check_blocks_one_at_a_time(model, ids, ins, outs, tol=1e-5)
    targets = ["re:.*self_attn.*"]  # the experts: tests/test_experts.py
    pipeline = build_pipeline(model, [_RecordingCopyConfig(targets=targets)], "sequential", batch_size=2, progress=False)
    pipeline.run(ids)
    attention = {n: g for n, g in reference.items() if "self_attn" in n}
    assert set(recording_copy.grams) == set(attention)
    for name, gram in attention.items():
        torch.testing.assert_close(recording_copy.grams[name], gram, rtol=1e-4, atol=1e-3, msg=name)

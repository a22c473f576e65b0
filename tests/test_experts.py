"""Mixture-of-experts models: experts as per-expert Linears, calibrated on the tokens routed to
them (or on every token), compressed by every method, saved and loaded bit-exactly.

Tiny random configs of Qwen3-MoE, Mixtral, gpt-oss (transposed, interleaved gate/up with biases
and a clamped SwiGLU), DeepSeek-V3 (dense first block, shared experts, grouped routing) and
Qwen2-MoE (a shared expert with a Linear gate, i.e. a router that is an nn.Linear).
"""

from __future__ import annotations

import json

import pytest
import torch

from compress.api import compress_model
from compress.collectors import shrink_sparse_statistics
from compress.checkpoint import export_dense, load, save_compressed
from compress.experts import (
    all_experts_calibrated,
    expert_linear_names,
    fuse_untouched_stacks,
    is_fused_experts,
    linearize_experts,
    per_expert_stacks,
    router_names,
)
from compress.modules import CompressedLinear
from compress.pipelines import build_pipeline
from compress.targets import match_linears
from conftest import MOE_FAMILIES, family_model
from test_architectures import _RecordingCopyConfig, recording_copy  # noqa: F401  (a fixture)

SEQ = 24


def _ids(batches: int = 3) -> torch.Tensor:
    return torch.randint(3, 300, (batches, SEQ), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", MOE_FAMILIES)
def test_per_expert_linears_compute_the_fused_forward_and_fuse_back_exactly(kind):
    model = family_model(kind)
    ids = _ids()
    reference = model(input_ids=ids).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    stacks = linearize_experts(model)
    assert stacks and all(name.endswith("experts") for name in stacks)
    torch.testing.assert_close(model(input_ids=ids).logits, reference, rtol=1e-5, atol=1e-5)
    with all_experts_calibrated(model):  # every expert on every token: the output is still the routed one
        torch.testing.assert_close(model(input_ids=ids).logits, reference, rtol=1e-5, atol=1e-5)
    assert fuse_untouched_stacks(model) == [] and not per_expert_stacks(model)
    after = model.state_dict()
    assert set(after) == set(state) and all(torch.equal(after[k], state[k]) for k in state)


def _routed_grams(model, ids) -> dict[str, torch.Tensor]:
    """Per-expert input Grams from the routing the model's own router chose: expert e's up
    projection sees the rows routed to e (independent of llmpress's per-expert forward)."""
    grams, counts, handles = {}, {}, []
    for stack_name, module in per_expert_stacks(model).items():

        def record(mod, args, _name=stack_name):
            hidden, index = args[0].double(), args[1]
            for e in range(mod.expert_count):
                rows = (index == e).any(-1)
                gram = hidden[rows].T @ hidden[rows]
                name = f"{_name}.{mod.up_name}.{e}"
                grams[name] = grams[name] + gram if name in grams else gram
                counts[name] = counts.get(name, 0) + int(rows.sum())

        handles.append(module.register_forward_pre_hook(record))
    with torch.no_grad():
        model(input_ids=ids)
    for handle in handles:
        handle.remove()
    # an expert that saw fewer tokens than its width gets its Gram shrunk towards the identity
    width = next(iter(grams.values())).shape[0]
    return {n: shrink_sparse_statistics({"gram": g}, counts[n], width)["gram"] for n, g in grams.items()}


@pytest.mark.parametrize("statistics", ["sequential", "dense"])
@pytest.mark.parametrize("kind", MOE_FAMILIES)
def test_each_expert_is_calibrated_on_the_tokens_routed_to_it(kind, statistics, recording_copy):  # noqa: F811
    model = family_model(kind)
    ids = _ids()
    before = model(input_ids=ids).logits
    linearize_experts(model)
    reference = _routed_grams(model, ids)
    pipeline = build_pipeline(model, [_RecordingCopyConfig(targets=["experts"])], statistics, batch_size=2, progress=False)
    records = pipeline.run(ids)
    assert {r.name for r in records} == set(expert_linear_names(model))
    for name, gram in reference.items():
        torch.testing.assert_close(recording_copy.grams[name], gram, rtol=1e-4, atol=1e-3, msg=name)
    assert all(r.tokens is not None and r.tokens > 0 for r in records)
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-5, atol=1e-5)  # a lossless "compression"


def test_calibrating_all_experts_gives_each_the_whole_calibration_set(recording_copy):  # noqa: F811
    model = family_model("qwen3_moe")
    ids = _ids()
    pipeline = build_pipeline(
        model, [_RecordingCopyConfig(targets=["re:.*experts\\.gate_up_proj"])], "sequential", batch_size=3,
        progress=False, moe_calibration="all",
    )  # fmt: skip
    records = pipeline.run(ids)
    assert records and all(r.tokens == ids.numel() for r in records)
    by_block: dict[int, list[torch.Tensor]] = {}
    for r in records:
        by_block.setdefault(r.block, []).append(recording_copy.grams[r.name])
    for grams in by_block.values():  # one shared Gram per block: every expert read the same input
        assert all(torch.equal(g, grams[0]) for g in grams)


def test_an_expert_that_no_token_reaches_is_compressed_data_free(caplog):
    model = family_model("qwen3_moe", layers=2)
    linearize_experts(model)
    stack = model.model.layers[0].mlp.experts

    def never_expert_3(module, args):
        hidden, index, weights = args
        return hidden, torch.where(index == 3, (index + 1) % 3, index), weights

    stack.register_forward_pre_hook(never_expert_3)
    from compress.recipe import load_recipe

    recipe = load_recipe({"calibration": {"num_samples": 2, "seq_len": 16}, "stages": [{"method": "sparsegpt", "ratio": 0.5}]})
    from compress.runner import CompressionRunner

    with caplog.at_level("INFO", logger="compress"):
        result = CompressionRunner(model, recipe, progress=False).run(_ids(2))
    starved = {r.name: r.tokens for r in result.records if r.tokens == 0}
    assert set(starved) == {"model.layers.0.mlp.experts.gate_up_proj.3", "model.layers.0.mlp.experts.down_proj.3"}
    assert "saw none" in caplog.text
    # with identity statistics SparseGPT keeps the largest weights, as magnitude pruning does
    layer = stack.down_proj[3]
    dense = layer.to_dense()
    kept = dense != 0
    assert kept.float().mean() == pytest.approx(0.5, abs=0.02)


def test_targets_select_experts_and_leave_routers_alone():
    model = family_model("qwen3_moe", layers=2)
    linearize_experts(model)
    experts = set(expert_linear_names(model))
    assert set(match_linears(model, ["experts"], [])) == experts
    assert set(match_linears(model, ["Qwen3MoeExperts"], [])) == experts
    assert set(match_linears(model, ["re:.*experts\\.down_proj\\.1$"], [])) == {
        "model.layers.0.mlp.experts.down_proj.1", "model.layers.1.mlp.experts.down_proj.1"
    }  # fmt: skip
    everything = set(match_linears(model, ["Linear"], ["lm_head"]))
    assert experts < everything and all("self_attn" in n for n in everything - experts)

    import transformers as tf

    torch.manual_seed(0)
    qwen2 = tf.AutoModelForCausalLM.from_config(
        tf.Qwen2MoeConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, vocab_size=64, num_attention_heads=2,
            num_key_value_heads=1, moe_intermediate_size=16, shared_expert_intermediate_size=32, num_experts=4,
            num_experts_per_tok=2,
        )
    )  # fmt: skip
    linearize_experts(qwen2)
    assert router_names(qwen2) == {"model.layers.0.mlp.shared_expert_gate"}
    selected = match_linears(qwen2, ["Linear"], ["lm_head"])
    assert "model.layers.0.mlp.shared_expert_gate" not in selected and "model.layers.0.mlp.shared_expert.up_proj" in selected
    assert "model.layers.0.mlp.shared_expert_gate" in match_linears(qwen2, ["model.layers.0.mlp.shared_expert_gate"], [])


METHOD_STAGES = [
    [{"method": "magnitude", "ratio": 0.5}],
    [{"method": "wanda", "ratio": 0.5}],
    [{"method": "sparsegpt", "pattern": "2:4"}],
    [{"method": "svd", "ratio": 0.3}],
    [{"method": "whitened_svd", "ratio": 0.3}],
    [{"method": "fwsvd", "ratio": 0.3}],
    [{"method": "rocket", "ratio": 0.3}],
    [{"method": "cospadi", "ratio": 0.3, "max_iters": 2}],
    [{"method": "gqsa", "ratio": 0.0, "group_size": 16}],
    [{"method": "mfac", "ratio": 0.5, "block_size": 32, "steps": 1}],
    [{"method": "magnitude", "pattern": "2:4"}, {"method": "eora", "rank": 4}],
    [{"method": "gptq", "bits": 3, "group_size": 32, "blocksize": 32, "residual_rank": 2}],  # a stacked option
]


@pytest.mark.parametrize("stages", METHOD_STAGES, ids=lambda s: "+".join(st["method"] for st in s))
def test_every_method_compresses_the_experts(stages):
    model = family_model("qwen3_moe", layers=2)
    stages = [{**stage, "targets": ["experts"]} for stage in stages]
    ids = _ids(2)
    dense = model(input_ids=ids).logits
    from compress.recipe import load_recipe
    from compress.runner import CompressionRunner

    recipe = load_recipe({"calibration": {"num_samples": 2, "seq_len": SEQ}, "stages": stages})
    result = CompressionRunner(model, recipe, progress=False).run(ids)
    names = set(expert_linear_names(model))
    assert {r.name for r in result.records if r.stage == len(stages) - 1} == names
    assert all(isinstance(model.get_submodule(n), CompressedLinear) for n in names)
    out = model(input_ids=ids).logits
    assert torch.isfinite(out).all() and not torch.equal(out, dense)


@pytest.mark.parametrize("kind", MOE_FAMILIES)
def test_compressed_experts_save_load_and_export_bit_exactly(kind, tmp_path, tokenizer):
    model = family_model(kind, layers=2)
    stacks = [name for name, module in model.named_modules() if is_fused_experts(module)]
    ids = _ids(2)
    model, report = compress_model(
        model, {"calibration": {"num_samples": 2, "seq_len": SEQ}, "stages": [{"method": "sparsegpt", "ratio": 0.5}]},
        dataset=["some calibration text " * 40], tokenizer=tokenizer, progress=False, device="cpu",
    )  # fmt: skip
    assert report["experts"]["stacks"] == len(stacks) and report["not_compressed"] is None
    out = model(input_ids=ids).logits
    save_compressed(model, tmp_path / "ckpt", tokenizer=tokenizer)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert config["expert_stacks"] == stacks
    loaded = load(tmp_path / "ckpt", dtype=torch.float32)
    assert torch.equal(loaded(input_ids=ids).logits, out)
    for name, module in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], module), name
    export_dense(tmp_path / "ckpt", tmp_path / "dense")
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)
    assert not per_expert_stacks(plain)  # a plain transformers model with its fused experts
    torch.testing.assert_close(plain(input_ids=ids).logits, out, rtol=1e-5, atol=1e-5)


def test_targeting_experts_on_a_dense_model_is_an_error(recording_copy):  # noqa: F811
    from compress.errors import LlmpressError

    model = family_model("llama", layers=2)
    with pytest.raises(LlmpressError, match="no mixture-of-experts layers"):
        build_pipeline(model, [_RecordingCopyConfig(targets=["experts"])], "sequential", progress=False)


def test_the_knapsack_allocates_over_experts_like_any_layer():
    """Experts are layers for the knapsack: each expert gets its own level (with the Fisher cost,
    an expert's price includes how much loss energy its routed tokens carry) within the budget."""
    from compress.recipe import load_recipe
    from compress.runner import CompressionRunner

    model = family_model("qwen3_moe", layers=2)
    recipe = load_recipe({
        "calibration": {"num_samples": 4, "seq_len": SEQ},
        "stages": [{"method": "whitened_svd", "targets": ["experts"]}],
        "allocation": {"strategy": "knapsack", "ratio": 0.4, "unit": "params", "cost": "fisher"},
    })  # fmt: skip
    result = CompressionRunner(model, recipe, progress=False).run(_ids(4))
    levels = {c.name: c.level for c in result.plan.layers}
    assert set(levels) == set(expert_linear_names(model)) and len(set(levels.values())) > 1
    kept = sum(c.values for c in result.plan.layers)
    dense = sum(c.dense_values for c in result.plan.layers)
    assert kept <= 0.6 * dense + 1


def test_statistics_beyond_the_limit_are_collected_in_several_passes(recording_copy, caplog):  # noqa: F811
    """A block whose Grams exceed max_statistics_gib is calibrated in groups of layers, one pass
    each, with the very same statistics."""
    ids = _ids()
    grams = {}
    for limit in (None, 3 * 64 * 64 * 8 / 2**30):  # at most three 64-wide Grams at once
        model = family_model("qwen3_moe", layers=2)
        pipeline = build_pipeline(
            model, [_RecordingCopyConfig()], "sequential", batch_size=2, progress=False, max_statistics_gib=limit
        )
        with caplog.at_level("INFO", logger="compress"):
            pipeline.run(ids)
        grams[limit] = dict(recording_copy.grams)
    assert "statistics of 12 layers collected in 3 passes" in caplog.text  # 4 attention + 2 x 4 expert layers
    unlimited, limited = grams.values()
    assert set(unlimited) == set(limited) and len(unlimited) == 2 * (4 + 2 * 4)
    for name in unlimited:
        torch.testing.assert_close(limited[name], unlimited[name], rtol=1e-12, atol=1e-12, msg=name)


def test_statistics_groups_respect_the_limit():
    from compress.pipelines.base import statistics_groups

    layers = {f"l{i}": torch.nn.Linear(16, 4) for i in range(10)}
    groups = statistics_groups(layers, {"gram"}, 3 * 16 * 16 * 8)
    assert [len(g) for g in groups] == [3, 3, 3, 1] and [n for g in groups for n in g] == list(layers)
    assert statistics_groups(layers, {"gram"}, None) == [layers] and statistics_groups(layers, set(), 1) == [layers]

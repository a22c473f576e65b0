"""The knapsack chooses the embeddings' bits (recipe `embeddings: {bits: [8, 4]}`): the Fisher
pass's per-role gradients of the table, the options' prices and sizes, and whole runs at a size."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, family_model, tiny_model

from compress.blocks import find_decoder_blocks
from compress.budget import AllocationConfig, solve_allocation
from compress.embeddings import EmbeddingsConfig, embedding_options, quantized_table
from compress.errors import LlmpressError
from compress.fisher import EMBEDDING_STATS, EmbeddingHooks, backward_walk, collect_fisher
from compress.metrics import serving_dtype
from compress.modules import GQSALinear, Int8Linear, QuantizedEmbedding
from compress.recipe import load_recipe


def _walk_embeddings(model, ids):
    """Per sequence: the lookup's table gradient, and the head's (input, output gradient)."""
    lookups: list[torch.Tensor] = []
    heads: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = EmbeddingHooks(lambda g: lookups.append(g.clone()), lambda x, gz: heads.append((x[0].clone(), gz[0].clone())))
    cpu = torch.device("cpu")
    backward_walk(model, find_decoder_blocks(model)[1], {}, ids, cpu, cpu, lambda n, g: None, progress=False, embeddings=hooks)
    return lookups, heads


@pytest.mark.parametrize("kind", ["llama", "gemma3", "gpt_neox", "opt", "qwen3_moe"])
def test_role_gradients_are_the_models_own(kind):
    """Lookup and head gradients, reported apart by the block-by-block walk, are the model's own:
    untied (GPT-NeoX, the Qwen3 MoE), each equals its weight's gradient; tied (Gemma's scaled
    lookup, OPT's positions), they add up to the shared weight's gradient."""
    model = family_model(kind)
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    lookups, heads = _walk_embeddings(model, ids)
    assert len(lookups) == len(heads) == 2
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head.weight is embedding.weight
    assert tied == (kind not in ("gpt_neox", "qwen3_moe"))
    for s in range(2):
        for p in model.parameters():
            p.requires_grad_(p is embedding.weight or p is head.weight)
        model(input_ids=ids[s : s + 1], labels=ids[s : s + 1]).loss.backward()
        lookup, (x, logit_grad) = lookups[s], heads[s]
        head_grad = logit_grad.T @ x  # logits = x·Wᵀ
        # only rows looked up, and not the last token's unless read earlier (no loss term sees it)
        assert int((lookup.abs().sum(1) > 0).sum()) == len(set(ids[s, :-1].tolist()))
        if tied:
            torch.testing.assert_close(lookup + head_grad, embedding.weight.grad)
        else:
            torch.testing.assert_close(lookup, embedding.weight.grad)
            torch.testing.assert_close(head_grad, head.weight.grad)
        embedding.weight.grad = head.weight.grad = None
    for p in model.parameters():
        p.requires_grad_(False)


def _embedding_stats(model, ids):
    blocks = find_decoder_blocks(model)[1]
    cpu = torch.device("cpu")
    return collect_fisher(model, blocks, {}, ids, cpu, cpu, progress=False, embeddings=True)[EMBEDDING_STATS]


def test_head_fisher_is_summed_per_token_and_lookup_per_sequence():
    """The head's row and column sums are those of Σ_t g_t², g_t the gradient of token t's share
    of the loss alone (autograd through the model's own loss, one label at a time); the lookup's
    those of Σ_s g_s² over sequences (as for the decoder's Linears)."""
    model = family_model("gpt_neox")  # untied: the head's weight gradient is its role alone
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    stats = _embedding_stats(model, ids)
    head, table = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    per_token, per_sequence = torch.zeros_like(head), torch.zeros_like(table)
    for p in model.parameters():
        p.requires_grad_(p is head or p is table)
    for s in range(2):
        predicted = ids.shape[1] - 1
        for t in range(1, ids.shape[1]):
            labels = torch.full_like(ids[s : s + 1], -100)
            labels[0, t] = ids[s, t]
            (model(input_ids=ids[s : s + 1], labels=labels).loss / predicted).backward()
            per_token += head.grad.square()
            head.grad = table.grad = None
        model(input_ids=ids[s : s + 1], labels=ids[s : s + 1]).loss.backward()
        per_sequence += table.grad.square()
        head.grad = table.grad = None
    for p in model.parameters():
        p.requires_grad_(False)
    torch.testing.assert_close(stats["head_row"], per_token.sum(1))
    torch.testing.assert_close(stats["head_col"], per_token.sum(0))
    torch.testing.assert_close(stats["lookup_row"], per_sequence.sum(1))
    torch.testing.assert_close(stats["lookup_col"], per_sequence.sum(0))


@pytest.mark.parametrize("kind", ["llama", "gpt_neox"])
def test_embedding_options_are_sized_as_served_and_priced_by_role(kind):
    model = family_model(kind, dtype=torch.float32)
    ids = torch.randint(3, VOCAB, (3, 24), generator=torch.Generator().manual_seed(2))
    stats = _embedding_stats(model, ids)
    assert all(float(v.sum()) > 0 for v in stats.values())
    config = EmbeddingsConfig(bits=[4, 8], group_size=16)
    assert config.choices == [(8, 16), (4, 16)]
    with serving_dtype("bfloat16"):
        dense, w8, w4 = embedding_options(model, config, stats)
    tables = 1 if kind == "llama" else 2  # an untied head is a second table of the same shape
    assert dense.fixed is None and dense.bytes == tables * VOCAB * 64 * 2
    per_table = {8: VOCAB * 64 + VOCAB * 4 * 3, 4: VOCAB * 64 // 2 + VOCAB * 4 * 3}  # codes + bf16 scale and uint8 zero
    assert (w8.fixed, w4.fixed) == ("embeddings w8 g16", "embeddings w4 g16")
    assert (w8.bytes, w4.bytes) == (tables * per_table[8], tables * per_table[4])
    cost = lambda r: r.rel_weighted_error**2 * r.sensitivity  # the knapsack's fisher cost
    assert 0 < cost(w8) < cost(w4)
    # the price is Σ F·ΔW² with F = row·colᵀ/Σrow per role: check the W4 option by hand
    weight = model.get_input_embeddings().weight.detach()
    rank_one = lambda role: torch.outer(stats[f"{role}_row"], stats[f"{role}_col"]) / stats[f"{role}_row"].sum()
    fisher = rank_one("lookup") + (rank_one("head") if kind == "llama" else 0)
    expected = float((fisher * (quantized_table(weight, None, config.at(4, 16)).to_dense().double() - weight.double()).square()).sum())
    if kind == "gpt_neox":
        head = model.get_output_embeddings().weight.detach()
        expected += float((rank_one("head") * (quantized_table(head, None, config.at(4, 16)).to_dense().double() - head.double()).square()).sum())
    assert cost(w4) == pytest.approx(expected, rel=1e-6)
    # the dense entry sizes the budget but is no option: even a budget that fits it takes W8
    plan = solve_allocation({"model.embed_tokens": [dense, w8, w4]}, AllocationConfig(unit="bytes", ratio=0.01, cost="fisher"))
    assert plan.layers[0].method == "embeddings w8 g16" and plan.layers[0].stage is None and not plan.left_dense()
    plan = solve_allocation({"model.embed_tokens": [dense, w8, w4]}, AllocationConfig(unit="bytes", ratio=0.5, cost="fisher"))
    assert plan.layers[0].method == "embeddings w4 g16"
    # group sizes too: every (bits, group) pair whose group divides the hidden size (64) is an option
    config = EmbeddingsConfig(bits=4, group_size=[16, 48, 32])
    with serving_dtype("bfloat16"):
        options = embedding_options(model, config, stats)
    assert [o.fixed for o in options[1:]] == ["embeddings w4 g32", "embeddings w4 g16"]  # 48 does not divide 64
    assert options[1].bytes < options[2].bytes and cost(options[1]) > cost(options[2])


def _recipe(**allocation):
    return {
        "calibration": {"num_samples": 4, "seq_len": 32},
        "embeddings": {"bits": [8, 4], "group_size": 16},
        "stages": [{"method": "gptq", "bits": 8, "group_size": 16}, {"method": "gptq", "bits": 4, "group_size": 16}],
        "allocation": {"strategy": "knapsack", "unit": "bytes", "cost": "fisher", "candidates": {0: [0.0], 1: [0.0]}, **allocation},
    }


def test_knapsack_picks_the_embeddings_bits_for_a_size(tokenizer, calib_text, monkeypatch):
    """A loose size keeps W8 embeddings, a tight one takes W4 (and what it saves goes to the
    Linears); the model fits the size as served, and the report names the choice. The table is
    quantized once per option, to price it; the chosen one is installed, not quantized again."""
    import compress.embeddings as embeddings
    from compress.api import compress_model
    from compress.report import model_size, report_markdown

    quantized = []
    original = embeddings.quantized_table
    monkeypatch.setattr(embeddings, "quantized_table", lambda *a, **k: quantized.append(original(*a, **k)) or quantized[-1])

    with serving_dtype(torch.bfloat16):
        dense = model_size(tiny_model("llama"))["bytes"]
    chosen = {}
    for share in (0.7, 0.4):  # 0.4: W8 embeddings would leave the Linears less than W4 everywhere takes
        limit = int(share * dense)
        model, report = compress_model(tiny_model("llama"), _recipe(max_size=limit), dataset=str(calib_text), tokenizer=tokenizer, progress=False)
        assert report["model_size"]["compressed"]["bytes"] <= limit
        table = model.get_input_embeddings()
        assert isinstance(table, QuantizedEmbedding)
        chosen[share] = report["embeddings"]["bits"]
        assert isinstance(table.table, Int8Linear if chosen[share] == 8 else GQSALinear)
        assert len(quantized) == 2 and table.table is quantized[0 if chosen[share] == 8 else 1]  # the options: W8, W4
        quantized.clear()
        entry = next(c for c in report["allocation"]["layers"] if c["name"] == "model.embed_tokens")
        assert entry["method"] == f"embeddings w{chosen[share]} g16" and entry["bytes"] == report["embeddings"]["bytes_after"]
        assert f"embeddings w{chosen[share]} g16" in report_markdown(report)
        ids = torch.randint(3, VOCAB, (1, 16))
        assert torch.isfinite(model(ids).logits).all()
    assert chosen == {0.7: 8, 0.4: 4}


def test_embedding_choices_need_a_fisher_knapsack_in_bytes():
    recipe = _recipe(ratio=0.5)
    load_recipe(recipe)
    for allocation, problem in (
        (None, "needs allocation"),
        ({**recipe["allocation"], "unit": "params"}, "unit: bytes"),
        ({**recipe["allocation"], "cost": "weighted_sq"}, "cost: fisher"),
    ):
        with pytest.raises(LlmpressError, match=problem):
            load_recipe({**recipe, "allocation": allocation})
    assert load_recipe({**recipe, "embeddings": {"bits": [4], "group_size": 16}}).embeddings.bits == 4  # one width
    with pytest.raises(LlmpressError, match="knapsack chooses one"):
        from compress.embeddings import quantize_embeddings

        quantize_embeddings(tiny_model("llama"), EmbeddingsConfig(bits=[8, 4]))
    with pytest.raises(LlmpressError, match="at least 2"):
        load_recipe({**recipe, "embeddings": {"bits": 8, "group_size": [64, 1]}})


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_head_input_gram_is_the_final_hidden_states_gram(kind):
    """Block by block, the head's input Gram equals the one of a plain forward (Gemma-2: its
    final norm and logit softcapping run in the model's own code)."""
    from compress.embeddings import head_input_gram

    model = family_model(kind)
    ids = torch.randint(3, VOCAB, (3, 20), generator=torch.Generator().manual_seed(4))
    expected = torch.zeros(64, 64, dtype=torch.float64)
    hook = model.get_output_embeddings().register_forward_pre_hook(
        lambda m, args: expected.add_(args[0].reshape(-1, 64).double().T @ args[0].reshape(-1, 64).double())
    )
    with torch.no_grad():
        model(input_ids=ids)
    hook.remove()
    torch.testing.assert_close(head_input_gram(model, ids, "cpu", "cpu"), expected)


def test_gptq_embeddings_lower_the_heads_error_and_run_in_a_recipe(tokenizer, calib_text):
    """method: gptq quantizes the tied table against the head input's Gram: a smaller error on
    the head's outputs than round-to-nearest at the same bytes; a recipe with it compresses, with
    fixed bits and with the knapsack choosing them."""
    from compress.api import compress_model
    from compress.embeddings import head_input_gram

    model = tiny_model("llama")
    ids = torch.randint(3, VOCAB, (4, 32), generator=torch.Generator().manual_seed(5))
    gram = head_input_gram(model, ids, "cpu", "cpu")
    weight = model.get_input_embeddings().weight.detach()
    config = EmbeddingsConfig(bits=4, group_size=16)
    rtn, gptq = quantized_table(weight, None, config), quantized_table(weight, None, config, gram)
    head_error = lambda t: float((((t.to_dense() - weight).double() @ gram) * (t.to_dense() - weight).double()).sum())
    assert head_error(gptq) < 0.8 * head_error(rtn) and gptq.num_bytes() == rtn.num_bytes()
    with pytest.raises(LlmpressError, match="calibration data"):
        from compress.embeddings import quantize_embeddings

        quantize_embeddings(tiny_model("llama"), config.model_copy(update={"method": "gptq"}))
    fixed = {**_recipe(ratio=0.5), "embeddings": {"bits": 4, "group_size": 16, "method": "gptq"}}
    chosen = {**_recipe(ratio=0.5), "embeddings": {"bits": [8, 4], "group_size": 16, "method": "gptq"}}
    for recipe in (fixed, chosen):
        compressed, report = compress_model(tiny_model("llama"), recipe, dataset=str(calib_text), tokenizer=tokenizer, progress=False)
        assert report["embeddings"]["method"] == "gptq" and isinstance(compressed.get_input_embeddings(), QuantizedEmbedding)
        assert torch.isfinite(compressed(torch.randint(3, VOCAB, (1, 16))).logits).all()


def test_gptq_head_is_priced_through_the_gram():
    """With method: gptq the head role costs Σ_v row_v·Δ_v G Δ_vᵀ / tr G: for a diagonal G it is
    the rank-1 diagonal price, an error in directions the head's inputs never take costs
    nothing (the diagonal price charges it), and the option's price is that of the table GPTQ
    makes (the lookup role still priced by its rank-1 Fisher)."""
    from compress.embeddings import _GramFisher, _RankOneFisher, head_input_gram

    g = torch.Generator().manual_seed(7)
    row, diag = torch.rand(40, generator=g, dtype=torch.float64), torch.rand(16, generator=g, dtype=torch.float64)
    delta = torch.randn(40, 16, generator=g, dtype=torch.float64)
    col = diag * row.sum() / diag.sum()  # the column sums a diagonal Gram implies
    assert _GramFisher(row, torch.diag(diag) * 3.0).price(delta, rows=7) == pytest.approx(_RankOneFisher(row, col).price(delta), rel=1e-9)
    basis = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))[0]
    gram = basis[:, :10] @ torch.diag(torch.rand(10, generator=g, dtype=torch.float64) + 0.1) @ basis[:, :10].T  # rank 10
    unseen = torch.randn(40, 6, generator=g, dtype=torch.float64) @ basis[:, 10:].T  # errors in G's null space
    assert abs(_GramFisher(row, gram).price(unseen)) < 1e-9 * _GramFisher(row, gram).price(delta)
    assert _RankOneFisher(row, torch.diagonal(gram) * row.sum() / torch.diagonal(gram).sum()).price(unseen) > 0

    model = family_model("llama", dtype=torch.float32)
    ids = torch.randint(3, VOCAB, (3, 24), generator=torch.Generator().manual_seed(2))
    stats, gram = _embedding_stats(model, ids), head_input_gram(model, ids, "cpu", "cpu")
    config = EmbeddingsConfig(bits=[8, 4], group_size=16, method="gptq")
    with serving_dtype("bfloat16"):
        dense, w8, w4 = embedding_options(model, config, stats, gram)
    weight = model.get_input_embeddings().weight.detach()
    delta = quantized_table(weight, None, config.at(4, 16), gram).to_dense().double() - weight.double()
    expected = _RankOneFisher(stats["lookup_row"], stats["lookup_col"]).price(delta) + _GramFisher(stats["head_row"], gram).price(delta)
    assert w4.rel_weighted_error**2 * w4.sensitivity == pytest.approx(expected, rel=1e-6)

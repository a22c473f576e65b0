"""Token embeddings and the output head in W8 or W4: the recipe's `embeddings:` section.

On a small model the embeddings are most of the bytes left after the decoder is compressed
(SmolLM2-135M with W4 decoder Linears: 56.6 of its 129.7 MB as served in bf16), and on Gemma-3
models they are over half of the weights. No calibration is needed: the table is quantized by
round-to-nearest with a per-group clipping search (compress/compressors/rtn.py), data-free.

- tied embeddings (one matrix for lookup and logits): the table is quantized once; the head
  becomes a `TiedOutputHead` calling the same quantized table, and the checkpoint stores it once.
- untied: the input table and (with `head: true`) the head, each quantized on its own.

Checkpoints record what was done in `quantization_config.embeddings`; `build_for_loading` and
`tie_after_loading` rebuild it in transformers' loader (compress/hf_quantizer.py), and
`dense_embeddings` restores plain modules for `llmpress export`.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from .blocks import capture_block_inputs, find_decoder_blocks, forward_through_blocks, tail_only
from .compressors.base import LevelResult
from .compressors.gqsa import GQSAConfig, gqsa_quantize
from .compressors.rtn import quantize_groups
from .errors import LlmpressError
from .metrics import relative_errors, tensor_bytes
from .modules import GQSALinear, Int8Linear, QuantizedEmbedding, TiedOutputHead
from .targets import set_submodule

logger = logging.getLogger("compress")


class EmbeddingsConfig(BaseModel):
    """`embeddings: {bits: 8, group_size: 64}` in a recipe."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: Literal[4, 8] | list[Literal[4, 8]] = Field(
        default=8,
        description="bits per value: 8 (near lossless) or 4; a list ([8, 4]) lets the knapsack choose for the table (and "
        "head) like for any layer, priced by their Fisher cost (needs allocation: {strategy: knapsack, unit: bytes, cost: fisher})",
    )
    group_size: int | list[int] = Field(
        default=64, description="columns (hidden units) sharing one scale and zero point; a list: the knapsack chooses"
    )
    head: bool = Field(default=True, description="untied models: quantize the output head too (tied: it is the same table)")
    method: Literal["rtn", "gptq"] = Field(
        default="rtn",
        description="rtn: round-to-nearest with a clipping search, data-free; gptq: the head's table (tied: the one table) "
        "with GPTQ's error feedback against the Gram of the head's input on the calibration data (an untied input table "
        "stays rtn: a lookup has no correlated inputs to feed errors to)",
    )

    @field_validator("bits", "group_size")
    @classmethod
    def _one_or_choices(cls, value: int | list[int], info: Any) -> int | list[int]:
        if isinstance(value, list):
            if not value:
                raise ValueError(f"{info.field_name}: give one value, or a list of them for the knapsack to choose from")
            value = sorted(set(value), reverse=True)
            value = value[0] if len(value) == 1 else value
        if info.field_name == "group_size" and min(value if isinstance(value, list) else [value]) < 2:
            raise ValueError("group_size must be at least 2")
        return value

    @property
    def choices(self) -> list[tuple[int, int]]:
        """The (bits, group size) pairs the knapsack chooses among ([] when both are one value)."""
        if not isinstance(self.bits, list) and not isinstance(self.group_size, list):
            return []
        listed = lambda v: v if isinstance(v, list) else [v]  # noqa: E731
        return [(b, g) for b in listed(self.bits) for g in listed(self.group_size)]

    def at(self, bits: int, group_size: int) -> "EmbeddingsConfig":
        """This config with one bit width and group size."""
        return self.model_copy(update={"bits": bits, "group_size": group_size})


def quantized_table(
    weight: torch.Tensor, bias: torch.Tensor | None, config: EmbeddingsConfig, gram: torch.Tensor | None = None
) -> GQSALinear | Int8Linear:
    """A (rows × cols) table as the W4/W8 Linear format that serves it, in `weight`'s dtype:
    round-to-nearest, or with `gram` (the input Gram of the head reading it) GPTQ's sweep."""
    cols = weight.shape[1]
    if cols % config.group_size or (config.bits == 4 and config.group_size % 2):
        raise LlmpressError(
            f"embeddings.group_size {config.group_size} must divide the hidden size {cols}"
            + (" and be even for 4 bits" if config.bits == 4 else "")
            + f"; try {next(g for g in (128, 64, 32, 16, 8, 4, 2, 1) if cols % g == 0)} (--set embeddings.group_size=...), "
            "or keep the embeddings as they are (--set embeddings=null)"
        )
    bias = None if bias is None else bias.detach()
    if gram is not None:
        sweep = GQSAConfig(ratio=0.0, group_size=config.group_size, blocksize=_blocksize(config.group_size), refit_scales=True)
        found = gqsa_quantize(weight.detach(), gram.to(weight.device), sweep, "embeddings", levels=2**config.bits - 1)
        scales = found.scales.to(weight.dtype)
        if config.bits == 8:
            return Int8Linear.from_codes(found.codes, scales, found.zeros, bias)
        return GQSALinear.from_codes(found.codes, scales, found.zeros, found.index, cols, bias)
    grid = quantize_groups(weight.detach(), config.bits, config.group_size)
    scales = grid.scales.to(weight.dtype)
    if config.bits == 8:
        return Int8Linear.from_codes(grid.codes, scales, grid.zeros, bias)
    groups = grid.codes.shape[1]
    order = torch.arange(groups, device=weight.device).expand(weight.shape[0], groups)
    return GQSALinear.from_codes(grid.codes, scales, grid.zeros, order, cols, bias)


def embedding_options(
    model: nn.Module,
    config: EmbeddingsConfig,
    stats: dict[str, torch.Tensor],
    gram: torch.Tensor | None = None,
    priced: dict[tuple[int, int], list[nn.Module]] | None = None,
) -> list[LevelResult]:
    """The embeddings as one knapsack item: its dense entry (sizes the budget, not an option) and
    one option per (bits, group size) in `config.choices`, in bytes as served, priced in the units of the
    Linears' `fisher` cost: Σ F·ΔW² over the roles the quantized table plays (lookup; head when
    tied or quantized too), F each role's rank-1 Fisher from `stats` (`fisher.EMBEDDING_STATS`).
    Round-to-nearest errors are uncorrelated across columns, so a diagonal Fisher prices them.
    With `gram` (`method: gptq`) the head's table is quantized as it will be, against that Gram,
    and its errors are correlated on purpose (moved into directions the head's inputs do not
    use): the head role is then priced through the Gram (`_GramFisher`), as the Linears' are.
    `priced` (a dict) receives each option's quantized tables, keyed (bits, group size), so that
    `quantize_embeddings` installs the chosen one instead of quantizing it again."""
    embedding, head, tied = _embedding_and_head(model, config)
    table = embedding.weight.detach()
    own_head = head if (head is not None and not tied and config.head) else None
    head_gram = _gptq_gram(config, gram)
    lookup = _RankOneFisher(stats["lookup_row"], stats["lookup_col"])
    if head_gram is None:
        head_fisher: _RankOneFisher | _GramFisher = _RankOneFisher(stats["head_row"], stats["head_col"])
    else:
        head_fisher = _GramFisher(stats["head_row"], head_gram)
    # (weight, its Fisher in every role it plays once quantized)
    tables = [(table, [lookup, head_fisher] if tied else [lookup])]
    if own_head is not None:
        tables.append((own_head.weight.detach(), [head_fisher]))
    sensitivity = sum(f.price(w) for w, roles in tables for f in roles)
    dense_values, dense_bytes = table.numel(), tensor_bytes(table)
    if own_head is not None:
        dense_values += own_head.weight.numel() + (own_head.bias.numel() if own_head.bias is not None else 0)
        dense_bytes += tensor_bytes(own_head.weight) + (tensor_bytes(own_head.bias) if own_head.bias is not None else 0)
    options = [LevelResult(0.0, dense_values, dense_bytes, 0.0, 0.0, sensitivity)]
    cols = table.shape[1]
    fitting = [(b, g) for b, g in config.choices if cols % g == 0 and (b == 8 or g % 2 == 0)]
    if not fitting:
        quantized_table(table, None, config.at(*config.choices[0]))  # raises with the fix
    if len(fitting) < len(config.choices):
        logger.warning("embeddings: group sizes that do not divide the hidden size %d are no option: %s", cols,
                       sorted({g for _, g in config.choices} - {g for _, g in fitting}))  # fmt: skip
    for bits, group_size in fitting:
        nbytes, cost, rel = 0, 0.0, 0.0
        for index, (weight, roles) in enumerate(tables):
            bias = own_head.bias if index == 1 and own_head.bias is not None else None
            reads_head = tied or index == 1  # the table the head reads: GPTQ against its input's Gram
            quantized = quantized_table(weight, bias, config.at(bits, group_size), head_gram if reads_head else None)
            if priced is not None:
                priced.setdefault((bits, group_size), []).append(quantized)
            delta = quantized.to_dense().to(weight.dtype) - weight
            nbytes += quantized.num_bytes()
            cost += sum(f.price(delta) for f in roles)
            if index == 0:  # the option's relative error is the input table's
                rel = _relative_error(weight, delta)
        weighted = (cost / sensitivity) ** 0.5 if sensitivity > 0 else 0.0
        options.append(LevelResult(0.0, dense_values, nbytes, rel, weighted, sensitivity, fixed=_option_label(bits, group_size)))
    return options


class _RankOneFisher:
    """A role's Fisher as F_vj ≈ row_v·col_j / Σ row (from its row and column sums)."""

    def __init__(self, row: torch.Tensor, col: torch.Tensor):
        self.row, self.col, self.total = row.double(), col.double(), float(row.sum())

    def price(self, delta: torch.Tensor, rows: int = 8192) -> float:
        """Σ_vj F_vj·Δ_vj², a slice of rows at a time (vocabularies are large)."""
        if self.total <= 0:
            return 0.0
        col, row = self.col.to(delta.device), self.row.to(delta.device)
        return sum(
            float((delta[start : start + rows].double().square() @ col) @ row[start : start + rows])
            for start in range(0, delta.shape[0], rows)
        ) / self.total


class _GramFisher:
    """The head's Fisher as F ≈ diag(row) ⊗ G / tr G: per output row v, its loss-gradient energy
    row_v (`head_row`: Σ_t g_tv²·‖h_t‖²) spread over the input directions as the head's inputs
    h_t spread (G = Σ_t h_t·h_tᵀ). The price Σ_v row_v·(Δ_v G Δ_vᵀ)/tr G keeps the cross terms
    between columns that the diagonal drops, so an error GPTQ put where the inputs do not go
    costs nothing; for uncorrelated errors it agrees with `_RankOneFisher` (whose column sums are
    G's diagonal, up to scale, when gradients and inputs are independent)."""

    def __init__(self, row: torch.Tensor, gram: torch.Tensor):
        self.row, self.gram = row.double(), gram.double()
        self.trace = float(torch.diagonal(self.gram).sum())

    def price(self, delta: torch.Tensor, rows: int = 8192) -> float:
        """Σ_v row_v·Δ_v G Δ_vᵀ / tr G, a slice of rows at a time (vocabularies are large)."""
        if self.trace <= 0 or float(self.row.sum()) <= 0:
            return 0.0
        gram, row = self.gram.to(delta.device), self.row.to(delta.device)
        total = 0.0
        for start in range(0, delta.shape[0], rows):
            d = delta[start : start + rows].double()
            total += float(((d @ gram) * d).sum(1) @ row[start : start + rows])
        return total / self.trace


def _relative_error(weight: torch.Tensor, delta: torch.Tensor, rows: int = 8192) -> float:
    """‖Δ‖/‖W‖ in float64, a slice of rows at a time."""
    squares = lambda t: sum(float(t[i : i + rows].double().square().sum()) for i in range(0, t.shape[0], rows))  # noqa: E731
    return (squares(delta) / max(squares(weight), 1e-300)) ** 0.5


def _gptq_gram(config: EmbeddingsConfig, gram: torch.Tensor | None) -> torch.Tensor | None:
    """The Gram the head's table is quantized against: `gram` with `method: gptq`, else none."""
    if config.method != "gptq":
        return None
    if gram is None:
        raise LlmpressError("embeddings.method gptq quantizes against calibration data (the head input's Gram): pass it, or use method: rtn")
    return gram


def _blocksize(group_size: int) -> int:
    """GPTQ's lazy-update block: 128 columns, or a multiple of the group that holds it."""
    return group_size * max(1, 128 // group_size)


@torch.no_grad()
def head_input_gram(model: nn.Module, input_ids: torch.Tensor, device: torch.device | str, offload_device: torch.device | str) -> torch.Tensor:
    """XᵀX (float64) of the output head's input, the final hidden states after the model's own
    norm, over the calibration tokens: the decoder runs one block on the device at a time, then
    the model's forward with every block replaced (the last hands over the stored state) runs
    its norm and head, one sequence at a time (a sequence's logits span the vocabulary)."""
    _, blocks = find_decoder_blocks(model)
    inputs = capture_block_inputs(model, blocks, input_ids, 1, device, offload_device)
    hiddens, as_tuple = forward_through_blocks(blocks, inputs, device, offload_device)
    head = model.get_output_embeddings()
    gram = torch.zeros(head.in_features, head.in_features, dtype=torch.float64)

    def accumulate(module: nn.Module, args: tuple) -> None:
        x = args[0].reshape(-1, args[0].shape[-1]).double()
        gram.add_((x.T @ x).cpu())

    hook = head.register_forward_pre_hook(accumulate)
    try:
        with tail_only(model, blocks, as_tuple, device, offload_device) as hand_over:
            for sequence, hidden in zip(input_ids.split(1), hiddens):
                hand_over(hidden.to(device))
                model(input_ids=sequence.to(device), use_cache=False)
    finally:
        hook.remove()
    return gram


def embedding_name(model: nn.Module) -> str:
    """The input embedding's module name: the embeddings' item in a knapsack plan."""
    return _name_of(model, model.get_input_embeddings())


def chosen_setting(model: nn.Module, config: EmbeddingsConfig, plan: Any) -> EmbeddingsConfig:
    """`config` at the (bits, group size) a knapsack plan (`budget.AllocationPlan`) chose."""
    choice = plan.choice(embedding_name(model))
    for bits, group_size in config.choices:
        if choice is not None and choice.method == _option_label(bits, group_size):
            return config.at(bits, group_size)
    raise LlmpressError(f"the allocation plan has no embeddings option (got {choice}); this is a bug, please report it")


def _option_label(bits: int, group_size: int) -> str:
    return f"embeddings w{bits} g{group_size}"


def _embedding_and_head(model: nn.Module, config: EmbeddingsConfig) -> tuple[nn.Embedding, nn.Module | None, bool]:
    """(input embedding, output head, whether the head is tied to it), checked for quantization."""
    embedding = model.get_input_embeddings()
    if isinstance(embedding, QuantizedEmbedding):
        raise LlmpressError("the embeddings are already quantized; remove `embeddings:` from the recipe")
    if not isinstance(embedding, nn.Embedding):
        raise LlmpressError(
            f"the input embedding is a {type(embedding).__name__}, not an nn.Embedding: embeddings quantization cannot "
            "handle it; keep the embeddings as they are: --set embeddings=null (or remove `embeddings:` from the recipe)"
        )
    head = model.get_output_embeddings()
    tied = head is not None and getattr(head, "weight", None) is embedding.weight
    if head is not None and not tied and config.head and not isinstance(head, nn.Linear):
        raise LlmpressError(f"the output head is a {type(head).__name__}, not an nn.Linear; set embeddings.head: false (--set embeddings.head=false)")
    return embedding, head, tied


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def quantize_embeddings(
    model: nn.Module, config: EmbeddingsConfig, gram: torch.Tensor | None = None, priced: dict[tuple[int, int], list[nn.Module]] | None = None
) -> dict[str, Any]:
    """Replace the input embedding (and the head) by quantized modules, in place; returns the
    report's `embeddings` section (names, bytes as served before and after, errors). `gram`: the
    head input's Gram (`head_input_gram`), which `method: gptq` quantizes the head's table against.
    `priced`: the tables `embedding_options` quantized for this setting, installed as they are."""
    head_gram = _gptq_gram(config, gram)
    if config.choices:
        raise LlmpressError(f"embeddings: bits or group_size is a list {config.choices}: the knapsack chooses one (config.at(bits, group_size))")
    embedding, head, tied = _embedding_and_head(model, config)
    embedding_name = _name_of(model, embedding)
    head_name = _name_of(model, head) if head is not None else None
    weight = embedding.weight.data
    before = tensor_bytes(weight)
    ready = list((priced or {}).get((config.bits, config.group_size), []))
    table = ready.pop(0) if ready else quantized_table(weight, None, config, head_gram if tied else None)
    scale = getattr(embedding, "embed_scale", None)
    scale = float(scale) if scale is not None else None
    quantized = QuantizedEmbedding(table, scale, embedding.padding_idx)
    section: dict[str, Any] = {
        "bits": config.bits, "group_size": config.group_size, "method": config.method, "tied": tied, "embedding": embedding_name,
        "head": head_name if (tied or config.head) else None, "embedding_rel_error": relative_errors(weight, table.to_dense(), None)[0],
    }  # fmt: skip
    set_submodule(model, embedding_name, quantized)
    after = table.num_bytes()
    if tied:
        tied_head = TiedOutputHead(embedding_name, quantized.embedding_dim, quantized.num_embeddings)
        tied_head.tie(quantized)
        set_submodule(model, head_name, tied_head)
        model.config.tie_word_embeddings = False  # no parameter is shared any more: the head reads the table
        model.all_tied_weights_keys = {}
    elif head is not None and config.head:
        before += tensor_bytes(head.weight) + (tensor_bytes(head.bias) if head.bias is not None else 0)
        head_table = ready.pop(0) if ready else quantized_table(head.weight.data, head.bias, config, head_gram)
        section["head_rel_error"] = relative_errors(head.weight.data, head_table.to_dense(), None)[0]
        set_submodule(model, head_name, head_table)
        after += head_table.num_bytes()
    section.update(bytes_before=before, bytes_after=after)
    logger.info("embeddings: W%d g%d%s, %s -> %s bytes", config.bits, config.group_size, " (tied head)" if tied else "", f"{before:,}", f"{after:,}")
    return section


def checkpoint_entry(model: nn.Module) -> dict[str, Any] | None:
    """What the loader needs to rebuild quantized embeddings (None: the model has none)."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, QuantizedEmbedding)]
    if not found:
        return None
    name, embedding = found[0]
    heads = [(n, m) for n, m in model.named_modules() if isinstance(m, TiedOutputHead)]
    return {"embedding": name, "spec": embedding.spec(), "tied_head": heads[0][0] if heads else None}


def build_for_loading(model: nn.Module, entry: dict[str, Any], dtype: torch.dtype) -> set[str]:
    """Before transformers fills in the weights: empty quantized embedding (and tied head) on the
    meta device. Returns the compressed-module names built here (the table)."""
    embedding = QuantizedEmbedding.from_spec(entry["spec"], dtype, "meta")
    set_submodule(model, entry["embedding"], embedding)
    if entry.get("tied_head"):
        set_submodule(model, entry["tied_head"], TiedOutputHead(entry["embedding"], embedding.embedding_dim, embedding.num_embeddings))
    return {entry["embedding"] + ".table"}


def tie_after_loading(model: nn.Module) -> None:
    """Point every TiedOutputHead at its quantized embedding (after the weights are loaded)."""
    for module in model.modules():
        if isinstance(module, TiedOutputHead):
            module.tie(model.get_submodule(module.embedding_name))


def dense_embeddings(model: nn.Module, entry: dict[str, Any]) -> None:
    """Back to the model's own embedding class with dequantized weights (and the head tied to it
    again): for `llmpress export`. The class comes from the model's config, built on the meta
    device (Gemma's scaled embedding keeps its scale)."""
    from transformers import AutoModelForCausalLM

    quantized: QuantizedEmbedding = model.get_submodule(entry["embedding"])
    config = copy.deepcopy(model.config)
    config.quantization_config = None
    del config.quantization_config
    tied = bool(entry.get("tied_head"))
    config.tie_word_embeddings = tied
    with torch.device("meta"):
        reference = AutoModelForCausalLM.from_config(config)
    dense = reference.get_submodule(entry["embedding"]).to_empty(device=quantized.table.scales.device)
    with torch.no_grad():
        dense.weight.data = quantized.to_dense().to(quantized.table.scales.dtype)
        if quantized.embed_scale is not None and hasattr(dense, "embed_scale"):
            dense.embed_scale.fill_(quantized.embed_scale)
    set_submodule(model, entry["embedding"], dense)
    if tied:
        head = nn.Linear(dense.embedding_dim, dense.num_embeddings, bias=False, device=dense.weight.device, dtype=dense.weight.dtype)
        head.weight = dense.weight
        set_submodule(model, entry["tied_head"], head)
        model.config.tie_word_embeddings = True


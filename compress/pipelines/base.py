"""What every pipeline mode shares: stages and their compressors, target selection, one block's
calibration statistics, and compressing a layer in place with its record.

A mode (sequential.py, dense.py, grouped.py, gradients.py) decides only *where the statistics
come from* and in which order blocks are visited; everything else is here. Per-layer levels
(the knapsack's plan) and the stages that also need Fisher sums are constructor arguments.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..blocks import find_decoder_blocks, run_block
from ..collectors import LinearInputHooks, identity_statistics, shrink_sparse_statistics
from ..compressors import COMPRESSORS, LayerStats, StageConfig
from ..compressors.base import flush_denormals
from ..distributed import current, linear_cost
from ..errors import LlmpressError
from ..experts import all_experts_calibrated, expert_linear_names, linearize_experts
from ..kernels import expanded_weights_cached
from ..metrics import LayerRecord, peak_memory_mb, relative_errors
from ..modules import CompressedLinear
from ..targets import match_linears, set_submodule

logger = logging.getLogger("compress")

# statistics that come from a backward pass (compress/fisher.py), not from input hooks
GRADIENT_STATS = frozenset({"fisher", "grads"})

# {stage index: {layer name: its config, or None to leave the layer dense}}
LayerConfigs = dict[int, dict[str, StageConfig | None]]
_NO_COLLECTORS: dict = {}  # what a layer without collectors (a data-free stage) has

# Fisher sums of the dense model by layer name (compress/fisher.py collect_fisher)
FisherSums = dict[str, dict[str, torch.Tensor]]


class BlockPipeline:
    """Compress a model's decoder-block Linears stage by stage, one block on the device at a time.

    `layer_configs` overrides a stage's config per layer (the knapsack's levels); `fisher_for`
    names stages whose targets get Fisher sums although their method needs none (the knapsack's
    `fisher` cost); `weighted_errors` collects a Gram for every target so that even methods that
    need none report calibration-weighted errors. Experts of MoE models become per-expert Linears
    here (compress/experts.py); `moe_calibration="all"` runs every expert on every calibration
    token while statistics are collected (the model's outputs stay the routed ones).
    `max_statistics_gib` bounds the statistics held at once: a block's layers are then collected
    in groups, one pass each.
    """

    def __init__(
        self,
        model: nn.Module,
        stages: list[StageConfig],
        *,
        device: str | torch.device = "cpu",
        offload_device: str | torch.device = "cpu",
        batch_size: int = 1,
        progress: bool = True,
        on_layer: Callable[[LayerRecord], None] | None = None,
        layer_configs: LayerConfigs | None = None,
        fisher_for: set[int] | frozenset[int] = frozenset(),
        weighted_errors: bool = True,
        moe_calibration: str = "routed",
        max_statistics_gib: float | None = None,
        run_progress: Any = None,
    ):
        if moe_calibration not in ("routed", "all"):
            raise LlmpressError(f"calibration.moe must be 'routed' or 'all', not {moe_calibration!r}")
        self.model = model
        self.moe_calibration = moe_calibration
        self.max_statistics_bytes = max_statistics_gib * 2**30 if max_statistics_gib else None
        self.run_progress = run_progress  # progress.RunProgress: resumable after each block (sequential mode)
        linearize_experts(model)
        self.expert_names = frozenset(expert_linear_names(model))
        self.stages = list(stages)
        self.device = torch.device(device)
        self.offload_device = torch.device(offload_device)
        self.batch_size = batch_size
        self.progress = progress
        self.on_layer = on_layer
        self.layer_configs = layer_configs or {}
        self.fisher_for = frozenset(fisher_for)
        self.weighted_errors = weighted_errors
        self.blocks_path, self.blocks = find_decoder_blocks(model)
        self.compressors = [COMPRESSORS[stage.method].for_stage(stage) for stage in self.stages]
        self.block_log: list[dict[str, Any]] = []
        self.parallel = current()  # ranks of a torchrun launch (compress/distributed.py), or one
        # original (weight, bias) of the current block's layers, kept only for refining stages (EoRA)
        self._keep_originals = any(c.wraps_compressed for c in self.compressors)
        self._originals: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        # the current block's Grams by layer, kept only when layers are measured again after
        # block tuning (sequential.py)
        self._keep_grams = False
        self._grams: dict[str, torch.Tensor] = {}
        self.check_targets()

    # ---- targets ---------------------------------------------------------------------------
    def check_targets(self) -> None:
        all_linears = match_linears(self.model, ["Linear"], [])
        for index, stage in enumerate(self.stages):
            matched = match_linears(self.model, stage.targets, stage.ignore)
            if not matched and any(t.lower() == "experts" for t in stage.targets) and not self.expert_names:
                raise LlmpressError(
                    f"stage {index} ({stage.method}) targets 'experts', but {type(self.model).__name__} has no "
                    "mixture-of-experts layers; target 'Linear' (or named layers) for a dense model"
                )
            if not matched:
                examples = ", ".join(list(all_linears)[:4])
                raise LlmpressError(
                    f"stage {index} ({stage.method}): targets {stage.targets} (ignore {stage.ignore}) match no "
                    f"Linear module. Use class names (Linear), exact names, or 're:' regexes; "
                    f"this model's Linears are named like: {examples}"
                )
            outside = [n for n in matched if not n.startswith(self.blocks_path + ".")]
            if outside:
                raise LlmpressError(
                    f"stage {index} ({stage.method}) targets {outside[:3]}, outside the decoder blocks "
                    f"({self.blocks_path}); only block Linears are compressed: add them to 'ignore'"
                )

    def prefix(self, index: int) -> str:
        return f"{self.blocks_path}.{index}"

    def stage_layers(self, block: nn.Module, index: int, stage_index: int) -> dict[str, nn.Module]:
        """This block's layers for a stage: plain Linears, or compressed ones for refining stages."""
        stage, compressor = self.stages[stage_index], self.compressors[stage_index]
        kind = CompressedLinear if compressor.wraps_compressed else nn.Linear
        return match_linears(block, stage.targets, stage.ignore, prefix=self.prefix(index), kind=kind)

    def dense_targets(self, block: nn.Module, index: int, stage_indices: list[int]) -> dict[str, nn.Module]:
        """Plain Linears any of the stages targets in this block (refining stages: the same names)."""
        layers: dict[str, nn.Module] = {}
        for i in stage_indices:
            stage = self.stages[i]
            layers.update(match_linears(block, stage.targets, stage.ignore, prefix=self.prefix(index), kind=nn.Linear))
        return layers

    def config_for(self, stage_index: int, name: str) -> StageConfig | None:
        """The layer's config: the stage's, or the allocator's level for it (None: left dense)."""
        return self.layer_configs.get(stage_index, {}).get(name, self.stages[stage_index])

    def forward_stages(self) -> list[int]:
        """Stages compressed from input statistics (all but the gradient-walk ones, gradients.py)."""
        return [i for i, c in enumerate(self.compressors) if "grads" not in c.needs]

    # ---- statistics ------------------------------------------------------------------------
    def input_needs(self, stage_indices: list[int]) -> set[str]:
        """Input-hook collectors the stages need (plus the Gram for weighted errors if asked)."""
        needs = set().union(*(self.compressors[i].needs for i in stage_indices)) - GRADIENT_STATS
        if self.weighted_errors or any(i in self.fisher_for for i in stage_indices):
            needs.add("gram")
        return needs

    def needs_data(self, stage_indices: list[int]) -> bool:
        return bool(self.input_needs(stage_indices)) or bool(self.fisher_stages(stage_indices)) or any(
            "grads" in self.compressors[i].needs for i in stage_indices
        )

    def fisher_stages(self, stage_indices: list[int]) -> list[int]:
        return [i for i in stage_indices if "fisher" in self.compressors[i].needs or i in self.fisher_for]

    def collect_fisher(self, input_ids: torch.Tensor | None, stage_indices: list[int], embeddings: bool = False) -> FisherSums:
        """Fisher sums of the dense model for the targets of the stages that need them (one backward
        pass); `embeddings`: also the sums that price the embeddings and head (`fisher.EMBEDDING_STATS`)."""
        wanted = self.fisher_stages(stage_indices)
        if not wanted and not embeddings:
            return {}
        if input_ids is None:
            raise LlmpressError(f"methods {[self.stages[i].method for i in wanted]} need Fisher statistics: pass calibration data")
        from ..fisher import collect_fisher

        linears: dict[str, nn.Module] = {}
        for i in wanted:
            linears.update(match_linears(self.model, self.stages[i].targets, self.stages[i].ignore))
        sums = collect_fisher(
            self.model, self.blocks, linears, self.parallel.share(input_ids), self.device, self.offload_device,
            progress=self.progress and self.parallel.is_main, embeddings=embeddings,
        )  # fmt: skip
        self.parallel.all_reduce_(t for layer_sums in sums.values() for t in layer_sums.values())
        return sums

    @torch.no_grad()
    def collect_block(
        self,
        block: nn.Module,
        index: int,
        layers: dict[str, nn.Module],
        needs: set[str],
        hiddens: list[torch.Tensor],
        kwargs: list[dict],
        fisher: FisherSums,
        keep: bool,
    ) -> tuple[dict[str, LayerStats], list[torch.Tensor] | None]:
        """Run the batches through `block` with collectors on `layers`: (stats by name, outputs if keep).

        When the layers' statistics would exceed `max_statistics_bytes` (an MoE block's hundreds
        of per-expert Grams), they are collected in groups, one pass over the batches per group."""
        groups = statistics_groups(layers, needs, self.max_statistics_bytes, self.shared_input)
        stats: dict[str, LayerStats] = {}
        outputs = None
        for number, group in enumerate(groups):
            last = number == len(groups) - 1
            group_stats, outputs = self._collect_group(block, index, group, needs, hiddens, kwargs, fisher, keep and last)
            stats.update(group_stats)
        if len(groups) > 1:
            logger.info("block %d: statistics of %d layers collected in %d passes", index, len(layers), len(groups))
        return stats, outputs

    def shared_input(self, name: str) -> str:
        """A key equal for layers known to read one input: with calibration.moe 'all', every
        expert's up projection of an experts module reads the block's tokens."""
        if self.moe_calibration == "all" and name in self.expert_names:
            stack, projection, _ = name.rsplit(".", 2)
            if projection != "down_proj":
                return f"{stack}.{projection}"
        return name

    def _collect_group(self, block, index, layers, needs, hiddens, kwargs, fisher, keep):
        """One pass of the batches through `block` with collectors on `layers`.

        An expert that saw fewer calibration tokens than its input width gets statistics shrunk
        towards the identity (collectors.shrink_sparse_statistics) instead of failing the run."""
        all_experts = self.moe_calibration == "all"
        with LinearInputHooks(layers, needs) as hooks, expanded_weights_cached(), all_experts_calibrated(block, all_experts):
            outputs = run_block(block, hiddens, kwargs, self.device, self.offload_device, keep=keep)
        hooks.all_reduce(self.parallel)  # several ranks: the sums over every rank's sequences
        stats: dict[str, LayerStats] = {}
        results: dict[int, dict[str, torch.Tensor]] = {}  # layers sharing collectors share their results
        starved: list[tuple[str, int]] = []
        for name, layer in layers.items():
            collectors = hooks.collectors.get(name, _NO_COLLECTORS)
            tokens = next(iter(collectors.values())).num_tokens if collectors else 0
            expert = name in self.expert_names
            if needs and tokens == 0 and not expert:
                raise LlmpressError(f"{name} received no calibration tokens (block {index} never calls it)")
            if id(collectors) not in results:
                results[id(collectors)] = {k: c.result() for k, c in collectors.items()}
            tensors = dict(results[id(collectors)])
            if needs and expert and tokens < layer.in_features:
                starved.append((name, tokens))
                tensors = (
                    shrink_sparse_statistics(tensors, tokens, layer.in_features)
                    if tokens
                    else identity_statistics(needs, layer.in_features, self.device)
                )
            if not expert and not tokens:  # a data-free stage: the block's tokens
                tokens = self.parallel.all_reduce_count(sum(h.shape[:-1].numel() for h in hiddens))
            stats[name] = LayerStats(tensors, tokens, name=name, block=index)
            stats[name].tensors.update(fisher.get(name, {}))
        if starved:
            none = sum(1 for _, tokens in starved if tokens == 0)
            logger.info(
                "block %d: %d expert layers saw fewer calibration tokens than their input width (%d saw none); their "
                "statistics are shrunk towards the identity (none: data-free). More samples or calibration.moe: all "
                "give them real statistics",
                index, len(starved), none,
            )  # fmt: skip
        return stats, outputs

    # ---- blocks and layers -----------------------------------------------------------------
    @contextmanager
    def on_device(self, index: int) -> Iterator[nn.Module]:
        """Block `index` on the execution device for the duration; logs its time and peak memory."""
        block = self.blocks[index]
        start = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        block.to(self.device)
        try:
            yield block
        finally:
            block.to(self.offload_device)
        prefix = self.prefix(index) + "."
        for name in [n for n in self._originals if n.startswith(prefix)]:
            del self._originals[name]  # this block's refining stages are done
        self._grams.clear()
        seconds, memory = time.perf_counter() - start, peak_memory_mb(self.device)
        self.block_log.append({"block": index, "seconds": round(seconds, 3), "peak_memory_mb": round(memory, 1)})

    def compress_block(self, block: nn.Module, index: int, stage_indices: list[int], stats_for: Callable) -> list[LayerRecord]:
        """Compress this block's targets of the given stages in order; `stats_for(stage_index, layers)`
        gives each stage's statistics by layer name."""
        records = []
        for stage_index in stage_indices:
            layers = self.stage_layers(block, index, stage_index)
            layers = {n: m for n, m in layers.items() if self.config_for(stage_index, n) is not None}
            if not layers:  # nothing here for this stage (the allocator chose other stages or dense)
                continue
            stage_stats = stats_for(stage_index, layers)
            for name in layers:
                if self.compressors[stage_index].needs and name not in stage_stats:
                    raise LlmpressError(f"no calibration statistics for {name}; collect them for every target")
            configured = {name: (linear, self.config_for(stage_index, name)) for name, linear in layers.items()}
            records += self.compress_layers(configured, stage_stats, index, stage_index)
        return records

    # several ranks split a block's layers between them (GroupedPipeline does not: a group spans blocks)
    weight_parallel = True

    def compress_layers(
        self, layers: dict[str, tuple[nn.Module, StageConfig]], stats: dict[str, LayerStats], index: int, stage_index: int
    ) -> list[LayerRecord]:
        """Compress each (layer, config) in place; the records in the layers' order.

        With several ranks each compresses its share, bin-packed by estimated cost, and the
        compressed modules are broadcast from their owners: every rank ends with the same block."""
        if not self.parallel.active or not self.weight_parallel:
            return [r for name, (linear, config) in layers.items() for r in self.compress_layer(name, linear, stats, config, index, stage_index)]
        rank = self.parallel.rank
        owners = self.parallel.assign({name: linear_cost(linear) for name, (linear, _) in layers.items()})
        mine = {
            name: self.compress_layer(name, linear, stats, config, index, stage_index)
            for name, (linear, config) in layers.items()
            if owners[name] == rank
        }
        records: list[LayerRecord] = []
        block = self.blocks[index]
        for name, (linear, _) in layers.items():
            local = name[len(self.prefix(index)) + 1 :]
            payload = None
            if owners[name] == rank:
                payload = (block.get_submodule(local).to("cpu"), mine[name])
            module, layer_records = self.parallel.broadcast_object(payload, owners[name])
            module.to(self.device)
            if owners[name] != rank:
                if self._keep_originals and not isinstance(linear, CompressedLinear):
                    self._originals[name] = (linear.weight.data, linear.bias.data if linear.bias is not None else None)
                set_submodule(block, local, module)
                for record in layer_records:
                    log_record(record)
                    if self.on_layer:
                        self.on_layer(record)
            records += layer_records
        return records

    @torch.no_grad()
    def compress_layer(
        self, name: str, linear: nn.Module, stats: dict[str, LayerStats], config: StageConfig, index: int, stage_index: int
    ) -> list[LayerRecord]:
        """Compress one layer in place (a mode may compress several at once: see grouped.py)."""
        start = time.perf_counter()
        base = None
        if isinstance(linear, CompressedLinear):  # a refining stage: start from the original weight
            base = linear
            weight, bias = self._originals[name]
        else:
            weight = linear.weight.data
            bias = linear.bias.data if linear.bias is not None else None
            if self._keep_originals:
                self._originals[name] = (weight, bias)
        layer_stats = stats.get(name) or LayerStats(name=name, block=index)
        if self._keep_grams and layer_stats.get("gram") is not None:
            self._grams[name] = layer_stats["gram"]
        with flush_denormals():
            compressed = self.compressors[stage_index].apply(weight, bias, layer_stats, config, base=base)
        seconds = time.perf_counter() - start
        return [self.place(name, weight, bias, compressed, layer_stats, config, index, stage_index, seconds)]

    def place(
        self,
        name: str,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        compressed: CompressedLinear,
        stats: LayerStats | None,
        config: StageConfig,
        index: int,
        stage_index: int,
        seconds: float,
    ) -> LayerRecord:
        """Put `compressed` in place of `name` and measure it (errors, sizes) for the report."""
        rel, weighted = relative_errors(weight, compressed.to_dense(), stats.get("gram") if stats else None)
        set_submodule(self.blocks[index], name[len(self.prefix(index)) + 1 :], compressed)
        spec = compressed.spec()
        record = LayerRecord(
            name=name,
            block=index,
            stage=stage_index,
            method=config.method,
            format=compressed.format,
            in_features=weight.shape[1],
            out_features=weight.shape[0],
            params_before=weight.numel() + (bias.numel() if bias is not None else 0),
            values_after=compressed.num_values(),
            bytes_before=compressed.dense_num_bytes(),
            bytes_after=compressed.num_bytes(),
            rel_error=rel,
            rel_weighted_error=weighted,
            seconds=seconds,
            tokens=stats.num_tokens if stats is not None and stats.tensors else None,
            detail={k: v for k, v in spec.items() if k not in ("format", "in_features", "out_features", "bias")},
        )
        log_record(record)
        if self.on_layer:
            self.on_layer(record)
        return record


def log_record(record: LayerRecord) -> None:
    """One line per compressed layer: sizes, errors, seconds."""
    weighted = record.rel_weighted_error
    logger.info(
        "%-40s %-10s params %9d -> %9d  bytes %10d -> %10d  err %.4f  wtd %s  %.2fs",
        record.name, record.method, record.params_before, record.values_after, record.bytes_before, record.bytes_after,
        record.rel_error, f"{weighted:.4f}" if weighted is not None else "n/a", record.seconds,
    )  # fmt: skip


def statistics_groups(
    layers: dict[str, nn.Module], needs: set[str], max_bytes: float | None, shared: Callable[[str], str] = str
) -> list[dict[str, nn.Module]]:
    """`layers` in module order, cut into groups whose float64 statistics (a Gram: in², else a
    vector: in) stay under `max_bytes` each. Layers with the same `shared(name)` are known to
    read one input and count once per group; any other sharing is found only while collecting, so
    the estimate is an upper bound. One group when there is no limit, no statistic, or all fits."""
    if not needs or max_bytes is None or not layers:
        return [layers]

    def size(layer: nn.Module) -> float:
        return 8.0 * len(needs) * (layer.in_features**2 if "gram" in needs else layer.in_features)

    groups: list[dict[str, nn.Module]] = [{}]
    used, counted = 0.0, set()
    for name, layer in layers.items():
        extra = 0.0 if shared(name) in counted else size(layer)
        if groups[-1] and used + extra > max_bytes:
            groups.append({})
            used, counted, extra = 0.0, set(), size(layer)
        groups[-1][name] = layer
        counted.add(shared(name))
        used += extra
    return groups


def check_finite(hiddens: list[torch.Tensor], index: int) -> None:
    """Refuse to go on when a compressed block's outputs overflowed."""
    if not all(torch.isfinite(h).all() for h in hiddens):
        raise LlmpressError(
            f"block {index} produces non-finite (NaN/Inf) outputs after compression; the model overflows in "
            "this dtype or the compression is too aggressive: try --dtype float32 or a milder ratio"
        )

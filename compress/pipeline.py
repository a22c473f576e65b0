"""Sequential block-wise compression: only one decoder block (and its activations) on the device.

1. Embed the calibration windows once and catch the first block's inputs with every keyword
   argument the model passes it (attention mask, position ids/embeddings, cache off).
2. For each block: move it to the execution device; per recipe stage, run all calibration
   batches with hooks on the stage's Linears (calibrating), compress them; then run the batches
   again through the compressed block to produce the next block's inputs (propagating); move it back.

Errors are measured for every layer in the same way: plain relative Frobenius ‖W−Ŵ‖/‖W‖ and
calibration-weighted ‖(W−Ŵ)Xᵀ‖/‖WXᵀ‖ = sqrt(tr(ΔW G ΔWᵀ)/tr(W G Wᵀ)) with G = XᵀX.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import psutil
import torch
from torch import nn
from tqdm.auto import tqdm

from .blocks import find_decoder_blocks
from .collectors import LinearInputHooks
from .compressors import COMPRESSORS, LayerStats, StageConfig
from .compressors.base import flush_denormals
from .errors import LlmpressError
from .modules import CompressedLinear
from .targets import is_target, match_linears, set_submodule

logger = logging.getLogger("compress")


@dataclass
class LayerRecord:
    """What happened to one Linear: sizes before/after, errors, time."""

    name: str
    block: int
    stage: int
    method: str
    format: str
    in_features: int
    out_features: int
    params_before: int
    values_after: int
    bytes_before: int
    bytes_after: int
    rel_error: float
    rel_weighted_error: float | None
    seconds: float
    detail: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _StopForward(Exception):
    """Raised by the capture hook once the first block's inputs are caught."""


def _to(obj: Any, device: torch.device | str) -> Any:
    """Move tensors inside nested tuples/lists/dicts (block kwargs) to `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _move_outside_blocks(model: nn.Module, blocks: nn.ModuleList, device) -> None:
    """Move every parameter/buffer that is not inside the decoder blocks (embeddings, rotary, norm)."""
    inside = {id(m) for m in blocks.modules()}
    for module in model.modules():
        if id(module) in inside:
            continue
        for param in module.parameters(recurse=False):
            param.data = param.data.to(device)
        for key, buf in module._buffers.items():
            if buf is not None:
                module._buffers[key] = buf.to(device)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return psutil.Process().memory_info().rss / 2**20


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor, batch_size: int, device, offload_device
) -> tuple[list[torch.Tensor], list[dict]]:
    """The first block's hidden states and keyword arguments for each calibration batch."""
    hiddens, kwargs_list = [], []

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        hiddens.append(hidden.detach().to(offload_device))
        kwargs_list.append(_to(kwargs, offload_device))
        raise _StopForward

    _move_outside_blocks(model, blocks, device)
    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in input_ids.split(batch_size):
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
        _move_outside_blocks(model, blocks, offload_device)
    return hiddens, kwargs_list


def run_block(block: nn.Module, hiddens, kwargs_list, device, offload_device, keep: bool) -> list[torch.Tensor] | None:
    """Run every batch through `block`; return the outputs (on offload_device) if `keep`."""
    outputs = [] if keep else None
    for hidden, kwargs in zip(hiddens, kwargs_list):
        out = block(hidden.to(device), **_to(kwargs, device))
        out = out[0] if isinstance(out, (tuple, list)) else out
        if keep:
            outputs.append(out.detach().to(offload_device))
    return outputs


def relative_errors(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor | None) -> tuple[float, float | None]:
    """(‖ΔW‖/‖W‖, ‖ΔW Xᵀ‖/‖W Xᵀ‖) computed in float64."""
    w = weight.double()
    delta = w - approx.double()
    rel = float(delta.norm() / w.norm().clamp_min(1e-30))
    if gram is None:
        return rel, None
    num = ((delta @ gram) * delta).sum()
    den = ((w @ gram) * w).sum().clamp_min(1e-30)
    return rel, float((num / den).clamp_min(0).sqrt())


# statistics from a backward pass (compress/fisher.py), not input hooks: Fisher sums are collected
# before the block loop; per-sequence gradients ("grads", M-FAC) are too big to keep for a whole
# model, so those stages compress each block during the backward walk itself (see `_gradient_stage`)
GRADIENT_STATS = {"fisher", "grads"}


class SequentialPipeline:
    """Compress a model's decoder-block Linears stage by stage, one block on the device at a time.

    `statistics="sequential"` (default) calibrates each block on the outputs of the already
    compressed blocks before it, so later layers correct for earlier errors. `"dense"` takes every
    statistic from the uncompressed model (one forward per block, no propagation pass): cheaper,
    and what allocation profiling and repeated experiments reuse. `layer_configs` overrides a
    stage's config per layer ({stage index: {layer name: config, or None to leave it dense}}):
    this is how the knapsack allocator's per-layer levels are applied.
    """

    def __init__(
        self,
        model: nn.Module,
        stages: list[StageConfig],
        device: str | torch.device = "cpu",
        offload_device: str | torch.device = "cpu",
        batch_size: int = 1,
        progress: bool = True,
        on_layer: Callable[[LayerRecord], None] | None = None,
        statistics: str = "sequential",
        layer_configs: dict[int, dict[str, StageConfig | None]] | None = None,
    ):
        if statistics not in ("sequential", "dense"):
            raise LlmpressError(f"statistics must be 'sequential' or 'dense', got {statistics!r}")
        self.model = model
        self.stages = stages
        self.device = torch.device(device)
        self.offload_device = torch.device(offload_device)
        self.batch_size = batch_size
        self.progress = progress
        self.on_layer = on_layer
        self.statistics = statistics
        self.layer_configs = layer_configs or {}
        self.blocks_path, self.blocks = find_decoder_blocks(model)
        self.compressors = [COMPRESSORS[stage.method]() for stage in stages]
        self.block_log: list[dict[str, Any]] = []
        # original (weight, bias) of the current block's layers, kept only for refining stages (EoRA)
        self._keep_originals = any(c.wraps_compressed for c in self.compressors)
        self._originals: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        # stages whose targets get Fisher sums even though their method needs none (the knapsack's
        # `fisher` cost weighs their profiles with it)
        self.fisher_stages: set[int] = set()
        self._check_targets()

    def _check_targets(self) -> None:
        all_linears = match_linears(self.model, ["Linear"], [])
        for index, stage in enumerate(self.stages):
            matched = match_linears(self.model, stage.targets, stage.ignore)
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

    def _block_layers(self, block: nn.Module, index: int, stage: StageConfig, compressor) -> dict[str, nn.Module]:
        """This block's layers for a stage: plain Linears, or compressed ones for refining stages."""
        kind = CompressedLinear if compressor.wraps_compressed else nn.Linear
        return match_linears(block, stage.targets, stage.ignore, prefix=f"{self.blocks_path}.{index}", kind=kind)

    def _stage_needs(self, stage_indices) -> tuple[set[str], set[str]]:
        """(input-hook collectors, gradient statistics) the given stages need; the Gram always."""
        needs = set().union(*(self.compressors[i].needs for i in stage_indices)) | {"gram"}
        return needs - GRADIENT_STATS, needs & GRADIENT_STATS

    def _fisher(self, input_ids: torch.Tensor, stage_indices) -> dict[str, dict[str, torch.Tensor]]:
        """Fisher sums for the plain-Linear targets of the stages that need them (one backward pass)."""
        wanted = [i for i in stage_indices if "fisher" in self.compressors[i].needs or i in self.fisher_stages]
        if not wanted:
            return {}
        from .fisher import collect_fisher  # model plumbing only FWSVD-like methods need

        linears: dict[str, nn.Module] = {}
        for i in wanted:
            linears.update(match_linears(self.model, self.stages[i].targets, self.stages[i].ignore))
        return collect_fisher(
            self.model, self.blocks, linears, input_ids, self.device, self.offload_device, progress=self.progress
        )

    def _require_data(self, input_ids, stage_indices) -> None:
        needy = [self.stages[i].method for i in stage_indices if self.compressors[i].needs]
        if input_ids is None and needy:
            raise LlmpressError(f"methods {needy} need calibration data; set calibration.num_samples >= 1")

    def collect_stats(
        self,
        input_ids: torch.Tensor,
        on_block: Callable[[int, dict[str, LayerStats]], None],
        stage_indices: list[int] | None = None,
    ) -> None:
        """Statistics of the *dense* model for the given stages' targets, handed over block by block.

        Nothing is compressed. Used to profile layers for allocation and to reuse one calibration
        pass across many experiments (pass the collected dict to `run(stats=...)`).
        """
        stage_indices = list(range(len(self.stages))) if stage_indices is None else stage_indices
        self._require_data(input_ids, stage_indices)
        fisher = self._fisher(input_ids, stage_indices)
        hiddens, kwargs_list = capture_block_inputs(
            self.model, self.blocks, input_ids, self.batch_size, self.device, self.offload_device
        )
        needs, _ = self._stage_needs(stage_indices)
        bar = tqdm(range(len(self.blocks)), desc="Collecting statistics", disable=not self.progress, unit="block")
        for index in bar:
            block = self.blocks[index].to(self.device)
            layers = self.dense_targets(block, index, stage_indices)
            stats, hiddens = self._collect(block, layers, needs, hiddens, kwargs_list, index, keep=True)
            block.to(self.offload_device)
            _merge(stats, fisher)
            on_block(index, stats)

    def dense_targets(self, block, index, stage_indices) -> dict[str, nn.Module]:
        """Plain Linears any of the stages targets in this block (refining stages: the same names)."""
        layers: dict[str, nn.Module] = {}
        for i in stage_indices:
            stage = self.stages[i]
            prefix = f"{self.blocks_path}.{index}"
            layers.update(match_linears(block, stage.targets, stage.ignore, prefix=prefix, kind=nn.Linear))
        return layers

    def run(self, input_ids: torch.Tensor | None, stats: dict[str, LayerStats] | None = None) -> list[LayerRecord]:
        """Compress every block; `input_ids` (samples, seq_len) or None for data-free stages only.

        `stats`: statistics already collected from the dense model (`collect_stats`); then no
        calibration forward runs at all.
        """
        all_stages = list(range(len(self.stages)))
        hiddens = kwargs_list = None
        fisher: dict[str, dict[str, torch.Tensor]] = {}
        grouped = [i for i, (st, c) in enumerate(zip(self.stages, self.compressors)) if c.group_size(st) > 1]
        if grouped and stats is None:
            stats = self._all_dense_stats(input_ids, grouped)
        if stats is None:
            self._require_data(input_ids, all_stages)
            if input_ids is not None:
                fisher = self._fisher(input_ids, all_stages)
                hiddens, kwargs_list = capture_block_inputs(
                    self.model, self.blocks, input_ids, self.batch_size, self.device, self.offload_device
                )
        records: list[LayerRecord] = []
        gradient_stages = [i for i, c in enumerate(self.compressors) if "grads" in c.needs]
        for stage_index in gradient_stages:
            if stats is not None or input_ids is None:
                raise LlmpressError(f"method {self.stages[stage_index].method!r} needs gradients: pass calibration data")
            records += self._gradient_stage(stage_index, input_ids)
        bar = tqdm(range(len(self.blocks)), desc="Compressing blocks", disable=not self.progress, unit="block")
        for index in bar:
            block = self.blocks[index]
            start = time.perf_counter()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            block.to(self.device)
            block_stats = None
            if stats is not None:
                block_stats = stats
            elif self.statistics == "dense" and hiddens is not None:
                needs, _ = self._stage_needs(all_stages)
                layers = self.dense_targets(block, index, all_stages)
                block_stats, hiddens = self._collect(block, layers, needs, hiddens, kwargs_list, index, keep=True)
                _merge(block_stats, fisher)
            for stage_index, (stage, compressor) in enumerate(zip(self.stages, self.compressors)):
                if stage_index in gradient_stages:
                    continue
                layers = self._block_layers(block, index, stage, compressor)
                if not layers:
                    continue
                if block_stats is not None:
                    stage_stats = block_stats
                elif hiddens is not None:
                    needs, _ = self._stage_needs([stage_index])
                    stage_stats, _ = self._collect(block, layers, needs, hiddens, kwargs_list, index, keep=False)
                    _merge(stage_stats, fisher)
                else:
                    stage_stats = {}
                for name, linear in layers.items():
                    config = self.layer_configs.get(stage_index, {}).get(name, stage)
                    if config is None:  # the allocator left this layer dense
                        continue
                    if compressor.needs and name not in stage_stats:
                        raise LlmpressError(f"no calibration statistics for {name}; collect them for every target")
                    if stage_index in grouped:
                        records += self._compress_group(name, linear, stage_stats, config, compressor, index, stage_index)
                        continue
                    layer_stats = stage_stats.get(name)
                    record = self._compress_layer(name, linear, layer_stats, config, compressor, index, stage_index)
                    records.append(record)
            if hiddens is not None and self.statistics == "sequential":
                with torch.no_grad():
                    hiddens = run_block(block, hiddens, kwargs_list, self.device, self.offload_device, keep=True)
                if not all(torch.isfinite(h).all() for h in hiddens):
                    raise LlmpressError(
                        f"block {index} produces non-finite (NaN/Inf) outputs after compression; the model "
                        "overflows in this dtype or the compression is too aggressive: try --dtype float32 "
                        "or a milder ratio"
                    )
            block.to(self.offload_device)
            prefix = f"{self.blocks_path}.{index}."
            for name in [n for n in self._originals if n.startswith(prefix)]:
                del self._originals[name]  # this block's refining stages are done
            seconds = time.perf_counter() - start
            memory = peak_memory_mb(self.device)
            self.block_log.append({"block": index, "seconds": round(seconds, 3), "peak_memory_mb": round(memory, 1)})
            bar.set_postfix(sec=f"{seconds:.1f}", mem_mb=f"{memory:.0f}")
        return records

    def _all_dense_stats(self, input_ids, grouped: list[int]) -> dict[str, LayerStats]:
        """Every block's statistics up front: a group's layers in later blocks are compressed
        together with its first layer, so they must be calibrated before it."""
        names = [self.stages[i].method for i in grouped]
        if self.statistics != "dense":
            raise LlmpressError(
                f"stages {names} share dictionaries across blocks (group_size > 1), which needs statistics "
                "of later blocks before earlier ones are compressed: set calibration.statistics: dense, or group_size: 1"
            )
        if any(i in self.layer_configs for i in grouped):
            raise LlmpressError(f"stages {names} with group_size > 1 cannot take per-layer allocation levels")
        self._require_data(input_ids, list(range(len(self.stages))))
        stats: dict[str, LayerStats] = {}
        self.collect_stats(input_ids, lambda index, block_stats: stats.update(block_stats))
        return stats

    def _group_members(self, name: str, linear: nn.Module, stage: StageConfig, size: int, index: int):
        """`name` and the same-named, same-shape plain target Linears of the next size-1 blocks."""
        local = name[len(f"{self.blocks_path}.{index}.") :]
        members = [(name, linear, index)]
        for j in range(index + 1, min(index + size, len(self.blocks))):
            full = f"{self.blocks_path}.{j}.{local}"
            try:
                other = self.blocks[j].get_submodule(local)
            except AttributeError:
                break
            same = isinstance(other, nn.Linear) and other.weight.shape == linear.weight.shape
            if not same or not is_target(full, other, stage.targets, stage.ignore):
                break
            members.append((full, other, j))
        return members

    @torch.no_grad()
    def _compress_group(self, name, linear, stats, stage, compressor, index, stage_index) -> list[LayerRecord]:
        """Compress `name` together with its group (one shared dictionary); one record per layer."""
        start = time.perf_counter()
        members = self._group_members(name, linear, stage, compressor.group_size(stage), index)
        missing = [n for n, _, _ in members if n not in stats]
        if missing:
            raise LlmpressError(f"no calibration statistics for {missing}; collect them for every target")
        weights = [m.weight.data.to(self.device) for _, m, _ in members]
        biases = [m.bias.data.to(self.device) if m.bias is not None else None for _, m, _ in members]
        with flush_denormals():
            modules = compressor.compress_group(weights, biases, [stats[n] for n, _, _ in members], stage, [n for n, _, _ in members])
        seconds = (time.perf_counter() - start) / len(members)
        records = []
        for (full, member, j), module, weight, bias in zip(members, modules, weights, biases):
            if self._keep_originals:
                self._originals[full] = (weight, bias)
            if j != index:
                module.to(self.offload_device)  # that block is not on the device now
            records.append(self._record(full, weight, bias, module, stats[full], stage, j, stage_index, seconds))
        return records

    def _gradient_stage(self, stage_index: int, input_ids: torch.Tensor) -> list[LayerRecord]:
        """Compress a stage that needs per-sequence gradients (M-FAC) during one backward walk."""
        return compress_from_gradients([(self, stage_index)], input_ids)[0]

    @torch.no_grad()
    def _collect(self, block, layers, needs, hiddens, kwargs_list, index, keep: bool):
        """Run the batches through `block` with collectors on `layers`: (stats by name, outputs if keep)."""
        with LinearInputHooks(layers, needs) as hooks:
            outputs = run_block(block, hiddens, kwargs_list, self.device, self.offload_device, keep=keep)
        stats = {}
        for name, collectors in hooks.collectors.items():
            any_collector = next(iter(collectors.values()))
            if any_collector.num_tokens == 0:
                raise LlmpressError(f"{name} received no calibration tokens (block {index} never calls it)")
            stats[name] = LayerStats({k: c.result() for k, c in collectors.items()}, any_collector.num_tokens)
        return stats, outputs

    @torch.no_grad()
    def _compress_layer(self, name, linear, stats, stage, compressor, index, stage_index) -> LayerRecord:
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
        with flush_denormals():
            compressed: CompressedLinear = compressor.compress(weight, bias, stats or LayerStats(), stage, base=base)
        return self._record(name, weight, bias, compressed, stats, stage, index, stage_index, time.perf_counter() - start)

    def _record(self, name, weight, bias, compressed, stats, stage, index, stage_index, seconds) -> LayerRecord:
        """Put `compressed` in place of `name` and measure it (errors, sizes) for the report."""
        rel, weighted = relative_errors(weight, compressed.to_dense(), stats.get("gram") if stats else None)
        local_name = name[len(f"{self.blocks_path}.{index}.") :]
        set_submodule(self.blocks[index], local_name, compressed)
        spec = compressed.spec()
        detail = {k: v for k, v in spec.items() if k not in ("format", "in_features", "out_features", "bias")}
        record = LayerRecord(
            name=name,
            block=index,
            stage=stage_index,
            method=stage.method,
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
            detail=detail,
        )
        logger.info(
            "%-40s %-10s params %9d -> %9d  bytes %10d -> %10d  err %.4f  wtd %s  %.2fs",
            name,
            stage.method,
            record.params_before,
            record.values_after,
            record.bytes_before,
            record.bytes_after,
            rel,
            f"{weighted:.4f}" if weighted is not None else "n/a",
            record.seconds,
        )
        if self.on_layer:
            self.on_layer(record)
        return record


def _merge(stats: dict[str, LayerStats], fisher: dict[str, dict[str, torch.Tensor]]) -> None:
    """Add gradient statistics (Fisher sums) to the input statistics of the same layers."""
    for name, tensors in fisher.items():
        if name in stats:
            stats[name].tensors.update(tensors)


def compress_from_gradients(jobs: list[tuple[SequentialPipeline, int]], input_ids: torch.Tensor) -> list[list[LayerRecord]]:
    """Compress gradient stages (M-FAC) during one backward walk of the first job's model.

    All sequences form one chunk, so when the walk finishes a block every gradient of its layers
    is known: each job compresses its own model's copy of those layers right there and the
    gradients are dropped, which keeps only one block's gradient windows in memory. Gradients are
    those of the dense model (the walk's input gradients are computed before the block is
    replaced), so such stages run before the forward stages. Several jobs (pipelines over
    identical copies of one model, e.g. a benchmark's sparsity levels) share the walk: its cost
    is paid once.
    """
    from .fisher import backward_walk

    walker = jobs[0][0]
    targets: list[dict[str, nn.Linear]] = []
    for pipeline, stage_index in jobs:
        stage, compressor = pipeline.stages[stage_index], pipeline.compressors[stage_index]
        if compressor.wraps_compressed:
            raise LlmpressError(f"method {stage.method!r} cannot refine another stage's result")
        targets.append(match_linears(pipeline.model, stage.targets, stage.ignore))
        if list(targets[-1]) != list(targets[0]):
            raise LlmpressError("pipelines sharing a gradient walk must target the same layers of identical models")
    grads: dict[str, list[torch.Tensor]] = {}
    records: list[list[LayerRecord]] = [[] for _ in jobs]
    tokens = int(input_ids.numel())

    def keep(name: str, grad: torch.Tensor) -> None:
        grads.setdefault(name, []).append(grad.reshape(-1).to(walker.offload_device, torch.float32))

    def compress_block(index: int) -> None:
        prefix = f"{walker.blocks_path}.{index}."
        for name in [n for n in targets[0] if n.startswith(prefix)]:
            window = LayerStats({"grads": torch.stack(grads.pop(name))}, tokens)
            for (pipeline, stage_index), linears, job_records in zip(jobs, targets, records):
                stage = pipeline.stages[stage_index]
                config = pipeline.layer_configs.get(stage_index, {}).get(name, stage)
                if config is not None:
                    with torch.no_grad():
                        compressor = pipeline.compressors[stage_index]
                        job_records.append(pipeline._compress_layer(name, linears[name], window, config, compressor, index, stage_index))

    backward_walk(
        walker.model, walker.blocks, targets[0], input_ids, walker.device, walker.offload_device, keep, compress_block,
        chunk_size=len(input_ids), progress=walker.progress, desc=f"{walker.stages[jobs[0][1]].method} (gradients)",
    )  # fmt: skip
    return records

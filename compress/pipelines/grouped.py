"""Grouped dictionaries: one dictionary shared by the same layer of g consecutive blocks (CoSpaDi
`group_size: g`).

A group's layers in later blocks are compressed together with its first layer, so every block's
statistics are needed before the first one is compressed: dense statistics, collected up front.
Later members are replaced by compressed modules when their group is compressed, so a later block
finds them done.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from ..compressors import LayerStats, StageConfig
from ..compressors.base import flush_denormals
from ..errors import LlmpressError
from ..metrics import LayerRecord
from ..targets import is_target
from .base import FisherSums
from .dense import BlockStats, DenseStatsPipeline


class GroupedPipeline(DenseStatsPipeline):
    weight_parallel = False  # a shared dictionary spans blocks: every rank compresses every group

    def grouped_stages(self) -> list[int]:
        return [i for i, (stage, c) in enumerate(zip(self.stages, self.compressors)) if c.group_size(stage) > 1]

    def run(
        self,
        input_ids: torch.Tensor | None,
        fisher: FisherSums | None = None,
        stage_indices: list[int] | None = None,
        stats: BlockStats | None = None,
    ) -> list[LayerRecord]:
        """Every block's dense statistics first (a group spans blocks), then compress from them."""
        stage_indices = self.forward_stages() if stage_indices is None else stage_indices
        grouped = [i for i in self.grouped_stages() if i in stage_indices]
        if any(i in self.layer_configs for i in grouped):
            names = [self.stages[i].method for i in grouped]
            raise LlmpressError(f"stages {names} with group_size > 1 cannot take per-layer allocation levels")
        if stats is None:
            stats = self.all_stats(input_ids, stage_indices, fisher)
        return super().run(None, fisher, stage_indices, stats=stats)

    def compress_layer(
        self, name: str, linear: nn.Module, stats: dict[str, LayerStats], config: StageConfig, index: int, stage_index: int
    ) -> list[LayerRecord]:
        if self.compressors[stage_index].group_size(config) == 1:
            return super().compress_layer(name, linear, stats, config, index, stage_index)
        return self.compress_group(name, linear, stats, config, index, stage_index)

    def members(self, name: str, linear: nn.Module, stage: StageConfig, size: int, index: int):
        """`name` and the same-named, same-shape plain target Linears of the next size-1 blocks."""
        local = name[len(self.prefix(index)) + 1 :]
        members = [(name, linear, index)]
        for j in range(index + 1, min(index + size, len(self.blocks))):
            full = f"{self.prefix(j)}.{local}"
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
    def compress_group(self, name, linear, stats, stage, index, stage_index) -> list[LayerRecord]:
        """Compress `name` together with its group (one shared dictionary); one record per layer."""
        start = time.perf_counter()
        compressor = self.compressors[stage_index]
        members = self.members(name, linear, stage, compressor.group_size(stage), index)
        missing = [n for n, _, _ in members if n not in stats]
        if missing:
            raise LlmpressError(f"no calibration statistics for {missing}; collect them for every target")
        weights = [m.weight.data.to(self.device) for _, m, _ in members]
        biases = [m.bias.data.to(self.device) if m.bias is not None else None for _, m, _ in members]
        names = [n for n, _, _ in members]
        with flush_denormals():
            modules = compressor.compress_group(weights, biases, [stats[n] for n in names], stage, names)
            modules = [compressor.stack(w, m, stats[n], stage) for w, m, n in zip(weights, modules, names)]
        seconds = (time.perf_counter() - start) / len(members)
        records = []
        for (full, _, j), module, weight, bias in zip(members, modules, weights, biases):
            if self._keep_originals:
                self._originals[full] = (weight, bias)
            if j != index:
                module.to(self.offload_device)  # that block is not on the device now
            records.append(self.place(full, weight, bias, module, stats[full], stage, j, stage_index, seconds))
        return records

"""Dense statistics: every statistic comes from the uncompressed model.

One forward per block collects the statistics of every target and the block's (dense) outputs at
once, with no propagation pass: cheaper than sequential, without error correction across blocks.
The same collection serves allocation profiling and experiments that reuse one calibration pass
for many compressed models (`collect`, then `run(stats=...)`).
"""

from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from ..blocks import capture_block_inputs
from ..compressors import LayerStats
from ..errors import LlmpressError
from ..metrics import LayerRecord
from .base import BlockPipeline, FisherSums

BlockStats = dict[str, LayerStats]


class DenseStatsPipeline(BlockPipeline):
    def collect(
        self,
        input_ids: torch.Tensor,
        on_block: Callable[[int, BlockStats], None],
        stage_indices: list[int] | None = None,
        fisher: FisherSums | None = None,
    ) -> None:
        """Statistics of the dense model for the stages' targets, handed over block by block.

        Nothing is compressed. `fisher`: sums already collected, else collected here if needed.
        """
        stage_indices = self.forward_stages() if stage_indices is None else stage_indices
        for _ in self.collect_blocks(input_ids, stage_indices, fisher, on_block):
            pass

    def collect_blocks(self, input_ids, stage_indices, fisher, on_block=None):
        """Yield each block index with the block on the device, after its statistics were collected."""
        if input_ids is None:
            raise LlmpressError("dense statistics need calibration data; set calibration.num_samples >= 1")
        fisher = self.collect_fisher(input_ids, stage_indices) if fisher is None else fisher
        inputs = capture_block_inputs(self.model, self.blocks, self.parallel.share(input_ids), self.batch_size, self.device, self.offload_device)
        needs = self.input_needs(stage_indices)
        bar = tqdm(range(len(self.blocks)), desc="Collecting statistics", disable=not self.progress, unit="block")
        for index in bar:
            with self.on_device(index) as block:
                layers = self.dense_targets(block, index, stage_indices)
                stats, inputs.hiddens = self.collect_block(
                    block, index, layers, needs, inputs.hiddens, inputs.kwargs[index], fisher, keep=True
                )
                if on_block is not None:
                    on_block(index, stats)
                yield index, block, stats

    def all_stats(self, input_ids: torch.Tensor, stage_indices: list[int], fisher: FisherSums | None) -> BlockStats:
        stats: BlockStats = {}
        self.collect(input_ids, lambda index, block_stats: stats.update(block_stats), stage_indices, fisher)
        return stats

    def run(
        self,
        input_ids: torch.Tensor | None,
        fisher: FisherSums | None = None,
        stage_indices: list[int] | None = None,
        stats: BlockStats | None = None,
    ) -> list[LayerRecord]:
        """Compress the given stages from dense statistics: `stats` if given (then no calibration
        forward runs at all), else collected block by block just before the block is compressed."""
        stage_indices = self.forward_stages() if stage_indices is None else stage_indices
        records: list[LayerRecord] = []
        if stats is not None or input_ids is None:
            if input_ids is None and stats is None and self.needs_data(stage_indices):
                raise LlmpressError("these methods need calibration data; set calibration.num_samples >= 1")
            for index in tqdm(range(len(self.blocks)), desc="Compressing blocks", disable=not self.progress, unit="block"):
                with self.on_device(index) as block:
                    records += self.compress_block(block, index, stage_indices, lambda i, layers: stats or {})
            return records
        for index, block, block_stats in self.collect_blocks(input_ids, stage_indices, fisher):
            records += self.compress_block(block, index, stage_indices, lambda i, layers: block_stats)
        return records

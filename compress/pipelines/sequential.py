"""Sequential statistics: each block is calibrated on the outputs of the already-compressed blocks
before it, so later layers correct for earlier errors (GPTQ/SparseGPT-style).

Per block: per stage, run the batches with hooks on the stage's layers and compress them (a
refining stage such as EoRA therefore sees the inputs as compressed by the stages before it);
then run the batches through the compressed block to produce the next block's inputs.

Block tuning (GQSA's `optimize: [bqpo]`, compress/quant_tuning.py) also carries the dense
model's outputs block after block (the dense stream): each block's are its tuning targets.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..blocks import capture_block_inputs, run_block
from ..errors import LlmpressError
from ..kernels import expanded_weights_cached
from ..metrics import LayerRecord, relative_errors
from ..quant_tuning import take_tuning_sources, tune_block, tuning_settings
from .base import BlockPipeline, FisherSums, check_finite, logger


class SequentialPipeline(BlockPipeline):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.block_tuning = tuning_settings(self.stages, "bqpo")
        if self.block_tuning is not None:  # tuned layers' errors are measured again afterwards
            self._keep_originals = self._keep_grams = True
        self.dense_hiddens: list[torch.Tensor] | None = None  # the dense stream (block tuning only)
        self._tuned: dict | None = None  # the current block's tuning result, for its block log entry

    def run(
        self, input_ids: torch.Tensor | None, fisher: FisherSums | None = None, stage_indices: list[int] | None = None
    ) -> list[LayerRecord]:
        """Compress the given stages (default: all). `fisher`: sums already collected, else collected here."""
        stage_indices = self.forward_stages() if stage_indices is None else stage_indices
        if input_ids is None and self.needs_data(stage_indices):
            needy = [self.stages[i].method for i in stage_indices if self.compressors[i].needs]
            raise LlmpressError(f"methods {needy} need calibration data; set calibration.num_samples >= 1")
        inputs = None
        if input_ids is not None:
            fisher = self.collect_fisher(input_ids, stage_indices) if fisher is None else fisher
            inputs = capture_block_inputs(self.model, self.blocks, self.parallel.share(input_ids), self.batch_size, self.device, self.offload_device)
        records: list[LayerRecord] = []
        start = 0
        if self.run_progress is not None:  # a resumed run: the finished blocks come back as they were
            dtype = next(self.model.parameters()).dtype
            start, hiddens, records, self.block_log = self.run_progress.restore(self.blocks, dtype)
            if start and inputs is not None:
                inputs.hiddens = hiddens
                self.dense_hiddens = self.run_progress.restore_dense_hiddens()
        bar = tqdm(range(start, len(self.blocks)), desc="Compressing blocks", disable=not self.progress, unit="block")
        for index in bar:
            with self.on_device(index) as block:
                if inputs is None:  # data-free stages: nothing to calibrate or propagate
                    records += self.compress_block(block, index, stage_indices, lambda stage_index, layers: {})
                else:
                    records += self._compress_calibrated(block, index, stage_indices, inputs, fisher or {})
            if self._tuned is not None:
                self.block_log[-1]["bqpo"], self._tuned = self._tuned, None
            if self.run_progress is not None:
                self.run_progress.save_block(
                    index, self.blocks[index], inputs.hiddens if inputs else None, records, self.block_log, self.dense_hiddens
                )
            bar.set_postfix(sec=f"{self.block_log[-1]['seconds']:.1f}", mem_mb=f"{self.block_log[-1]['peak_memory_mb']:.0f}")
        return records

    def _compress_calibrated(self, block, index: int, stage_indices: list[int], inputs, fisher: FisherSums) -> list[LayerRecord]:
        """Each stage calibrated on this block's inputs as compressed so far, then the block's
        outputs (the next block's inputs) from the compressed block."""
        kwargs = inputs.kwargs[index]

        def stats_for(stage_index, layers):
            needs = self.input_needs([stage_index])
            stats, _ = self.collect_block(block, index, layers, needs, inputs.hiddens, kwargs, fisher, keep=False)
            return stats

        targets = None
        if self.block_tuning is not None:  # the dense block's outputs on the dense stream
            with torch.no_grad():
                targets = run_block(block, self.dense_hiddens or inputs.hiddens, kwargs, self.device, self.offload_device, keep=True)
        records = self.compress_block(block, index, stage_indices, stats_for)
        if targets is not None:
            self.train_block(block, index, inputs.hiddens, kwargs, targets, records)
            self.dense_hiddens = targets
        with torch.no_grad(), expanded_weights_cached():  # each compressed layer expanded once, not per batch
            inputs.hiddens = run_block(block, inputs.hiddens, kwargs, self.device, self.offload_device, keep=True)
        check_finite(inputs.hiddens, index)
        return records

    def train_block(self, block, index: int, hiddens, kwargs, targets, records: list[LayerRecord]) -> None:
        """BQPO on this block's GQSA layers; their records get the errors of the tuned layers and
        the block log the block's output error before and after."""
        modules, continuous = take_tuning_sources(block)
        if not modules:
            return
        result = tune_block(block, modules, continuous, hiddens, kwargs, targets, self.block_tuning, self.device, self.parallel)
        logger.info(
            "block %d: BQPO of %d layers, output error %.5f -> %.5f (%s, %d steps, %.1fs)", index, len(modules),
            result["loss_before"], result["trained_loss"], "kept" if result["kept"] else "reverted", result["steps"], result["seconds"],
        )  # fmt: skip
        self._tuned = {k: result[k] for k in ("loss_before", "loss_after", "trained_loss", "kept", "steps", "seconds")}
        prefix = self.prefix(index) + "."
        tuned = {prefix + name: module for name, module in modules.items()}
        for record in records:
            if record.name in tuned and record.name in self._originals:
                weight, _ = self._originals[record.name]
                record.rel_error, record.rel_weighted_error = relative_errors(weight, tuned[record.name].to_dense(), self._grams.get(record.name))
                record.detail["bqpo"] = result["kept"]

"""Gradient walk: stages that need per-sequence gradients (M-FAC) are compressed during one exact
backward walk of the dense model, a block at a time (compress/fisher.py `backward_walk`).

All sequences form one chunk, so when the walk finishes a block every gradient of its layers is
known: each job compresses its own model's copy of those layers right there and the gradients
are dropped, which keeps only one block's gradient windows in memory. The gradients are those of
the dense model (a block's input gradient is computed before the block is replaced), so such
stages run before the forward stages. Several jobs (pipelines over identical copies of one
model, e.g. a benchmark's sparsity levels) share the walk: its cost is paid once.

When every job's method asks for per-block sums of gradient outer products instead of the
gradients (M-FAC with m ≥ its block size, `Compressor.gradient_block_sums`), each sequence's
gradient is folded into Σ g gᵀ per block of B weights as it arrives (d·B values per layer,
however many sequences), in batches of SUM_BATCH sequences.
"""

from __future__ import annotations

import torch
from torch import nn

from ..compressors import LayerStats
from ..compressors.mfac import outer_product_sums
from ..errors import LlmpressError
from ..metrics import LayerRecord
from ..targets import match_linears, set_submodule
from .base import BlockPipeline

SUM_BATCH = 32  # sequences folded into the block sums at once (one batched GEMM)


def gradient_stages(pipeline: BlockPipeline) -> list[int]:
    return [i for i, c in enumerate(pipeline.compressors) if "grads" in c.needs]


def compress_from_gradients(jobs: list[tuple[BlockPipeline, int]], input_ids: torch.Tensor) -> list[list[LayerRecord]]:
    """Compress stage `stage_index` of each (pipeline, stage_index) job during one backward walk of
    the first job's model; returns each job's records."""
    from ..fisher import backward_walk

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
    sums: dict[str, torch.Tensor] = {}
    records: list[list[LayerRecord]] = [[] for _ in jobs]
    tokens = int(input_ids.numel())
    parallel = walker.parallel
    sum_block = _shared_block_sums(jobs, len(input_ids))

    def fold(name: str) -> None:
        g = torch.stack(grads.pop(name))  # (n, d)
        if name not in sums:
            sums[name] = torch.zeros(g.shape[1] // sum_block, sum_block, sum_block, dtype=torch.float32, device=g.device)
        outer_product_sums(g, sum_block, into=sums[name])

    def keep(name: str, grad: torch.Tensor) -> None:
        grads.setdefault(name, []).append(grad.reshape(-1).to(walker.offload_device, torch.float32))
        if sum_block and len(grads[name]) == SUM_BATCH:
            fold(name)

    def window(name: str, index: int) -> LayerStats:
        if not sum_block:  # several ranks: each walked its own sequences; the window holds every rank's, in sample order
            return LayerStats({"grads": parallel.all_gather_rows(torch.stack(grads.pop(name)))}, tokens, name=name, block=index)
        if grads.get(name):
            fold(name)
        outer = sums.pop(name)
        parallel.all_reduce_([outer])
        count = torch.tensor(float(len(input_ids)))
        return LayerStats({"grad_outer": outer, "num_grads": count}, tokens, name=name, block=index)

    def compress_block(index: int) -> None:
        prefix = walker.prefix(index) + "."
        names = [n for n in targets[0] if n.startswith(prefix)]
        windows = {name: window(name, index) for name in names}
        for (pipeline, stage_index), linears, job_records in zip(jobs, targets, records):
            configured = {name: (linears[name], pipeline.config_for(stage_index, name)) for name in names}
            configured = {name: pair for name, pair in configured.items() if pair[1] is not None}
            job_records += pipeline.compress_layers(configured, windows, index, stage_index)

    mine = parallel.share(input_ids)  # this rank's sequences (all of them with one process)
    backward_walk(
        walker.model, walker.blocks, targets[0], mine, walker.device, walker.offload_device, keep,
        compress_block, chunk_size=len(mine), progress=walker.progress and parallel.is_main,
        desc=f"{walker.stages[jobs[0][1]].method} (gradients)",
    )  # fmt: skip
    return records


def densify(model: nn.Module, names: list[str]) -> None:
    """Put back nn.Linear layers holding the compressed modules' dense weights (zeros where pruned),
    so that the next gradient walk differentiates the partly pruned model (M-FAC `walks`)."""
    for name in names:
        set_submodule(model, name, model.get_submodule(name).to_linear())


def _shared_block_sums(jobs: list[tuple[BlockPipeline, int]], num_grads: int) -> int | None:
    """The block size B when every job's stage takes per-block gradient sums of that one size, else None."""
    sizes = set()
    for pipeline, stage_index in jobs:
        ask = getattr(pipeline.compressors[stage_index], "gradient_block_sums", None)
        sizes.add(ask(pipeline.stages[stage_index], num_grads) if ask else None)
    return sizes.pop() if len(sizes) == 1 else None

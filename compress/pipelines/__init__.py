"""Block-wise compression pipelines, one module per way of getting calibration statistics.

- base.py: what all modes share (targets, one block's statistics, compressing a layer in place)
- sequential.py: statistics from the already-compressed model, block after block (default)
- dense.py: statistics from the uncompressed model (profiling, reuse across experiments)
- grouped.py: dictionaries shared by consecutive blocks (needs every block's dense statistics)
- gradients.py: per-sequence gradient stages (M-FAC) during one backward walk

`build_pipeline` picks the mode a recipe's stages and `calibration.statistics` call for.
"""

from __future__ import annotations

from torch import nn

from ..compressors import COMPRESSORS, StageConfig
from ..errors import LlmpressError
from .base import GRADIENT_STATS, BlockPipeline, FisherSums, LayerConfigs
from .dense import DenseStatsPipeline
from .gradients import compress_from_gradients, gradient_stages
from .grouped import GroupedPipeline
from .sequential import SequentialPipeline

STATISTICS_MODES = ("sequential", "dense")


def build_pipeline(model: nn.Module, stages: list[StageConfig], statistics: str = "sequential", **options) -> BlockPipeline:
    """The pipeline for these stages: grouped if a stage shares storage across blocks, else by `statistics`."""
    if statistics not in STATISTICS_MODES:
        raise LlmpressError(f"statistics must be one of {STATISTICS_MODES}, got {statistics!r}")
    grouped = [s.method for s in stages if COMPRESSORS[s.method]().group_size(s) > 1]
    if grouped:
        if statistics != "dense":
            raise LlmpressError(
                f"stages {grouped} share dictionaries across blocks (group_size > 1), which needs statistics "
                "of later blocks before earlier ones are compressed: set calibration.statistics: dense, or group_size: 1"
            )
        return GroupedPipeline(model, stages, **options)
    tuned = [s.method for s in stages if "bqpo" in getattr(s, "optimize", ())]
    if tuned and statistics != "sequential":
        raise LlmpressError(
            f"stages {tuned} ask for block tuning (optimize: [bqpo]), which trains each block on the compressed "
            "model's own inputs: set calibration.statistics: sequential"
        )
    cls = SequentialPipeline if statistics == "sequential" else DenseStatsPipeline
    return cls(model, stages, **options)


__all__ = [
    "GRADIENT_STATS",
    "STATISTICS_MODES",
    "BlockPipeline",
    "DenseStatsPipeline",
    "FisherSums",
    "GroupedPipeline",
    "LayerConfigs",
    "SequentialPipeline",
    "build_pipeline",
    "compress_from_gradients",
    "gradient_stages",
]

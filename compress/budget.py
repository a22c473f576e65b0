"""One global budget split across layers: profile every (layer, level), then solve the knapsack.

A recipe's `allocation` section names the stage whose level (e.g. whitened_svd's `ratio`) is
chosen per layer, the global ratio removed (of parameters or of true bytes), and the candidate
levels. Profiling runs the *dense* model once (`DenseStatsPipeline.collect`); each layer's
compressor measures its size and error at every level (`Compressor.profile`: one SVD for all
ranks for the low-rank family); level 0 means "leave the layer dense". The solver
(compress/allocation.py) picks one level per layer minimizing the summed cost under the budget.
The chosen levels are then applied by the normal (sequential) compression run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .allocation import Option, solve_dp, solve_lagrangian, total
from .compressors import LayerStats, StageConfig
from .compressors.base import LevelResult, flush_denormals
from .errors import LlmpressError
from .metrics import tensor_bytes
from .pipelines import DenseStatsPipeline, FisherSums

logger = logging.getLogger("compress")

DEFAULT_LEVELS = [round(0.05 * i, 2) for i in range(20)]  # 0 (dense), 0.05, ..., 0.95


class AllocationConfig(BaseModel):
    """The `allocation:` section of a recipe."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    strategy: Literal["knapsack", "uniform"] = "knapsack"
    stage: int = Field(default=0, ge=0, description="index of the stage whose level is allocated")
    ratio: float = Field(gt=0.0, lt=1.0, description="fraction of the stage's target size removed, globally")
    unit: Literal["params", "bytes"] = "params"
    levels: list[float] = Field(default_factory=lambda: list(DEFAULT_LEVELS), description="candidate levels; 0 = dense")
    # fisher is the default: on SmolLM2 it beat weighted_sq in all 6 measured (method, ratio) pairs
    # and uniform allocation in 5 of them; weighted_sq lost to uniform in all 6 (README).
    cost: Literal["weighted_sq", "weighted", "plain_sq", "plain", "fisher"] = Field(
        default="fisher",
        description="per-layer cost summed by the knapsack: the relative calibration-weighted error "
        "‖ΔW Xᵀ‖/‖W Xᵀ‖ (weighted) or the relative Frobenius error ‖ΔW‖/‖W‖ (plain), squared or not; "
        "fisher: the squared weighted error times the layer's Fisher energy Σ F_ij·W_ij², an estimate of "
        "the loss increase that compares layers (needs a backward pass over the calibration data)",
    )
    solver: Literal["dp", "lagrangian"] = "dp"
    resolution: int = Field(default=65536, ge=16, description="budget slots of the DP (sizes are rounded up)")

    @field_validator("levels")
    @classmethod
    def _check_levels(cls, levels: list[float]) -> list[float]:
        bad = [v for v in levels if not 0.0 <= v < 1.0]
        if bad or not levels:
            raise ValueError(f"levels must be a non-empty list of values in [0, 1) (0 = leave dense); got {bad or levels}")
        return sorted(set(levels))


@dataclass
class LayerChoice:
    name: str
    level: float
    values: int
    bytes: int
    dense_values: int
    dense_bytes: int
    rel_error: float
    rel_weighted_error: float | None


@dataclass
class AllocationPlan:
    strategy: str
    stage: int
    unit: str
    ratio: float
    budget: int  # allowed total size of the stage's targets, in `unit`
    dense_total: int
    chosen_total: int
    total_cost: float
    cost: str  # the AllocationConfig.cost that priced the options
    seconds: float
    layers: list[LayerChoice] = field(default_factory=list)

    def layer_configs(self, stage: StageConfig, level_field: str) -> dict[int, dict[str, StageConfig | None]]:
        """Per-layer configs for a pipeline's `layer_configs`; level 0 leaves a layer dense."""
        configs: dict[str, StageConfig | None] = {}
        for choice in self.layers:
            configs[choice.name] = None if choice.level == 0 else stage.model_copy(update={level_field: choice.level})
        return {self.stage: configs}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _dense_result(weight: torch.Tensor, bias: torch.Tensor | None) -> LevelResult:
    values = weight.numel() + (bias.numel() if bias is not None else 0)
    nbytes = tensor_bytes(weight) + (tensor_bytes(bias) if bias is not None else 0)
    return LevelResult(0.0, values, nbytes, 0.0, 0.0)


def profile_block(
    pipeline: DenseStatsPipeline, stage_index: int, index: int, stats: dict[str, LayerStats], levels: list[float]
) -> dict[str, list[LevelResult]]:
    """Size and error of each of this block's target layers at every level (level 0: dense)."""
    stage = pipeline.stages[stage_index]
    compressor = pipeline.compressors[stage_index]
    if compressor.level_field is None:
        raise LlmpressError(f"method {stage.method!r} has no level to allocate; allocation needs e.g. a 'ratio' method")
    block = pipeline.blocks[index]
    profiles = {}
    for name, linear in pipeline.dense_targets(block, index, [stage_index]).items():
        weight = linear.weight.data
        bias = linear.bias.data if linear.bias is not None else None
        layer_stats = stats.get(name, LayerStats())
        compressed_levels = [lv for lv in levels if lv > 0]
        with flush_denormals():
            results = compressor.profile(weight, bias, layer_stats, stage, compressed_levels) if compressed_levels else []
        results = ([_dense_result(weight, bias)] if 0.0 in levels else []) + results
        energy = layer_stats.get("fisher_energy")
        if energy is not None:
            results = [replace(r, sensitivity=float(energy)) for r in results]
        profiles[name] = results
    return profiles


def profile_layers(
    pipeline: DenseStatsPipeline,
    input_ids: torch.Tensor,
    stage_index: int,
    levels: list[float],
    fisher: FisherSums | None = None,
    keep_stats: dict[str, LayerStats] | None = None,
) -> dict[str, list[LevelResult]]:
    """Profile every target layer of a stage on the dense model (one calibration pass).

    `fisher`: Fisher sums already collected (else collected here if the pipeline's `fisher_for`
    asks); `keep_stats`: a dict to also receive the collected statistics, for reuse.
    """
    profiles: dict[str, list[LevelResult]] = {}

    def on_block(index: int, stats: dict[str, LayerStats]) -> None:
        if keep_stats is not None:
            keep_stats.update(stats)
        profiles.update(profile_block(pipeline, stage_index, index, stats, levels))

    pipeline.collect(input_ids, on_block, stage_indices=[stage_index], fisher=fisher)
    return profiles


COSTS = ("weighted_sq", "weighted", "plain_sq", "plain", "fisher")


def _cost(result: LevelResult, kind: str) -> float:
    if kind == "fisher":
        if result.sensitivity is None or result.rel_weighted_error is None:
            raise LlmpressError("cost 'fisher' needs Fisher statistics and a Gram: collect them with calibration data")
        return result.rel_weighted_error**2 * result.sensitivity
    if kind.startswith("plain"):
        error = result.rel_error
    elif result.rel_weighted_error is None:
        raise LlmpressError("cost 'weighted*' needs calibration data (a Gram); use cost: plain for data-free runs")
    else:
        error = result.rel_weighted_error
    return error**2 if kind.endswith("_sq") else error


def solve_allocation(profiles: dict[str, list[LevelResult]], config: AllocationConfig, seconds: float = 0.0) -> AllocationPlan:
    """Pick one level per layer: minimum summed cost with total size <= (1 - ratio) × dense size."""
    names = list(profiles)
    if not names:
        raise LlmpressError("allocation: the stage targets no layer")
    size_of = (lambda r: r.values) if config.unit == "params" else (lambda r: r.bytes)
    dense = {n: _dense_entry(profiles[n]) for n in names}
    dense_total = sum(size_of(dense[n]) for n in names)
    budget = int((1.0 - config.ratio) * dense_total)
    options = [[Option(f"{r.level:g}", _cost(r, config.cost), size_of(r)) for r in profiles[n]] for n in names]
    if config.solver == "dp":
        choice = solve_dp(options, budget, config.resolution)
    else:
        choice = solve_lagrangian(options, budget)
    cost, size = total(options, choice)
    if size > budget:  # the solvers guarantee this; a violated budget would be a bug
        raise AssertionError(f"allocation exceeds its budget: {size} > {budget}")
    layers = []
    for n, i in zip(names, choice):
        r = profiles[n][i]
        layers.append(LayerChoice(n, r.level, r.values, r.bytes, dense[n].values, dense[n].bytes, r.rel_error, r.rel_weighted_error))
    return AllocationPlan("knapsack", config.stage, config.unit, config.ratio, budget, dense_total, size, cost, config.cost, seconds, layers)


def _dense_entry(results: list[LevelResult]) -> LevelResult:
    """The level-0 profile entry: the layer left dense, which defines the budget."""
    for result in results:
        if result.level == 0.0:
            return result
    raise LlmpressError("allocation profiles must include level 0 (the dense layer) to define the budget")


def plan_allocation(
    profiler: DenseStatsPipeline, input_ids: torch.Tensor | None, config: AllocationConfig, fisher: FisherSums | None = None
) -> AllocationPlan:
    """Profile the dense model and solve; logs the chosen level per layer.

    `profiler` is a dense-statistics pipeline over the recipe's stages (with `fisher_for` holding
    the allocated stage when the cost is `fisher`); `fisher`: sums already collected.
    """
    if config.stage >= len(profiler.stages):
        raise LlmpressError(f"allocation.stage {config.stage} but the recipe has {len(profiler.stages)} stages")
    if input_ids is None:
        raise LlmpressError("knapsack allocation measures layer errors on calibration data: set calibration.num_samples >= 1")
    start = time.perf_counter()
    levels = sorted(set(config.levels) | {0.0})
    profiles = profile_layers(profiler, input_ids, config.stage, levels, fisher)
    plan = solve_allocation(profiles, config, seconds=time.perf_counter() - start)
    for choice in plan.layers:
        logger.info("allocation %-40s level %.2f  size %d/%d", choice.name, choice.level, choice.values, choice.dense_values)
    logger.info(
        "allocation: %s %d of %d allowed (dense %d), total cost %.4f, %.1f s",
        config.unit,
        plan.chosen_total,
        plan.budget,
        plan.dense_total,
        plan.total_cost,
        plan.seconds,
    )
    return plan

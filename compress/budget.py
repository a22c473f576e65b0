"""One global budget split across layers: profile every (layer, option), then solve the knapsack.

A recipe's `allocation` section names the stage whose level (e.g. whitened_svd's `ratio`) is
chosen per layer, the global ratio removed (of parameters or of bytes as served), and the
candidate levels; level 0 means "leave the layer dense". With `candidates` it names several
stages instead, each with its levels: the stages are then alternatives (one knapsack across
methods) and every layer gets one (method, level) of them or stays dense; a level is then the
method's own (gqsa at 0 is plain W4). A method without a level (gptq W8) is listed with [0]:
one fixed option, the stage as written.

Profiling runs the *dense* model once (`DenseStatsPipeline.collect`); each layer's compressor
measures its size and error at every level (`Compressor.profile`: one SVD for all ranks for the
low-rank family). The solver (compress/allocation.py) picks one option per layer minimizing the
summed cost under the budget; the normal (sequential) compression run then applies the choices.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .allocation import Option, solve_dp, solve_lagrangian, total
from .compressors import LayerStats, StageConfig
from .compressors.base import LevelResult, flush_denormals
from .distributed import linear_cost
from .errors import LlmpressError, ShapeNotSupported
from .metrics import tensor_bytes
from .pipelines import DenseStatsPipeline, FisherSums

logger = logging.getLogger("compress")

DEFAULT_LEVELS = [round(0.05 * i, 2) for i in range(20)]  # 0 (dense), 0.05, ..., 0.95


class AllocationConfig(BaseModel):
    """The `allocation:` section of a recipe."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    strategy: Literal["knapsack", "uniform"] = "knapsack"
    stage: int = Field(default=0, ge=0, description="index of the stage whose level is allocated")
    ratio: float | None = Field(
        default=None, gt=0.0, lt=1.0, description="fraction of the targets' size removed, globally (or max_size)"
    )
    max_size: int | str | None = Field(
        default=None,
        description="instead of ratio: the whole model's size as served ('8GB', '7.5GiB', bytes); the targets get "
        "what the parts no method compresses (embeddings, head, norms) leave. Needs unit: bytes",
    )
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
    candidates: dict[int, list[float]] | None = Field(
        default=None,
        description="one knapsack across methods: stage index -> its candidate levels (the method's own level "
        "field, 0 included: gqsa at 0 is W4); each layer gets one (stage, level) or stays dense. Replaces stage/levels",
    )
    from_ratio: dict[int, float] | None = Field(
        default=None,
        description="candidate stage -> the fraction of the targets' size a budget must remove before that stage is "
        "profiled at all (with max_size: the fraction the size implies). Options only tight budgets pick (group "
        "sparsity, low rank) then cost no profiling time for loose budgets; the other stages are always profiled",
    )
    fisher_samples: int | None = Field(
        default=None,
        ge=1,
        description="calibration sequences of the Fisher backward pass when only the knapsack's cost needs it (each "
        "layer's Fisher energy is one number: a few sequences rank layers); null: all",
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

    @field_validator("candidates")
    @classmethod
    def _check_candidates(cls, candidates: dict[int, list[float]] | None) -> dict[int, list[float]] | None:
        if candidates is None:
            return None
        if not candidates:
            raise ValueError("candidates must name at least one stage: {stage index: [levels]}")
        for stage, levels in candidates.items():
            bad = [v for v in levels if not 0.0 <= v < 1.0]
            if bad or not levels:
                raise ValueError(f"candidates[{stage}]: levels must be a non-empty list in [0, 1); got {bad or levels}")
        return {stage: sorted(set(levels)) for stage, levels in sorted(candidates.items())}

    @model_validator(mode="after")
    def _one_budget(self) -> "AllocationConfig":
        if self.candidates is not None and self.strategy != "knapsack":
            raise ValueError("candidates (one knapsack across methods) need strategy: knapsack")
        if self.from_ratio is not None:
            unknown = sorted(set(self.from_ratio) - set(self.candidates or {}))
            if unknown:
                raise ValueError(f"from_ratio names stages {unknown} that are not among allocation.candidates")
            bad = {s: r for s, r in self.from_ratio.items() if not 0.0 <= r < 1.0}
            if bad:
                raise ValueError(f"from_ratio values are fractions removed, in [0, 1); got {bad}")
            if all(s in self.from_ratio for s in self.candidates or {}):
                raise ValueError("from_ratio names every candidate stage: leave at least one always profiled")
        if (self.ratio is None) == (self.max_size is None):
            raise ValueError("give exactly one budget: ratio (fraction removed) or max_size (e.g. '8GB')")
        if self.max_size is not None:
            parse_size(self.max_size)
            if self.unit != "bytes" or self.strategy != "knapsack":
                raise ValueError("max_size is a size in bytes: it needs strategy: knapsack and unit: bytes")
        return self

    def stage_levels(self, removed: float | None = None) -> dict[int, list[float]]:
        """Stage -> levels to profile: the candidates, or the one allocated stage's levels. With
        `removed` (the fraction the budget removes), candidates whose `from_ratio` is above it are left out."""
        if self.candidates is not None:
            floors = self.from_ratio or {}
            return {s: lv for s, lv in self.candidates.items() if removed is None or floors.get(s, 0.0) <= removed}
        return {self.stage: sorted(set(self.levels) | {0.0})}


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes of '8GB' (10^9), '7.5GiB' (2^30), '500MB' or a plain number of bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(size))
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError(f"size {size!r} not understood; write e.g. 8GB, 7.5GiB, 500MB or a number of bytes")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


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
    stage: int | None = None  # the stage (method) chosen; None: left dense
    method: str | None = None


@dataclass
class AllocationPlan:
    strategy: str
    stage: int
    unit: str
    ratio: float | None
    budget: int  # allowed total size of the stage's targets, in `unit`
    dense_total: int
    chosen_total: int
    total_cost: float
    cost: str  # the AllocationConfig.cost that priced the options
    seconds: float
    layers: list[LayerChoice] = field(default_factory=list)
    stages: list[int] = field(default_factory=list)  # the candidate stages (one with a single allocated stage)
    max_size: int | str | None = None  # the whole-model budget, when given instead of ratio

    def layer_configs(self, stages: list[StageConfig], level_fields: list[str | None]) -> dict[int, dict[str, StageConfig | None]]:
        """Per-layer configs for a pipeline's `layer_configs`: each layer's chosen stage gets its
        level; every other candidate stage leaves the layer alone (None); dense: None everywhere."""
        configs: dict[int, dict[str, StageConfig | None]] = {stage: {} for stage in self.stages}
        for choice in self.layers:
            for stage in self.stages:
                chosen = choice.stage == stage
                if not chosen:
                    configs[stage][choice.name] = None
                elif level_fields[stage] is None:  # a fixed option (a method without a level)
                    configs[stage][choice.name] = stages[stage]
                else:
                    configs[stage][choice.name] = stages[stage].model_copy(update={level_fields[stage]: choice.level})
        return configs

    def left_dense(self) -> list[LayerChoice]:
        return [c for c in self.layers if c.stage is None and c.method is None]

    def choice(self, name: str) -> LayerChoice | None:
        """The plan's choice for item `name` (None: no such item)."""
        return next((c for c in self.layers if c.name == name), None)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _with_sensitivity(results: list[LevelResult], stats: LayerStats) -> list[LevelResult]:
    """The layer's Fisher energy on each of its options, when it was collected."""
    energy = stats.get("fisher_energy")
    return results if energy is None else [replace(r, sensitivity=float(energy)) for r in results]


def _dense_result(weight: torch.Tensor, bias: torch.Tensor | None) -> LevelResult:
    """The option of leaving the layer dense (stage None, level 0), at its bytes as served."""
    values = weight.numel() + (bias.numel() if bias is not None else 0)
    nbytes = tensor_bytes(weight) + (tensor_bytes(bias) if bias is not None else 0)
    return LevelResult(0.0, values, nbytes, 0.0, 0.0)


def _dense_option(linear: torch.nn.Module) -> LevelResult:
    """`_dense_result` of a Linear module."""
    return _dense_result(linear.weight.data, linear.bias.data if linear.bias is not None else None)


def profile_block(
    pipeline: DenseStatsPipeline,
    stage_index: int,
    index: int,
    stats: dict[str, LayerStats],
    levels: list[float],
    level_zero_is_dense: bool = True,
    left_out: dict[str, list[str]] | None = None,
) -> dict[str, list[LevelResult]]:
    """Size and error of each of this block's target layers at every level. Level 0 is the dense
    layer (`level_zero_is_dense`, one allocated stage) or the method's own level 0 (candidates).
    A layer the method cannot take (its shape: `ShapeNotSupported`) gets no option from it, and
    its name goes to `left_out[stage label]`."""
    stage = pipeline.stages[stage_index]
    compressor = pipeline.compressors[stage_index]
    if compressor.level_field is None and (level_zero_is_dense or levels != [0.0]):
        raise LlmpressError(
            f"method {stage.method!r} has no level to allocate: allocate a method with one (e.g. a 'ratio'), or list it "
            "among allocation.candidates with levels [0] (one fixed option)"
        )
    block = pipeline.blocks[index]
    compressed_levels = [lv for lv in levels if lv > 0 or not level_zero_is_dense]

    def profile(name: str, linear: torch.nn.Module) -> list[LevelResult]:
        weight = linear.weight.data
        bias = linear.bias.data if linear.bias is not None else None
        layer_stats = stats.get(name, LayerStats())
        try:
            with flush_denormals():
                results = compressor.profile(weight, bias, layer_stats, stage, compressed_levels) if compressed_levels else []
        except ShapeNotSupported as error:
            logger.info("allocation: %s is no option for %s: %s", stage_label(stage), name, error)
            if left_out is not None:
                left_out.setdefault(stage_label(stage), []).append(name)
            results = []
        results = [replace(r, stage=stage_index) for r in results]
        results = ([_dense_result(weight, bias)] if 0.0 in levels and level_zero_is_dense else []) + results
        return _with_sensitivity(results, layer_stats)

    # several ranks: each profiles its share of the layers (bin-packed by cost), all get every profile
    return pipeline.parallel.split_work(pipeline.dense_targets(block, index, [stage_index]), linear_cost, profile)


def profile_layers(
    pipeline: DenseStatsPipeline,
    input_ids: torch.Tensor,
    stage_index: int | dict[int, list[float]],
    levels: list[float] | None = None,
    fisher: FisherSums | None = None,
    keep_stats: dict[str, LayerStats] | None = None,
) -> dict[str, list[LevelResult]]:
    """Profile every target layer on the dense model (one calibration pass for all stages).

    `stage_index` with `levels`: one allocated stage (level 0 = dense). A {stage: levels} dict:
    candidate stages, each layer's options from all of them plus the dense layer. `fisher`:
    Fisher sums already collected (else collected here if the pipeline's `fisher_for` asks);
    `keep_stats`: a dict to also receive the collected statistics, for reuse.
    """
    candidates = isinstance(stage_index, dict)
    stage_levels = stage_index if candidates else {stage_index: levels}
    profiles: dict[str, list[LevelResult]] = {}
    left_out: dict[str, list[str]] = {}

    def on_block(index: int, stats: dict[str, LayerStats]) -> None:
        if keep_stats is not None:
            keep_stats.update(stats)
        if candidates:  # the dense layer: one option per layer, whichever stages target it
            targets = pipeline.dense_targets(pipeline.blocks[index], index, list(stage_levels))
            for name, linear in targets.items():
                profiles[name] = _with_sensitivity([_dense_option(linear)], stats.get(name, LayerStats()))
        for stage, stage_levels_ in stage_levels.items():
            for name, results in profile_block(pipeline, stage, index, stats, stage_levels_, not candidates, left_out).items():
                profiles.setdefault(name, []).extend(results)

    pipeline.collect(input_ids, on_block, stage_indices=list(stage_levels), fisher=fisher)
    for label, names in left_out.items():
        logger.warning(
            "allocation: %s cannot compress %d layer(s) of this shape (e.g. %s); the knapsack chooses among the other "
            "options there", label, len(names), names[0],
        )  # fmt: skip
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


def solve_allocation(
    profiles: dict[str, list[LevelResult]],
    config: AllocationConfig,
    seconds: float = 0.0,
    methods: dict[int, str] | None = None,
    fixed_bytes: int = 0,
) -> AllocationPlan:
    """Pick one option per layer: minimum summed cost with total size <= (1 - ratio) × dense size,
    or <= max_size − `fixed_bytes` (the model's bytes outside the targets, as served).
    `methods`: stage index -> method name, recorded in the plan."""
    names = list(profiles)
    if not names:
        raise LlmpressError("allocation: the stage targets no layer")
    size_of = (lambda r: r.values) if config.unit == "params" else (lambda r: r.bytes)
    dense = {n: _dense_entry(profiles[n]) for n in names}
    dense_total = sum(size_of(dense[n]) for n in names)
    if config.max_size is not None:
        budget = parse_size(config.max_size) - fixed_bytes
        if budget <= 0:
            raise LlmpressError(
                f"max_size {config.max_size} is not even the {fixed_bytes:,} bytes of what no method compresses "
                "(embeddings, head, norms): give a larger size"
            )
    else:
        budget = int((1.0 - config.ratio) * dense_total)
    choosable = {n: _choosable(profiles[n]) for n in names}
    options = [[Option(_label(r), _cost(r, config.cost), size_of(r)) for r in choosable[n]] for n in names]
    if config.solver == "dp":
        choice = solve_dp(options, budget, config.resolution)
    else:
        choice = solve_lagrangian(options, budget)
    cost, size = total(options, choice)
    if size > budget:  # the solvers guarantee this; a violated budget would be a bug
        raise AssertionError(f"allocation exceeds its budget: {size} > {budget}")
    layers = []
    for n, i in zip(names, choice):
        r = choosable[n][i]
        # one allocated stage: every compressed option is that stage's (profiles may come from a
        # pipeline that numbered its stages differently, as the benchmarks' shared profiles do)
        stage = None if _is_dense(r) or r.fixed else (r.stage if config.candidates is not None else config.stage)
        method = r.fixed or (methods.get(stage) if methods and stage is not None else None)
        layers.append(
            LayerChoice(n, r.level, r.values, r.bytes, dense[n].values, dense[n].bytes, r.rel_error, r.rel_weighted_error, stage, method)
        )
    stages = list(config.stage_levels())
    return AllocationPlan(
        "knapsack", stages[0], config.unit, config.ratio, budget, dense_total, size, cost, config.cost, seconds, layers, stages,
        config.max_size,
    )  # fmt: skip


def _is_dense(result: LevelResult) -> bool:
    return result.stage is None and result.level == 0.0 and result.fixed is None


def _choosable(results: list[LevelResult]) -> list[LevelResult]:
    """An item's options: all of them, but not the dense entry of an item with fixed options (the
    embeddings whose bits the recipe leaves to the knapsack must take one of them)."""
    if any(r.fixed for r in results):
        return [r for r in results if not _is_dense(r)]
    return results


def _label(result: LevelResult) -> str:
    return result.fixed or ("dense" if _is_dense(result) else f"{result.stage}:{result.level:g}")


def _dense_entry(results: list[LevelResult]) -> LevelResult:
    """The dense option of a layer (stage None, level 0), which defines the budget."""
    for result in results:
        if _is_dense(result):
            return result
    raise LlmpressError("allocation profiles must include the dense layer (level 0) to define the budget")


def stage_label(stage: StageConfig) -> str:
    """How a plan names a candidate stage: its method, and what tells apart two stages of one
    method (gqsa g16 and gqsa g32, gptq w8 g128; an N:M pattern; a stacked residual, "gptq w3 g64 + r16")."""
    label = stage.method
    if stage.method == "gptq":
        label += f" w{stage.bits}"
    if getattr(stage, "group_size", None) and stage.method in ("gqsa", "gptq"):
        label += f" g{stage.group_size}"
    if getattr(stage, "pattern", "unstructured") not in ("unstructured", None):
        label += f" {stage.pattern}"
    if getattr(stage, "residual_rank", None):
        label += f" + r{stage.residual_rank}"
    return label


def fixed_bytes(model: torch.nn.Module, profiles: dict[str, list[LevelResult]]) -> int:
    """The model's bytes as served outside the profiled targets: what any plan keeps as it is."""
    from .report import model_size

    return model_size(model)["bytes"] - sum(_dense_entry(results).bytes for results in profiles.values())


def removed_fraction(
    profiler: DenseStatsPipeline, config: AllocationConfig, extra: dict[str, list[LevelResult]] | None = None
) -> float:
    """The fraction of the targets' size (in `config.unit`) the budget removes, known before
    profiling: `ratio`, or what `max_size` leaves the targets once the rest of the model is counted
    (`extra` items, the embeddings the knapsack quantizes, at their largest option)."""
    if config.max_size is None:
        return config.ratio
    stages = list(config.stage_levels())
    dense_options: dict[str, list[LevelResult]] = {}
    for index, block in enumerate(profiler.blocks):
        for name, linear in profiler.dense_targets(block, index, stages).items():
            dense_options[name] = [_dense_option(linear)]
    dense = sum(options[0].bytes for options in dense_options.values())
    outside = fixed_bytes(profiler.model, dense_options)
    for results in (extra or {}).values():
        outside -= _dense_entry(results).bytes - max(r.bytes for r in _choosable(results))
    allowed = parse_size(config.max_size) - outside
    return min(1.0, max(0.0, 1.0 - allowed / dense)) if dense else 0.0


def plan_allocation(
    profiler: DenseStatsPipeline,
    input_ids: torch.Tensor | None,
    config: AllocationConfig,
    fisher: FisherSums | None = None,
    extra: dict[str, list[LevelResult]] | None = None,
) -> AllocationPlan:
    """Profile the dense model and solve; logs the chosen level per layer.

    `profiler` is a dense-statistics pipeline over the recipe's stages (with `fisher_for` holding
    the allocated stage when the cost is `fisher`); `fisher`: sums already collected; `extra`:
    items priced elsewhere that join the knapsack (the embeddings: `embeddings.embedding_options`).
    """
    for stage in config.stage_levels():
        if stage >= len(profiler.stages):
            raise LlmpressError(f"allocation names stage {stage} but the recipe has {len(profiler.stages)} stages")
    if input_ids is None:
        raise LlmpressError("knapsack allocation measures layer errors on calibration data: set calibration.num_samples >= 1")
    stage_levels = config.stage_levels()
    if config.from_ratio:
        removed = removed_fraction(profiler, config, extra)
        stage_levels = config.stage_levels(removed)
        skipped = [stage_label(profiler.stages[s]) for s in config.candidates if s not in stage_levels]
        if skipped:
            logger.info("allocation: the budget removes %.1f%% of the targets' size; not profiled (from_ratio): %s", 100 * removed, ", ".join(skipped))
    start = time.perf_counter()
    if config.candidates is not None:
        profiles = profile_layers(profiler, input_ids, stage_levels, fisher=fisher)
    else:
        profiles = profile_layers(profiler, input_ids, config.stage, stage_levels[config.stage], fisher)
    profiles.update(extra or {})
    methods = {i: stage_label(stage) for i, stage in enumerate(profiler.stages)}
    fixed = fixed_bytes(profiler.model, profiles) if config.max_size is not None else 0
    plan = solve_allocation(profiles, config, seconds=time.perf_counter() - start, methods=methods, fixed_bytes=fixed)
    for choice in plan.layers:
        logger.info(
            "allocation %-40s %-12s level %.2f  size %d/%d",
            choice.name, choice.method or "dense", choice.level, choice.values, choice.dense_values,
        )  # fmt: skip
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

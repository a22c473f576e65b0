"""The compressor interface: (weight, statistics, config) -> a compressed module.

A compressor is pure tensor math in one file: it never sees the model, only one Linear's
weight and bias, the calibration statistics its `needs` names (collected by the pipeline), and
its validated config. It returns a `CompressedLinear` whose sizes are exact; the pipeline
measures the reconstruction error the same way for every method.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

import torch
from pydantic import BaseModel, ConfigDict

from ..metrics import relative_errors
from ..modules import CompressedLinear
from .residual import with_residual


_flush_depth = 0


@contextmanager
def flush_denormals() -> Iterator[None]:
    """Treat subnormal floats as zero while factorizing (usable as a decorator; nests).

    Triangular factorizations of these near-singular Grams produce subnormal intermediates,
    which x86 handles in microcode: a 135×135 batched Cholesky took 69 s instead of 0.6 s.
    Values below 2.2e-308 are irrelevant to any result here.
    """
    global _flush_depth
    supported = torch.set_flush_denormal(True)
    _flush_depth += 1
    try:
        yield
    finally:
        _flush_depth -= 1
        if supported and _flush_depth == 0:
            torch.set_flush_denormal(False)


class StageConfig(BaseModel):
    """Keys every recipe stage has; each method subclasses it with its own keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str
    targets: list[str] = ["Linear"]
    ignore: list[str] = ["lm_head"]


@dataclass
class LayerStats:
    """What a compressor knows of one layer besides its weight: the calibration statistics of its
    input by collector name (see collectors.py), and which layer it is (errors name it)."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    num_tokens: int = 0
    name: str = "layer"
    block: int | None = None
    # what a compressor derives from these statistics and may reuse when several configs are
    # compressed from the same statistics (M-FAC's Fisher inverse for several sparsities)
    derived: dict[Any, Any] = field(default_factory=dict, repr=False)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def get(self, name: str) -> torch.Tensor | None:
        return self.tensors.get(name)


class Compressor(ABC):
    method: ClassVar[str]
    config_class: ClassVar[type[StageConfig]]
    needs: ClassVar[tuple[str, ...]] = ()  # collector names this method requires
    # True for methods that refine an earlier stage's result (EoRA): they target compressed
    # modules and receive the original weight plus the compressed module as `base`.
    wraps_compressed: ClassVar[bool] = False
    # the config field that sets how hard a layer is compressed (what the allocator varies per
    # layer), with its valid range: e.g. "ratio" in (0, 1); None for methods without one
    level_field: ClassVar[str | None] = None

    @abstractmethod
    def compress(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        stats: LayerStats,
        config: StageConfig,
        base: CompressedLinear | None = None,
    ) -> CompressedLinear:
        """Compress one (out_features, in_features) weight (or refine `base`, its compressed form)."""

    @classmethod
    def for_stage(cls, config: StageConfig) -> "Compressor":
        """The compressor of one recipe stage: its `needs` gain the Gram when the stage stacks an
        EoRA residual on its result (`residual_rank`)."""
        compressor = cls()
        if getattr(config, "residual_rank", None) and "gram" not in cls.needs:
            compressor.needs = (*cls.needs, "gram")
        return compressor

    def apply(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        stats: LayerStats,
        config: StageConfig,
        base: CompressedLinear | None = None,
    ) -> CompressedLinear:
        """`compress`, plus the stage's stacked EoRA residual when it asks for one: what the
        pipelines and the allocator's profiles call."""
        return self.stack(weight, self.compress(weight, bias, stats, config, base=base), stats, config)

    @staticmethod
    def stack(weight: torch.Tensor, module: CompressedLinear, stats: LayerStats, config: StageConfig) -> CompressedLinear:
        """`module` with the EoRA residual of rank `config.residual_rank` (as it is without one)."""
        rank = getattr(config, "residual_rank", None)
        return with_residual(weight, module, stats.get("gram"), rank, stats.name) if rank else module

    def group_size(self, config: StageConfig) -> int:
        """How many same-named layers of consecutive blocks one call compresses together (1: alone)."""
        return 1

    def compress_group(
        self,
        weights: list[torch.Tensor],
        biases: list[torch.Tensor | None],
        stats: list[LayerStats],
        config: StageConfig,
        names: list[str],
    ) -> list[CompressedLinear]:
        """Compress layers that share storage (group_size > 1); one module per layer, in order."""
        raise NotImplementedError(f"{self.method} does not compress layers in groups")

    def profile(
        self, weight: torch.Tensor, bias: torch.Tensor | None, stats: LayerStats, config: StageConfig, levels: list[float]
    ) -> list["LevelResult"]:
        """Size and error of this layer at each level (what the knapsack allocator chooses from).

        The default compresses once per level; methods with a cheaper way (one SVD for every
        rank) override it. A method without a level (gptq) has one option, level 0. Errors are the pipeline's: plain and calibration-weighted relative.
        """
        results = []
        for level in levels:
            if self.level_field is None and level != 0.0:
                raise ValueError(f"method {self.method!r} has no level; its one option is level 0 (the stage as written)")
            at_level = config if self.level_field is None else config.model_copy(update={self.level_field: level})
            module = self.apply(weight, bias, stats, at_level)
            rel, weighted = relative_errors(weight, module.to_dense(), stats.get("gram"))
            results.append(LevelResult(level, module.num_values(), module.num_bytes(), rel, weighted))
        return results


@dataclass(frozen=True)
class LevelResult:
    """One (layer, level) point measured by `Compressor.profile`."""

    level: float
    values: int
    bytes: int
    rel_error: float
    rel_weighted_error: float | None
    # the layer's Fisher energy Σ F_ij·W_ij² when Fisher statistics were collected (same for every
    # level of a layer): scales the relative error into loss units for the knapsack's `fisher` cost
    sensitivity: float | None = None
    # the recipe stage (method) this option compresses with; None with level 0: the layer left dense
    stage: int | None = None
    # an option outside the recipe's stages (the embeddings' "embeddings w4 g64"), named so in the
    # plan; an item with such options must take one of them (its dense entry only sizes the budget)
    fixed: str | None = None


COMPRESSORS: dict[str, type[Compressor]] = {}


def register_compressor(cls: type[Compressor]) -> type[Compressor]:
    if cls.method in COMPRESSORS:
        raise ValueError(f"compressor {cls.method!r} registered twice")
    COMPRESSORS[cls.method] = cls
    return cls


def rank_for_ratio(out_features: int, in_features: int, ratio: float) -> int:
    """Largest rank whose two factors keep at most (1 - ratio) of the m·n weights (at least 1)."""
    budget = (1.0 - ratio) * out_features * in_features
    return max(1, min(int(budget // (out_features + in_features)), min(out_features, in_features)))

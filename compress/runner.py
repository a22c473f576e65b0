"""One compression run, built in one place: statistics → plan → compress.

`CompressionRunner(model, recipe).run(input_ids)`:
0. embeddings (the recipe's `embeddings:`): token embeddings and output head to W8/W4, data-free,
   first, so that every later step calibrates on the model as it will be served; when the
   knapsack chooses their bits (a list of bits or group sizes), after step 2 instead, priced by
   the Fisher pass of step 1 (compress/embeddings.py `embedding_options`);
1. statistics: the Fisher sums every stage (or the knapsack's `fisher` cost) needs, from one
   backward pass over the dense model, shared by profiling and compression;
2. plan: with `allocation: knapsack`, profile the allocated stage (or the candidate stages, one
   knapsack across methods) on the dense model and solve for one option per layer (compress/budget.py);
3. compress: gradient stages (M-FAC) during one backward walk, then the forward stages in the
   pipeline the recipe's statistics mode calls for (compress/pipelines/). MoE experts are
   per-expert Linears meanwhile; stacks nothing compressed are fused back at the end;
4. tune (GQSA's `optimize: [e2e]`): the quantization parameters trained on the language-model
   loss of the calibration data through the whole compressed model (compress/quant_tuning.py).

`compress_model` (api.py) and the benchmarks (eval/bench_*.py) both run recipes through it; the
benchmarks pass statistics and profiles collected once for many rows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .budget import AllocationPlan, plan_allocation, solve_allocation, stage_label
from .compressors import LayerStats
from .compressors.base import LevelResult
from .embeddings import chosen_setting, embedding_name, embedding_options, head_input_gram, quantize_embeddings
from .errors import LlmpressError
from .experts import fuse_untouched_stacks
from .fisher import EMBEDDING_STATS
from .metrics import LayerRecord, serving_dtype
from .modules import GQSALinear
from .pipelines import DenseStatsPipeline, FisherSums, build_pipeline, compress_from_gradients, gradient_stages
from .pipelines.gradients import densify
from .quant_tuning import tune_end_to_end, tuning_settings
from .recipe import Recipe


@dataclass
class RunResult:
    records: list[LayerRecord]
    plan: AllocationPlan | None
    block_log: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    tuning: dict[str, Any] | None = None  # end-to-end tuning's losses (GQSA optimize: [e2e])
    embeddings: dict[str, Any] | None = None  # the quantized embeddings (recipe `embeddings:`)

    def left_dense(self) -> list[tuple[int, int]]:
        """(values, bytes) of the targets the allocator kept dense (they count in the budget)."""
        return [(c.dense_values, c.dense_bytes) for c in self.plan.left_dense()] if self.plan else []

    def allocation_summary(self, recipe: Recipe) -> dict[str, Any] | None:
        """The report's `allocation` section: the plan (knapsack) or the uniform level."""
        if recipe.allocation is None:
            return None
        if self.plan is None:
            return {"strategy": "uniform", "stage": recipe.allocation.stage, "ratio": recipe.allocation.ratio}
        return self.plan.as_dict()


class CompressionRunner:
    def __init__(
        self,
        model: nn.Module,
        recipe: Recipe,
        *,
        device: str | torch.device = "cpu",
        offload_device: str | torch.device = "cpu",
        progress: bool = True,
        on_layer: Callable[[LayerRecord], None] | None = None,
    ):
        self.model = model
        self.recipe = recipe
        allocation = recipe.allocation
        self.knapsack = allocation if allocation is not None and allocation.strategy == "knapsack" else None
        # the embeddings' options as quantized to price them, keyed (bits, group size): the chosen
        # one is installed as it is (`quantize_embeddings`), not quantized a second time
        self._priced_tables: dict[tuple[int, int], list[nn.Module]] = {}
        self.options = dict(
            device=device,
            offload_device=offload_device,
            batch_size=recipe.calibration.batch_size,
            progress=progress,
            on_layer=on_layer,
            weighted_errors=recipe.calibration.weighted_errors,
            moe_calibration=recipe.calibration.moe,
            max_statistics_gib=recipe.calibration.max_statistics_gib,
            fisher_for=frozenset(self.knapsack.stage_levels()) if self.knapsack and self.knapsack.cost == "fisher" else frozenset(),
        )
        if self.knapsack is not None and any(getattr(stage, "walks", 1) > 1 for stage in recipe.stages):
            raise LlmpressError("walks > 1 prunes every layer to the same intermediate sparsities: use it without an allocation")
        # checks the targets now, before any data is loaded
        self.pipeline = build_pipeline(model, recipe.stages, recipe.calibration.statistics, **self.options)
        self.gradient_stages = gradient_stages(self.pipeline)
        self.forward_stages = [i for i in range(len(recipe.stages)) if i not in self.gradient_stages]

    def save_progress(self, run_progress) -> None:
        """Make the run resumable: the sequential pipeline commits each finished block to `run_progress`."""
        self.options["run_progress"] = run_progress
        self.pipeline.run_progress = run_progress

    def needs_data(self) -> bool:
        """Whether any step needs calibration data (data-free recipes skip calibration)."""
        gptq_embeddings = self.recipe.embeddings is not None and self.recipe.embeddings.method == "gptq"
        return self.knapsack is not None or gptq_embeddings or self.pipeline.needs_data(list(range(len(self.recipe.stages))))

    def profiler(self) -> DenseStatsPipeline:
        """A dense-statistics pipeline over the recipe's stages, for profiling (Gram always: the
        knapsack's costs are weighted errors)."""
        options = {**self.options, "weighted_errors": not self.knapsack.cost.startswith("plain"), "on_layer": None}
        return DenseStatsPipeline(self.model, self.recipe.stages, **options)

    def fisher(self, input_ids: torch.Tensor | None, embeddings: bool = False) -> FisherSums:
        """Step 1: Fisher sums for the forward stages and the knapsack cost, one backward pass
        (`embeddings`: also those pricing the embeddings' bits)."""
        if input_ids is None:
            return {}
        methods_need_it = any("fisher" in self.pipeline.compressors[i].needs for i in self.forward_stages)
        samples = self.knapsack.fisher_samples if self.knapsack is not None else None
        if samples and not methods_need_it:  # only the knapsack's per-layer energies: a subset suffices
            input_ids = input_ids[:samples]
        return self.pipeline.collect_fisher(input_ids, self.forward_stages, embeddings=embeddings)

    def head_gram(self, input_ids: torch.Tensor | None) -> torch.Tensor:
        """The head input's Gram that `embeddings: {method: gptq}` quantizes against (dense model)."""
        if input_ids is None:
            raise LlmpressError("embeddings.method gptq quantizes against calibration data: set calibration.num_samples >= 1, or use method: rtn")
        return head_input_gram(self.model, input_ids, self.options["device"], self.options["offload_device"])

    def plan(
        self,
        input_ids: torch.Tensor | None,
        fisher: FisherSums,
        profiles: dict[str, list[LevelResult]] | None,
        head_gram: torch.Tensor | None = None,
    ) -> AllocationPlan | None:
        """Step 2: the knapsack's level per layer (None: the recipe's levels apply)."""
        if self.knapsack is None:
            return None
        if profiles is not None:
            return solve_allocation(profiles, self.knapsack, methods={i: stage_label(s) for i, s in enumerate(self.recipe.stages)})
        extra = None
        if self.recipe.embeddings is not None and self.recipe.embeddings.choices:
            with torch.no_grad():  # the options' tables are kept for the chosen one (`quantize_embeddings`)
                options = embedding_options(self.model, self.recipe.embeddings, fisher[EMBEDDING_STATS], head_gram, self._priced_tables)
            extra = {embedding_name(self.model): options}
        return plan_allocation(self.profiler(), input_ids, self.knapsack, fisher, extra)

    def run(
        self,
        input_ids: torch.Tensor | None,
        *,
        stats: dict[str, LayerStats] | None = None,
        profiles: dict[str, list[LevelResult]] | None = None,
        fisher: FisherSums | None = None,
    ) -> RunResult:
        """Statistics → plan → compress. `stats` (dense statistics, with Fisher sums merged) and
        `profiles` (the allocated stage's) reuse what was collected for an earlier run. Sizes
        (records, budgets) are bytes as served in the recipe's `serve_dtype`."""
        with serving_dtype(self.recipe.serve_dtype):
            return self._run(input_ids, stats=stats, profiles=profiles, fisher=fisher)

    def _run(self, input_ids, *, stats, profiles, fisher) -> RunResult:
        start = time.perf_counter()
        if input_ids is None and stats is None and self.needs_data():
            raise LlmpressError("this recipe needs calibration data; set calibration.num_samples >= 1")
        if stats is not None and not isinstance(self.pipeline, DenseStatsPipeline):
            raise LlmpressError("precomputed statistics are dense statistics: set calibration.statistics: dense")
        config = self.recipe.embeddings
        chosen_by_knapsack = config is not None and bool(config.choices)
        if chosen_by_knapsack and (stats is not None or profiles is not None or fisher is not None):
            raise LlmpressError("embeddings chosen by the knapsack (a list of bits or group sizes) are priced from this run's Fisher pass: run without precomputed statistics")
        gram = self.head_gram(input_ids) if config is not None and config.method == "gptq" else None
        embeddings = quantize_embeddings(self.model, config, gram) if config is not None and not chosen_by_knapsack else None
        if fisher is None:
            fisher = self.fisher(input_ids, embeddings=chosen_by_knapsack) if stats is None else {}
        plan = self.plan(input_ids, fisher, profiles, gram)
        if chosen_by_knapsack:  # the knapsack chose the embeddings' bits along with the layers
            embeddings = quantize_embeddings(self.model, chosen_setting(self.model, config, plan), gram, self._priced_tables)
            self._priced_tables.clear()
        pipeline = self.pipeline
        if plan is not None:
            layer_configs = plan.layer_configs(self.recipe.stages, [c.level_field for c in pipeline.compressors])
            pipeline = build_pipeline(self.model, self.recipe.stages, self.recipe.calibration.statistics, layer_configs=layer_configs, **self.options)
        records: list[LayerRecord] = []
        for stage_index in self.gradient_stages:
            if input_ids is None:
                raise LlmpressError(f"method {self.recipe.stages[stage_index].method!r} needs gradients: pass calibration data")
            self.prune_in_walks(stage_index, input_ids)
            records += compress_from_gradients([(pipeline, stage_index)], input_ids)[0]
        if self.forward_stages:
            if isinstance(pipeline, DenseStatsPipeline):
                records += pipeline.run(input_ids if stats is None else None, fisher, self.forward_stages, stats=stats)
            else:
                records += pipeline.run(input_ids, fisher, self.forward_stages)
        tuning = self.tune_end_to_end(input_ids, records)
        fuse_untouched_stacks(self.model)  # experts nothing compressed: back to the model's own fused weights
        return RunResult(records, plan, pipeline.block_log, time.perf_counter() - start, tuning, embeddings)

    def prune_in_walks(self, stage_index: int, input_ids: torch.Tensor) -> None:
        """M-FAC `walks: W > 1`: walks 1..W−1 prune the model to ratio·w/W, each from gradients of
        the model as the previous walk left it; the caller's last walk prunes to the ratio. Between
        walks the pruned layers are dense nn.Linear again (zeros where pruned) so that gradients
        reach their weights."""
        stage = self.recipe.stages[stage_index]
        walks = getattr(stage, "walks", 1)
        if walks == 1:
            return
        for walk in range(1, walks):
            interim = stage.model_copy(update={"ratio": stage.ratio * walk / walks})
            pipeline = build_pipeline(self.model, [interim], self.recipe.calibration.statistics, **{**self.options, "on_layer": None})
            done = compress_from_gradients([(pipeline, 0)], input_ids)[0]
            densify(self.model, [r.name for r in done])

    def tune_end_to_end(self, input_ids: torch.Tensor | None, records: list[LayerRecord]) -> dict[str, Any] | None:
        """Step 4: E2E tuning of the GQSA layers of the stages that ask for it (their records'
        errors stay those measured when each layer was compressed)."""
        settings = tuning_settings(self.recipe.stages, "e2e", self.recipe.calibration.seed)
        if settings is None:
            return None
        if input_ids is None:
            raise LlmpressError("optimize: [e2e] trains on the calibration sequences: pass calibration data, not statistics")
        asked = {i for i, stage in enumerate(self.recipe.stages) if "e2e" in getattr(stage, "optimize", ())}
        modules = {r.name: self.model.get_submodule(r.name) for r in records if r.stage in asked}
        modules = {name: m for name, m in modules.items() if isinstance(m, GQSALinear)}
        if not modules:
            return None
        parallel = self.pipeline.parallel
        result = tune_end_to_end(self.model, modules, parallel.share(input_ids), settings, self.options["device"], parallel, self.options["progress"])
        for record in records:
            if record.name in modules:
                record.detail["e2e"] = result["kept"]
        return {"e2e": result}

"""Recipes: a YAML description of a compression run, validated with pydantic.

    name: svd-20
    calibration: {num_samples: 32, seq_len: 512, seed: 0}
    stages:
      - method: svd
        ratio: 0.2
        targets: [Linear]
        ignore: [lm_head]

Unknown keys and methods are rejected with the list of valid ones; `--set key=value`
overrides any field by dotted path (`stages.0.ratio=0.3`, `calibration.num_samples=64`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import re
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator, model_validator

from .budget import AllocationConfig
from .embeddings import EmbeddingsConfig

from .compressors import COMPRESSORS, StageConfig
from .errors import LlmpressError


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader without YAML 1.1's base-60 numbers: `pattern: 2:4` is the string
    "2:4" (as in YAML 1.2), not the integer 124."""


YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_INT = re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$")
_FLOAT = re.compile(
    r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9_]+(?:[eE][-+][0-9]+)?"
    r"|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)
YamlLoader.add_implicit_resolver("tag:yaml.org,2002:int", _INT, list("-+0123456789"))
YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=YamlLoader)


class CalibrationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str | None = Field(default=None, description="file, HF dataset id, or None for the built-in corpus")
    num_samples: int = Field(default=32, ge=0, description="0 = data-free (no calibration pass)")
    seq_len: int = Field(default=512, ge=8)
    seed: int = 0
    batch_size: int = Field(default=1, ge=1)
    chat_template: bool = Field(default=False, description="wrap each document in the tokenizer's chat template")
    text_field: str = "text"
    split: str = "train"
    statistics: Literal["sequential", "dense"] = Field(
        default="sequential",
        description="sequential: each block calibrated on the compressed model's outputs; dense: all "
        "statistics from the uncompressed model (faster, no error correction across blocks)",
    )
    moe: Literal["routed", "all"] = Field(
        default="routed",
        description="mixture-of-experts models: each expert's statistics from the tokens routed to it (routed), or "
        "from every calibration token (all: rare experts get real statistics; costs one expert pass per token)",
    )
    max_statistics_gib: float | None = Field(
        default=32.0,
        gt=0,
        description="most GiB of calibration statistics (float64 Grams) held at once on the device; a block whose "
        "layers need more (hundreds of per-expert Grams of an MoE block) is calibrated in several passes. null: no limit",
    )
    weighted_errors: bool = Field(
        default=False,
        description="collect every target's Gram to report calibration-weighted errors even for methods that need "
        "no Gram; data-free recipes then calibrate only for that",
    )


class Recipe(BaseModel):
    """A validated, immutable recipe: overrides build a new one (`load_recipe(..., overrides)`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "recipe"
    description: str = ""
    serve_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        default="bfloat16",
        description="the dtype the compressed model is served in: every size (reports, budgets) counts floating "
        "values at its width, indices and codes as stored",
    )
    calibration: CalibrationConfig = CalibrationConfig()
    stages: list[SerializeAsAny[StageConfig]] = Field(min_length=1)
    allocation: AllocationConfig | None = Field(default=None, description="global budget split across layers")
    embeddings: EmbeddingsConfig | None = Field(
        default=None,
        description="token embeddings and output head in W8/W4 (data-free, before the stages); null keeps them as they are",
    )

    @field_validator("stages", mode="before")
    @classmethod
    def _stage_configs(cls, stages: Any) -> list[StageConfig]:
        if not isinstance(stages, list):
            raise ValueError("stages must be a list of {method: ..., ...} mappings")
        parsed = []
        for index, stage in enumerate(stages):
            if isinstance(stage, StageConfig):
                parsed.append(stage)
                continue
            if not isinstance(stage, dict) or "method" not in stage:
                raise ValueError(f"stage {index} needs a 'method' key; methods: {sorted(COMPRESSORS)}")
            method = stage["method"]
            if method not in COMPRESSORS:
                raise ValueError(f"stage {index}: unknown method {method!r}; valid methods: {sorted(COMPRESSORS)}")
            parsed.append(COMPRESSORS[method].config_class.model_validate(stage))
        return parsed

    @model_validator(mode="after")
    def _embedding_choices_need_a_knapsack(self):
        if self.embeddings is None or not self.embeddings.choices:
            return self
        allocation = self.allocation
        if allocation is None or allocation.strategy != "knapsack" or allocation.unit != "bytes" or allocation.cost != "fisher":
            raise ValueError(
                f"embeddings (bits, group_size) choices {self.embeddings.choices} ask the knapsack to choose, which needs "
                "allocation: {strategy: knapsack, unit: bytes, cost: fisher}; or give one value each (embeddings.bits: 8)"
            )
        return self

    @model_validator(mode="after")
    def _allocated_stage_exists(self):
        if self.allocation is not None and self.allocation.candidates is not None:
            return self  # checked with the candidates' placeholder levels (_candidate_levels)
        if self.allocation is not None:
            if self.allocation.stage >= len(self.stages):
                raise ValueError(f"allocation.stage is {self.allocation.stage} but the recipe has {len(self.stages)} stages")
            stage = self.stages[self.allocation.stage]
            if COMPRESSORS[stage.method].level_field is None:
                levelled = sorted(m for m, c in COMPRESSORS.items() if c.level_field)
                raise ValueError(f"allocation: method {stage.method!r} has no level to allocate; methods that do: {levelled}")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _format_errors(error: ValidationError, prefix: tuple, valid_keys: list[str]) -> list[str]:
    lines = []
    for item in error.errors():
        loc = ".".join(str(part) for part in prefix + tuple(item["loc"]))
        if item["type"] == "extra_forbidden":
            lines.append(f"  {loc}: unknown key; valid keys here: {valid_keys}")
        else:
            lines.append(f"  {loc or '(recipe)'}: {item['msg']}")
    return lines


def _validate_stages(stages: Any, errors: list[str]) -> Any:
    """Each stage validated by its method's config class, errors located as stages.N.key."""
    if not isinstance(stages, list):
        return stages
    parsed = []
    for index, stage in enumerate(stages):
        if isinstance(stage, StageConfig):
            parsed.append(stage)
        elif not isinstance(stage, dict) or "method" not in stage:
            errors.append(f"  stages.{index}: needs a 'method' key; valid methods: {sorted(COMPRESSORS)}")
        elif stage["method"] not in COMPRESSORS:
            errors.append(f"  stages.{index}: unknown method {stage['method']!r}; valid methods: {sorted(COMPRESSORS)}")
        else:
            config_class = COMPRESSORS[stage["method"]].config_class
            try:
                parsed.append(config_class.model_validate(stage))
            except ValidationError as exc:
                errors.extend(_format_errors(exc, ("stages", index), sorted(config_class.model_fields)))
    return parsed


def _stage_level_from_allocation(data: dict, errors: list[str]) -> None:
    """The allocated stage's level (e.g. `ratio`) comes from `allocation.ratio`: fill it in, or
    report a conflicting value (a stage ratio that the allocation would silently override)."""
    allocation, stages = data.get("allocation"), data.get("stages")
    if not isinstance(allocation, dict) or not isinstance(stages, list):
        return
    if isinstance(allocation.get("candidates"), dict):
        _candidate_levels(allocation["candidates"], stages, errors)
        return
    if allocation.get("ratio") is None:
        if allocation.get("max_size") is not None:  # the knapsack sets each layer's level: a placeholder for validation
            allocation = {**allocation, "ratio": 0.5}
        else:
            return
    index = allocation.get("stage", 0)
    if not isinstance(index, int) or not 0 <= index < len(stages) or not isinstance(stages[index], dict):
        return
    method = COMPRESSORS.get(stages[index].get("method"))
    if method is None or method.level_field is None:
        return
    stage = stages[index] = dict(stages[index])
    given = stage.setdefault(method.level_field, allocation["ratio"])
    if given != allocation["ratio"] and allocation.get("max_size") is None:
        errors.append(
            f"  stages.{index}.{method.level_field}: {given} conflicts with allocation.ratio {allocation['ratio']}; "
            "the allocation sets each layer's level, drop one of them"
        )


def _candidate_levels(candidates: dict, stages: list, errors: list[str]) -> None:
    """Candidate stages of a knapsack across methods get a placeholder level (their first
    candidate; the knapsack sets each layer's); a level written in the stage would be ignored."""
    for index, levels in candidates.items():
        index = int(index) if isinstance(index, str) and index.isdigit() else index  # JSON keys are strings
        if not isinstance(index, int) or not 0 <= index < len(stages) or not isinstance(stages[index], dict):
            errors.append(f"  allocation.candidates: {index!r} is not a stage index (the recipe has {len(stages)} stages)")
            continue
        method = COMPRESSORS.get(stages[index].get("method"))
        if method is None or not isinstance(levels, list) or not levels:
            continue
        if method.level_field is None:  # one fixed option: the stage as written
            if levels != [0] and levels != [0.0]:
                errors.append(
                    f"  allocation.candidates.{index}: method {method.method!r} has no level to allocate, so its only "
                    f"candidate is [0] (the stage as written); got {levels}"
                )
            continue
        placeholder = next((v for v in levels if isinstance(v, (int, float)) and v > 0), levels[0])
        if stages[index].get(method.level_field, placeholder) != placeholder:  # (a dumped recipe has the placeholder)
            errors.append(
                f"  stages.{index}.{method.level_field}: set by the allocation per layer (allocation.candidates.{index}); drop it"
            )
            continue
        stages[index] = {**stages[index], method.level_field: placeholder}


def with_calibration(recipe: Recipe, **changes: Any) -> Recipe:
    """A new recipe whose calibration section has `changes` (None values ignored), validated."""
    changes = {k: v for k, v in changes.items() if v is not None}
    if not changes:
        return recipe
    data = recipe.model_dump(mode="json")
    data["calibration"] = {**data["calibration"], **changes}
    return parse_recipe(data, "<recipe with calibration " + ", ".join(f"{k}={v}" for k, v in changes.items()) + ">")


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `key.path=value` strings (values parsed as YAML) to a recipe mapping."""
    for item in overrides:
        if "=" not in item:
            raise LlmpressError(f"--set expects key=value, got {item!r} (example: --set stages.0.ratio=0.3)")
        key, _, raw = item.partition("=")
        value = load_yaml(raw)
        node: Any = data
        parts = key.strip().split(".")
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise LlmpressError(f"--set {key}: {'.'.join(parts[:depth]) or 'recipe'} has {len(node)} entries")
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                raise LlmpressError(f"--set {key}: {'.'.join(parts[:depth])} is not a mapping or list")
    return data


def parse_recipe(data: dict | Recipe, source: str = "<recipe>", overrides: list[str] | None = None) -> Recipe:
    if isinstance(data, Recipe):
        if not overrides:
            return data
        data = data.model_dump(mode="json")
    if not isinstance(data, dict):
        raise LlmpressError(f"recipe {source} must be a YAML mapping with a 'stages' list")
    data = apply_overrides(data, overrides or [])
    errors: list[str] = []
    _stage_level_from_allocation(data, errors)
    data = {**data, "stages": _validate_stages(data["stages"], errors)} if "stages" in data else data
    recipe = None
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        for item in exc.errors():
            top = item["loc"][0] if item["loc"] else None
            if top == "stages" and errors:
                continue  # already reported per stage
            keys = {"calibration": sorted(CalibrationConfig.model_fields), "allocation": sorted(AllocationConfig.model_fields)}.get(
                top, sorted(Recipe.model_fields)
            )
            errors.extend(_format_errors(ValidationError.from_exception_data(exc.title, [item]), (), keys))
    if errors:
        raise LlmpressError(f"invalid recipe {source}:\n" + "\n".join(_blame_overrides(errors, overrides or [])))
    return recipe


def _blame_overrides(errors: list[str], overrides: list[str]) -> list[str]:
    """Errors located at a key that a --set override wrote name that override, not the file."""
    blamed = []
    for line in errors:
        loc = line.strip().split(":", 1)[0]
        culprit = next((o for o in overrides if loc == o.partition("=")[0].strip() or loc.startswith(o.partition("=")[0].strip() + ".")), None)
        blamed.append(f"{line} (from --set {culprit})" if culprit else line)
    return blamed


# `llmpress compress MODEL` with no --recipe: recipes/w4-g16.yaml (the test suite checks they agree)
DEFAULT_RECIPE: dict[str, Any] = {
    "name": "w4-g16",
    "description": "W4 (GQSA with every group kept): INT4 groups of 16 with GPTQ-style error feedback and a scale refit",
    "calibration": {"num_samples": 32, "seq_len": 512, "seed": 0},
    "embeddings": {"bits": 8, "group_size": 64},
    "stages": [{"method": "gqsa", "ratio": 0.0, "group_size": 16, "refit_scales": True, "targets": ["Linear"], "ignore": ["lm_head"]}],
}


def load_recipe(path: str | Path | dict | Recipe, overrides: list[str] | None = None) -> Recipe:
    """A validated Recipe from a YAML file, a mapping or a Recipe, with `--set` overrides applied."""
    if isinstance(path, (dict, Recipe)):
        return parse_recipe(path, overrides=overrides)
    path = Path(path)
    if not path.is_file():
        raise LlmpressError(f"recipe file {str(path)!r} not found; examples live in recipes/ (e.g. recipes/svd-20.yaml)")
    try:
        data = load_yaml(path.read_text())
    except yaml.YAMLError as exc:
        raise LlmpressError(f"recipe {path} is not valid YAML: {exc}") from None
    return parse_recipe(data, str(path), overrides)


def auto_recipe(ratio: float | None = None, max_size: str | int | None = None) -> dict[str, Any]:
    """The recommended recipe for a size: one knapsack across W8 and W4 (GPTQ, groups of 64); for
    budgets that remove 60% of the Linears' bytes or more also W4 g32 with 25–75% of its groups
    removed and whitened SVD, from 70% W3 and W2 (GPTQ, g64); priced by the Fisher cost, in bytes
    as served (bf16). Embeddings and head: W8 (groups of 64) with a `ratio` (a fraction of the
    decoder Linears' bytes: recipes/auto-*.yaml are this at 30, 50, 70 and 80% removed); with a
    whole-model `max_size` (`--max-size`) the same knapsack chooses W8 or W4 (g64 or g32; GPTQ on
    the head input's Gram, `method: gptq`) for them, since on
    small models and large vocabularies they are a large share of the size (eval/results/embeddings).
    Measured against other candidate sets in eval/results/budget (rows "auto v1/v2/v3"; this is v3)."""
    budget = {"ratio": ratio} if max_size is None else {"max_size": max_size}
    embeddings = {"bits": 8, "group_size": 64} if max_size is None else {"bits": [8, 4], "group_size": [64, 32], "method": "gptq"}
    every_linear = {"targets": ["Linear"], "ignore": ["lm_head"]}
    return {
        "name": f"auto-{round(100 * ratio)}" if max_size is None else f"auto-{max_size}",
        "description": "The best model for a size: embeddings and head in "
        + ("W8 (groups of 64)" if max_size is None else "W8 or W4 in groups of 64 or 32 (chosen by the knapsack; GPTQ against the head's inputs)")
        + ", and every decoder Linear gets W8 "
        "or W4 (GPTQ, groups of 64) or stays dense; budgets that remove 60% or more of the Linears' bytes also offer W4 "
        "g32 with 25/50/75% of its groups removed and whitened SVD at a rank, and from 70% W3 and W2 (GPTQ, g64). One "
        "knapsack over bf16 bytes as served minimizes the summed Fisher-weighted error (eval/results/budget).",
        "serve_dtype": "bfloat16",
        "calibration": {"num_samples": 32, "seq_len": 512, "seed": 0},
        "embeddings": embeddings,
        "stages": [
            {"method": "gptq", "bits": 8, "group_size": 64, **every_linear},
            {"method": "gptq", "bits": 4, "group_size": 64, **every_linear},
            {"method": "gqsa", "group_size": 32, **every_linear},
            {"method": "whitened_svd", **every_linear},
            {"method": "gptq", "bits": 3, "group_size": 64, **every_linear},
            {"method": "gptq", "bits": 2, "group_size": 64, **every_linear},
        ],
        "allocation": {
            "strategy": "knapsack",
            "unit": "bytes",
            **budget,
            "cost": "fisher",
            "fisher_samples": 8,
            "candidates": {0: [0.0], 1: [0.0], 2: [0.25, 0.5, 0.75], 3: [round(0.1 * i, 1) for i in range(1, 10)], 4: [0.0], 5: [0.0]},
            "from_ratio": {2: 0.6, 3: 0.6, 4: 0.7, 5: 0.7},
        },
    }


def with_max_size(recipe: Recipe, size: str) -> Recipe:
    """`recipe` with its knapsack's budget replaced by a whole-model size as served (`--max-size`)."""
    if recipe.allocation is None or recipe.allocation.strategy != "knapsack":
        raise LlmpressError(
            f"--max-size needs a recipe with a knapsack allocation, and {recipe.name!r} has none: leave --recipe out "
            "(the auto recipe: W8 and W4 and, for tight budgets, group-sparse W4, whitened SVD, W3 and W2 across layers) or add allocation: {strategy: knapsack, unit: bytes}"
        )
    data = recipe.model_dump(mode="json")
    data["allocation"].update({"ratio": None, "max_size": size, "unit": "bytes"})
    return parse_recipe(data, f"<{recipe.name} with --max-size {size}>")

"""transformers integration: `AutoModelForCausalLM.from_pretrained(dir)` for llmpress checkpoints.

A checkpoint's config.json carries `quantization_config = {"quant_method": "llmpress",
"format_version": 3, "modules": {name: spec}, "expert_stacks": [names], "embeddings": {...}}`. On load, the quantizer
turns each listed MoE experts module of the freshly built (meta-device) model into per-expert
Linears (compress/experts.py), then replaces each listed nn.Linear by an empty module of the
spec's format, and quantized token embeddings (with a head reading their table) are rebuilt;
transformers fills in the stored factors by name like any other weights.

Since version 2 the tensors are stored under the model's own parameter names
(`save_pretrained(save_original_format=False)`), so transformers' checkpoint conversions (which
fuse per-expert weights of original MoE checkpoints into 3-D stacks) must not run on them.
"""

from __future__ import annotations

from typing import Any

from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .checkpoint_check import FORMAT_VERSION
from .embeddings import build_for_loading, tie_after_loading
from .experts import linearize_experts
from .modules import CompressedLinear, build_module, tie_shared_dictionaries
from .targets import set_submodule

QUANT_METHOD = "llmpress"


class LlmpressConfig(QuantizationConfigMixin):
    """The `quantization_config` block of an llmpress checkpoint."""

    def __init__(
        self,
        modules: dict[str, dict[str, Any]] | None = None,
        format_version: int = FORMAT_VERSION,
        recipe: str | None = None,
        expert_stacks: list[str] | None = None,
        embeddings: dict[str, Any] | None = None,
        **kwargs,
    ):
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.recipe = recipe
        self.modules = dict(modules or {})
        self.expert_stacks = list(expert_stacks or [])
        self.embeddings = embeddings  # quantized token embeddings (compress/embeddings.py), or None

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": QUANT_METHOD,
            "format_version": self.format_version,
            "recipe": self.recipe,
            "modules": self.modules,
            "expert_stacks": self.expert_stacks,
            "embeddings": self.embeddings,
        }

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()


class LlmpressHfQuantizer(HfQuantizer):
    """Builds llmpress modules before weight loading; the checkpoint already holds their factors."""

    requires_calibration = True

    def validate_environment(self, *args, **kwargs):
        version = self.quantization_config.format_version
        if version > FORMAT_VERSION:
            raise ValueError(
                f"this checkpoint uses llmpress format version {version}, newer than this install "
                f"supports ({FORMAT_VERSION}); upgrade llmpress"
            )

    def _process_model_before_weight_loading(self, model, dtype=None, **kwargs):
        import torch

        dtype = dtype if isinstance(dtype, torch.dtype) else model.dtype
        linearize_experts(model, self.quantization_config.expert_stacks)
        built = set()
        if self.quantization_config.embeddings:
            built = build_for_loading(model, self.quantization_config.embeddings, dtype)
        for name, spec in self.quantization_config.modules.items():
            if name not in built:
                set_submodule(model, name, build_module(spec, dtype=dtype, device="meta"))
        return model

    def update_weight_conversions(self, weight_conversions, model):
        """No conversion for version-2 checkpoints: they hold the model's own parameter names."""
        if self.quantization_config.format_version >= 2:
            return []
        return super().update_weight_conversions(weight_conversions, model)

    def _process_model_after_weight_loading(self, model, **kwargs):
        tie_shared_dictionaries(model)  # layers sharing one stored dictionary (CoSpaDi groups)
        tie_after_loading(model)  # an output head reading the quantized embedding table
        for module in model.modules():
            if isinstance(module, CompressedLinear):
                module.after_loading()  # layouts of earlier checkpoints (W3 codes, dictionary index rows) rewritten
        return model

    def is_serializable(self, safe_serialization=None):
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Idempotent registration with transformers' quantizer registry."""
    AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(QUANT_METHOD, LlmpressConfig)
    AUTO_QUANTIZER_MAPPING.setdefault(QUANT_METHOD, LlmpressHfQuantizer)


register()

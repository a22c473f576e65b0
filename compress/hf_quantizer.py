"""transformers integration: `AutoModelForCausalLM.from_pretrained(dir)` for llmpress checkpoints.

A checkpoint's config.json carries `quantization_config = {"quant_method": "llmpress",
"format_version": 1, "modules": {name: spec}}`. On load, the quantizer replaces each listed
nn.Linear of the freshly built (meta-device) model by an empty module of the spec's format;
transformers then fills in the stored factors by name like any other weights.
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
from .modules import build_module, tie_shared_dictionaries
from .targets import set_submodule

QUANT_METHOD = "llmpress"


class LlmpressConfig(QuantizationConfigMixin):
    """The `quantization_config` block of an llmpress checkpoint."""

    def __init__(
        self,
        modules: dict[str, dict[str, Any]] | None = None,
        format_version: int = FORMAT_VERSION,
        recipe: str | None = None,
        **kwargs,
    ):
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.recipe = recipe
        self.modules = dict(modules or {})

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": QUANT_METHOD,
            "format_version": self.format_version,
            "recipe": self.recipe,
            "modules": self.modules,
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
        for name, spec in self.quantization_config.modules.items():
            set_submodule(model, name, build_module(spec, dtype=dtype, device="meta"))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        tie_shared_dictionaries(model)  # layers sharing one stored dictionary (CoSpaDi groups)
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

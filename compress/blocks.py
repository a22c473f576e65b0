"""Find a model's decoder blocks without assuming `model.model.layers`.

First choice: the ModuleList whose children are the classes in the model's own
`_no_split_modules` (what accelerate uses to place whole blocks on one device). Then a list of
known attribute paths; last, the longest ModuleList of identical modules that contain Linears.
"""

from __future__ import annotations

from torch import nn

from .errors import LlmpressError

KNOWN_BLOCK_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2/3, Gemma2/3 text, Phi-3
    "model.language_model.layers",  # Gemma3 / multimodal wrappers
    "model.decoder.layers",  # OPT
    "gpt_neox.layers",  # GPT-NeoX / Pythia
    "transformer.h",  # GPT-2, Falcon, Bloom
    "transformer.blocks",  # MPT
)


def _get(model: nn.Module, path: str) -> nn.Module | None:
    module = model
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _has_linear(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Linear) for m in module.modules())


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return (attribute path, ModuleList) of the repeated decoder blocks."""
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0
    ]
    by_class = [
        (name, module)
        for name, module in candidates
        if no_split and all(type(child).__name__ in no_split for child in module)
    ]
    if by_class:
        return max(by_class, key=lambda item: len(item[1]))
    for path in KNOWN_BLOCK_PATHS:
        module = _get(model, path)
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return path, module
    homogeneous = [
        (name, module)
        for name, module in candidates
        if len({type(child) for child in module}) == 1 and _has_linear(module[0])
    ]
    if homogeneous:
        return max(homogeneous, key=lambda item: len(item[1]))
    raise LlmpressError(
        f"could not find the decoder blocks of {type(model).__name__}: no ModuleList of "
        f"{sorted(no_split) or 'repeated blocks'} and none of {list(KNOWN_BLOCK_PATHS)}. "
        "Please report the architecture"
    )

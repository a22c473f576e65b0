"""Select which Linear layers a recipe stage compresses, as llm-compressor does.

A target or ignore entry is a class name (`Linear`, which also matches llmpress's compressed
linear modules, so a refining stage like EoRA can follow any method), an exact module name
(`model.layers.0.mlp.down_proj`), or a regular expression prefixed with `re:` matched against
the full module name (`re:.*mlp\\.down_proj$`). `lm_head` and embeddings are never compressed
unless named explicitly as targets.
"""

from __future__ import annotations

import re

from torch import nn

DEFAULT_IGNORE = ("lm_head",)


def _matches(name: str, module: nn.Module, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    if name == pattern:
        return True
    if pattern == "Linear" and hasattr(module, "in_features") and hasattr(module, "out_features"):
        return True
    return any(cls.__name__ == pattern for cls in type(module).__mro__)


def is_target(name: str, module: nn.Module, targets: list[str], ignore: list[str]) -> bool:
    if any(_matches(name, module, pattern) for pattern in ignore):
        return False
    return any(_matches(name, module, pattern) for pattern in targets)


def match_linears(
    model: nn.Module, targets: list[str], ignore: list[str], prefix: str = "", kind: type = nn.Linear
) -> dict[str, nn.Module]:
    """Every module of type `kind` (default nn.Linear) under `model` selected by `targets` and
    not by `ignore`, by full name."""
    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, kind):
            continue
        full = f"{prefix}.{name}" if prefix and name else (prefix or name)
        if is_target(full, module, targets, ignore):
            found[full] = module
    return found


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)

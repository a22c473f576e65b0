"""Select which Linear layers a recipe stage compresses, as llm-compressor does.

A target or ignore entry is a class name (`Linear`, which also matches llmpress's compressed
linear modules, so a refining stage like EoRA can follow any method), an exact module name
(`model.layers.0.mlp.down_proj`), or a regular expression prefixed with `re:` matched against
the full module name (`re:.*mlp\\.down_proj$`). `lm_head` and embeddings are never compressed
unless named explicitly as targets.

Experts of mixture-of-experts models are per-expert Linears (compress/experts.py) named
`<experts>.gate_up_proj.<e>` / `<experts>.down_proj.<e>`: `Linear` selects them like any other,
`experts` (or the experts module's class name, e.g. `Qwen3MoeExperts`) selects only them, and a
regex can pick a projection or single experts. Routers are skipped unless named exactly.
"""

from __future__ import annotations

import re

from torch import nn

from .experts import EXPERTS_TARGET, expert_linear_names, router_names

DEFAULT_IGNORE = ("lm_head",)


def _matches(name: str, module: nn.Module, pattern: str, experts: nn.Module | None = None) -> bool:
    """Whether `pattern` selects the module; `experts`: the experts module it belongs to, if any."""
    if experts is not None and (
        pattern.lower() == EXPERTS_TARGET or any(cls.__name__ == pattern for cls in type(experts).__mro__)
    ):
        return True
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    if name == pattern:
        return True
    if pattern == "Linear" and hasattr(module, "in_features") and hasattr(module, "out_features"):
        return True
    return any(cls.__name__ == pattern for cls in type(module).__mro__)


def is_target(
    name: str, module: nn.Module, targets: list[str], ignore: list[str], experts: nn.Module | None = None
) -> bool:
    if any(_matches(name, module, pattern, experts) for pattern in ignore):
        return False
    return any(_matches(name, module, pattern, experts) for pattern in targets)


def match_linears(
    model: nn.Module, targets: list[str], ignore: list[str], prefix: str = "", kind: type = nn.Linear
) -> dict[str, nn.Module]:
    """Every module of type `kind` (default nn.Linear) under `model` selected by `targets` and
    not by `ignore`, by full name. Routers are left out unless a target names them exactly."""
    experts = expert_linear_names(model)
    routers = router_names(model)
    found = {}
    for name, module in model.named_modules():
        if not isinstance(module, kind):
            continue
        full = f"{prefix}.{name}" if prefix and name else (prefix or name)
        if name in routers and full not in targets:
            continue
        stack = model.get_submodule(experts[name]) if name in experts else None
        if is_target(full, module, targets, ignore, stack):
            found[full] = module
    return found


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)

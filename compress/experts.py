"""Mixture-of-experts layers as one nn.Linear per expert, so that everything llmpress does to a
Linear (targets, calibration hooks, every method, every format and kernel, checkpoints) applies
to experts unchanged.

transformers v5 stores a layer's experts as fused 3-D parameters inside an "experts" module
(`Qwen3MoeExperts.gate_up_proj`: (experts, 2·inter, hidden); `down_proj`: (experts, hidden,
inter)), declared through `use_experts_implementation`, whose flags say the layout (transposed,
gate and up interleaved, biases, a gate or not). `linearize_experts` turns each such module in
place into its per-expert form: the fused parameters become `nn.ModuleList`s of Linears named
`<experts>.gate_up_proj.<e>` and `<experts>.down_proj.<e>` (views of the fused storage, copies
for layouts stored transposed),
and its class gains a forward over those Linears. The model's own router and MoE block are
untouched, and so are the experts module's activation and gate function (`_apply_gate`, e.g.
gpt-oss's clamped SwiGLU): only where the weights live changes. The forward computes only the
experts that received tokens; during calibration with `calibration.moe: all` every expert also
runs on every token (its statistics then see the whole calibration set) while the output stays
the routed one. `fuse_untouched_stacks` restores the fused parameters of stacks nothing compressed.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

# the keyword a recipe target uses for every per-expert Linear (any class name of an experts
# module, e.g. Qwen3MoeExperts, selects that module's Linears too)
EXPERTS_TARGET = "experts"


def _up_name(module: nn.Module) -> str:
    """The experts' first projection: fused gate and up, or up alone (`has_gate` false)."""
    return "gate_up_proj" if module.has_gate else "up_proj"


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers v5 experts module with its fused 3-D weights (declared through
    `use_experts_implementation`, which sets the layout flags read here)."""
    if isinstance(module, PerExpertLinears) or not hasattr(module, "is_transposed") or not hasattr(module, "has_gate"):
        return False
    up = getattr(module, _up_name(module), None)
    down = getattr(module, "down_proj", None)
    return isinstance(up, torch.Tensor) and isinstance(down, torch.Tensor) and up.dim() == 3 and down.dim() == 3


class PerExpertLinears:
    """Mixed into an experts module's own class by `linearize_experts`: its projections are
    ModuleLists of per-expert Linears (the fused class's `_apply_gate`, `act_fn` and flags stay)."""

    calibrate_all_experts: bool = False  # set by `all_experts_calibrated` for a calibration pass

    @property
    def up_name(self) -> str:
        return _up_name(self)

    @property
    def expert_count(self) -> int:
        return len(self.down_proj)

    def expert_forward(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """One expert on its tokens: up (and gate) projection, activation, down projection."""
        hidden = getattr(self, self.up_name)[index](x)
        hidden = self._apply_gate(hidden) if self.has_gate else self.act_fn(hidden)
        out = self.down_proj[index](hidden)
        return self.post_expert_norm(out) if getattr(self, "has_post_expert_norm", False) else out

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """Σ over each token's routed experts of routing weight × expert(token), like the fused
        eager forward. Slots are sorted by expert once (one host sync for the counts)."""
        num_experts = self.expert_count
        top_k = top_k_index.shape[-1]
        expert_of_slot = top_k_index.reshape(-1)
        order = torch.argsort(expert_of_slot, stable=True)
        counts = torch.bincount(expert_of_slot, minlength=num_experts).tolist()
        token_of_slot = order // top_k
        weight_of_slot = top_k_weights.reshape(-1)[order]
        accumulate = torch.float32 if hidden_states.dtype in (torch.float16, torch.bfloat16) else hidden_states.dtype
        out = torch.zeros(hidden_states.shape, dtype=accumulate, device=hidden_states.device)
        start = 0
        for index in range(num_experts):  # ids >= num_experts (expert-parallel sentinels) sort last: never read
            count = counts[index]
            tokens = token_of_slot[start : start + count]
            weights = weight_of_slot[start : start + count, None]
            start += count
            if self.calibrate_all_experts:  # every token through this expert; only routed ones count
                expert_out = self.expert_forward(index, hidden_states)[tokens]
            elif count == 0:
                continue
            else:
                expert_out = self.expert_forward(index, hidden_states[tokens])
            out.index_add_(0, tokens, (expert_out * weights).to(accumulate))
        return out.to(hidden_states.dtype)


_PER_EXPERT_CLASSES: dict[type, type] = {}


def _per_expert_class(fused: type) -> type:
    """`fused` with PerExpertLinears mixed in (one class per experts class; importable by name so
    that a model holding it can still be pickled)."""
    if fused not in _PER_EXPERT_CLASSES:
        name = f"PerExpert{fused.__name__}"
        cls = type(name, (PerExpertLinears, fused), {"__module__": __name__, "__qualname__": name, "fused_class": fused})
        globals()[name] = cls
        _PER_EXPERT_CLASSES[fused] = cls
    return _PER_EXPERT_CLASSES[fused]


def _projection_linears(module: nn.Module, name: str) -> nn.ModuleList:
    """One Linear per expert whose weight is a view of the fused (experts, ...) parameter (a copy
    for transposed layouts)."""
    fused = getattr(module, name)
    requires_grad = fused.requires_grad
    fused = fused.detach()
    bias = getattr(module, f"{name}_bias").detach() if module.has_bias else None
    linears = []
    for index in range(fused.shape[0]):
        # transposed layouts (gpt-oss, Llama-4) are copied: every Linear weight is a contiguous (out, in)
        weight = fused[index].T.contiguous() if module.is_transposed else fused[index]
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=requires_grad)
        if bias is not None:
            linear.bias = nn.Parameter(bias[index], requires_grad=requires_grad)
        linears.append(linear)
    return nn.ModuleList(linears)


def linearize(module: nn.Module) -> nn.Module:
    """Turn one fused experts module into its per-expert form, in place."""
    for name in (_up_name(module), "down_proj"):
        linears = _projection_linears(module, name)
        delattr(module, name)
        if module.has_bias:
            delattr(module, f"{name}_bias")
        setattr(module, name, linears)
    module.__class__ = _per_expert_class(type(module))
    # its weights are the Linears' now: transformers' weight init (`_init_weights`, which tests
    # isinstance against the fused class) must not look for the fused parameters
    module._is_hf_initialized = True
    return module


def fuse(module: nn.Module) -> nn.Module:
    """Back to the fused 3-D parameters (every expert Linear must still be an nn.Linear)."""
    cls = type(module).fused_class
    for name in (module.up_name, "down_proj"):
        linears = getattr(module, name)
        weights = [linear.weight.T if module.is_transposed else linear.weight for linear in linears]
        requires_grad = linears[0].weight.requires_grad
        biases = [linear.bias for linear in linears] if module.has_bias else None
        delattr(module, name)
        setattr(module, name, nn.Parameter(torch.stack(weights).detach().contiguous(), requires_grad=requires_grad))
        if biases is not None:
            setattr(module, f"{name}_bias", nn.Parameter(torch.stack(biases).detach(), requires_grad=requires_grad))
    module.__class__ = cls
    return module


def linearize_experts(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Linearize the fused experts modules of `model` (all, or those named); their names."""
    found = [name for name, module in model.named_modules() if is_fused_experts(module)]
    if names is not None:
        missing = sorted(set(names) - set(found))
        if missing:
            raise ValueError(f"no fused experts module at {missing[:3]} in {type(model).__name__}")
        found = [name for name in found if name in set(names)]
    for name in found:
        linearize(model.get_submodule(name))
    return found


def per_expert_stacks(model: nn.Module) -> dict[str, nn.Module]:
    """The linearized experts modules of `model`, by name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, PerExpertLinears)}


def fuse_untouched_stacks(model: nn.Module) -> list[str]:
    """Fuse back every linearized stack whose Linears are all still plain nn.Linear (nothing
    compressed them): the model is then exactly as loaded there. Names of the stacks that stay
    per-expert (they hold compressed experts)."""
    kept = []
    for name, module in per_expert_stacks(model).items():
        linears = list(getattr(module, module.up_name)) + list(module.down_proj)
        if all(type(linear) is nn.Linear for linear in linears):
            fuse(module)
        else:
            kept.append(name)
    return kept


def expert_linear_names(model: nn.Module) -> dict[str, str]:
    """Every per-expert layer's full name -> the name of its experts module."""
    names = {}
    for stack_name, module in per_expert_stacks(model).items():
        for projection in (module.up_name, "down_proj"):
            for index in range(module.expert_count):
                names[f"{stack_name}.{projection}.{index}"] = stack_name
    return names


def router_names(model: nn.Module) -> set[str]:
    """Linears that route tokens to experts: a Linear beside an experts module (same parent) with
    one output per expert, or a single output (a shared expert's gate). Never compressed unless a
    target names them exactly (llm-compressor's MoE recipes leave routers alone as well)."""
    routers = set()
    for parent_name, parent in model.named_modules():
        experts = [child for child in parent.children() if is_fused_experts(child) or isinstance(child, PerExpertLinears)]
        if not experts:
            continue
        counts = {_num_experts(child) for child in experts} | {1}
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Linear) and child.out_features in counts:
                routers.add(f"{parent_name}.{child_name}" if parent_name else child_name)
    return routers


def _num_experts(module: nn.Module) -> int:
    return module.expert_count if isinstance(module, PerExpertLinears) else module.down_proj.shape[0]


@contextmanager
def all_experts_calibrated(module: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within: every per-expert stack under `module` runs each expert on every token (outputs unchanged)."""
    stacks = [m for m in module.modules() if isinstance(m, PerExpertLinears)] if enabled else []
    for stack in stacks:
        stack.calibrate_all_experts = True
    try:
        yield
    finally:
        for stack in stacks:
            stack.calibrate_all_experts = False

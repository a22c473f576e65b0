"""Training GQSA's quantization parameters on calibration data, weights frozen (the GQSA paper's
BQPO and E2E-OQP stages; recipe: `optimize: [bqpo, e2e]` on a `gqsa` stage).

What trains, with everything else frozen and no label used:

- block-wise (`bqpo`, `tune_block`): inside the sequential pipeline, right after a block is
  compressed, minimize ‖block(X̃) − Y‖² where X̃ are the block's inputs in the compressed model
  and Y the dense model's outputs of the same block (the dense stream, as OmniQuant and
  EfficientQAT's Block-AP do). `bqpo_codes: trained` (default; the paper's block-wise weight
  recovery) trains the kept weights' positions on the integer grid, starting from the sweep's
  error-corrected values and rounded straight-through, so codes may change, together with the
  scales (as log-factors of the closed-form ones, so one step size fits every layer). Zero
  points stay. `bqpo_codes: fixed` trains the scales alone, codes fixed: an exact gradient (Ŵ
  is linear in the scales) but far less freedom (SmolLM2 W4S50: eval/results/pruning).
  The block's error over all its calibration batches is measured before and after; the trained
  values are kept only if it went down (never a worse block than the closed-form start).
- end-to-end (`e2e`, `tune_end_to_end`): once every block is done, the language-model loss of
  the calibration sequences through the whole compressed model; codes and zero points fixed,
  the scales of every tuned layer train (EfficientQAT's E2E-QP, the paper's E2E-OQP).

With several ranks (torchrun) each computes gradients on its share of the sequences and they
are averaged before every step, so every rank keeps identical parameters.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import block_output, to_device
from .compressors import StageConfig
from .compressors.gqsa import LEVELS
from .distributed import Parallel, current
from .modules.gqsa import GQSALinear, pack_int4, unpack_int4
from .targets import set_submodule

logger = logging.getLogger("compress")

POSITION_LR_FACTOR = 10.0  # grid positions move in quantization steps, scales by log-factors


@dataclass(frozen=True)
class TuningSettings:
    epochs: int
    lr: float
    batch_size: int  # calibration batches per optimizer step
    seed: int = 0


def tuning_settings(stages: list[StageConfig], kind: str, seed: int = 0) -> TuningSettings | None:
    """The settings of the first stage whose `optimize` lists `kind` ("bqpo" or "e2e"), or None."""
    for stage in stages:
        if kind in getattr(stage, "optimize", ()):
            return TuningSettings(getattr(stage, f"{kind}_epochs"), getattr(stage, f"{kind}_lr"), getattr(stage, f"{kind}_batch_size"), seed)
    return None


def take_tuning_sources(root: nn.Module) -> tuple[dict[str, GQSALinear], dict[str, torch.Tensor | None]]:
    """The GQSA layers under `root` that their compressor marked for BQPO, and the continuous
    weights it left on them (None: codes stay fixed), removed from the modules (names relative
    to `root`)."""
    modules, continuous = {}, {}
    for name, module in root.named_modules():
        if isinstance(module, GQSALinear) and "tuning_source" in module.__dict__:
            modules[name] = module
            continuous[name] = module.__dict__.pop("tuning_source")
    return modules, continuous


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


class TunableGQSA(nn.Module):
    """Stands in for a GQSALinear while it trains.

    Ŵ[r, G_a] = (q − z)·s with s = s₀·exp(θ) and q = clamp(round(u) + z, 0, 15): u are the
    weights' positions on the integer grid (in steps of s), z the fixed zero points. Without
    continuous weights u = q₀ − z, integers that stay put (codes fixed, scales train); with them
    u = c/s₀ trains too (rounded straight-through), so codes may change: the weights' own
    recovery. At θ = 0 and the initial u it computes exactly what the module does."""

    def __init__(self, module: GQSALinear, continuous: torch.Tensor | None):
        super().__init__()
        self.target = [module]  # a list: not registered as a submodule (its tensors stay frozen)
        scales = module.scales.detach().float().clone()
        self.register_buffer("base_scales", scales)
        self.log_scale = nn.Parameter(torch.zeros_like(scales))
        self.register_buffer("zero", module.zeros.float().clone())
        if continuous is None:
            self.register_buffer("position", unpack_int4(module.qweight).float() - self.zero[..., None])
        else:
            safe = torch.where(scales.abs() < 1e-12, torch.full_like(scales, 1e-12), scales)
            self.position = nn.Parameter(continuous.detach().float().to(scales.device) / safe[..., None])
        self.bias = None if module.bias is None else module.bias.detach()

    @property
    def module(self) -> GQSALinear:
        return self.target[0]

    def scales(self) -> torch.Tensor:
        return self.base_scales * self.log_scale.exp()

    def codes(self) -> torch.Tensor:
        return torch.clamp(round_ste(self.position) + self.zero[..., None], 0, LEVELS)

    def weight(self) -> torch.Tensor:
        return self.module.place_groups((self.codes() - self.zero[..., None]) * self.scales()[..., None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight().to(x.dtype), bias)

    @torch.no_grad()
    def write_back(self) -> None:
        """Store the trained scales (and codes) in the module."""
        m = self.module
        m.qweight.copy_(pack_int4(self.codes().round()))
        m.scales.data.copy_(self.scales().to(m.scales.dtype))


@contextmanager
def standing_in(root: nn.Module, modules: dict[str, GQSALinear], continuous: dict[str, torch.Tensor | None]) -> Iterator[dict[str, TunableGQSA]]:
    """Within: every named module of `root` replaced by its TunableGQSA, all of `root`'s own
    parameters frozen; afterwards the modules are back (trained values only after write_back)."""
    frozen = [(p, p.requires_grad) for p in root.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    stand_ins = {name: TunableGQSA(module, continuous.get(name)) for name, module in modules.items()}
    for name, stand_in in stand_ins.items():
        set_submodule(root, name, stand_in)
    try:
        yield stand_ins
    finally:
        for name, module in modules.items():
            set_submodule(root, name, module)
        for p, flag in frozen:
            p.requires_grad_(flag)


def _optimizer(stand_ins: dict[str, TunableGQSA], lr: float) -> torch.optim.Optimizer:
    scales = [s.log_scale for s in stand_ins.values()]
    positions = [s.position for s in stand_ins.values() if isinstance(s.position, nn.Parameter)]
    groups = [{"params": scales, "lr": lr}] + ([{"params": positions, "lr": lr * POSITION_LR_FACTOR}] if positions else [])
    return torch.optim.Adam(groups)


def _average_gradients(stand_ins: dict[str, TunableGQSA], parallel: Parallel) -> None:
    if not parallel.active:
        return
    grads = [p.grad for s in stand_ins.values() for p in s.parameters() if p.grad is not None]
    parallel.all_reduce_(grads)
    for g in grads:
        g.div_(parallel.world_size)


def _steps_per_epoch(batches: int, batch_size: int, parallel: Parallel) -> int:
    """Optimizer steps per epoch, equal on every rank (the smallest share decides)."""
    local = max(1, math.ceil(batches / batch_size))
    return min(parallel.all_gather_objects(local)) if parallel.active else local


def _train(
    stand_ins: dict[str, TunableGQSA], count: int, loss_of: Callable[[int], torch.Tensor], settings: TuningSettings,
    parallel: Parallel, on_step: Callable[[float], None] | None = None,
) -> int:  # fmt: skip
    """Adam over this rank's `count` batches, `settings.batch_size` per step (gradients averaged
    over ranks), for `settings.epochs` shuffled epochs; `loss_of(i)` is batch i's loss. Returns
    the number of steps."""
    optimizer = _optimizer(stand_ins, settings.lr)
    steps = _steps_per_epoch(count, settings.batch_size, parallel)
    size = settings.batch_size
    generator = torch.Generator().manual_seed(settings.seed)
    for _ in range(settings.epochs):
        order = torch.randperm(count, generator=generator).tolist()
        for step in range(steps):
            chosen = order[step * size : (step + 1) * size] or order[:size]
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for i in chosen:
                loss = loss_of(i) / len(chosen)
                loss.backward()
                total += float(loss.detach())
            _average_gradients(stand_ins, parallel)
            optimizer.step()
            if on_step is not None:
                on_step(total)
    return steps * settings.epochs


def _keep_if_better(stand_ins: dict[str, TunableGQSA], before: float, after: float, steps: int, start: float) -> dict[str, Any]:
    """Write the trained values into the modules if the loss went down; the run's summary."""
    kept = after < before
    if kept:
        for stand_in in stand_ins.values():
            stand_in.write_back()
    return {"loss_before": before, "loss_after": after if kept else before, "trained_loss": after,
            "kept": kept, "steps": steps, "seconds": round(time.perf_counter() - start, 2)}  # fmt: skip


def tune_block(
    block: nn.Module,
    modules: dict[str, GQSALinear],
    continuous: dict[str, torch.Tensor],
    hiddens: list[torch.Tensor],
    kwargs: list[dict],
    targets: list[torch.Tensor],
    settings: TuningSettings,
    device: torch.device | str,
    parallel: Parallel | None = None,
) -> dict[str, Any]:
    """BQPO: train the scales (and grid positions) of `modules` (names relative to `block`) so that
    block(hiddens) approaches `targets`; returns the block's relative squared error before and
    after (sums over every batch and rank), and whether the trained values were kept."""
    parallel = parallel or current()
    start = time.perf_counter()

    def error() -> float:
        """Relative squared output error over all batches: Σ‖block(x) − y‖² / Σ‖y‖²."""
        sums = torch.zeros(2, dtype=torch.float64)
        with torch.no_grad():
            for hidden, block_kwargs, target in zip(hiddens, kwargs, targets):
                out = block_output(block(hidden.to(device), **to_device(block_kwargs, device))).float()
                y = target.to(device).float()
                sums += torch.stack([(out - y).square().sum(), y.square().sum()]).double().cpu()
        parallel.all_reduce_([sums])
        return float(sums[0] / sums[1].clamp_min(1e-30))

    def batch_loss(i: int) -> torch.Tensor:
        out = block_output(block(hiddens[i].to(device), **to_device(kwargs[i], device))).float()
        return F.mse_loss(out, targets[i].to(device).float())

    with standing_in(block, modules, continuous) as stand_ins, torch.enable_grad():
        before = error()
        steps = _train(stand_ins, len(hiddens), batch_loss, settings, parallel)
        return _keep_if_better(stand_ins, before, error(), steps, start)


def tune_end_to_end(
    model: nn.Module,
    modules: dict[str, GQSALinear],
    input_ids: torch.Tensor,
    settings: TuningSettings,
    device: torch.device | str,
    parallel: Parallel | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """E2E: train the scales of `modules` (names relative to `model`) on the
    language-model loss of `input_ids` (this rank's share), codes fixed. The model must fit on
    `device` (it is moved there for the duration and back)."""
    from tqdm.auto import tqdm

    parallel = parallel or current()
    start = time.perf_counter()
    home = next(model.parameters()).device
    model.to(device)
    batches = list(input_ids.split(1))

    def loss_over_all() -> float:
        total = torch.zeros(2, dtype=torch.float64)
        with torch.no_grad():
            for ids in batches:
                ids = ids.to(device)
                total += torch.tensor([float(model(input_ids=ids, labels=ids).loss) * ids.numel(), ids.numel()], dtype=torch.float64)
        parallel.all_reduce_([total])
        return float(total[0] / total[1])

    def batch_loss(i: int) -> torch.Tensor:
        ids = batches[i].to(device)
        return model(input_ids=ids, labels=ids).loss

    def show(loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")

    bar = tqdm(total=settings.epochs * _steps_per_epoch(len(batches), settings.batch_size, parallel), desc="E2E tuning",
               disable=not progress, unit="step")  # fmt: skip
    try:
        with standing_in(model, modules, {}) as stand_ins, torch.enable_grad():
            before = loss_over_all()
            steps = _train(stand_ins, len(batches), batch_loss, settings, parallel, show)
            result = _keep_if_better(stand_ins, before, loss_over_all(), steps, start)
    finally:
        bar.close()
        model.to(home)
    logger.info(
        "E2E tuning of %d layers: calibration loss %.4f -> %.4f (%s)", len(modules), before, result["trained_loss"],
        "kept" if result["kept"] else "reverted",
    )  # fmt: skip
    return result

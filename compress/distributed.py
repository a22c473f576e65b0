"""Many processes, one compression: data-parallel calibration, weight-parallel optimization.

Launched with `torchrun --nproc-per-node N -m compress compress MODEL ...` (NCCL on GPUs, gloo
on CPUs), or from Python after `torch.distributed.init_process_group`. Every rank holds the model
(offloaded to its CPU) and, per block:
- calibrate: each rank runs its own contiguous share of the calibration sequences; the collectors'
  running sums (Gram, channel norms, token counts) and the Fisher sums are all-reduced, so every
  rank holds the statistics of all sequences;
- optimize: the block's layers are bin-packed onto ranks by estimated cost (largest first, onto
  the least-loaded rank); each rank compresses its share and the compressed modules are broadcast
  from their owners, so every rank ends the block with the same modules;
- propagate: each rank runs its share through the compressed block.
Knapsack profiling is split the same way, and M-FAC's per-sequence gradients are gathered. Rank 0
alone logs progress and writes the checkpoint.

With one process every helper here is a no-op and nothing of torch.distributed is touched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Parallel:
    """This process's place among the ranks of one run (world_size 1: alone)."""

    rank: int = 0
    world_size: int = 1

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- data ------------------------------------------------------------------------------
    def share(self, rows: torch.Tensor | None) -> torch.Tensor | None:
        """This rank's contiguous share of the calibration sequences (rank order = sample order)."""
        if rows is None or not self.active:
            return rows
        if len(rows) < self.world_size:
            from .errors import LlmpressError

            raise LlmpressError(
                f"{len(rows)} calibration sequences for {self.world_size} ranks: every rank needs at least one; "
                "raise calibration.num_samples or launch fewer processes"
            )
        return rows.tensor_split(self.world_size)[self.rank]

    # ---- collectives -----------------------------------------------------------------------
    def _comm_device(self) -> torch.device:
        """Where the backend reduces: the current GPU for NCCL, the CPU for gloo."""
        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")

    def all_reduce_(self, tensors: Iterable[torch.Tensor]) -> None:
        """Sum each tensor over the ranks, in place (moved to the backend's device and back)."""
        if not self.active:
            return
        device = self._comm_device()
        for t in tensors:
            buffer = t if t.device == device else t.to(device)
            dist.all_reduce(buffer)
            if buffer is not t:
                t.copy_(buffer)

    def all_reduce_count(self, count: int) -> int:
        if not self.active:
            return count
        t = torch.tensor([count], dtype=torch.int64)
        self.all_reduce_([t])
        return int(t.item())

    def all_gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's (n_r, ...) rows in rank order (shares may differ by one row)."""
        if not self.active:
            return rows
        counts = [None] * self.world_size
        dist.all_gather_object(counts, rows.shape[0])
        device = self._comm_device()
        padded = torch.zeros(max(counts), *rows.shape[1:], dtype=rows.dtype, device=device)
        padded[: rows.shape[0]] = rows.to(device)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([p[:n] for p, n in zip(parts, counts)]).to(rows.device)

    def all_gather_objects(self, obj: Any) -> list[Any]:
        if not self.active:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int) -> Any:
        if not self.active:
            return obj
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    # ---- work split ------------------------------------------------------------------------
    def assign(self, costs: dict[str, float]) -> dict[str, int]:
        """Owner rank of each item: largest cost first onto the least-loaded rank (ties: lowest
        rank), the same on every rank since it depends only on the costs."""
        load = [0.0] * self.world_size
        owners: dict[str, int] = {}
        for name in sorted(costs, key=lambda n: (-costs[n], n)):
            rank = min(range(self.world_size), key=lambda r: (load[r], r))
            owners[name] = rank
            load[rank] += costs[name]
        return owners

    def split_work(self, items: dict[str, Any], cost: Callable[[Any], float], run: Callable[[str, Any], Any]) -> dict[str, Any]:
        """`run(name, item)` for every item, each on its owner rank; every rank gets every result
        (pickled, so results must be CPU objects or small), in the items' order."""
        if not self.active:
            return {name: run(name, item) for name, item in items.items()}
        owners = self.assign({name: cost(item) for name, item in items.items()})
        mine = {name: run(name, item) for name, item in items.items() if owners[name] == self.rank}
        merged: dict[str, Any] = {}
        for part in self.all_gather_objects(mine):
            merged.update(part)
        return {name: merged[name] for name in items}


def linear_cost(layer: torch.nn.Module) -> float:
    """Relative cost of compressing a Linear: the OBS/Cholesky/SVD steps go as in²·(in + out)."""
    n, m = layer.in_features, layer.out_features
    return float(n) * n * (n + m)


def current() -> Parallel:
    """The ranks of the process group torch.distributed runs, or a single process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return Parallel(dist.get_rank(), dist.get_world_size())
    return Parallel()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str) -> tuple[Parallel, str]:
    """Join the process group torchrun describes (env://): NCCL when compressing on CUDA, each
    rank on its LOCAL_RANK's GPU; gloo on CPUs. Returns the ranks and this rank's device."""
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        return current(), device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device(device))
    else:
        dist.init_process_group("gloo")
    return current(), device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

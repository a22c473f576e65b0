"""Resume a killed compression run from its last finished block.

While a sequential run compresses block after block, `RunProgress` writes into a sibling of the
output directory (`.NAME.progress/`): after each block, that block's tensors and the specs of its
compressed modules (`block_<i>.pt`), the next block's inputs (`hiddens.pt`; with block tuning
also the dense model's, `dense_hiddens.pt`), the layer records
and block log so far, the RNG state, then `state.json` naming the next block. Every file is
written to a temporary name and renamed, and `state.json` last: a kill at any moment leaves the
last finished block as the resume point. `state.json` holds a fingerprint of the recipe, the
model source, its dtype and the calibration tokens; a run with another one refuses to resume.

A resumed run recomputes what comes before the blocks (Fisher sums, the knapsack's plan: both
deterministic), restores the finished blocks, and goes on; its checkpoint equals an
uninterrupted run's (bit-exact on CPU, tests/test_resume.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import LlmpressError
from .metrics import LayerRecord
from .modules import CompressedLinear, build_module
from .targets import set_submodule

logger = logging.getLogger("compress")


def fingerprint(recipe_json: str, model_source: str, dtype: torch.dtype, input_ids: torch.Tensor | None) -> str:
    """What a resumed run must share with the killed one."""
    digest = hashlib.sha256()
    digest.update(recipe_json.encode())
    digest.update(model_source.encode())
    digest.update(str(dtype).encode())
    if input_ids is not None:
        digest.update(str(tuple(input_ids.shape)).encode())
        digest.update(input_ids.cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def progress_dir(output_dir: str | Path) -> Path:
    output_dir = Path(output_dir)
    return output_dir.parent / f".{output_dir.name}.progress"


class RunProgress:
    """The resumable state of one sequential run, in `directory`."""

    def __init__(self, directory: str | Path, fingerprint: str, resume: bool):
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        state = self._state()
        if state is not None and not resume:
            logger.info("discarding the progress of an earlier run in %s (pass --resume to continue it)", self.directory)
            shutil.rmtree(self.directory)
        elif state is not None and state["fingerprint"] != fingerprint:
            raise LlmpressError(
                f"cannot resume: {self.directory} holds the progress of a run with another recipe, model or calibration "
                "data; run the same command as before, or drop --resume to start over"
            )
        elif state is None and resume:
            logger.warning("--resume: no earlier progress in %s; starting from the first block", self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def _state(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.directory / "state.json").read_text())
        except (OSError, ValueError):
            return None

    def _write(self, name: str, save) -> None:
        tmp = self.directory / f".{name}.tmp"
        save(tmp)
        os.replace(tmp, self.directory / name)

    def next_block(self) -> int:
        state = self._state()
        return state["next_block"] if state else 0

    def save_block(self, index: int, block: nn.Module, hiddens: list[torch.Tensor] | None,
                   records: list[LayerRecord], block_log: list[dict],
                   dense_hiddens: list[torch.Tensor] | None = None) -> None:  # fmt: skip
        """Commit block `index` as finished (its tensors, the next inputs, records, RNG;
        `dense_hiddens`: the dense model's outputs so far, the targets of block tuning)."""
        specs: dict[str, dict] = {}
        for name, module in block.named_modules():  # the outermost compressed modules (an EoRA wrapper, not its base)
            if isinstance(module, CompressedLinear) and not any(name.startswith(f"{outer}.") for outer in specs):
                specs[name] = module.spec()
        state = {k: v.detach().cpu() for k, v in block.state_dict().items()}
        self._write(f"block_{index}.pt", lambda p: torch.save({"specs": specs, "state": state}, p))
        if hiddens is not None:
            self._write("hiddens.pt", lambda p: torch.save([h.cpu() for h in hiddens], p))
        if dense_hiddens is not None:
            self._write("dense_hiddens.pt", lambda p: torch.save([h.cpu() for h in dense_hiddens], p))
        self._write("records.json", lambda p: p.write_text(json.dumps({"records": [r.as_dict() for r in records], "blocks": block_log})))
        self._write("rng.pt", lambda p: torch.save(torch.get_rng_state(), p))
        self._write("state.json", lambda p: p.write_text(json.dumps({"fingerprint": self.fingerprint, "next_block": index + 1})))

    def restore(self, blocks: nn.ModuleList, dtype: torch.dtype) -> tuple[int, list[torch.Tensor] | None, list[LayerRecord], list[dict]]:
        """Put the finished blocks back: (next block, its inputs, records, block log so far)."""
        start = self.next_block()
        if start == 0:
            return 0, None, [], []
        for index in range(start):
            saved = torch.load(self.directory / f"block_{index}.pt", weights_only=False)
            block = blocks[index]
            device = next(iter(block.parameters())).device
            for name, spec in saved["specs"].items():
                set_submodule(block, name, build_module(spec, dtype=dtype, device=device))
            block.load_state_dict(saved["state"], strict=True)
        hiddens_file = self.directory / "hiddens.pt"
        hiddens = torch.load(hiddens_file, weights_only=False) if hiddens_file.exists() else None
        saved = json.loads((self.directory / "records.json").read_text())
        records = [LayerRecord(**r) for r in saved["records"]]
        torch.set_rng_state(torch.load(self.directory / "rng.pt", weights_only=False))
        logger.warning("resuming at block %d of %d (%s)", start, len(blocks), self.directory)
        return start, hiddens, records, saved["blocks"]

    def restore_dense_hiddens(self) -> list[torch.Tensor] | None:
        """The dense model's outputs of the last finished block (runs with block tuning), or None."""
        path = self.directory / "dense_hiddens.pt"
        return torch.load(path, weights_only=False) if self.next_block() and path.exists() else None

    def finish(self) -> None:
        """The run is complete (its checkpoint written): drop the progress."""
        shutil.rmtree(self.directory, ignore_errors=True)

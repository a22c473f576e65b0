"""llmpress: post-training compression of Hugging Face causal LMs, served by Triton kernels.

    import compress
    model, report = compress.compress_model("HuggingFaceTB/SmolLM2-135M", "recipes/w4-g16.yaml")
    compress.save_compressed(model, "out/w4", tokenizer=tokenizer, report=report)
    model = compress.load("out/w4")                # or AutoModelForCausalLM.from_pretrained after import
    compress.eval.perplexity(model, tokenizer, "test.txt")

Importing this package registers the llmpress quantizer with transformers (as soon as
transformers loads its quantizer registry: `import compress` itself stays fast).
"""

from . import _quantizer_hook

_quantizer_hook.install()

__version__ = "0.1.0"

# The public API, imported on first use (PEP 562): importing one submodule (a compressor, a
# kernel) does not pull in the whole orchestration, and `compress.eval` / `compress.kernels`,
# which live in the top-level folders eval/ and kernels/ (mapped by setuptools package-dir),
# load only when asked for.
_PUBLIC = {
    "COMPRESSORS": "compressors",
    "FORMATS": "modules",
    "LlmpressError": "errors",
    "Recipe": "recipe",
    "compress_model": "api",
    "export_dense": "checkpoint",
    "load": "checkpoint",
    "load_model": "model_loading",
    "load_recipe": "recipe",
    "load_tokenizer": "model_loading",
    "save_compressed": "checkpoint",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    import importlib

    if name in ("eval", "kernels"):
        return importlib.import_module(f"compress.{name}")
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f"compress.{_PUBLIC[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'compress' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC) | {"eval", "kernels"})

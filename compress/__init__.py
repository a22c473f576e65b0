"""llmpress: post-training compression of Hugging Face causal LMs, served by Triton kernels.

    import compress
    model, report = compress.compress_model("HuggingFaceTB/SmolLM2-135M", "recipes/svd-20.yaml")
    compress.save_compressed(model, "out/svd-20", tokenizer=tokenizer, report=report)
    model = compress.load("out/svd-20")            # or AutoModelForCausalLM.from_pretrained after import
    compress.eval.perplexity(model, tokenizer, "test.txt")

Importing this package registers the llmpress quantizer with transformers.
"""

from . import hf_quantizer  # noqa: F401  (registers quant_method "llmpress" with transformers)
from .api import compress_model
from .checkpoint import export_dense, load, save_compressed
from .compressors import COMPRESSORS
from .errors import LlmpressError
from .model_loading import load_model, load_tokenizer
from .modules import FORMATS
from .recipe import Recipe, load_recipe

__version__ = "0.1.0"

__all__ = [
    "COMPRESSORS",
    "FORMATS",
    "LlmpressError",
    "Recipe",
    "compress_model",
    "export_dense",
    "load",
    "load_model",
    "load_recipe",
    "load_tokenizer",
    "save_compressed",
]


def __getattr__(name):
    # compress.eval and compress.kernels live in top-level folders eval/ and kernels/ of the repo
    # (mapped by setuptools package-dir); import them lazily so `compress.eval.perplexity` works.
    if name in ("eval", "kernels"):
        import importlib

        return importlib.import_module(f"compress.{name}")
    raise AttributeError(f"module 'compress' has no attribute {name!r}")

"""Quantized token embeddings, and the output head that shares their bytes.

`QuantizedEmbedding` replaces the model's input embedding: its (vocab × dim) table is stored as a
group-quantized CompressedLinear (`GQSALinear` with every group kept for W4, `Int8Linear` for
W8), and a lookup dequantizes only the rows it reads. The table being a Linear format means the
output head (logits = h·Eᵀ) multiplies by the very same bytes through that format's kernels.

With tied embeddings (most small models: SmolLM2, Llama-3.2-1B, Gemma) `TiedOutputHead` replaces
the head: it owns no tensors and calls the embedding's table, so the table is stored, loaded and
counted once. Checkpoints name the embedding in `quantization_config.embeddings`, and the
loader ties the head back (compress/embeddings.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import CompressedLinear, build_module


class QuantizedEmbedding(nn.Module):
    """input_ids (...) -> (..., dim) rows of a quantized table (× `embed_scale`, Gemma's √dim)."""

    def __init__(self, table: CompressedLinear, embed_scale: float | None = None, padding_idx: int | None = None):
        super().__init__()
        if not hasattr(table, "dequantize_rows"):
            raise ValueError(f"a {table.format} table cannot be read row by row; use W4 (all groups) or W8")
        self.table = table
        self.embed_scale = embed_scale
        self.padding_idx = padding_idx
        self.num_embeddings = table.out_features
        self.embedding_dim = table.in_features

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.table.dequantize_rows(input_ids.reshape(-1)).reshape(*input_ids.shape, self.embedding_dim)
        if self.embed_scale is not None:  # in the table's dtype, as Gemma's scaled embedding does
            rows = rows * torch.tensor(self.embed_scale, dtype=rows.dtype, device=rows.device)
        return rows

    def to_dense(self) -> torch.Tensor:
        """The (vocab × dim) table the lookups read (without `embed_scale`)."""
        return self.table.to_dense()

    def spec(self) -> dict[str, Any]:
        return {"table": self.table.spec(), "embed_scale": self.embed_scale, "padding_idx": self.padding_idx}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], dtype: torch.dtype, device=None) -> QuantizedEmbedding:
        return cls(build_module(spec["table"], dtype, device), spec.get("embed_scale"), spec.get("padding_idx"))

    def extra_repr(self) -> str:
        return f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, format={self.table.format}"


class TiedOutputHead(nn.Module):
    """logits = x·Êᵀ through the tied embedding's quantized table: no tensors of its own."""

    def __init__(self, embedding_name: str, in_features: int, out_features: int):
        super().__init__()
        self.embedding_name = embedding_name
        self.in_features = in_features
        self.out_features = out_features
        self._embedding: list[QuantizedEmbedding] = []  # a plain list: not a submodule (stored once)

    def tie(self, embedding: QuantizedEmbedding) -> None:
        if (embedding.embedding_dim, embedding.num_embeddings) != (self.in_features, self.out_features):
            raise ValueError(
                f"cannot tie a {self.out_features}×{self.in_features} head to a "
                f"{embedding.num_embeddings}×{embedding.embedding_dim} embedding"
            )
        self._embedding[:] = [embedding]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._embedding:
            raise RuntimeError(
                f"this output head reads the quantized embedding {self.embedding_name!r} but was never tied to it; "
                "load checkpoints with compress.load or AutoModelForCausalLM.from_pretrained after `import compress`"
            )
        table = self._embedding[0].table
        device = table.scales.device
        if x.device != device:  # placed by a device map on another device than the embedding
            return table(x.to(device)).to(x.device)
        return table(x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tied_to={self.embedding_name}"

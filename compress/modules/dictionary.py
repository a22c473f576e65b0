"""DictLinear: Ŵ = C·D, a dense dictionary D of k atoms and a row-sparse coefficient matrix C.

Stored as `atoms` (k × in) and, per output row, exactly s coefficients: `coef_values` (out × s)
and their atom indices `coef_index` (out × s; uint8 when k ≤ 256, else int16): an ELL layout,
what a kernel reads row by row. The forward never forms Ŵ (out × in): y = (x·Dᵀ)·Cᵀ, where C is
scattered to its dense (out × k) form, k < in, on the PyTorch path.

Several layers may share one dictionary (CoSpaDi's group mode). Only the first layer of a group
(the owner) stores the atoms; the others name it in their spec (`atoms_from`) and read its
atoms at run time, so the shared dictionary is stored, loaded and counted once.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..kernels import dispatch
from .base import CompressedLinear, register_format


def index_dtype(num_atoms: int) -> torch.dtype:
    """The narrowest integer type that holds atom indices 0..num_atoms-1."""
    if num_atoms <= 256:
        return torch.uint8
    if num_atoms <= 32768:
        return torch.int16
    return torch.int32


@register_format
class DictLinear(CompressedLinear):
    format = "dict"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_atoms: int,
        nnz_per_row: int,
        has_bias: bool,
        dtype=torch.float32,
        device=None,
        atoms_from: str | None = None,
    ):
        super().__init__(in_features, out_features, has_bias, dtype, device)
        self.num_atoms = num_atoms
        self.nnz_per_row = nnz_per_row
        self.atoms_from = atoms_from
        self._owner: list[DictLinear] = []  # a plain list: the owner is not a submodule of this one
        if atoms_from is None:
            self.atoms = nn.Parameter(torch.empty(num_atoms, in_features, dtype=dtype, device=device), requires_grad=False)
        self.coef_values = nn.Parameter(
            torch.empty(out_features, nnz_per_row, dtype=dtype, device=device), requires_grad=False
        )
        self.register_buffer(
            "coef_index", torch.empty(out_features, nnz_per_row, dtype=index_dtype(num_atoms), device=device)
        )

    @classmethod
    def from_factors(
        cls,
        atoms: torch.Tensor,
        values: torch.Tensor,
        index: torch.Tensor,
        bias: torch.Tensor | None,
        owner: DictLinear | None = None,
        owner_name: str | None = None,
    ) -> DictLinear:
        """Build from atoms (k × in), values and indices (out × s); with `owner`, share its atoms."""
        num_atoms, in_features = (owner.num_atoms, owner.in_features) if owner is not None else atoms.shape
        module = cls(
            in_features, values.shape[0], num_atoms, values.shape[1], bias is not None, values.dtype, values.device,
            atoms_from=owner_name if owner is not None else None,
        )  # fmt: skip
        if owner is None:
            module.atoms.data.copy_(atoms)
        else:
            module.tie(owner)
        module.coef_values.data.copy_(values)
        module.coef_index.copy_(index.to(module.coef_index.dtype))
        if bias is not None:
            module.bias.data.copy_(bias)
        return module

    def tie(self, owner: DictLinear) -> None:
        """Read atoms from `owner` (the layer that stores this group's dictionary)."""
        if owner.atoms_from is not None or owner.num_atoms != self.num_atoms or owner.in_features != self.in_features:
            raise ValueError(f"cannot share atoms with {owner!r}: not a dictionary owner of the same shape")
        self._owner[:] = [owner]

    def dictionary(self) -> torch.Tensor:
        if self.atoms_from is None:
            return self.atoms
        if not self._owner:
            raise RuntimeError(
                f"this DictLinear shares the dictionary of {self.atoms_from!r} but was never tied to it; "
                "load checkpoints with compress.load or AutoModelForCausalLM.from_pretrained after `import compress`"
            )
        return self._owner[0].atoms

    def dense_coefficients(self) -> torch.Tensor:
        """C as a dense (out × k) matrix: k·out numbers, far fewer than the dense weight's in·out."""
        dense = torch.zeros(self.out_features, self.num_atoms, dtype=self.coef_values.dtype, device=self.coef_values.device)
        return dense.scatter_(1, self.coef_index.long(), self.coef_values)

    def to_dense(self) -> torch.Tensor:
        return self.dense_coefficients() @ self.dictionary()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch("dict", self, x)

    def spec(self) -> dict[str, Any]:
        spec = {**super().spec(), "num_atoms": self.num_atoms, "nnz_per_row": self.nnz_per_row}
        if self.atoms_from is not None:
            spec["atoms_from"] = self.atoms_from
        return spec

    @classmethod
    def from_spec(cls, spec, dtype, device=None):
        return cls(
            spec["in_features"], spec["out_features"], spec["num_atoms"], spec["nnz_per_row"], spec["bias"],
            dtype, device, atoms_from=spec.get("atoms_from"),
        )  # fmt: skip

    def extra_repr(self) -> str:
        shared = f", atoms_from={self.atoms_from}" if self.atoms_from else ""
        return super().extra_repr() + f", atoms={self.num_atoms}, nnz_per_row={self.nnz_per_row}{shared}"


def tie_shared_dictionaries(model: nn.Module) -> None:
    """Point every DictLinear that names an `atoms_from` owner at that owner (after loading)."""
    for module in model.modules():
        if isinstance(module, DictLinear) and module.atoms_from is not None:
            owner = model.get_submodule(module.atoms_from)
            module.tie(owner)

"""DictLinear: Ŵ = C·D, a dense dictionary D of k atoms and a row-sparse coefficient matrix C.

Stored as `atoms` (k × in) and, per output row, exactly s coefficients: `coef_values` (out × s)
and their atom indices packed to b = ceil(log2 k) bits each, `coef_index` (out × 4·ceil(s·b/32)
bytes, little-endian bit order: index j occupies bits j·b .. j·b+b−1 of its row, rows padded to
whole 32-bit words, which the decode kernel loads and splits by shifts): an ELL layout,
what a kernel reads row by row, unpacking on chip. With k = 640 atoms an index costs 10 bits, not
the 16 of an int16, which in bf16 would cost as much as the coefficient itself. The forward never
forms Ŵ (out × in): y = (x·Dᵀ)·Cᵀ, where C is scattered to its dense (out × k) form, k < in, on
the PyTorch path.

Coefficients are floats in the model's dtype, or (`coefficient_bits: 8`) int8 codes with one
scale per row: int8 halves their bytes. Atoms likewise (`atom_bits: 8`): W8 codes in groups of
`atom_group` input columns with a scale and zero point each, Int8Linear's storage, so x·Dᵀ runs
on the W8 kernel; at k = 2s the atoms are two thirds of a square layer's values.

Several layers may share one dictionary (CoSpaDi's group mode). Only the first layer of a group
(the owner) stores the atoms; the others name it in their spec (`atoms_from`) and read its
atoms at run time, so the shared dictionary is stored, loaded and counted once.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..kernels import dispatch
from ..kernels.ell_matmul import packed_row_bytes
from .base import CompressedLinear, register_format
from .int8 import dequantize_groups


def index_bits(num_atoms: int) -> int:
    """Bits per atom index: the fewest that hold 0..num_atoms-1 (at least 1, at most 16)."""
    bits = max(1, (num_atoms - 1).bit_length())
    if bits > 16:
        raise ValueError(f"{num_atoms} atoms: indices wider than 16 bits are not supported")
    return bits


def pack_bits(index: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, s) integers < 2**bits -> (rows, ceil(s·bits/8)) uint8, index j at bits j·b.. of its row."""
    rows, count = index.shape
    shifts = torch.arange(bits, device=index.device)
    stream = ((index.long()[..., None] >> shifts) & 1).reshape(rows, count * bits)  # bit j·b+t of the row
    stream = torch.nn.functional.pad(stream, (0, packed_row_bytes(count, bits) * 8 - count * bits))
    weights = 2 ** torch.arange(8, device=index.device)
    return (stream.reshape(rows, -1, 8) * weights).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of pack_bits: (rows, bytes) uint8 -> (rows, count) int64."""
    rows = packed.shape[0]
    stream = ((packed.long()[..., None] >> torch.arange(8, device=packed.device)) & 1).reshape(rows, -1)
    stream = stream[:, : count * bits].reshape(rows, count, bits)
    return (stream << torch.arange(bits, device=packed.device)).sum(-1)


INDEX_ROWS = "words"  # spec "index_rows"; checkpoints without it padded rows to bytes only


ATOM_GROUP = 64  # input columns per W8 atom group: the W8 layers' own size


def atom_group_size(in_features: int) -> int:
    """W8 atoms' group: ATOM_GROUP input columns, or the whole row where ATOM_GROUP does not divide it."""
    return ATOM_GROUP if in_features % ATOM_GROUP == 0 else in_features


def index_bytes(out_features: int, nnz_per_row: int, num_atoms: int) -> int:
    """Stored bytes of a layer's packed atom indices."""
    return out_features * packed_row_bytes(nnz_per_row, index_bits(num_atoms))


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
        coefficient_bits: int = 16,
        atom_bits: int = 16,
        atom_group: int | None = None,
    ):
        super().__init__(in_features, out_features, has_bias, dtype, device)
        if coefficient_bits not in (8, 16):
            raise ValueError(f"coefficient_bits must be 16 (floats) or 8 (int8 with a scale per row), got {coefficient_bits}")
        if atom_bits not in (8, 16):
            raise ValueError(f"atom_bits must be 16 (floats) or 8 (W8 groups with a scale and zero point), got {atom_bits}")
        self.num_atoms = num_atoms
        self.nnz_per_row = nnz_per_row
        self.atoms_from = atoms_from
        self.coefficient_bits = coefficient_bits
        self.atom_bits = atom_bits
        self.atom_group = (atom_group or atom_group_size(in_features)) if atom_bits == 8 else None
        self._owner: list[DictLinear] = []  # a plain list: the owner is not a submodule of this one
        if atoms_from is None and atom_bits == 16:
            self.atoms = nn.Parameter(torch.empty(num_atoms, in_features, dtype=dtype, device=device), requires_grad=False)
        elif atoms_from is None:  # W8 codes, Int8Linear's layout: (k, in/g, g), a scale and zero point per group
            if in_features % self.atom_group:
                raise ValueError(f"atom_group {self.atom_group} must divide in_features {in_features}")
            groups = in_features // self.atom_group
            self.register_buffer("atom_codes", torch.empty(num_atoms, groups, self.atom_group, dtype=torch.uint8, device=device))
            self.atom_scales = nn.Parameter(torch.empty(num_atoms, groups, dtype=dtype, device=device), requires_grad=False)
            self.register_buffer("atom_zeros", torch.empty(num_atoms, groups, dtype=torch.uint8, device=device))
        if coefficient_bits == 16:  # in the model's dtype
            self.coef_values = nn.Parameter(
                torch.empty(out_features, nnz_per_row, dtype=dtype, device=device), requires_grad=False
            )
            self.register_parameter("coef_scales", None)
        else:  # int8 codes, value = code · scale of its row
            self.register_buffer("coef_values", torch.empty(out_features, nnz_per_row, dtype=torch.int8, device=device))
            self.coef_scales = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
        self.index_bits = index_bits(num_atoms)
        row_bytes = packed_row_bytes(nnz_per_row, self.index_bits)
        self.register_buffer("coef_index", torch.empty(out_features, row_bytes, dtype=torch.uint8, device=device))
        self.stored_index_rows = INDEX_ROWS  # "bytes" for a layer of an earlier checkpoint until `after_loading`

    @classmethod
    def from_factors(
        cls,
        atoms: torch.Tensor,
        values: torch.Tensor,
        index: torch.Tensor,
        bias: torch.Tensor | None,
        owner: DictLinear | None = None,
        owner_name: str | None = None,
        scales: torch.Tensor | None = None,
        atom_grid: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> DictLinear:
        """Build from atoms (k × in), values and indices (out × s); with `owner`, share its atoms.
        With `scales` (out,), `values` are int8 codes and a coefficient is code · scale of its row.
        With `atom_grid` (W8 codes (k, in/g, g), scales and zero points (k, in/g)), the atoms are
        stored as those codes (`atoms` is then unused and may be None)."""
        if owner is not None:
            num_atoms, in_features, atom_bits, atom_group = owner.num_atoms, owner.in_features, owner.atom_bits, owner.atom_group
        elif atom_grid is not None:
            codes = atom_grid[0]
            num_atoms, in_features, atom_bits, atom_group = codes.shape[0], codes.shape[1] * codes.shape[2], 8, codes.shape[2]
        else:
            (num_atoms, in_features), atom_bits, atom_group = atoms.shape, 16, None
        dtype = values.dtype if scales is None else scales.dtype
        module = cls(
            in_features, values.shape[0], num_atoms, values.shape[1], bias is not None, dtype, values.device,
            atoms_from=owner_name if owner is not None else None, coefficient_bits=16 if scales is None else 8,
            atom_bits=atom_bits, atom_group=atom_group,
        )  # fmt: skip
        if owner is not None:
            module.tie(owner)
        elif atom_grid is not None:
            module.atom_codes.copy_(atom_grid[0].to(torch.uint8))
            module.atom_scales.data.copy_(atom_grid[1])
            module.atom_zeros.copy_(atom_grid[2].to(torch.uint8))
        else:
            module.atoms.data.copy_(atoms)
        module.coef_values.data.copy_(values)
        if scales is not None:
            module.coef_scales.data.copy_(scales)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= num_atoms):
            raise ValueError(f"atom indices must lie in [0, {num_atoms})")
        module.coef_index.copy_(pack_bits(index, module.index_bits))
        if bias is not None:
            module.bias.data.copy_(bias)
        return module

    def tie(self, owner: DictLinear) -> None:
        """Read atoms from `owner` (the layer that stores this group's dictionary)."""
        if (
            owner.atoms_from is not None or owner.num_atoms != self.num_atoms or owner.in_features != self.in_features
            or (owner.atom_bits, owner.atom_group) != (self.atom_bits, self.atom_group)
        ):  # fmt: skip
            raise ValueError(f"cannot share atoms with {owner!r}: not a dictionary owner of the same shape and storage")
        self._owner[:] = [owner]

    def atom_store(self) -> DictLinear:
        """The layer that stores this layer's atoms: itself, or its group's owner."""
        if self.atoms_from is None:
            return self
        if not self._owner:
            raise RuntimeError(
                f"this DictLinear shares the dictionary of {self.atoms_from!r} but was never tied to it; "
                "load checkpoints with compress.load or AutoModelForCausalLM.from_pretrained after `import compress`"
            )
        return self._owner[0]

    def dictionary(self) -> torch.Tensor:
        """The atoms (k × in) as floats: the stored ones, or the W8 codes dequantized (each call)."""
        store = self.atom_store()
        if store.atom_bits == 16:
            return store.atoms
        return dequantize_groups(store.atom_codes, store.atom_scales, store.atom_zeros)

    def atom_index(self) -> torch.Tensor:
        """The (out × s) atom indices, unpacked."""
        return unpack_bits(self.coef_index, self.index_bits, self.nnz_per_row)

    @property
    def coefficient_dtype(self) -> torch.dtype:
        """The floating dtype coefficients are computed in (their scales' for int8 codes)."""
        return self.coef_values.dtype if self.coef_scales is None else self.coef_scales.dtype

    def coefficients(self) -> torch.Tensor:
        """The (out × s) coefficient values as floats."""
        if self.coef_scales is None:
            return self.coef_values
        return self.coef_values.to(self.coef_scales.dtype) * self.coef_scales[:, None]

    def dense_coefficients(self) -> torch.Tensor:
        """C as a dense (out × k) matrix: k·out numbers, far fewer than the dense weight's in·out."""
        dense = torch.zeros(self.out_features, self.num_atoms, dtype=self.coefficient_dtype, device=self.coef_values.device)
        return dense.scatter_(1, self.atom_index(), self.coefficients())

    def num_values(self) -> int:
        """Atoms (the owner's; W8 ones with their scales and zero points), coefficients, their row
        scales and the bias (indices are metadata)."""
        atoms = 0
        if self.atoms_from is None:
            atoms = self.num_atoms * self.in_features + (2 * self.atom_scales.numel() if self.atom_bits == 8 else 0)
        scales = self.out_features if self.coef_scales is not None else 0
        return atoms + self.coef_values.numel() + scales + (self.out_features if self.bias is not None else 0)

    def to_dense(self) -> torch.Tensor:
        return self.dense_coefficients() @ self.dictionary()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch("dict", self, x)

    def spec(self) -> dict[str, Any]:
        spec = {
            **super().spec(), "num_atoms": self.num_atoms, "nnz_per_row": self.nnz_per_row, "index_bits": self.index_bits,
            "index_rows": INDEX_ROWS,
        }  # fmt: skip
        if self.coefficient_bits != 16:
            spec["coefficient_bits"] = self.coefficient_bits
        if self.atom_bits != 16:
            spec["atom_bits"], spec["atom_group"] = self.atom_bits, self.atom_group
        if self.atoms_from is not None:
            spec["atoms_from"] = self.atoms_from
        return spec

    @classmethod
    def from_spec(cls, spec, dtype, device=None):
        if spec.get("index_bits") != index_bits(spec["num_atoms"]):
            raise ValueError(
                "this dict layer stores its atom indices unpacked (uint8/int16), the layout of llmpress checkpoints "
                "written before indices were bit-packed; compress the model again"
            )
        module = cls(
            spec["in_features"], spec["out_features"], spec["num_atoms"], spec["nnz_per_row"], spec["bias"],
            dtype, device, atoms_from=spec.get("atoms_from"), coefficient_bits=spec.get("coefficient_bits", 16),
            atom_bits=spec.get("atom_bits", 16), atom_group=spec.get("atom_group"),
        )  # fmt: skip
        if spec.get("index_rows") != INDEX_ROWS:  # rows of whole bytes: loaded as stored, padded by after_loading
            row_bytes = (module.nnz_per_row * module.index_bits + 7) // 8
            module.coef_index = torch.empty(module.out_features, row_bytes, dtype=torch.uint8, device=device)
            module.stored_index_rows = "bytes"
        return module

    def after_loading(self) -> None:
        """Pad index rows loaded from a checkpoint written before rows were whole words."""
        if self.stored_index_rows != INDEX_ROWS:
            self.check_rewritable(self.coef_index, "atom indices")
            padding = packed_row_bytes(self.nnz_per_row, self.index_bits) - self.coef_index.shape[1]
            self.coef_index = torch.nn.functional.pad(self.coef_index, (0, padding))
            self.stored_index_rows = INDEX_ROWS

    def extra_repr(self) -> str:
        shared = f", atoms_from={self.atoms_from}" if self.atoms_from else ""
        bits = f", coefficient_bits={self.coefficient_bits}" if self.coefficient_bits != 16 else ""
        bits += f", atom_bits=8, atom_group={self.atom_group}" if self.atom_bits == 8 else ""
        return super().extra_repr() + f", atoms={self.num_atoms}, nnz_per_row={self.nnz_per_row}{shared}{bits}"


def tie_shared_dictionaries(model: nn.Module) -> None:
    """Point every DictLinear that names an `atoms_from` owner at that owner (after loading)."""
    for module in model.modules():
        if isinstance(module, DictLinear) and module.atoms_from is not None:
            owner = model.get_submodule(module.atoms_from)
            if not isinstance(owner, DictLinear) and isinstance(getattr(owner, "base", None), DictLinear):
                owner = owner.base  # the owner stacks a residual on its dictionary layer (EoRALinear)
            module.tie(owner)

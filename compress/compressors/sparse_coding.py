"""Sparse-dictionary math shared by ROCKET and CoSpaDi: sizes, coding on a support, OMP, refits.

Convention (ours, y = x·Wᵀ): the whitened weight A = W·S (out × in, S·Sᵀ = XᵀX) is approximated
by P·E, a dictionary E of k atoms (rows, k × in) and coefficients P (out × k) with exactly s
nonzeros per row, so each output neuron is a combination of s atoms. ‖(A − P·E)‖_F is then the
calibration-weighted output error. Supports are (out × s) index tensors, values (out × s).
"""

from __future__ import annotations

import torch

from ..errors import LlmpressError


def coefficient_row_multiple(coefficient_bits: int) -> int:
    """Coefficients per 16 bytes (8 of 16 bits, 16 int8): the multiple of s that starts every row
    of coefficients on a 16-byte boundary, for the decode kernel's vector loads."""
    return 128 // coefficient_bits


def dictionary_shape(
    out_features: int, in_features: int, ratio: float, ks: float, max_atoms: int | None = None, values_multiple: int = 1
):
    """(k atoms, s nonzeros per row) keeping at most (1 − ratio) of the out·in weights.

    Storage is k·in (atoms) + s·out (coefficients) with s ≈ k/ks, so
    k = (1 − ratio)·out·in / (in + out/ks); ks = 1 is plain low rank (s = k). When k is capped
    (at `max_atoms`, e.g. the rank available to an eigenbasis), s takes what the budget leaves.
    With `values_multiple` m, an s < k of at least 8·m is rounded down to a multiple of m and the
    atoms take the budget it frees: a row's coefficients then start on a 16-byte boundary (m = 8
    for 16-bit values, 16 for int8), which the decode kernel's vector loads need.
    """
    if not 0.0 < ratio < 1.0:
        raise LlmpressError(f"dictionary ratio must be in (0, 1) (fraction of weights removed), got {ratio}")
    if not ks >= 1.0:
        raise LlmpressError(f"ks (atoms per nonzero coefficient) must be >= 1 (1 = plain low rank), got {ks}")
    budget = (1.0 - ratio) * out_features * in_features
    k = int(budget // (in_features + out_features / ks))
    if max_atoms is not None:
        k = min(k, max_atoms)
    s = min(k, int((budget - k * in_features) // out_features)) if k > 0 else 0
    if k < 1 or s < 1:
        raise LlmpressError(
            f"ratio {ratio} with ks {ks} leaves no room for a dictionary on a {out_features}x{in_features} layer "
            f"(k={k} atoms, s={s} per row); use a smaller ratio or ks"
        )
    if values_multiple > 1 and 8 * values_multiple <= s < k:
        s -= s % values_multiple
        k = max(k, int((budget - s * out_features) // in_features))
        if max_atoms is not None:
            k = min(k, max_atoms)
    return k, s


def top_s_support(scores: torch.Tensor, s: int) -> torch.Tensor:
    """Indices (rows × s, sorted) of the s largest scores of each row."""
    return scores.topk(s, dim=1).indices.sort(dim=1).values


def _solve_on_support(gram: torch.Tensor, corr: torch.Tensor, support: torch.Tensor, ridge: float) -> torch.Tensor:
    """Per row, x = (G_II + λI)⁻¹·corr_I: least-squares coefficients on the row's own atoms."""
    sub = gram[support.unsqueeze(-1), support.unsqueeze(-2)]  # rows × s × s
    rhs = corr.gather(1, support)
    scale = sub.diagonal(dim1=-2, dim2=-1).mean(-1, keepdim=True).clamp_min(1e-30)
    sub.diagonal(dim1=-2, dim2=-1).add_(ridge * scale)  # in place: the gather made a fresh tensor
    chol, info = torch.linalg.cholesky_ex(sub)
    if int(info.max()) == 0:
        return torch.cholesky_solve(rhs.unsqueeze(-1), chol).squeeze(-1)
    return torch.linalg.lstsq(sub, rhs.unsqueeze(-1)).solution.squeeze(-1)  # degenerate atoms


def code_on_support(a: torch.Tensor, atoms: torch.Tensor, support: torch.Tensor, ridge: float = 1e-8, chunk: int = 256):
    """Least-squares coefficients of each row of `a` on its own atoms, and each row's residual.

    Solves (E_I·E_Iᵀ + λI) x = E_I·a per row, batched (rows in chunks: each holds s×s per row);
    the ridge keeps dependent atoms solvable. The s×s solves run in float32, 2-3x faster than float64 and
    accurate here: atoms stay close to the orthonormal eigenbasis they start from.
    Returns (values (rows × s), residual² (rows,)) in float64.
    """
    a, atoms = a.double(), atoms.double()
    gram = (atoms @ atoms.T).float()  # k × k
    corr = a @ atoms.T  # rows × k
    values = torch.cat([_solve_on_support(gram, c, i, ridge) for c, i in zip(corr.float().split(chunk), support.split(chunk))])
    values = values.double()
    residual = (a - dense_coefficients(values, support, atoms.shape[0]) @ atoms).square().sum(1)
    return values, residual


def dense_coefficients(values: torch.Tensor, support: torch.Tensor, num_atoms: int) -> torch.Tensor:
    out = values.new_zeros(values.shape[0], num_atoms)
    return out.scatter_(1, support, values)


def refit_dictionary(a: torch.Tensor, coefficients: torch.Tensor, ridge: float = 1e-6) -> torch.Tensor:
    """E = (PᵀP + μI)⁻¹·Pᵀ·A: the best atoms for fixed coefficients (MOD / ROCKET's closed form).

    μ = ridge·mean(diag PᵀP) keeps atoms that no row uses (zero columns of P) at zero.
    """
    p = coefficients.double()
    ptp = p.T @ p
    mu = ridge * float(ptp.diagonal().mean().clamp_min(1e-30))
    ptp = ptp + mu * torch.eye(ptp.shape[0], dtype=ptp.dtype, device=ptp.device)
    return torch.linalg.solve(ptp, p.T @ a.double())


def ksvd_update(a: torch.Tensor, atoms: torch.Tensor, values: torch.Tensor, support: torch.Tensor):
    """Approximate K-SVD (Rubinstein et al.): refit each atom and its coefficients in turn.

    For atom j and the rows I that use it, the residual without it, R = (A − P·E)_I + p_Ij·e_j,
    is approximated by a rank-1 product: one power step gives e_j ∝ Rᵀ·p_Ij and p_Ij = R·e_j.
    Unlike MOD, coefficients move with their atom, which escapes the local minima MOD stalls
    in. The residual is kept up to date, so one sweep costs O(s·rows·in), not O(k·rows·k·in).
    Returns (atoms, values), float64; the supports are unchanged. Unused atoms stay as they are.
    """
    atoms, values = atoms.double().clone(), values.double().clone()
    k = atoms.shape[0]
    residual = a.double() - dense_coefficients(values, support, k) @ atoms
    flat = support.flatten()
    order = flat.argsort()
    counts = torch.bincount(flat, minlength=k).tolist()
    rows_all, slots_all = order // support.shape[1], order % support.shape[1]
    start = 0
    for j, count in enumerate(counts):
        if count == 0:
            continue
        rows, slots = rows_all[start : start + count], slots_all[start : start + count]
        start += count
        coef = values[rows, slots]
        r = residual[rows] + coef[:, None] * atoms[j]
        direction = r.T @ coef
        norm = direction.norm()
        if float(norm) == 0.0:
            continue
        atom = direction / norm
        coef = r @ atom
        atoms[j] = atom
        values[rows, slots] = coef
        residual[rows] = r - coef[:, None] * atom
    return atoms, values


def replace_weak_atoms(a: torch.Tensor, atoms: torch.Tensor, values, support, max_cosine: float = 0.99) -> torch.Tensor:
    """Atoms (almost) no row uses, or near-duplicates of another atom, replaced by the residuals
    of the worst-represented rows (K-SVD's standard escape from local minima). float64."""
    atoms = atoms.double().clone()
    k = atoms.shape[0]
    usage = torch.bincount(support.flatten(), minlength=k).double()
    used = usage > 0.1 * usage.mean()  # an atom serving almost no row is wasted storage
    unit = atoms / atoms.norm(dim=1, keepdim=True).clamp_min(1e-30)
    cosine = (unit @ unit.T).abs().triu(diagonal=1)
    weak = (~used) | (cosine.amax(dim=0) > max_cosine)  # the later atom of a duplicate pair
    count = int(weak.sum())
    if count == 0:
        return atoms
    residual = a.double() - dense_coefficients(values.double(), support, k) @ atoms
    worst = residual.norm(dim=1).topk(min(count, residual.shape[0])).indices
    fresh = residual[worst]
    atoms[weak.nonzero().flatten()[: len(worst)]] = fresh / fresh.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return atoms


def batch_omp(a: torch.Tensor, atoms: torch.Tensor, s: int, steps: int = 4, chunk: int = 256) -> torch.Tensor:
    """Greedy sparse coding of every row of `a` at once (generalized OMP): the support (rows × s).

    Each of `steps` rounds adds the atoms most correlated with each row's residual (s/steps of
    them), then re-solves the row's coefficients exactly on its support. Correlations come from
    the precomputed G = E·Eᵀ and α₀ = A·Eᵀ (atoms normalized), as in Batch-OMP, so no residual
    of size `in` is formed. Picking several atoms per round instead of one costs a little
    greediness and saves s/steps rounds; callers keep a row's old support when it fits better.
    float32: the rounds only choose atoms (callers re-solve values in float64 on the support).
    """
    e = atoms.float()
    e = e / e.norm(dim=1, keepdim=True).clamp_min(1e-12)
    gram = e @ e.T
    supports = []
    for rows in a.float().split(chunk):
        alpha0 = rows @ e.T
        alpha, support = alpha0, alpha0.new_zeros(rows.shape[0], 0, dtype=torch.long)
        for step in range(steps):
            q = -(-(s - support.shape[1]) // (steps - step))  # ceil: what is left over the rounds left
            if q == 0:
                continue
            scores = alpha.abs().scatter(1, support, -1.0)  # never pick an atom twice
            support = torch.cat([support, scores.topk(q, dim=1).indices], 1)
            x = _solve_on_support(gram, alpha0, support, 1e-6)
            alpha = alpha0 - dense_coefficients(x, support, gram.shape[0]) @ gram
        supports.append(support)
    return torch.cat(supports).sort(dim=1).values

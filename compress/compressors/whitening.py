"""Whitening of a layer's input Gram G = XᵀX: a factor S with S·Sᵀ = G and its inverse.

Data-aware compressors (whitened SVD, EoRA, ROCKET, CoSpaDi) work on W·S, because
‖(W−Ŵ)Xᵀ‖_F = ‖(W−Ŵ)·S‖_F for any S with S·Sᵀ = G: plain Frobenius truncation of W·S is
then optimal in output error. Cholesky (with a small damping so dead input channels do not
make G singular) is tried first; when it fails, the eigendecomposition with clamped eigenvalues
is used. A Gram that is clearly indefinite cannot come from real activations: that is an error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LlmpressError


@dataclass
class Whitening:
    s: torch.Tensor  # (in, in), s @ s.T == damped G
    s_inv: torch.Tensor  # (in, in)
    method: str  # "cholesky" or "eigh"
    damping: float  # absolute damping added to the diagonal


def damped_gram(gram: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, float]:
    """G + λI with λ = percdamp·mean(diag G); dead channels (zero diagonal) get λ too."""
    g = gram.double()
    mean_diag = float(g.diagonal().mean())
    if not torch.isfinite(g).all():
        raise LlmpressError("the Gram matrix contains NaN/Inf: calibration activations were not finite")
    damping = percdamp * mean_diag if mean_diag > 0 else 1.0
    return g + damping * torch.eye(g.shape[0], dtype=g.dtype, device=g.device), damping


def whiten(
    gram: torch.Tensor,
    percdamp: float = 1e-4,
    name: str = "layer",
    indefinite_tol: float = 1e-6,
    prefer: str = "cholesky",
) -> Whitening:
    """S with S·Sᵀ = G + λI: Cholesky when it succeeds (and `prefer` allows), else Q·Λ^½."""
    g, damping = damped_gram(gram, percdamp)
    chol, info = torch.linalg.cholesky_ex(g)
    if prefer == "cholesky" and int(info) == 0:
        eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
        s_inv = torch.linalg.solve_triangular(chol, eye, upper=False)
        return Whitening(chol, s_inv, "cholesky", damping)
    evals, evecs = torch.linalg.eigh(g)
    top = float(evals.abs().max())
    if float(evals.min()) < -indefinite_tol * top:
        raise LlmpressError(
            f"the input Gram matrix of {name} is indefinite (smallest eigenvalue {float(evals.min()):.3e}, "
            f"largest {top:.3e}); it cannot come from real activations. Recollect statistics (fp32/fp64 "
            "accumulation) or raise the damping"
        )
    floor = max(top * 1e-10, 1e-30)
    root = evals.clamp_min(floor).sqrt()
    return Whitening(evecs * root, (evecs / root).T, "eigh", damping)


@dataclass
class WhitenedSpectrum:
    """A layer's whitened weight A = W·S and its SVD (float64): whitened SVD truncates it, ROCKET and
    CoSpaDi sparsify it; one per layer serves every ratio."""

    a: torch.Tensor
    white: Whitening
    u: torch.Tensor
    sigma: torch.Tensor
    vh: torch.Tensor

    @classmethod
    def of(
        cls, weight: torch.Tensor, gram: torch.Tensor, percdamp: float, name: str = "layer", prefer: str = "cholesky"
    ) -> "WhitenedSpectrum":
        white = whiten(gram, percdamp, name, prefer=prefer)
        a = weight.double() @ white.s
        u, sigma, vh = torch.linalg.svd(a, full_matrices=False)
        return cls(a, white, u, sigma, vh)

    def undamped_error(self, whitened_rel: float, plain_rel: float, weight_norm: float) -> float:
        """‖ΔW Xᵀ‖/‖W Xᵀ‖ (the pipeline's weighted error, `metrics.relative_errors`) from the
        error in this damped whitened space, without an (out × in × in) product per candidate:
        S·Sᵀ = G + λI gives ‖ΔW·S‖² = tr(ΔW G ΔWᵀ) + λ‖ΔW‖² (exact on the Cholesky path; the
        eigh fallback clamps tiny eigenvalues)."""
        lam, a2, w2 = self.white.damping, float(self.a.square().sum()), weight_norm**2
        num = whitened_rel**2 * a2 - lam * plain_rel**2 * w2
        den = max(a2 - lam * w2, 1e-300)
        return max(num, 0.0) ** 0.5 / den**0.5

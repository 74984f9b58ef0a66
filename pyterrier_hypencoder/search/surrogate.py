"""Linear surrogates of q-nets for adaptive search: per-query ridge fits and their incremental form.

Pure tensor code; see :mod:`pyterrier_hypencoder.search.adaptive` and :mod:`~pyterrier_hypencoder.search.pooled`.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

__all__ = ['NormalEquations', 'fit_surrogates']


def fit_surrogates(x: torch.Tensor, y: torch.Tensor, mask: Optional[torch.Tensor] = None, ridge: float = 0.1):
    """Per-query ridge regression of q-net scores on document vectors.

    Args:
        x: ``[m, d]`` documents shared by all queries (one factorisation serves them all), or ``[Q, m, d]`` one set
            per query.
        y: ``[Q, m]`` their q-net scores.
        mask: ``[Q, m]`` bool, False for padding (per-query sets only).
        ridge: penalty as a share of the mean eigenvalue of the centred ``x.T @ x`` (scale free).

    Returns:
        ``(w [Q, d], b [Q])``, float32, with ``score ~ x @ w + b``.
    """
    x = x.float()
    y = y.float()
    if x.ndim == 2:
        mx, my = x.mean(0), y.mean(1, keepdim=True)
        xc, yc = x - mx, (y - my).T  # [m, d], [m, Q]
        w = _ridge_solve(xc.unsqueeze(0), yc.unsqueeze(0), ridge)[0].T
        return w, my.squeeze(1) - w @ mx
    weight = torch.ones_like(y) if mask is None else mask.float()
    y = torch.where(weight > 0, y, torch.zeros_like(y))  # padding holds -inf
    count = weight.sum(1, keepdim=True).clamp_min(1)
    mx = (weight.unsqueeze(-1) * x).sum(1) / count
    my = (weight * y).sum(1, keepdim=True) / count
    # Padding rows become zero, so they add nothing to either Gram matrix.
    xc = (x - mx.unsqueeze(1)) * weight.unsqueeze(-1)
    yc = ((y - my) * weight).unsqueeze(-1)
    w = _ridge_solve(xc, yc, ridge, pad=1 - weight).squeeze(-1)
    return w, my.squeeze(1) - (w * mx).sum(1)


def _ridge_solve(xc: torch.Tensor, yc: torch.Tensor, ridge: float, pad: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(xc.T xc + lam I)^-1 xc.T yc`` per batch row (``xc [B, m, d]``, ``yc [B, m, r]``), by Cholesky."""
    m, d = xc.shape[1], xc.shape[2]
    if m <= d:
        # Dual form: an [m, m] system instead of [d, d], with the same solution.
        gram = xc @ xc.transpose(1, 2)
        eye = torch.eye(m, dtype=xc.dtype)
        lam = ridge * gram.diagonal(dim1=1, dim2=2).sum(1) / d + 1e-6
        system = gram + lam[:, None, None] * eye
        if pad is not None:  # zero padding rows: a one on the diagonal keeps the system regular, their weight zero
            system = system + pad.unsqueeze(-1) * eye
        return xc.transpose(1, 2) @ torch.cholesky_solve(yc, torch.linalg.cholesky(system))
    gram = xc.transpose(1, 2) @ xc
    lam = ridge * gram.diagonal(dim1=1, dim2=2).sum(1) / d + 1e-6
    system = gram + lam[:, None, None] * torch.eye(d, dtype=xc.dtype)
    return torch.cholesky_solve(xc.transpose(1, 2) @ yc, torch.linalg.cholesky(system))


class NormalEquations:
    """Per-query normal equations of the ridge fit, accumulated as documents are scored (no refit re-reads them).

    Vectors are shifted by the sample mean (conditioning) and get a constant feature (the intercept, not penalised).
    The penalty grows with each query's count, so it stays ``ridge`` times the mean eigenvalue of the covariance.
    """

    def __init__(self, x_sample: torch.Tensor, y_sample: torch.Tensor, ridge: float):
        self.shift = x_sample.mean(0)
        xa = self._augment(x_sample - self.shift)
        self.gram = (xa.T @ xa).expand(len(y_sample), -1, -1).clone()  # [Q, d+1, d+1]
        self.rhs = y_sample @ xa  # [Q, d+1]
        self.count = torch.full((len(y_sample),), float(len(x_sample)))
        d = x_sample.shape[1]
        self.unit = ridge * float((x_sample - self.shift).pow(2).sum()) / (len(x_sample) * d) + 1e-9
        self.penalty = torch.ones(d + 1)
        self.penalty[-1] = 0
        self.coef = None

    @staticmethod
    def _augment(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=x.dtype)], dim=-1)

    def add(self, x: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, rows: Optional[np.ndarray] = None) -> None:
        """Adds ``x [R, m, d]`` with scores ``y [R, m]`` where ``valid``, to the queries ``rows`` (default: all)."""
        xa = self._augment(x - self.shift) * valid.unsqueeze(-1)
        gram = xa.transpose(1, 2) @ xa
        rhs = (xa * torch.where(valid, y, torch.zeros_like(y)).unsqueeze(-1)).sum(1)
        if rows is None:
            self.gram += gram
            self.rhs += rhs
            self.count += valid.sum(1)
        else:
            rows = torch.from_numpy(np.asarray(rows))
            self.gram[rows] += gram
            self.rhs[rows] += rhs
            self.count[rows] += valid.sum(1)

    def solve(self, iterations: int = 8) -> torch.Tensor:
        """Surrogate vectors ``w [Q, d]`` (the intercept does not change a ranking).

        The first solve is exact (one Cholesky factorisation: every query shares the sample's Gram matrix); later
        ones run a few Jacobi-preconditioned conjugate-gradient steps from the previous solution, since a round
        changes the system little, and a batched Cholesky per round cost more than scoring the round's documents.
        """
        diag = (self.unit * self.count)[:, None] * self.penalty + 1e-6
        if self.coef is None:
            system = self.gram[0] + torch.diag(diag[0])
            factor = torch.linalg.cholesky(system)
            self.coef = torch.cholesky_solve(self.rhs.T, factor).T.contiguous()
            return self.coef[:, :-1]

        def apply(v):
            return (self.gram @ v.unsqueeze(-1)).squeeze(-1) + diag * v

        precond = 1 / (self.gram.diagonal(dim1=1, dim2=2) + diag)
        x = self.coef
        r = self.rhs - apply(x)
        z = precond * r
        p = z
        rz = (r * z).sum(1, keepdim=True)
        for _ in range(iterations):
            ap = apply(p)
            alpha = rz / (p * ap).sum(1, keepdim=True).clamp_min(1e-30)
            x = x + alpha * p
            r = r - alpha * ap
            z = precond * r
            rz_new = (r * z).sum(1, keepdim=True)
            p = z + (rz_new / rz.clamp_min(1e-30)) * p
            rz = rz_new
        self.coef = x
        return x[:, :-1]

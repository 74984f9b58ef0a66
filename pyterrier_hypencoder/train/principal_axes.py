"""The rotation that orders a warm-started q-net's hidden units by the documents' principal axes.

A Matryoshka q-net cut to width ``w`` keeps its first ``w`` hidden units. The warm starts put standardised document
coordinate ``i`` on hidden unit ``i``, so a cut q-net would start from the encoder's first ``w`` coordinates, which
carry no more of the documents' variation than any other ``w``. :func:`principal_rotation` gives an orthogonal
``R`` to apply to the hidden units instead: their first ``w`` (for every ``w`` at once) are linear functions of the
documents' ``w`` leading principal axes, so a cut q-net starts near the best rank-``w`` similarity.

``R`` also fixes the all-ones vector (``R 1 = 1``). The q-net's parameter-free layer norm subtracts each vector's
mean over its units and divides by their spread; an orthogonal map that fixes ``1`` preserves both, so
``layer_norm(R v) = R layer_norm(v)`` and the full-width q-net scores exactly as it did without the rotation.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ['helmert_basis', 'principal_rotation']


def helmert_basis(dim: int) -> torch.Tensor:
    """``[dim, dim - 1]`` orthonormal columns spanning the vectors orthogonal to ``1`` (float64).

    Column ``k`` is ``(1, ..., 1, -(k + 1), 0, ..., 0) / sqrt((k + 1)(k + 2))`` with ``k + 1`` ones: supported on
    the first ``k + 2`` components, summing to zero there, and constant on the first ``k + 1``.
    """
    k = torch.arange(dim - 1, dtype=torch.float64)
    i = torch.arange(dim, dtype=torch.float64)[:, None]
    column = torch.where(i <= k, 1.0, torch.where(i == k + 1, -(k + 1), 0.0))
    return column / torch.sqrt((k + 1) * (k + 2))


def principal_rotation(doc_vectors, dim: int) -> torch.Tensor:
    """An orthogonal ``[dim, dim]`` matrix (float64) that fixes ``1`` and puts the documents' principal axes first.

    The axes are those of the standardised document vectors (each centred and scaled over its own components, as
    the q-net's first block sees them), ordered by the variance across documents. ``R`` maps axis ``k`` to the
    ``k``-th Helmert vector (:func:`helmert_basis`), which is zero beyond unit ``k + 1`` and constant before it.
    So for every width ``w`` at once: the first ``w`` hidden units of ``R z``, centred over those ``w`` units as the
    layer norm of a q-net cut to ``w`` centres them, are an isometric copy of ``z``'s coordinates on the
    ``w - 1`` leading axes (the later axes add only a constant over those units, which the centring removes).

    Args:
        doc_vectors: ``[n_docs, dim]`` document vectors (a sample of the corpus is enough: a few thousand).
        dim: the q-net input size they must have.

    Returns:
        ``R``, with ``R @ R.T = I`` and ``R @ 1 = 1``.

    Raises:
        ValueError: the vectors are not numeric, not ``[n_docs, dim]`` with at least two documents, or not finite.
    """
    array = np.asarray(doc_vectors)
    if not np.issubdtype(array.dtype, np.number):
        raise ValueError(f'principal axes need numeric document vectors; got an array of {array.dtype}: encode texts '
                         'first (warm_start_hypencoder encodes texts itself; warm_start_from_dot takes vectors)')
    x = torch.as_tensor(array, dtype=torch.float64)
    if x.ndim != 2 or x.shape[1] != dim or x.shape[0] < 2:
        raise ValueError(f'principal axes need [n_docs, {dim}] document vectors with n_docs >= 2; got shape '
                         f'{tuple(x.shape)}: pass the corpus vectors the q-net will score (e.g. a sample of the index)')
    if not torch.isfinite(x).all():
        raise ValueError('principal axes need finite document vectors; these contain NaN or inf')
    z = x - x.mean(dim=1, keepdim=True)
    z = z / z.norm(dim=1, keepdim=True).clamp(min=1e-12)
    z = z - z.mean(dim=0)
    basis = helmert_basis(dim)
    covariance = basis.T @ (z.T @ z) @ basis
    _, vecs = torch.linalg.eigh(covariance)
    vecs = vecs.flip(1)  # descending variance
    # a deterministic sign per axis: its largest coordinate positive
    signs = torch.sign(vecs.gather(0, vecs.abs().argmax(dim=0, keepdim=True)))
    vecs = vecs * torch.where(signs == 0, torch.ones_like(signs), signs)
    # R = 11'/dim + B V' B': maps the k-th principal axis (B V)[:, k] to the k-th Helmert vector, and 1 to 1.
    return torch.full((dim, dim), 1.0 / dim, dtype=torch.float64) + basis @ vecs.T @ basis.T

"""Inner-product search over document vectors: exact (one GEMM) or FAISS HNSW, where surrogates find candidates.

Pure NumPy / torch code; FAISS only for the HNSW index (stored with an index by ``HypencoderIndex.add_ip_index``).
"""
from __future__ import annotations

import os
from typing import Optional, Union

import numpy as np
import torch

from ..checks import check_int
from ..optional import require
from .rows import VectorsLike

__all__ = ['InnerProductIndex', 'METRICS']

METRICS = ('cosine', 'lifted')


class InnerProductIndex:
    """Top documents by inner product with per-query surrogate vectors, over a corpus' document vectors.

    Exact by default: one float32 GEMM over the corpus per search (``n`` inner products per query), which also
    skips the documents a query has already scored, so a round asks for ``m`` documents, not ``m`` plus all seen
    ones (FAISS's flat index would, and its heap over hundreds of results costs more than the GEMM). With ``hnsw_m``, a
    FAISS ``IndexHNSWFlat`` (approximate; about ``ef * M * log(n)`` distance computations per search, counted by
    FAISS). Build it once per corpus (``HypencoderIndex.add_ip_index`` stores one with the index) and pass it to every
    call.

    The HNSW graph's ``metric``:

    - ``'cosine'`` (default): a graph over the unit-normalised vectors, searched by inner product with the query,
      so it returns the documents of highest cosine with the surrogate. Adaptive search uses its answer as a
      candidate pool whose order the surrogate recomputes exactly (``x . w`` on the pool's vectors), so what counts
      is that the pool holds the best documents, and a cosine graph navigates well (``docs/approximate-search.md``).
    - ``'lifted'``: the classic reduction of inner products to L2 (every document gets the extra coordinate
      ``sqrt(R - |x|^2)``, ``R`` the largest squared norm, the query a 0), exact in ranking but, with norms that
      vary this much, the extra coordinate dominates the distances and the graph navigates poorly.

    Args:
        vectors: ``[n, dim]`` document vectors (NumPy array, memory map or tensor); copied as float32 (HNSW: one
            block at a time, into the FAISS index).
        hnsw_m: 0 for exact search, else the HNSW graph degree (e.g. 32).
        ef_search: HNSW search beam (ignored for exact search).
        ef_construction: HNSW build beam.
        metric: the HNSW graph's geometry, ``'cosine'`` or ``'lifted'`` (ignored for exact search).
        verbose: a progress bar while the HNSW index is built.
    """

    def __init__(self, vectors: VectorsLike, hnsw_m: int = 0, ef_search: int = 256, ef_construction: int = 40,
                 metric: str = 'cosine', verbose: bool = False):
        check_int('hnsw_m', hnsw_m, 0)
        check_int('ef_search', ef_search)
        check_int('ef_construction', ef_construction)
        if metric not in METRICS:
            raise ValueError(f'metric must be one of {METRICS}; got {metric!r}')
        if isinstance(vectors, torch.Tensor):
            vectors = vectors.detach().float().cpu().numpy()
        if vectors.ndim != 2 or len(vectors) == 0:
            raise ValueError(f'vectors must have shape [n_docs, dim] with n_docs >= 1; got {tuple(vectors.shape)}')
        self.n, self.dim, self.hnsw, self.ef_search = vectors.shape[0], vectors.shape[1], bool(hnsw_m), int(ef_search)
        self.metric = metric if hnsw_m else 'exact'
        if hnsw_m:
            faiss = _faiss()
            step = 1 << 16  # rows per block: float32 copies of one block at a time (vectors may be a float16 map)
            if metric == 'cosine':
                self.index = faiss.IndexHNSWFlat(self.dim, int(hnsw_m), faiss.METRIC_INNER_PRODUCT)
            else:
                radius = max(float(np.square(self._block(vectors, s, step)).sum(1).max())
                             for s in range(0, self.n, step))
                self.index = faiss.IndexHNSWFlat(self.dim + 1, int(hnsw_m))
            self.index.hnsw.efConstruction = int(ef_construction)
            self.index.hnsw.efSearch = int(ef_search)
            blocks = range(0, self.n, step)
            if verbose:
                import pyterrier as pt
                blocks = pt.tqdm(blocks, desc='HNSW inner-product index', unit='block')
            for start in blocks:
                x = self._block(vectors, start, step)
                if metric == 'cosine':
                    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
                else:
                    lift = np.sqrt(np.maximum(radius - np.square(x).sum(1), 0))
                    x = np.hstack([x, lift[:, None].astype(np.float32)])
                self.index.add(np.ascontiguousarray(x, dtype=np.float32))
        else:
            x = np.ascontiguousarray(vectors, dtype=np.float32)
            self.x = torch.from_numpy(x if x.flags.writeable else x.copy())

    @staticmethod
    def _block(vectors, start: int, step: int) -> np.ndarray:
        return np.ascontiguousarray(vectors[start:start + step], dtype=np.float32)

    def __repr__(self) -> str:
        if self.hnsw:
            return f'InnerProductIndex({self.n} x {self.dim}, HNSW M={self.index.hnsw.nb_neighbors(1)}, ' \
                   f'{self.metric}, ef_search={self.ef_search})'
        return f'InnerProductIndex({self.n} x {self.dim}, exact)'

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Writes an HNSW index to ``path`` in FAISS's own format (no pickle); an exact index has nothing to save."""
        if not self.hnsw:
            raise ValueError('an exact InnerProductIndex is the vectors themselves; only HNSW indexes are saved')
        _faiss().write_index(self.index, os.fspath(path))

    @classmethod
    def load(cls, path: Union[str, os.PathLike], ef_search: int = 256) -> InnerProductIndex:
        """Reads an HNSW index written by :meth:`save`.

        Raises:
            ValueError: when the file is not a FAISS HNSW inner-product index.
        """
        check_int('ef_search', ef_search)
        faiss = _faiss()
        try:
            index = faiss.read_index(os.fspath(path))
        except RuntimeError as e:
            raise ValueError(f'{path} is not a readable FAISS index ({e}); rebuild it') from None
        metric = {faiss.METRIC_INNER_PRODUCT: 'cosine', faiss.METRIC_L2: 'lifted'}.get(getattr(index, 'metric_type', None))
        if not isinstance(index, faiss.IndexHNSWFlat) or metric is None:
            raise ValueError(f'{path} holds a {type(index).__name__}, not the HNSW index of an InnerProductIndex; '
                             'rebuild it')
        self = cls.__new__(cls)
        self.n, self.hnsw, self.ef_search, self.index, self.metric = index.ntotal, True, int(ef_search), index, metric
        self.dim = index.d - (metric == 'lifted')
        index.hnsw.efSearch = int(ef_search)
        return self

    def search(self, queries: np.ndarray, m: int, seen: Optional[np.ndarray] = None):
        """Top ``m`` documents per row of ``queries`` ``[Q, dim]`` that ``seen`` ``[Q, n]`` (bool) does not mark.

        Returns:
            ``(ids [Q, m'], inner products per query)``; ids are -1 where fewer documents qualify.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self.hnsw:
            extra = 0 if seen is None else int(seen.sum(1).max())
            k = min(int(m) + extra, self.n)
            stats = _faiss().cvar.hnsw_stats
            stats.reset()
            self.index.hnsw.efSearch = max(self.ef_search, k)
            if self.metric == 'lifted':
                queries = np.hstack([queries, np.zeros((len(queries), 1), dtype=np.float32)])
            _, ids = self.index.search(queries, k)
            ids = ids.astype(np.int64)
            if seen is not None:
                fresh = (ids >= 0) & ~np.take_along_axis(seen, np.maximum(ids, 0), axis=1)
                keep = fresh & (np.cumsum(fresh, axis=1) <= m)
                ids = np.where(keep, ids, -1)
                order = np.argsort(~keep, axis=1, kind='stable')[:, :m]  # kept ones first, in rank order
                ids = np.take_along_axis(ids, order, axis=1)
            return ids, int(np.ceil(stats.ndis / max(1, len(queries))))
        scores = torch.from_numpy(queries) @ self.x.T  # [Q, n]
        if seen is not None:
            scores[torch.from_numpy(seen)] = float('-inf')
        top, ids = torch.topk(scores, min(int(m), self.n), dim=1)
        ids = ids.numpy().astype(np.int64)
        ids[~np.isfinite(top.numpy())] = -1
        return ids, self.n


def _faiss():
    require('faiss', purpose='the HNSW inner-product index')
    import faiss
    return faiss

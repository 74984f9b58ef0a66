"""Adaptive search at scale: linear surrogates over a candidate pool drawn from an inner-product ANN index.

:func:`~pyterrier_hypencoder.search.adaptive.adaptive_search` refits a surrogate and asks for its best unseen documents every
round, which is exact but touches the whole corpus each time (an inner-product GEMM over all ``n`` documents, a
``[queries, n]`` mask and a top-k over ``n``). :func:`pooled_search` keeps every per-round step inside a pool:

1. **Sample.** Score ``n_sample`` random documents (shared by all queries: one :meth:`QNets.score` call) and fit
   each query a ridge-regression surrogate ``score ~ w . x + b``. Cost: ``n_sample`` q-net evaluations, independent
   of ``n``.
2. **Pool.** Ask an approximate inner-product index (:class:`~pyterrier_hypencoder.search.ip_index.InnerProductIndex`
   with HNSW, built once with the index) for each surrogate's top ``pool`` documents. Cost: one HNSW search with a
   beam of ``pool``, about ``pool * M * log(n)`` inner products.
3. **Rounds.** Rank the unscored pool documents by the current surrogate (``pool`` inner products, no corpus
   access), score the best ``n_entry`` with the q-net (by default the whole pool: one round per draw), and refit
   the surrogate on everything scored (incremental normal equations). Cost per round: ``n_entry`` q-net
   evaluations plus ``pool`` inner products; the rounds depend on the q-net, not on ``n``.
4. **Refresh.** When a round adds nothing to a query's top ``stop_k`` (or its pool is used up), the refitted
   surrogate, now fitted on the sample and every pool document scored, draws a fresh pool from the ANN index (step 2 again);
   the query stops once that has happened ``refreshes`` times, or a fresh draw brings nothing unseen.

Nothing per query scales with ``n`` except the ANN searches (sublinear for HNSW); "seen" sets live in the pool
(``[queries, pool]``), not in ``[queries, n]`` bitmaps. With an exact :class:`InnerProductIndex` the same code runs
on small corpora (one GEMM over the corpus per draw), which the tests use to check it against exhaustive search.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ..checks import check_int
from ..model.qnet import QNets
from .adaptive import WalkResult, check_common
from .ip_index import InnerProductIndex
from .rows import VectorsLike, default_chunk_size, gather_rows
from .surrogate import NormalEquations

__all__ = ['pooled_search']


class _Top:
    """Each query's best ``k`` scored documents (score descending; row ascending among ties, via a stable sort)."""

    def __init__(self, n_queries: int, k: int, stop_k: int):
        self.scores = torch.full((n_queries, k), float('-inf'))
        self.ids = np.full((n_queries, k), -1, dtype=np.int64)
        self.stop_k = stop_k

    def merge(self, rows: np.ndarray, ids: np.ndarray, scores: torch.Tensor) -> np.ndarray:
        """Adds ``ids``/``scores`` ``[len(rows), m]`` (id -1: padding) to ``rows``; returns how many entered each
        row's top ``stop_k``."""
        k = self.scores.shape[1]
        rows_t = torch.from_numpy(rows)
        cat_s = torch.cat([self.scores[rows_t], scores], dim=1)
        cat_i = np.concatenate([self.ids[rows], ids], axis=1)
        top, pos = torch.topk(cat_s, k, dim=1)
        pos = pos.numpy()
        self.scores[rows_t] = top
        self.ids[rows] = np.take_along_axis(cat_i, pos, axis=1)
        head = pos[:, :self.stop_k]
        return ((head >= k) & (np.take_along_axis(cat_i, head, axis=1) >= 0)).sum(1)


class _Pool:
    """Per-query candidate pools: ids ``[Q, P]`` (-1 = padding), their vectors, and which are still unscored."""

    def __init__(self, qnets: QNets, vectors: VectorsLike, ids: np.ndarray, sample: np.ndarray):
        self.qnets, self.vectors, self.sample = qnets, vectors, sample
        self.ids = np.full((len(ids), 0), -1, dtype=np.int64)
        self.x = torch.zeros(len(ids), 0, vectors.shape[1])
        self.open = np.zeros((len(ids), 0), dtype=bool)
        self.add(np.arange(len(ids)), ids)

    def add(self, rows: np.ndarray, found: np.ndarray) -> np.ndarray:
        """Appends to ``rows`` the ids of ``found`` ``[len(rows), m]`` they do not hold yet (nor the shared sample);
        returns how many each row gained."""
        n = self.vectors.shape[0]
        valid = found >= 0
        # One sorted key per (query, document) the pool already holds, so membership is a searchsorted, not a bitmap.
        held = (rows[:, None] * n + self.ids[rows])[self.ids[rows] >= 0]
        key = rows[:, None] * n + np.maximum(found, 0)
        fresh = valid & ~np.isin(key, held) & ~np.isin(found, self.sample)
        # A document appears once per ANN answer, so no de-duplication within `found` is needed.
        gained = fresh.sum(1)
        width = int(gained.max(initial=0))
        if width == 0:
            return gained
        add_ids = np.full((len(rows), width), -1, dtype=np.int64)
        order = np.argsort(~fresh, axis=1, kind='stable')[:, :width]  # fresh ones first, in ANN rank order
        add_ids[:] = np.where(np.take_along_axis(fresh, order, axis=1), np.take_along_axis(found, order, axis=1), -1)
        # Widen every row by `width` columns (padding), then fill the rows that gained documents.
        q = len(self.ids)
        self.ids = np.concatenate([self.ids, np.full((q, width), -1, dtype=np.int64)], axis=1)
        self.open = np.concatenate([self.open, np.zeros((q, width), dtype=bool)], axis=1)
        self.x = torch.cat([self.x, torch.zeros(q, width, self.x.shape[2])], dim=1)
        cols = slice(self.ids.shape[1] - width, None)
        self.ids[rows, cols] = add_ids
        self.open[rows, cols] = add_ids >= 0
        self.x[torch.from_numpy(rows), cols] = gather_rows(self.qnets, self.vectors, np.maximum(add_ids, 0)).float().cpu()
        return gained

    def best(self, rows: np.ndarray, w: torch.Tensor, m: np.ndarray) -> tuple:
        """The ``m[i]`` open pool documents of ``rows[i]`` with the highest surrogate score ``w[i] . x`` (closed as
        they are returned): ``[len(rows), max(m)]`` ids, -1 where a row has fewer, and their vectors from the pool
        (so a round reads no document twice from the corpus)."""
        # Indexing copies the pool's vectors: skip it while every query is active.
        x = self.x if len(rows) == len(self.ids) else self.x[torch.from_numpy(rows)]
        s = torch.bmm(x, w.unsqueeze(-1)).squeeze(-1)
        s[~torch.from_numpy(self.open[rows])] = float('-inf')
        top, pos = torch.topk(s, min(int(m.max(initial=0)), s.shape[1]), dim=1)
        ok = np.isfinite(top.numpy()) & (np.arange(pos.shape[1]) < m[:, None])
        vecs = torch.gather(x, 1, pos.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        pos = pos.numpy()
        r, c = np.nonzero(ok)
        self.open[rows[r], pos[r, c]] = False
        return np.where(ok, np.take_along_axis(self.ids[rows], pos, axis=1), -1), vecs


def _score(qnets: QNets, rows: np.ndarray, vecs: torch.Tensor, valid: np.ndarray) -> torch.Tensor:
    """q-net scores ``[len(rows), m]`` of the documents ``vecs`` ``[len(rows), m, dim]`` for the queries ``rows``
    (``-inf`` where not ``valid``), in blocks of rows that keep the activations within the q-nets' bound."""
    n_rows, m = valid.shape
    out = torch.full((n_rows, m), float('-inf'))
    if m == 0:
        return out
    block = max(1, qnets.step_elements() // (m * max(qnets.spec.vector_dimensions)))
    # Indexing q-nets by a tensor copies all their weights: cheaper to score every row while most are active.
    every = 2 * n_rows >= len(qnets)
    for start in range(0, len(qnets) if every else n_rows, block):
        stop = min(start + block, len(qnets) if every else n_rows)
        if every:
            x = torch.zeros(stop - start, m, vecs.shape[2])
            local = np.nonzero((rows >= start) & (rows < stop))[0]
            x[torch.from_numpy(rows[local] - start)] = vecs[torch.from_numpy(local)]
            scores = qnets[start:stop].score_pairs(x).float().cpu()
            out[torch.from_numpy(local)] = scores[torch.from_numpy(rows[local] - start)]
        else:
            out[start:stop] = qnets[torch.from_numpy(rows[start:stop])].score_pairs(vecs[start:stop]).float().cpu()
    out[~torch.from_numpy(valid)] = float('-inf')
    return out


@torch.no_grad()
def pooled_search(qnets: QNets, vectors: VectorsLike, ip_index: InnerProductIndex, k: int, *, n_sample: int = 128,
                  pool: int = 1024, n_entry: Optional[int] = None, max_rounds: int = 32, refreshes: int = 1,
                  stop_k: Optional[int] = None, max_scored: Optional[int] = None, ridge: float = 0.1,
                  seed: int = 0) -> WalkResult:
    """Approximate top-``k``: refitted linear surrogates over candidate pools from an inner-product ANN index.

    See the module docstring for the steps and what each costs as the corpus grows.

    Args:
        qnets: the q-nets of ``Q`` queries.
        vectors: ``[n, dim]`` document vectors (NumPy array, memory map, or tensor).
        ip_index: an :class:`InnerProductIndex` over ``vectors``: HNSW for large corpora (e.g.
            ``HypencoderIndex.ip_index()``), exact for small ones.
        k: results per query; ``min(k, n)`` are returned.
        n_sample: random documents scored to fit the first surrogates (shared by all queries); clamped to ``n``.
        pool: documents drawn from the ANN index per draw (the HNSW beam is at least this wide).
        n_entry: pool documents scored per round: the surrogate's best among those not scored yet. None (default):
            the whole pool, so a draw is scored in one round of large GEMMs and the surrogate only has to bring the
            right documents into the pool (smaller rounds missed more of the top 10 and cost more per query in
            per-round overhead than the extra documents scored: ``docs/million-documents.md``).
        max_rounds: most rounds per query.
        refreshes: fresh pools a query may draw with its refitted surrogate once its rounds stop improving.
        stop_k: a round "improves" when it adds to the top ``stop_k`` (default ``k``; at most ``k``).
        max_scored: budget of q-net evaluations per query; the sample is always scored (default: none).
        ridge: ridge penalty of the surrogate fit, relative to the mean eigenvalue of the Gram matrix.
        seed: seed of the random sample; results are deterministic given it.

    Returns:
        A :class:`~pyterrier_hypencoder.search.adaptive.WalkResult` (``n_inner``: inner products, ANN and pool;
        ``n_iter``: rounds).

    Raises:
        ValueError: on a parameter out of range, vectors of the wrong shape, or an ``ip_index`` of another corpus.
    """
    for name, value, low in (('pool', pool, 1), ('max_rounds', max_rounds, 0), ('refreshes', refreshes, 0)):
        check_int(name, value, low)
    n_entry = pool if n_entry is None else n_entry
    n = check_common(qnets, vectors, k, n_sample, n_entry, ridge, seed)
    if stop_k is not None:
        check_int('stop_k', stop_k)
    if max_scored is not None:
        check_int('max_scored', max_scored)
    if not isinstance(ip_index, InnerProductIndex):
        raise TypeError(f'ip_index must be an InnerProductIndex over the vectors; got {type(ip_index).__name__}')
    if ip_index.n != n or ip_index.dim != vectors.shape[1]:
        raise ValueError(f'ip_index holds {ip_index.n} vectors of {ip_index.dim} dims; the corpus has {n} of '
                         f'{vectors.shape[1]}: was it built for another index?')
    k = min(int(k), n)
    stop_k = min(int(stop_k or k), k)
    budget = np.iinfo(np.int64).max if max_scored is None else int(max_scored)
    n_queries = len(qnets)
    rows = np.arange(n_queries)

    # 1. The shared sample and the first surrogates.
    sample = np.sort(np.random.default_rng(seed).choice(n, min(int(n_sample), n), replace=False))
    step = default_chunk_size(n_queries, qnets.dim)
    sample_scores = torch.cat([qnets.score(gather_rows(qnets, vectors, sample[s:s + step])).float().cpu()
                               for s in range(0, len(sample), step)], dim=1)
    top = _Top(n_queries, k, stop_k)
    top.merge(rows, np.broadcast_to(sample, sample_scores.shape).copy(), sample_scores)
    n_scored = np.full(n_queries, len(sample), dtype=np.int64)
    n_inner = np.zeros(n_queries, dtype=np.int64)
    n_iter = np.zeros(n_queries, dtype=np.int64)
    normal = NormalEquations(gather_rows(qnets, vectors, sample).float().cpu(), sample_scores, ridge)
    w = normal.solve()

    # 2. The first pools.
    draw = min(int(pool), n)
    found, per_query = ip_index.search(w.numpy(), draw)
    n_inner += per_query
    pools = _Pool(qnets, vectors, found, sample)
    left = np.full(n_queries, int(refreshes))
    active = np.ones(n_queries, dtype=bool)

    # 3-4. Rounds within the pools; a fresh draw when a query's rounds stop improving.
    for _ in range(max_rounds):
        active &= n_scored < budget
        act = np.nonzero(active)[0]
        if len(act) == 0:
            break
        n_inner[act] += pools.ids.shape[1]
        ids, vecs = pools.best(act, w[torch.from_numpy(act)], np.minimum(n_entry, budget - n_scored[act]))
        n_iter[act] += 1
        if ids.shape[1] == 0:  # no active pool holds an unscored document (e.g. the sample covered the corpus)
            entered = np.zeros(len(act), dtype=np.int64)
        else:
            valid = ids >= 0
            scores = _score(qnets, act, vecs, valid)
            n_scored[act] += valid.sum(1)
            entered = top.merge(act, ids, scores)
        stall = (entered == 0) | ~pools.open[act].any(1)
        # Refit only the queries that will search again: one whose round ends it with no fresh draw left never
        # uses its surrogate again (and that Gram update costs as much as scoring the documents).
        refit = ~(stall & (left[act] == 0)) if ids.shape[1] else np.zeros(len(act), dtype=bool)
        if refit.any():
            keep = torch.from_numpy(refit)
            normal.add(vecs[keep], scores[keep], torch.from_numpy(valid[refit]), rows=act[refit])
            w = normal.solve()
        stalled = act[stall]
        active[stalled[left[stalled] == 0]] = False
        again = stalled[left[stalled] > 0]
        if len(again):
            left[again] -= 1
            found, per_query = ip_index.search(w[torch.from_numpy(again)].numpy(), draw)
            n_inner[again] += per_query
            gained = pools.add(again, found)
            active[again[(gained == 0) & ~pools.open[again].any(1)]] = False
    return WalkResult(top.scores, torch.from_numpy(top.ids), torch.from_numpy(n_scored), torch.from_numpy(n_inner),
                      torch.from_numpy(n_iter))

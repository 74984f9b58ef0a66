"""Adaptive approximate search: surrogate entry points, a best-first graph walk, and a stopping rule.

The paper's walk (:func:`~pyterrier_hypencoder.search.graph_walk.graph_search`) starts every query from the same random sample
and expands the best of the documents scored last. This module instead:

1. scores a small random sample (shared by all queries, so it is one efficient :meth:`QNets.score` call) and fits
   each query a ridge-regression *linear surrogate* of its q-net on it (``score ~ w . x + b``), optionally refitted
   on everything scored so far;
2. takes each surrogate's top documents over the whole corpus from an inner-product index (FAISS; one inner product
   per document, counted) and scores them with the q-net: these are the walk's entry points;
3. walks the neighbour graph best first over a *global* pool: the best ``ef`` documents scored so far, of which the
   best not yet expanded are expanded next (HNSW's ``ef`` search, in batches of ``expand`` per query);
4. stops a query when every document in its pool has been expanded (the best unexpanded candidate ranks below the
   ``ef``-th result, so it could only enter the top ``ef`` through a neighbour of a better document), or when it has
   spent its budget of q-net evaluations.

:func:`surrogate_search` is steps 1-2 alone (the two-stage baseline). Queries are processed together: each step
scores one padded ``[queries, documents]`` batch. Pure tensor / NumPy / FAISS code (no pandas).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np
import torch

from ..checks import check_int
from ..model.qnet import QNets
from .ip_index import InnerProductIndex
from .rows import VectorsLike, check_vectors, default_chunk_size, gather_rows, score_padded
from .surrogate import NormalEquations, fit_surrogates

DEFAULT_N_ENTRY = 64  # documents per exact surrogate round (adaptive_search)

__all__ = ['InnerProductIndex', 'WalkResult', 'adaptive_search', 'surrogate_search', 'fit_surrogates']

# Bytes of the per-query "seen" bitmaps of one walk group; more queries are walked group by group.
_SEEN_BYTES = 1 << 28


class WalkResult(NamedTuple):
    """Results and costs of an approximate search, all on the CPU.

    Attributes:
        scores: float32 ``[Q, k]`` q-net scores, best first (``-inf`` where fewer than ``k`` were found).
        ids: int64 ``[Q, k]`` document row ids (``-1`` where fewer than ``k`` were found).
        n_scored: int64 ``[Q]`` q-net evaluations (documents scored) per query.
        n_inner: int64 ``[Q]`` surrogate inner products per query (FAISS distance computations).
        n_iter: int64 ``[Q]`` iterations per query: surrogate rounds plus graph-walk steps.
    """
    scores: torch.Tensor
    ids: torch.Tensor
    n_scored: torch.Tensor
    n_inner: torch.Tensor
    n_iter: torch.Tensor


def check_common(qnets, vectors, k, n_sample, n_entry, ridge, seed):
    check_int('k (the number of results)', k)
    check_int('n_sample', n_sample, 2)
    check_int('n_entry', n_entry, 0)
    check_int('seed', seed, 0)
    if not isinstance(ridge, (int, float)) or isinstance(ridge, bool) or not ridge > 0:
        raise ValueError(f'ridge must be a number > 0; got {ridge!r}')
    return check_vectors(qnets, vectors)


class _State:
    """What a group of queries has scored: a seen bitmap, the best ``ef`` results and which were expanded."""

    def __init__(self, n_queries: int, n: int, k: int, ef: int):
        self.k = k
        self.seen = np.zeros((n_queries, n), dtype=bool)
        self.scores = torch.full((n_queries, ef), float('-inf'))
        self.ids = np.full((n_queries, ef), -1, dtype=np.int64)
        self.expanded = np.zeros((n_queries, ef), dtype=bool)
        self.n_scored = np.zeros(n_queries, dtype=np.int64)
        self.n_inner = np.zeros(n_queries, dtype=np.int64)
        self.n_iter = np.zeros(n_queries, dtype=np.int64)
        # The last scores, for refitting the surrogates (only kept while refits remain).
        self.all_scores = []

    def merge(self, rows: np.ndarray, ids: np.ndarray, scores: torch.Tensor, keep_all: bool) -> np.ndarray:
        """Adds newly scored documents (``ids``/``scores`` ``[len(rows), m]``, id -1 = padding) to rows ``rows``;
        returns how many of them entered each row's top ``k``."""
        valid = ids >= 0
        self.n_scored[rows] += valid.sum(1)
        if keep_all:
            self.all_scores.append(scores)
        ef = self.scores.shape[1]
        rows_t = torch.from_numpy(rows)
        cat_s = torch.cat([self.scores[rows_t], scores], dim=1)
        cat_i = np.concatenate([self.ids[rows], ids], axis=1)
        cat_x = np.concatenate([self.expanded[rows], np.zeros(ids.shape, dtype=bool)], axis=1)
        top, pos = torch.topk(cat_s, ef, dim=1)
        pos = pos.numpy()
        self.scores[rows_t] = top
        self.ids[rows] = np.take_along_axis(cat_i, pos, axis=1)
        self.expanded[rows] = np.take_along_axis(cat_x, pos, axis=1)
        # New documents among the first k: the rounds' stopping rule.
        return ((pos[:, :self.k] >= ef) & (np.take_along_axis(cat_i, pos[:, :self.k], axis=1) >= 0)).sum(1)


def _pad(owner: np.ndarray, cand: np.ndarray, n_rows: int) -> np.ndarray:
    """Pairs (row ``owner``, document ``cand``), sorted by row, as an ``[n_rows, width]`` id array padded with -1."""
    counts = np.bincount(owner, minlength=n_rows)
    out = np.full((n_rows, max(1, int(counts.max(initial=0)))), -1, dtype=np.int64)
    slot = np.arange(len(cand)) - np.repeat(np.cumsum(counts) - counts, counts)
    out[owner, slot] = cand
    return out


def _score_new(qnets: QNets, vectors, state: _State, rows: np.ndarray, ids: np.ndarray, keep_all: bool) -> np.ndarray:
    """Scores ``ids`` (``[len(rows), m]``, -1 = padding) with the q-nets of ``rows`` and merges them into ``state``;
    returns how many entered each row's top ``k``."""
    valid = ids >= 0
    if 2 * len(rows) >= len(qnets):
        # Indexing q-nets by a tensor copies all their weights (113 MB for 32 six-layer 384-d q-nets): cheaper to
        # score every row and drop the others while at least half of the queries are still walking.
        full = np.full((len(qnets), ids.shape[1]), -1, dtype=np.int64)
        full[rows] = ids
        scores = score_padded(qnets, vectors, np.maximum(full, 0), full >= 0)[torch.from_numpy(rows)]
    else:
        scores = score_padded(qnets[torch.from_numpy(rows)], vectors, np.maximum(ids, 0), valid)
    r, c = np.nonzero(valid)
    state.seen[rows[r], ids[r, c]] = True
    return state.merge(rows, ids, scores, keep_all)


def _surrogate_rounds(qnets, vectors, state, sample, sample_scores, n_entry, rounds, ridge, ip_index, stop, budget):
    """Fits the surrogates on the sample, then per round scores each surrogate's best ``n_entry`` unseen documents
    and refits on everything scored. With ``stop``, a query's rounds end once a round adds nothing to its top ``k``."""
    n_queries = len(qnets)
    rows = np.arange(n_queries)
    state.seen[:, sample] = True
    state.merge(rows, np.broadcast_to(sample, sample_scores.shape).copy(), sample_scores, False)
    x_sample = gather_rows(qnets, vectors, sample).float().cpu()
    if rounds > 1:
        normal = NormalEquations(x_sample, sample_scores, ridge)
        w = normal.solve()
    else:
        w, _ = fit_surrogates(x_sample, sample_scores, ridge=ridge)
    active = np.ones(n_queries, dtype=bool)
    for r in range(rounds if n_entry else 0):
        active &= state.n_scored < budget
        if not active.any():
            break
        found, per_query = ip_index.search(w.numpy(), n_entry, state.seen)
        state.n_inner[active] += per_query
        fresh = (found >= 0) & active[:, None]
        # The best documents each surrogate ranks that its query has not scored yet, within its budget.
        fresh &= np.cumsum(fresh, axis=1) <= np.minimum(n_entry, budget - state.n_scored)[:, None]
        owner, col = np.nonzero(fresh)
        ids = _pad(owner, found[owner, col], n_queries)
        last = r == rounds - 1
        entered = _score_new(qnets, vectors, state, rows, ids, not last)
        state.n_iter[active] += 1
        if stop:
            active &= entered > 0
        if last or not active.any():
            break
        normal.add(gather_rows(qnets, vectors, np.maximum(ids, 0)).float().cpu(), state.all_scores.pop(),
                   torch.from_numpy(ids >= 0))
        w = normal.solve()


def _walk(qnets, vectors, edges, state, expand, max_scored, max_iter):
    """Steps 3-4: best-first expansion of each query's unexpanded top-``ef`` documents, in padded batches."""
    n = vectors.shape[0]
    n_queries = len(qnets)
    active = np.ones(n_queries, dtype=bool)
    for _ in range(max_iter):
        active &= state.n_scored < max_scored
        # Pool entries worth expanding: scored (finite) and not expanded yet. None left: the query has converged.
        open_ = ~state.expanded & np.isfinite(state.scores.numpy())
        active &= open_.any(axis=1)
        act = np.nonzero(active)[0]
        if len(act) == 0:
            break
        # The pool is sorted best first, so the first `expand` open entries are the best unexpanded ones.
        pick = open_[act] & (np.cumsum(open_[act], axis=1) <= expand)
        owner, col = np.nonzero(pick)
        state.expanded[act[owner], col] = True
        state.n_iter[act] += 1
        neighbours = np.asarray(edges[state.ids[act[owner], col]], dtype=np.int64)
        owner = np.repeat(owner, neighbours.shape[1])
        cand = neighbours.reshape(-1)
        keep = (cand >= 0) & (cand < n)
        owner, cand = owner[keep], cand[keep]
        keep = ~state.seen[act[owner], cand]
        key = np.unique(owner[keep] * n + cand[keep])  # one per (query, document), sequential reads per query
        owner, cand = key // n, key % n
        if len(key) == 0:
            continue
        # The budget caps the last step: keep the first `room` new documents of each query.
        counts = np.bincount(owner, minlength=len(act))
        room = max_scored - state.n_scored[act]
        rank = np.arange(len(key)) - np.repeat(np.cumsum(counts) - counts, counts)
        keep = rank < room[owner]
        owner, cand = owner[keep], cand[keep]
        walking = np.bincount(owner, minlength=len(act)) > 0
        owner = (np.cumsum(walking) - 1)[owner]
        rows = act[walking]
        if len(rows):
            _score_new(qnets, vectors, state, rows, _pad(owner, cand, len(rows)), False)


def _run(qnets, vectors, edges, k, ef, n_sample, n_entry, rounds, stop, budget, ridge, seed, ip_index, walk_args):
    n = vectors.shape[0]
    k = min(int(k), n)
    ef = min(max(int(ef), k), n)
    if ip_index is None:
        ip_index = InnerProductIndex(vectors)
    elif ip_index.n != n or ip_index.dim != vectors.shape[1]:
        raise ValueError(f'ip_index holds {ip_index.n} vectors of {ip_index.dim} dims; the corpus has '
                         f'{n} of {vectors.shape[1]}: was it built for another index?')
    sample = np.sort(np.random.default_rng(seed).choice(n, min(int(n_sample), n), replace=False))
    step = default_chunk_size(len(qnets), qnets.dim)
    sample_scores = torch.cat([qnets.score(gather_rows(qnets, vectors, sample[s:s + step])).float().cpu()
                               for s in range(0, len(sample), step)], dim=1)
    group = max(1, _SEEN_BYTES // n)
    parts = []
    for s in range(0, len(qnets), group):
        sub = qnets[s:s + group]
        state = _State(len(sub), n, k if stop is True or not stop else min(int(stop), k), ef)
        _surrogate_rounds(sub, vectors, state, sample, sample_scores[s:s + group], n_entry, rounds, ridge, ip_index,
                          stop, budget)
        if walk_args is not None:
            _walk(sub, vectors, edges, state, walk_args[0], budget, walk_args[1])
        parts.append(state)
    ids = torch.from_numpy(np.concatenate([p.ids[:, :k] for p in parts]))
    scores = torch.cat([p.scores[:, :k] for p in parts])
    return WalkResult(scores, ids, *(torch.from_numpy(np.concatenate([getattr(p, a) for p in parts]))
                                     for a in ('n_scored', 'n_inner', 'n_iter')))


_NO_BUDGET = np.iinfo(np.int64).max


@torch.no_grad()
def surrogate_search(qnets: QNets, vectors: VectorsLike, k: int, *, n_sample: int = 500,
                     n_entry: Optional[int] = 500,
                     refits: int = 0, ridge: float = 0.1, seed: int = 0,
                     ip_index: Optional[InnerProductIndex] = None) -> WalkResult:
    """Two-stage approximate top-``k``: score a random sample, fit linear surrogates, score their top documents.

    Args:
        qnets: the q-nets of ``Q`` queries.
        vectors: ``[n, dim]`` document vectors (NumPy array, memory map, or tensor).
        k: results per query; ``min(k, n)`` are returned.
        n_sample: random documents scored to fit the surrogates (the same for every query); clamped to ``n``.
        n_entry: documents each surrogate ranks best (among those not scored yet) that are then scored (None:
            ``DEFAULT_N_ENTRY``).
        refits: times the surrogates are refitted on everything scored so far, each followed by ``n_entry`` more.
        ridge: ridge penalty, relative to the mean eigenvalue of the documents' Gram matrix.
        seed: seed of the random sample.
        ip_index: an :class:`InnerProductIndex` over ``vectors`` (default: an exact one, built per call).

    Returns:
        A :class:`WalkResult` (``n_iter`` counts the surrogate rounds).

    Raises:
        ValueError: on a parameter out of range or vectors of the wrong shape.
    """
    n_entry = DEFAULT_N_ENTRY if n_entry is None else n_entry
    check_common(qnets, vectors, k, n_sample, n_entry, ridge, seed)
    check_int('refits', refits, 0)
    return _run(qnets, vectors, None, k, k, n_sample, n_entry, refits + 1, False, _NO_BUDGET, ridge, seed, ip_index,
                None)


@torch.no_grad()
def adaptive_search(qnets: QNets, vectors: VectorsLike, edges: Optional[np.ndarray], k: int, *, n_sample: int = 128,
                    n_entry: Optional[int] = DEFAULT_N_ENTRY, max_rounds: int = 32, expand: int = 0, ef: Optional[int] = None,
                    max_scored: Optional[int] = None, max_iter: int = 10000, stop_k: Optional[int] = None,
                    ridge: float = 0.1, seed: int = 0, ip_index: Optional[InnerProductIndex] = None) -> WalkResult:
    """Approximate top-``k``: rounds of refitted linear surrogates, then (optionally) a best-first graph walk.

    See the module docstring. Surrogate rounds end for a query when a round adds nothing to its top ``k``, after
    ``max_rounds``, or on its budget; the graph walk (``expand > 0``) when all of its best ``ef`` documents have been
    expanded, on its budget, or after ``max_iter`` steps. With ``ef >= n`` on a connected graph the walk scores
    every reachable document, so it returns exhaustive search's results; so does ``n_sample >= n``.

    Args:
        qnets: the q-nets of ``Q`` queries.
        vectors: ``[n, dim]`` document vectors (NumPy array, memory map, or tensor).
        edges: ``[n, K]`` neighbour row ids per document (nearest first); ids outside ``[0, n)`` are ignored,
            so rows may have fewer valid neighbours than ``K``. Only read when ``expand > 0`` (may be None then).
        k: results per query; ``min(k, n)`` are returned.
        n_sample: random documents scored to fit the first surrogates (shared by all queries); clamped to ``n``.
        n_entry: documents scored per surrogate round: the surrogate's best not scored yet (None: the default).
        max_rounds: most surrogate rounds (each: search, score ``n_entry``, refit); 0 skips them.
        expand: graph walk: pool documents expanded per query per step; 0 (default) skips the walk.
        ef: graph walk: size of the pool whose documents are expanded (default ``k``; at least ``k``).
        max_scored: budget of q-net evaluations per query; the sample is always scored (default: none).
        max_iter: graph walk: maximum number of expansion steps.
        stop_k: the rounds stop once a round adds nothing to the top ``stop_k`` (default ``k``; at most ``k``):
            e.g. 10 when only the first 10 of 100 results need to be exact.
        ridge: ridge penalty of the surrogate fit, relative to the mean eigenvalue of the Gram matrix.
        seed: seed of the random sample; results are deterministic given it.
        ip_index: an :class:`InnerProductIndex` over ``vectors`` (default: an exact one, built per call).

    Returns:
        A :class:`WalkResult`: ``k`` results per query with their costs (``n_iter``: rounds plus walk steps).

    Raises:
        ValueError: on a parameter out of range, or ``edges`` or ``vectors`` of the wrong shape.
    """
    n_entry = DEFAULT_N_ENTRY if n_entry is None else n_entry
    n = check_common(qnets, vectors, k, n_sample, n_entry, ridge, seed)
    check_int('max_rounds', max_rounds, 0)
    check_int('expand', expand, 0)
    check_int('max_iter', max_iter, 0)
    ef = k if ef is None else ef
    check_int('ef', ef)
    if max_scored is not None:
        check_int('max_scored', max_scored)
    if expand:
        if edges is None or edges.ndim != 2 or edges.shape[0] != n:
            raise ValueError(f'edges must have shape [n_docs, neighbours] with n_docs={n} (one row per document vector)'
                             f'; got {None if edges is None else tuple(edges.shape)}: is the graph from another index?')
    if stop_k is not None:
        check_int('stop_k', stop_k)
    budget = _NO_BUDGET if max_scored is None else int(max_scored)
    return _run(qnets, vectors, edges, k, ef, n_sample, n_entry, max_rounds, stop_k or True, budget, ridge, seed,
                ip_index, (int(expand), int(max_iter)) if expand else None)

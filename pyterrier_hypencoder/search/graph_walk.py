"""The paper's approximate search: a greedy walk over the documents' L2 neighbour graph (Algorithm 1)."""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch

from ..checks import check_int
from ..model.qnet import QNets
from .rows import VectorsLike, check_vectors, default_chunk_size, gather_rows, merge_topk, progress, score_padded

__all__ = ['graph_search']

# Bytes of the per-query "seen" bitmaps of one graph-walk group; more queries are walked group by group.
_SEEN_BYTES = 1 << 28


def _check_walk_args(k, n_initial, n_candidates, max_iter) -> None:
    check_int('k (the number of results)', k)
    check_int('n_initial', n_initial)
    check_int('n_candidates', n_candidates)
    check_int('max_iter', max_iter, 0)


@torch.no_grad()
def graph_search(qnets: QNets, vectors: VectorsLike, edges: np.ndarray, k: int, *, n_initial: int = 10000,
                 n_candidates: int = 64, max_iter: int = 16, early_stopping: bool = True, seed: int = 0,
                 verbose: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Approximate top-``k`` by a greedy walk on a document neighbour graph (Algorithm 1 of the Hypencoder paper).

    Per query: score a random sample of ``n_initial`` documents (the first candidates) and keep the best ``k``.
    Each iteration takes the best ``n_candidates`` of the documents scored last, gathers their neighbours in
    ``edges`` that the query has not scored yet, scores only those (the next candidates) and merges them into the
    top ``k``. A query's walk stops after ``max_iter`` iterations, when no unscored neighbours remain, or (with
    ``early_stopping``) when none of the newly scored documents enters its top ``k``.

    Choices, and where they differ from the reference code:

    - The initial sample is the same for every query (as in the reference code, one sample per index), drawn
      with ``numpy.random.default_rng(seed)``, so results are deterministic given ``seed``. It is clamped to the
      corpus size (the reference code fails on corpora smaller than the sample).
    - A walk with no new candidates stops instead of scoring an empty set.
    - Which documents are scored does not depend on ``k`` without early stopping, so the top-``k'`` of a walk
      for ``k >= k'`` is the walk for ``k'``; with early stopping a larger ``k`` can only walk longer.

    Queries are walked together: their new candidates are padded into one ``[Q, m]`` batch and scored with
    :meth:`QNets.score_pairs`, and the initial sample is scored for all queries in one :meth:`QNets.score`.

    Args:
        qnets: the q-nets of ``Q`` queries.
        vectors: ``[n, dim]`` document vectors (NumPy array, memory map, or tensor on any device).
        edges: ``[n, K]`` neighbour row ids per document (e.g. uint32, nearest first); ids ``>= n`` are ignored.
        k: results per query; ``min(k, n)`` are returned.
        n_initial: documents in the initial random sample (the paper: 10,000); clamped to ``n``.
        n_candidates: documents expanded per iteration (the paper: 64).
        max_iter: maximum number of expansion iterations (the paper: 16); 0 scores only the sample.
        early_stopping: stop a query's walk when an iteration adds nothing to its top ``k``.
        seed: seed of the initial sample.
        verbose: show a progress bar over the iterations.

    Returns:
        ``(scores, ids, n_scored)`` on the CPU: float32 ``[Q, min(k, n)]`` scores and int64 row ids, best first,
        and int64 ``[Q]`` numbers of documents scored per query. When a walk scores fewer than ``min(k, n)``
        documents (a small sample on a sparse graph), the rest of its row is padded with id -1 and score -inf.

    Raises:
        ValueError: on a parameter out of range, or ``edges`` or ``vectors`` of the wrong shape.
    """
    _check_walk_args(k, n_initial, n_candidates, max_iter)
    n = check_vectors(qnets, vectors)
    if edges.ndim != 2 or edges.shape[0] != n:
        raise ValueError(f'edges must have shape [n_docs, neighbours] with n_docs={n} (one row per document vector); '
                         f'got {tuple(edges.shape)}: is the graph from another index?')
    k = min(int(k), n)
    sample = np.sort(np.random.default_rng(seed).choice(n, min(int(n_initial), n), replace=False))
    # Scored for all queries at once, in chunks (the sample can be the whole corpus).
    step = default_chunk_size(len(qnets), qnets.dim)
    sample_scores = torch.cat([qnets.score(gather_rows(qnets, vectors, sample[s:s + step])).float().cpu()
                               for s in range(0, len(sample), step)], dim=1)
    # The per-query "seen" bitmaps take n bytes per query, so large batches are walked group by group.
    group = max(1, _SEEN_BYTES // n)
    parts = [_walk(qnets[s:s + group], vectors, edges, sample, sample_scores[s:s + group], k, n_candidates, max_iter,
                   early_stopping, verbose)
             for s in range(0, len(qnets), group)]
    scores, ids, n_scored = (torch.cat([p[i] for p in parts]) for i in range(3))
    # The results in the total order of exhaustive search (score descending, then row), so tied documents come
    # out in the same order whichever search found them.
    scores, ids = merge_topk([scores], [ids], k)
    return scores, ids, n_scored


def _top(scores: torch.Tensor, ids: np.ndarray, k: int) -> Tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Best ``k`` columns of each row (``k`` at most the width); returns scores, ids and source columns."""
    top, pos = torch.topk(scores, min(k, scores.shape[1]), dim=1)
    pos = pos.numpy()
    return top, np.take_along_axis(ids, pos, axis=1), pos


def _walk(qnets, vectors, edges, sample, sample_scores, k, n_candidates, max_iter, early_stopping, verbose):
    n = vectors.shape[0]
    n_queries = len(qnets)
    # The candidates scored last ("frontier") and the results so far; empty slots hold id -1 and score -inf.
    front_scores = sample_scores
    front_ids = np.broadcast_to(sample, sample_scores.shape)
    top, top_ids, _ = _top(front_scores, front_ids, k)
    scores = torch.full((n_queries, k), float('-inf'))
    ids = np.full((n_queries, k), -1, dtype=np.int64)
    scores[:, :top.shape[1]] = top
    ids[:, :top.shape[1]] = top_ids
    seen = np.zeros((n_queries, n), dtype=bool)
    seen[:, sample] = True
    n_scored = np.full(n_queries, len(sample), dtype=np.int64)
    active = np.ones(n_queries, dtype=bool)

    for _ in progress(range(max_iter), verbose, max_iter, 'graph search', 'iter'):
        act = np.nonzero(active)[0]
        if len(act) == 0:
            break
        act_t = torch.from_numpy(act)
        # Expand the best n_candidates of the last candidates: their neighbours not scored yet are the next ones.
        best, nodes, _ = _top(front_scores[act_t], front_ids[act], n_candidates)
        owner, col = np.nonzero(np.isfinite(best.numpy()))
        neighbours = np.asarray(edges[nodes[owner, col]], dtype=np.int64)
        owner = np.repeat(owner, neighbours.shape[1])
        cand = neighbours.reshape(-1)
        keep = (cand >= 0) & (cand < n)
        owner, cand = owner[keep], cand[keep]
        keep = ~seen[act[owner], cand]
        # One entry per (query, document), sorted by query then row (sequential reads from a memory map).
        key = np.unique(owner[keep] * n + cand[keep])
        owner, cand = key // n, key % n
        seen[act[owner], cand] = True
        counts = np.bincount(owner, minlength=len(act))
        n_scored[act] += counts
        active[act[counts == 0]] = False
        if len(key) == 0:
            break
        # Only queries with new candidates go on to scoring.
        walking = counts > 0
        owner = (np.cumsum(walking) - 1)[owner]
        act, counts = act[walking], counts[walking]
        act_t = torch.from_numpy(act)
        # Pad the new candidates into one [queries, width] batch and score them.
        slot = np.arange(len(key)) - np.repeat(np.cumsum(counts) - counts, counts)
        front_ids = np.full((n_queries, int(counts.max())), -1, dtype=np.int64)
        front_ids[act[owner], slot] = cand
        front_scores = torch.full(front_ids.shape, float('-inf'))
        valid = front_ids[act] >= 0
        # Indexing q-nets by a tensor copies their weights: skip it while every query is still walking.
        active_qnets = qnets if len(act) == n_queries else qnets[act_t]
        front_scores[act_t] = score_padded(active_qnets, vectors, np.maximum(front_ids[act], 0), valid)
        # Merge into the top k.
        top, top_ids, pos = _top(torch.cat([scores[act_t], front_scores[act_t]], dim=1),
                                 np.concatenate([ids[act], front_ids[act]], axis=1), k)
        scores[act_t] = top
        ids[act] = top_ids
        if early_stopping:
            entered = ((pos >= k) & np.isfinite(top.numpy())).any(axis=1)
            active[act[~entered]] = False

    return scores, torch.from_numpy(ids), torch.from_numpy(n_scored)

"""Search with q-nets over stored document vectors: exact (exhaustive) top-k, and the paper's greedy graph walk.

Pure tensor / NumPy functions (no pandas), so they can be tested, benchmarked and run per shard on their own.
Document vectors are rows of an ``[n, dim]`` array: a NumPy array or memory map (float16 or float32), or a
``torch.Tensor`` (e.g. already resident on the GPU). Results come back on the CPU, best first.
"""
from __future__ import annotations

from typing import Sequence, Tuple, Union

import numpy as np
import torch

from .qnet import SCORE_MIN_DOCS, QNets

__all__ = ['exhaustive_search', 'graph_search', 'merge_topk', 'place_vectors', 'score_block']

VectorsLike = Union[np.ndarray, torch.Tensor]

# Bytes of one exhaustive-search step's inputs and outputs (the chunk of vectors in the q-nets' dtype and its
# [n_queries, chunk] scores). QNets.score splits each chunk further so its activations stay bounded; this chunk
# only amortises the reads and the top-k merge, which is why it can be much larger than one GEMM's worth.
_CHUNK_BYTES = 1 << 27
# Bytes of the per-query "seen" bitmaps of one graph-walk group; more queries are walked group by group.
_SEEN_BYTES = 1 << 28


def check_int(name: str, value, low: int = 1) -> None:
    """Raises a ValueError naming ``name`` unless ``value`` is an integer (not a bool) of at least ``low``."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
        raise ValueError(f'{name} must be an integer >= {low}; got {value!r}')


def check_vectors(qnets: QNets, vectors: VectorsLike) -> int:
    if vectors.ndim != 2 or vectors.shape[1] != qnets.dim:
        raise ValueError(f'document vectors must have shape [n_docs, {qnets.dim}] to match the q-nets; got '
                         f'{tuple(vectors.shape)} (were they encoded by another model?)')
    if vectors.shape[0] == 0:
        raise ValueError('there are no document vectors to search')
    return vectors.shape[0]


def _rows(qnets: QNets, vectors: VectorsLike, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of ``vectors`` as a tensor on the q-nets' device and dtype."""
    if isinstance(vectors, torch.Tensor):
        block = vectors[start:stop]
    else:
        # np.array copies: memory-mapped rows are read-only, which torch.from_numpy warns about.
        block = torch.from_numpy(np.array(vectors[start:stop]))
    return block.to(device=qnets.device, dtype=qnets.dtype)


def gather_rows(qnets: QNets, vectors: VectorsLike, ids: np.ndarray) -> torch.Tensor:
    """Rows ``ids`` (any shape) of ``vectors``: a tensor of shape ``ids.shape + (dim,)`` on the q-nets' device."""
    if isinstance(vectors, torch.Tensor):
        block = vectors[torch.from_numpy(ids.reshape(-1)).to(vectors.device)]
    else:
        block = torch.from_numpy(np.asarray(vectors[ids.reshape(-1)]))
    return block.to(device=qnets.device, dtype=qnets.dtype).reshape(*ids.shape, -1)


def _progress(it, verbose: bool, total: int, desc: str, unit: str):
    if not verbose:
        return it
    import pyterrier as pt
    return pt.tqdm(it, total=total, desc=desc, unit=unit)


def place_vectors(vectors: np.ndarray, device: Union[str, torch.device], dtype: torch.dtype,
                  memory_fraction: float = 0.5) -> VectorsLike:
    """The vectors to search on ``device``: a resident tensor on a GPU when they fit, else ``vectors`` unchanged.

    On a GPU, copying the vectors once beats streaming them from host memory for every batch of queries. On
    the CPU, a memory map is already as fast as a copy (the OS caches its pages) and costs no extra memory.

    Args:
        vectors: ``[n, dim]`` NumPy array or memory map.
        device: the device that scores.
        dtype: the q-nets' dtype (the resident copy is stored in it, so chunks need no conversion).
        memory_fraction: largest share of the GPU's free memory the copy may take.
    """
    device = torch.device(device)
    if device.type != 'cuda':
        return vectors
    need = vectors.shape[0] * vectors.shape[1] * (torch.finfo(dtype).bits // 8)
    free, _ = torch.cuda.mem_get_info(device)
    if need > memory_fraction * free:
        return vectors
    out = torch.empty(vectors.shape, device=device, dtype=dtype)
    step = max(1, _CHUNK_BYTES // (vectors.shape[1] * vectors.itemsize))
    for start in range(0, vectors.shape[0], step):
        out[start:start + step] = torch.from_numpy(np.array(vectors[start:start + step])).to(device=device, dtype=dtype)
    return out


def score_block(device: Union[str, torch.device]) -> int:
    """Documents per q-net scoring step in exhaustive search on ``device`` (1,024 on CPU, 4,096 on a GPU).

    Exhaustive search scores documents in fixed blocks of rows ``[j * block, (j + 1) * block)``, so a document's
    score depends only on its block's rows and the query batch, not on the corpus size. A shard whose offset is
    a multiple of the block therefore computes its documents' scores in the same GEMMs as the unsharded index,
    bit for bit (see :class:`~pyterrier_hypencoder.sharded.ShardedIndexFiles`).
    """
    return SCORE_MIN_DOCS.get(torch.device(device).type, SCORE_MIN_DOCS['cpu'])


def _order_keys(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """int64 keys whose descending order is the total order: score descending, then row ascending.

    The float32 score's bits, made monotone as a signed integer, fill the high 32 bits, and ``2**32 - 1 - row``
    the low ones, so ``topk`` over the keys never has to break a tie (torch.topk's tie order is unspecified).
    Padding (id -1, score -inf) sorts after every real result.
    """
    bits = scores.float().contiguous().view(torch.int32).long()
    bits = torch.where(bits < 0, bits ^ 0x7fffffff, bits)  # negative floats: larger magnitude -> smaller key
    low = torch.where(ids >= 0, 0xffffffff - ids, torch.zeros_like(ids))
    return (bits << 32) | low


def merge_topk(scores: Sequence[torch.Tensor], ids: Sequence[torch.Tensor], k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The top ``k`` of several result lists per query, under the total order (score descending, then id ascending).

    Exhaustive search merges its chunks with it and a sharded search its shards' results, so both rank a set of
    (score, row) pairs the same way whatever the split: ties never depend on where a row was scored.

    Args:
        scores: ``[Q, k_i]`` float scores per part (any float dtype; compared as float32).
        ids: ``[Q, k_i]`` int64 global row ids per part (below 2**32 - 1); -1 marks padding (score -inf).
        k: results per query; at most the total width is returned.

    Returns:
        ``(scores, ids)``: float32 ``[Q, min(k, sum k_i)]`` and int64, best first, on the parts' device.
    """
    all_scores = torch.cat([s.float() for s in scores], dim=1)
    all_ids = torch.cat(list(ids), dim=1)
    width = min(int(k), all_scores.shape[1])
    _, pos = torch.topk(_order_keys(all_scores, all_ids), width, dim=1)
    return torch.gather(all_scores, 1, pos), torch.gather(all_ids, 1, pos)


def default_chunk_size(n_queries: int, dim: int, itemsize: int = 4) -> int:
    """Documents per exhaustive-search step: about 128 MB of vectors and scores, at least 1024 documents."""
    return max(1024, _CHUNK_BYTES // (itemsize * (dim + n_queries)))


@torch.no_grad()
def exhaustive_search(qnets: QNets, vectors: VectorsLike, k: int, *, chunk_size: int = None, block: int = None,
                      verbose: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` documents for every q-net, scoring every document.

    Chunks of ``vectors`` are streamed through all q-nets at once, and a running top-``k`` is merged after each
    chunk (:func:`merge_topk`: score descending, then row ascending, so ties are deterministic), so memory stays
    bounded whatever the corpus size and a memory-mapped index is read once per call. Within a chunk, documents
    are scored in fixed blocks of ``block`` rows counted from row 0, so a row's score does not depend on ``n``.

    Args:
        qnets: the q-nets of ``Q`` queries.
        vectors: ``[n, dim]`` document vectors (NumPy array, memory map, or tensor on any device).
        k: results per query; ``min(k, n)`` are returned.
        chunk_size: documents per step (default: :func:`default_chunk_size`); rounded down to a multiple of
            ``block``.
        block: documents per q-net scoring call (default: :func:`score_block` of the q-nets' device).
        verbose: show a progress bar over the chunks.

    Returns:
        ``(scores, ids)``: float32 ``[Q, min(k, n)]`` scores and int64 row ids, on the CPU, best first.
    """
    check_int('k (the number of results)', k)
    n = check_vectors(qnets, vectors)
    n_queries = len(qnets)
    if block is None:
        block = score_block(qnets.device)
    check_int('block', block)
    if chunk_size is None:
        chunk_size = default_chunk_size(n_queries, qnets.dim, torch.finfo(qnets.dtype).bits // 8)
    if chunk_size < 1:
        raise ValueError(f'chunk_size must be >= 1; got {chunk_size}')
    chunk_size = max(block, chunk_size - chunk_size % block)
    k = min(int(k), n)
    device = qnets.device
    best_scores = torch.empty(n_queries, 0, device=device, dtype=torch.float32)
    best_ids = torch.empty(n_queries, 0, device=device, dtype=torch.long)
    starts = range(0, n, chunk_size)
    for start in _progress(starts, verbose, len(starts), 'exhaustive search', 'chunk'):
        stop = min(start + chunk_size, n)
        scores = qnets.score(_rows(qnets, vectors, start, stop), chunk_size=block)
        ids = torch.arange(start, stop, device=device).expand(n_queries, -1)
        # A chunk may be smaller than k (the last one, or a small corpus): keep whatever there is.
        best_scores, best_ids = merge_topk([best_scores, scores], [best_ids, ids], k)
    return best_scores.cpu(), best_ids.cpu()


def score_padded(qnets: QNets, vectors: VectorsLike, ids: np.ndarray, valid: np.ndarray) -> torch.Tensor:
    """Scores row ``i`` of ``ids`` ([Q, m], a different set per query) with q-net ``i``; ``-inf`` where not valid."""
    n_queries, m = ids.shape
    out = torch.full((n_queries, m), float('-inf'))
    if m == 0:
        return out
    width = max(qnets.spec.vector_dimensions)
    budget = qnets.step_elements()  # the same bound on activations as QNets.score keeps
    cols = max(1, min(m, budget // width))
    rows = max(1, budget // (cols * width))
    for r in range(0, n_queries, rows):
        for c in range(0, m, cols):
            block = ids[r:r + rows, c:c + cols]
            out[r:r + rows, c:c + cols] = qnets[r:r + rows].score_pairs(gather_rows(qnets, vectors, block)).float().cpu()
    out[~torch.from_numpy(valid)] = float('-inf')
    return out


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

    for _ in _progress(range(max_iter), verbose, max_iter, 'graph search', 'iter'):
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

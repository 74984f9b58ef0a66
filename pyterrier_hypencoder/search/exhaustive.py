"""Exact search: every document scored by every q-net, in fixed blocks, with a running top-k."""
from __future__ import annotations

from typing import Tuple, Union

import torch

from ..checks import check_int
from ..model.qnet import SCORE_MIN_DOCS, QNets
from .rows import VectorsLike, check_vectors, default_chunk_size, merge_topk, progress, read_rows

__all__ = ['exhaustive_search', 'score_block']


def score_block(device: Union[str, torch.device]) -> int:
    """Documents per q-net scoring step in exhaustive search on ``device`` (1,024 on CPU, 4,096 on a GPU).

    Exhaustive search scores documents in fixed blocks of rows ``[j * block, (j + 1) * block)``, so a document's
    score depends only on its block's rows and the query batch, not on the corpus size. A shard whose offset is
    a multiple of the block therefore computes its documents' scores in the same GEMMs as the unsharded index,
    bit for bit (see :class:`~pyterrier_hypencoder.index.sharded.ShardedIndexFiles`).
    """
    return SCORE_MIN_DOCS.get(torch.device(device).type, SCORE_MIN_DOCS['cpu'])


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
    for start in progress(starts, verbose, len(starts), 'exhaustive search', 'chunk'):
        stop = min(start + chunk_size, n)
        scores = qnets.score(read_rows(qnets, vectors, start, stop), chunk_size=block)
        ids = torch.arange(start, stop, device=device).expand(n_queries, -1)
        # A chunk may be smaller than k (the last one, or a small corpus): keep whatever there is.
        best_scores, best_ids = merge_topk([best_scores, scores], [best_ids, ids], k)
    return best_scores.cpu(), best_ids.cpu()

"""Cascade search: candidates found and ranked by narrow (Matryoshka) q-nets, the best re-scored at full width.

A Matryoshka Hypencoder's q-net cut to width ``w`` costs about ``(w / dim)**2`` of the full one in its hidden blocks,
and it ranks close to the full q-net (it was trained to rank well by itself). Adaptive search spends most of its
q-net evaluations on documents that never reach the results, so a cascade runs the whole search (sample, surrogate
fits, candidate pools) with the narrow q-nets and pays full width only for their best ``rescore`` documents per
query. The results are ranked by full-width scores, in the total order (score descending, then row).
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
import torch

from ..model.qnet import QNets
from .rows import VectorsLike, merge_topk, score_padded

__all__ = ['rescore']


@torch.no_grad()
def rescore(qnets: QNets, vectors: VectorsLike, ids: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top ``k`` of each query's candidates by full-width score.

    Args:
        qnets: the full-width q-nets of ``Q`` queries.
        vectors: ``[n, dim]`` document vectors.
        ids: int64 ``[Q, m]`` candidate rows per query (-1 for none), e.g. a narrow search's results.
        k: results per query (at most ``m``).

    Returns:
        ``(scores, ids, n_scored)`` on the CPU: float32 ``[Q, min(k, m)]`` full-width scores and int64 rows, best first
        (-inf and -1 where a query has fewer candidates), and int64 ``[Q]`` full-width evaluations per query.
    """
    ids = ids.cpu()
    valid = (ids >= 0).numpy()
    scores = score_padded(qnets, vectors, np.maximum(ids.numpy(), 0), valid)
    top_scores, top_ids = merge_topk([scores], [torch.where(torch.from_numpy(valid), ids, -1)], k)
    return top_scores, top_ids, torch.from_numpy(valid.sum(axis=1).astype(np.int64))

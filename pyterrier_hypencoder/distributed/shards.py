"""Searching a sharded index: each shard searched on its own, returning global rows, and the in-process backend.

:class:`ShardSearcher` is what every backend runs per shard (:class:`LocalShards` here, one after another; Ray actors
in :mod:`~pyterrier_hypencoder.distributed.ray_backend`); the driver merges the shards' top-k lists in the total order (score
descending, global row ascending among ties) with :func:`~pyterrier_hypencoder.search.merge_topk`.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import torch

from ..index.files import HypencoderIndexFiles
from ..index.sharded import ShardedIndexFiles
from ..search.modes import Corpus, SearchMode, SearchResult
from ..search.rows import merge_topk, place_vectors

__all__ = ['LocalShards', 'ShardSearcher', 'merge_shards']


def merge_shards(parts: Sequence[SearchResult], k: int) -> SearchResult:
    """The top ``k`` of the shards' results (global rows) in the total order; evaluations summed over the shards."""
    scores, ids = merge_topk([p.scores for p in parts], [p.ids for p in parts], k)
    costs = {field: None if getattr(parts[0], field) is None else sum(getattr(p, field) for p in parts)
             for field in ('n_narrow', 'n_inner', 'n_iter')}
    return SearchResult(scores, ids, sum(p.n_scored for p in parts), **costs)


class ShardSearcher:
    """One shard, placed for search, and what its searches keep between batches: what each backend runs per shard.

    Every mode searches the shard on its own and returns global row ids, so the driver only merges top-k lists.
    Graph mode walks the shard's own graph with its share of the initial sample (``n_initial * count / total``,
    at least 1). Adaptive and surrogate modes run their rounds in the shard with the full parameters: the
    shard's top-k is then found as well as one index's would be, and the merge of the shards' exact top-k lists is
    the exact top-k. Adaptive search draws its pools from the shard's own inner-product ANN index when it has one
    (:func:`~pyterrier_hypencoder.search.pooled.pooled_search`), else it runs the exact rounds over the shard. Each shard
    samples with the seed ``seed + shard_no``.
    """

    def __init__(self, shard: HypencoderIndexFiles, shard_no: int, offset: int, total: int, device: torch.device,
                 dtype: torch.dtype):
        self.shard, self.shard_no, self.offset, self.total = shard, shard_no, offset, total
        # Placed once (a GPU copy per shard when they fit), as the unsharded retriever does.
        self.vectors = place_vectors(shard.vectors(), device, dtype)
        self.corpus = Corpus(self.vectors, edges=shard.graph_edges if shard.has_graph() else None,
                             ann=shard.ip_index if shard.has_ip_index() else None)

    def search(self, qnets, k: int, mode: SearchMode) -> SearchResult:
        """The shard's top-``k`` (global row ids, -1 padding), on the CPU.

        Args:
            qnets: the batch's q-nets, on the shard's device.
            k: results per query.
            mode: the search mode and its parameters, as the retriever holds them; each shard runs
                ``mode.for_shard(...)`` (its share of a graph walk's sample, its own seed).
        """
        result = mode.for_shard(self.shard_no, len(self.shard), self.total).search(qnets, self.corpus, k)
        return result._replace(ids=torch.where(result.ids >= 0, result.ids + self.offset, result.ids))

    def score_rows(self, qnets: Sequence, pair_query: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Scores of (query, document) pairs held by this shard, computed where its vectors are (a reranker's
        work, so no vector leaves the shard).

        Args:
            qnets: one single-query q-net per query of the batch.
            pair_query: ``[m]`` the query (index into ``qnets``) of each pair.
            rows: ``[m]`` the shard-local row of each pair's document.

        Returns:
            ``[m]`` float64 scores, in the pairs' order.
        """
        out = np.empty(len(rows), dtype=np.float64)
        for j in np.unique(pair_query):
            sel = np.nonzero(pair_query == j)[0]
            x = self.vectors[torch.from_numpy(rows[sel])] if isinstance(self.vectors, torch.Tensor) else \
                torch.from_numpy(np.asarray(self.vectors[rows[sel]]))
            q = qnets[int(j)].to(x.device)
            out[sel] = q.score(x.to(q.weights[0].dtype))[0].double().cpu().numpy()
        return out


class LocalShards:
    """The in-process backend: the shards searched one after another in this process (the reference in tests)."""

    def __init__(self, index: ShardedIndexFiles, device: torch.device, dtype: torch.dtype):
        self.index = index
        self.device = device
        self.dtype = dtype
        self._searchers: Optional[List[ShardSearcher]] = None

    def __repr__(self) -> str:
        return 'local'

    def _placed(self) -> List[ShardSearcher]:
        if self._searchers is None:
            offsets = self.index.offsets
            self._searchers = [ShardSearcher(self.index.shard(i), i, int(offsets[i]), len(self.index), self.device,
                                             self.dtype) for i in range(self.index.n_shards)]
        return self._searchers

    def search(self, qnets, k: int, mode: SearchMode) -> SearchResult:
        """The merged top-``k`` of every shard (``n_scored`` summed over the shards)."""
        parts = [searcher.search(qnets, k, mode) for searcher in self._placed()]
        return merge_shards(parts, k)

    def score_rows(self, qnets: Sequence, pair_query: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Scores of (query, global row) pairs. In this process the rows' vectors are gathered from their shards
        and each query's documents scored in one call, exactly as over the unsharded index."""
        vectors = self.vectors(rows)
        out = np.empty(len(rows), dtype=np.float64)
        for j in np.unique(pair_query):
            sel = np.nonzero(pair_query == j)[0]
            q = qnets[int(j)]
            out[sel] = q.score(vectors[torch.from_numpy(sel)].to(q.weights[0].device, q.weights[0].dtype))[0] \
                .double().cpu().numpy()
        return out

    def close(self) -> None:
        """Drops the placed vectors (GPU copies); the next search places them again."""
        self._searchers = None

    def vectors(self, rows: np.ndarray) -> torch.Tensor:
        """The stored vectors of global ``rows``, in that order."""
        shard, local = self.index.locate(rows)
        out = np.empty((len(rows), self.index.dim), dtype=self.index.meta['dtype'])
        for i in np.unique(shard):
            sel = np.nonzero(shard == i)[0]
            out[sel] = self.index.shard(int(i)).vectors()[local[sel]]
        return torch.from_numpy(out)

"""The index artifacts users hold, with the transformers they hand out (as pyterrier-dr's FlexIndex does).

This thin module sits above both the storage classes (:mod:`~pyterrier_hypencoder.index`,
:mod:`~pyterrier_hypencoder.index.sharded`) and the transformers, which read the storage classes: the hand-outs live
here so that nothing imports in a circle and no method imports lazily. These are the classes registered under
the ``pyterrier.artifact`` entry point, so ``pt.Artifact.load(path)`` returns them.
"""
from __future__ import annotations

from ..index.files import HypencoderIndexFiles
from ..index.sharded import ShardedIndexFiles, split_index
from .indexer import HypencoderIndexer
from .reranker import HypencoderReranker
from .retriever import HypencoderRetriever

__all__ = ['HypencoderIndex', 'ShardedHypencoderIndex']


class _HandsOut:
    def retriever(self, model, **kwargs) -> HypencoderRetriever:
        """A :class:`~pyterrier_hypencoder.HypencoderRetriever` over this index (``backend=...`` for a sharded one)."""
        return HypencoderRetriever(model, self, **kwargs)

    def reranker(self, model, **kwargs) -> HypencoderReranker:
        """A :class:`~pyterrier_hypencoder.HypencoderReranker` scoring this index's stored vectors."""
        return HypencoderReranker(model, self, **kwargs)


class HypencoderIndex(_HandsOut, HypencoderIndexFiles):
    """Document vectors for Hypencoder retrieval, with docnos and a k-nearest-neighbour graph for approximate search.

    Build one with :class:`~pyterrier_hypencoder.HypencoderIndexer` (or ``index.indexer(model)``), load one with
    ``HypencoderIndex(path)`` or ``pt.Artifact.load(path)``, then get transformers from it::

        index = HypencoderIndex('scifact.hypencoder')
        retriever = index.retriever(model)                  # exhaustive search
        approx = index.retriever(model, mode='graph')       # greedy graph walk
        reranker = index.reranker(model)                    # rescoring with stored vectors
        sharded = index.split('scifact.sharded', n_shards=2)  # the same rows in 2 shards, not re-encoded
    """

    def indexer(self, model, **kwargs) -> HypencoderIndexer:
        """A :class:`~pyterrier_hypencoder.HypencoderIndexer` that builds this index with ``model`` (this object then
        reads the new one)."""
        indexer = HypencoderIndexer(model, self.path, **kwargs)
        indexer._built_for = self
        return indexer

    def split(self, path, **kwargs) -> ShardedHypencoderIndex:
        """This index cut into shards, without re-encoding; see :func:`~pyterrier_hypencoder.split_index`."""
        return split_index(self, path, **kwargs)


class ShardedHypencoderIndex(_HandsOut, ShardedIndexFiles):
    """A Hypencoder index in N shards over contiguous row ranges, searched in-process or on a Ray cluster.

    Made by :func:`~pyterrier_hypencoder.split_index` or :class:`~pyterrier_hypencoder.ShardedHypencoderIndexer`;
    loaded with ``ShardedHypencoderIndex(path)`` or ``pt.Artifact.load(path)``::

        index = ShardedHypencoderIndex('msmarco.sharded')
        retriever = index.retriever(model, backend='ray')   # one actor per shard; results as on one machine
    """

"""An index's L2 neighbour graph as a pyterrier-adaptive corpus graph that follows rebuilds of the index.

pyterrier-adaptive's ``NpTopKCorpusGraph`` memory-maps the graph files once. A GAR pipeline built on an index that
is later rebuilt in place (``overwrite=True``) would go on expanding with the old neighbours, which now point at
other documents. :class:`IndexCorpusGraph` asks the index, before each lookup, whether it was rebuilt, and reopens
the new graph (or fails, when the new index has none).
"""
from __future__ import annotations

from typing import Optional

from pyterrier_adaptive.corpus_graph import NpTopKCorpusGraph

from ..errors import HypencoderIndexError
from .layout import graph_dirname

__all__ = ['IndexCorpusGraph']


class IndexCorpusGraph(NpTopKCorpusGraph):
    """The neighbour graph of a :class:`~pyterrier_hypencoder.HypencoderIndex`, kept in step with its folder.

    Args:
        index: the index (anything with ``path``, ``generation()``, ``has_graph()`` and ``graph_k``).
        k: keep only the nearest ``k`` neighbours (at most the stored k).

    Raises:
        HypencoderIndexError: when the index has no graph (now, or after a rebuild).
    """

    def __init__(self, index, k: Optional[int] = None):
        self._index, self._want_k = index, k
        self._generation = index.generation()
        self._open()

    def _open(self) -> None:
        index = self._index
        if not index.has_graph():
            raise HypencoderIndexError(f'the index {index.path} has no neighbour graph; rebuild it with '
                                       'HypencoderIndexer(..., neighbours=100) to use graph-mode retrieval or GAR')
        if self._want_k is not None and self._want_k > index.graph_k:
            raise HypencoderIndexError(f'k={self._want_k} is more neighbours than the graph of {index.path} holds '
                                       f'({index.graph_k})')
        for name in ('edges_data', 'weights_data'):  # memory maps of the files read before
            self.__dict__.pop(name, None)
        NpTopKCorpusGraph.__init__(self, index.path / graph_dirname(index.graph_k), k=self._want_k)

    def _follow(self) -> None:
        generation = self._index.generation()  # raises when the index folder is gone
        if generation != self._generation:
            self._open()
            self._generation = generation

    def neighbours(self, docid, weights=False):
        self._follow()
        return super().neighbours(docid, weights)

    def __repr__(self) -> str:
        return f'IndexCorpusGraph({str(self.path)!r}, k={self._k})'

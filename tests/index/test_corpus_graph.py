"""The index's neighbour graph as a pyterrier-adaptive corpus graph, which follows rebuilds of the index."""
import pyterrier as pt
import pytest
from helpers import make_docs

from pyterrier_hypencoder import HypencoderIndex, HypencoderIndexer
from pyterrier_hypencoder.index import HypencoderIndexError


def test_corpus_graph_for_adaptive(built_index):
    index, _ = built_index
    graph = index.corpus_graph()
    assert graph.neighbours(0).tolist() == index.graph_edges()[0].tolist()
    assert list(graph.neighbours('d0'))[0] == index.docnos.fwd[int(index.graph_edges()[0, 0])]
    from pyterrier_adaptive.corpus_graph import NpTopKCorpusGraph
    assert isinstance(pt.Artifact.load(str(graph.path)), NpTopKCorpusGraph)
    assert len(index.corpus_graph(k=3).neighbours(5)) == 3


def test_corpus_graph_follows_a_rebuild(tiny_model, tmp_path):
    path = tmp_path / 'idx'
    index = HypencoderIndexer(tiny_model, path, neighbours=5, verbose=False).index(make_docs(40))
    graph = index.corpus_graph()
    before = graph.neighbours(0).tolist()
    # Rebuilt in place with other documents: the graph handed out before reads the new neighbours.
    HypencoderIndexer(tiny_model, path, neighbours=5, overwrite=True, verbose=False).index(make_docs(40, seed=7))
    fresh = HypencoderIndex(path).graph_edges()
    assert graph.neighbours(0).tolist() == fresh[0].tolist() and fresh[0].tolist() != before
    assert list(graph.neighbours('d3')) == list(HypencoderIndex(path).docnos.fwd[fresh[3].astype(int)])
    # Rebuilt without a graph: a clear error, not the old neighbours.
    HypencoderIndexer(tiny_model, path, neighbours=0, overwrite=True, verbose=False).index(make_docs(40))
    with pytest.raises(HypencoderIndexError, match='no neighbour graph'):
        graph.neighbours(0)

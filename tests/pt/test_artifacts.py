"""HypencoderIndex as a PyTerrier artifact: loading, and the retrievers, rerankers and indexers it hands out, which
follow the folder when it is rebuilt or deleted."""
import numpy as np
import pyterrier as pt
import pytest
from helpers import SHORT_TOPICS, make_docs, short_docs

from pyterrier_hypencoder import HypencoderIndex, HypencoderIndexer, HypencoderIndexError

pytestmark = pytest.mark.usefixtures('one_thread')


def test_artifact_load(built_index):
    index, _ = built_index
    loaded = pt.Artifact.load(str(index.path))
    assert isinstance(loaded, HypencoderIndex) and len(loaded) == 150


def test_index_object_reads_its_rebuilt_folder(tiny_model, tmp_path):
    index = HypencoderIndexer(tiny_model, tmp_path / 'i', neighbours=0, verbose=False).index(make_docs(20))
    assert len(index.vectors()) == 20 and index.docnos.fwd[19] == make_docs(20)[19]['docno']  # cached now
    rebuilt = index.indexer(tiny_model, neighbours=3, overwrite=True, verbose=False).index(make_docs(30, 1))
    assert rebuilt is index
    assert len(index) == 30 and len(index.vectors()) == 30 and index.graph_k == 3
    assert index.docnos.fwd[29] == make_docs(30, 1)[29]['docno']


@pytest.mark.parametrize('how', ['new indexer', 'index.indexer'])
def test_rebuilt_index_is_never_served_stale(tiny_model, tmp_path, how):
    path = tmp_path / 'i'
    HypencoderIndexer(tiny_model, path, neighbours=4, verbose=False).index(short_docs(30, prefix='old'))
    index = HypencoderIndex(path)
    retriever, graph = index.retriever(tiny_model), index.retriever(tiny_model, mode='graph', n_initial=5)
    reranker = index.reranker(tiny_model)
    assert retriever(SHORT_TOPICS)['docno'].str.startswith('old').all()  # used before the rebuild
    indexer = HypencoderIndexer(tiny_model, path, overwrite=True, neighbours=4, verbose=False) if how == 'new indexer' \
        else index.indexer(tiny_model, overwrite=True, neighbours=4, verbose=False)
    indexer.index(short_docs(40, seed=1, prefix='new'))
    run = retriever(SHORT_TOPICS)
    assert len(run) == 80 and run['docno'].str.startswith('new').all()
    assert graph(SHORT_TOPICS)['docno'].str.startswith('new').all()
    assert np.allclose(reranker(run)['score'].sort_values(), run['score'].sort_values(), atol=1e-5)
    with pytest.raises(KeyError, match='not in the index'):
        reranker(run.assign(docno='old1'))


def test_deleted_index_is_an_error_not_old_results(tiny_model, tmp_path):
    import shutil
    index = HypencoderIndexer(tiny_model, tmp_path / 'i', neighbours=0, verbose=False).index(short_docs(10))
    retriever = index.retriever(tiny_model)
    retriever(SHORT_TOPICS)
    shutil.rmtree(index.path)
    with pytest.raises(HypencoderIndexError, match='was deleted'):
        retriever(SHORT_TOPICS)

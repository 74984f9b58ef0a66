"""HypencoderIndexer and HypencoderIndex: layout, artifact loading, graph, atomic writes, bad input."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pyterrier as pt
import pytest

from pyterrier_hypencoder import Hypencoder, HypencoderIndex, HypencoderIndexer
from pyterrier_hypencoder.index import HypencoderIndexError

WORDS = ('retrieval neural network query document vector graph search index model training score rank '
         'hyper head layer attention token embedding dense sparse corpus').split()


def make_docs(n, seed=0):
    rng = np.random.default_rng(seed)
    return [{'docno': f'd{i}', 'text': ' '.join(rng.choice(WORDS, size=rng.integers(3, 12)))} for i in range(n)]


@pytest.fixture(scope='module')
def built(tiny_model, tmp_path_factory):
    docs = make_docs(150)
    path = tmp_path_factory.mktemp('idx') / 'index'
    index = HypencoderIndexer(tiny_model, path, neighbours=10, verbose=False).index(iter(docs))
    return index, docs


def test_index_layout_and_vectors(built, tiny_model):
    index, docs = built
    assert index.built() and len(index) == 150 and index.dim == tiny_model.dim
    meta = json.loads((index.path / 'pt_meta.json').read_text())
    assert meta['type'] == 'dense_index' and meta['format'] == 'hypencoder'
    assert meta['doc_count'] == 150 and meta['vec_size'] == tiny_model.dim and meta['graph']['k'] == 10
    expected = tiny_model.encode_docs([d['text'] for d in docs]).numpy()
    assert np.allclose(index.vectors(), expected, atol=1e-5)
    assert list(index.docnos.fwd[[0, 149]]) == ['d0', 'd149']
    assert index.rows(['d7', 'd3']).tolist() == [7, 3]
    assert 'HypencoderIndex(' in repr(index) and '150 docs' in repr(index)


def test_artifact_load(built):
    index, _ = built
    loaded = pt.Artifact.load(str(index.path))
    assert isinstance(loaded, HypencoderIndex) and len(loaded) == 150


def test_graph_is_exact_l2_knn(built):
    index, _ = built
    vecs = np.asarray(index.vectors(), dtype=np.float64)
    d2 = ((vecs[:, None, :] - vecs[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d2, np.inf)
    brute = np.argsort(d2, axis=1, kind='stable')[:, :10]
    edges = index.graph_edges()
    assert edges.shape == (150, 10) and edges.dtype == np.uint32
    assert (edges != np.arange(150)[:, None]).all()
    assert (edges == brute).mean() > 0.99  # ties aside


def test_corpus_graph_for_adaptive(built):
    index, _ = built
    graph = index.corpus_graph()
    assert graph.neighbours(0).tolist() == index.graph_edges()[0].tolist()
    assert list(graph.neighbours('d0'))[0] == index.docnos.fwd[int(index.graph_edges()[0, 0])]
    from pyterrier_adaptive.corpus_graph import NpTopKCorpusGraph
    assert isinstance(pt.Artifact.load(str(graph.path)), NpTopKCorpusGraph)
    assert len(index.corpus_graph(k=3).neighbours(5)) == 3


def test_fp16_storage_and_title_text_fields(tiny_model, tmp_path):
    docs = [{'docno': f'x{i}', 'title': f'title {i}', 'text': w} for i, w in enumerate(WORDS)]
    index = HypencoderIndexer(tiny_model, tmp_path / 'i', fp16=True, neighbours=0, text_field=['title', 'text'],
                              verbose=False).index(docs)
    assert index.vectors().dtype == np.float16 and not index.has_graph()
    expected = tiny_model.encode_docs([f'{d["title"]} {d["text"]}' for d in docs]).numpy()
    assert np.allclose(index.vectors().astype(np.float32), expected, atol=1e-2)
    assert (tmp_path / 'i' / 'vecs.f2').stat().st_size == len(docs) * tiny_model.dim * 2
    with pytest.raises(HypencoderIndexError, match='no neighbour graph'):
        index.graph_edges()


def test_existing_path_needs_overwrite(built, tiny_model):
    index, docs = built
    with pytest.raises(FileExistsError, match='overwrite=True'):
        HypencoderIndexer(tiny_model, index.path, verbose=False).index(docs)


def test_overwrite_replaces_atomically(tiny_model, tmp_path):
    path = tmp_path / 'i'
    HypencoderIndexer(tiny_model, path, neighbours=0, verbose=False).index(make_docs(20))
    index = HypencoderIndexer(tiny_model, path, neighbours=3, overwrite=True, verbose=False).index(make_docs(30, 1))
    assert len(index) == 30 and index.graph_k == 3
    assert sorted(os.listdir(tmp_path)) == ['i']  # no temporary folders left behind


def test_index_object_reads_its_rebuilt_folder(tiny_model, tmp_path):
    index = HypencoderIndexer(tiny_model, tmp_path / 'i', neighbours=0, verbose=False).index(make_docs(20))
    assert len(index.vectors()) == 20 and index.docnos.fwd[19] == make_docs(20)[19]['docno']  # cached now
    rebuilt = index.indexer(tiny_model, neighbours=3, overwrite=True, verbose=False).index(make_docs(30, 1))
    assert rebuilt is index
    assert len(index) == 30 and len(index.vectors()) == 30 and index.graph_k == 3
    assert index.docnos.fwd[29] == make_docs(30, 1)[29]['docno']


@pytest.mark.parametrize('docs, match', [
    ([], 'empty'),
    ([{'docno': 'a', 'text': 'x'}], 'at least 2'),
    ([{'docno': 'a', 'text': 'x'}, {'text': 'y'}], 'no docno'),
    ([{'docno': 'a', 'text': 'x'}, {'docno': 'b', 'body': 'y'}], "no 'text' field"),
    ([{'docno': 'a', 'text': 'x'}, {'docno': 'b', 'text': 'y'}, {'docno': 'a', 'text': 'z'}], "duplicate docno 'a'"),
])
def test_bad_corpora_leave_nothing(tiny_model, tmp_path, docs, match):
    with pytest.raises(ValueError, match=match):
        HypencoderIndexer(tiny_model, tmp_path / 'i', neighbours=2, verbose=False).index(docs)
    assert os.listdir(tmp_path) == []
    assert not HypencoderIndex(tmp_path / 'i').built()


def test_integer_docnos_become_strings(tiny_model, tmp_path):
    index = HypencoderIndexer(tiny_model, tmp_path / 'i', neighbours=0, verbose=False).index(
        [{'docno': 10, 'text': 'a b'}, {'docno': 11, 'text': 'c d'}])
    assert index.rows(['11']).tolist() == [1]


def test_unknown_docnos_are_named(built):
    index, _ = built
    with pytest.raises(KeyError, match='nope'):
        index.rows(['d1', 'nope'])


def test_unbuilt_and_corrupt_indexes(built, tmp_path):
    with pytest.raises(HypencoderIndexError, match='folder does not exist'):
        len(HypencoderIndex(tmp_path / 'missing'))
    (tmp_path / 'empty').mkdir()
    with pytest.raises(HypencoderIndexError, match='folder exists but pt_meta.json is missing, so it was never built'):
        len(HypencoderIndex(tmp_path / 'empty'))
    index, _ = built
    copy = tmp_path / 'copy'
    import shutil
    shutil.copytree(index.path, copy)
    vec = copy / 'vecs.f4'
    vec.write_bytes(vec.read_bytes()[:-4])
    with pytest.raises(HypencoderIndexError, match='truncated'):
        HypencoderIndex(copy).vectors()
    (copy / 'pt_meta.json').write_text('{"type": "dense_')
    with pytest.raises(HypencoderIndexError, match='corrupt'):
        len(HypencoderIndex(copy))


def test_check_model_catches_other_models(built, tiny_model, tiny_bert):
    index, _ = built
    index.check_model(tiny_model)
    other = Hypencoder.from_backbone(str(tiny_bert), qnet_layers=3, pooling='mean', device='cpu')
    with pytest.raises(HypencoderIndexError, match='encodes documents differently'):
        index.check_model(other)
    from conftest import make_tiny_bert
    wide = Hypencoder.from_backbone(str(make_tiny_bert(index.path.parent / 'wide', hidden=48)), qnet_layers=2,
                                    device='cpu')
    with pytest.raises(HypencoderIndexError, match='48-d'):
        index.check_model(wide)


def test_interrupted_indexing_leaves_nothing_that_loads(tiny_bert, tmp_path):
    """A process killed mid-run leaves no index; re-running with overwrite=True succeeds."""
    script = textwrap.dedent(f'''
        import os, signal
        from pyterrier_hypencoder import Hypencoder, HypencoderIndexer
        model = Hypencoder.from_backbone({str(tiny_bert)!r}, qnet_layers=2, device='cpu')
        def docs():
            for i in range(1000):
                if i == 300:
                    os.kill(os.getpid(), signal.SIGKILL)
                yield {{'docno': str(i), 'text': 'some words here'}}
        HypencoderIndexer(model, {str(tmp_path / 'i')!r}, chunk_size=100, verbose=False).index(docs())
    ''')
    proc = subprocess.run([sys.executable, '-c', script], capture_output=True)
    assert proc.returncode == -9
    assert not (tmp_path / 'i').exists()
    assert not HypencoderIndex(tmp_path / 'i').built()
    model = Hypencoder.from_backbone(str(tiny_bert), qnet_layers=2, device='cpu')
    index = HypencoderIndexer(model, tmp_path / 'i', neighbours=5, overwrite=True, verbose=False).index(make_docs(40))
    assert len(HypencoderIndex(index.path)) == 40
    assert sorted(os.listdir(tmp_path)) == ['i']  # overwrite=True also cleared the killed run's partial folder


def test_flex_index_reads_the_same_vectors(built):
    import pandas as pd
    index, _ = built
    flex = index.flex_index(sim_fn='cos', verbose=False)
    assert len(flex) == len(index)
    query = pd.DataFrame({'qid': ['q'], 'query_vec': [np.array(index.vectors()[7])]})
    assert flex.retriever(num_results=1)(query)['docno'].tolist() == ['d7']
    assert index.flex_index(verbose=False).index_path == flex.index_path  # made once, then reused


def test_bad_graph_method_fails_before_encoding(tiny_model, tmp_path):
    with pytest.raises(ValueError, match=r"graph='nsg' is not supported.*'ivf'"):
        HypencoderIndexer(tiny_model, tmp_path / 'idx', graph='nsg')
    HypencoderIndexer(tiny_model, tmp_path / 'idx', graph='nsg', neighbours=0)  # no graph: the method is unused


def test_ivf_graph_in_an_index(tiny_model, tmp_path):
    docs = [{'docno': f'd{i}', 'text': f'document number {i} about topic {i % 7}'} for i in range(60)]
    index = HypencoderIndexer(tiny_model, tmp_path / 'idx', neighbours=10, graph='ivf', verbose=False).index(docs)
    assert index.meta['graph'] == {'k': 10, 'metric': 'l2', 'method': 'ivf'}
    edges = index.graph_edges()
    assert edges.shape == (60, 10) and not (edges == np.arange(60)[:, None]).any()


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

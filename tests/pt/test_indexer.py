"""HypencoderIndexer: what it writes, atomic and resumable builds, bad corpora named before the expensive part,
relative paths, devices, and truncation of long documents."""
import gc
import json
import os
import re
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pandas as pd
import pyterrier as pt
import pytest
from helpers import (
    GRAPH,
    SHORT_TOPICS,
    WORDS,
    make_docs,
    one_token_words,
    short_docs,
)

from pyterrier_hypencoder import (
    Hypencoder,
    HypencoderIndex,
    HypencoderIndexer,
    HypencoderIndexError,
    HypencoderReranker,
    HypencoderRetriever,
)

pytestmark = pytest.mark.usefixtures('one_thread')


# ---- what an index holds ------------------------------------------------------------------------------------------------

def test_index_layout_and_vectors(built_index, tiny_model):
    index, docs = built_index
    assert index.built() and len(index) == 150 and index.dim == tiny_model.dim
    meta = json.loads((index.path / 'pt_meta.json').read_text())
    assert meta['type'] == 'dense_index' and meta['format'] == 'hypencoder'
    assert meta['doc_count'] == 150 and meta['vec_size'] == tiny_model.dim and meta['graph']['k'] == 10
    expected = tiny_model.encode_docs([d['text'] for d in docs]).numpy()
    assert np.allclose(index.vectors(), expected, atol=1e-5)
    assert list(index.docnos.fwd[[0, 149]]) == ['d0', 'd149']
    assert index.rows(['d7', 'd3']).tolist() == [7, 3]
    assert 'HypencoderIndex(' in repr(index) and '150 docs' in repr(index)


def test_graph_is_exact_l2_knn(built_index):
    index, _ = built_index
    vecs = np.asarray(index.vectors(), dtype=np.float64)
    d2 = ((vecs[:, None, :] - vecs[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d2, np.inf)
    brute = np.argsort(d2, axis=1, kind='stable')[:, :10]
    edges = index.graph_edges()
    assert edges.shape == (150, 10) and edges.dtype == np.uint32
    assert (edges != np.arange(150)[:, None]).all()
    assert (edges == brute).mean() > 0.99  # ties aside


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


def test_indexer_inputs(tiny_model, tmp_path):
    assert pt.inspect.indexer_inputs(HypencoderIndexer(tiny_model, tmp_path / 'i')) == [['docno', 'text']]
    indexer = HypencoderIndexer(tiny_model, tmp_path / 'i', text_field=['title', 'text'])
    assert pt.inspect.indexer_inputs(indexer) == [['docno', 'title', 'text']]


def test_indexer_device(tiny_model, tmp_path):
    built = HypencoderIndexer(tiny_model, tmp_path / 'i', neighbours=0, device='cpu', verbose=False).index(short_docs(4))
    assert len(built) == 4
    with pytest.raises(ValueError, match='not a device|CUDA'):
        HypencoderIndexer(tiny_model, tmp_path / 'j', device='cuda:99')


def test_long_document_is_truncated(tiny_model, tmp_path):
    words = one_token_words(tiny_model)
    rng = np.random.default_rng(1)
    long = ' '.join(rng.choice(words, size=5000))
    keep = ' '.join(long.split()[:tiny_model.doc_max_length - 2])
    shorter = ' '.join(long.split()[:tiny_model.doc_max_length - 10])
    index = HypencoderIndexer(tiny_model, tmp_path / 'i', neighbours=0, verbose=False).index(
        [{'docno': 'long', 'text': long}, {'docno': 'kept', 'text': keep}, {'docno': 'shorter', 'text': shorter}])
    vectors = np.asarray(index.vectors())
    np.testing.assert_allclose(vectors[0], vectors[1], rtol=1e-5, atol=1e-6)
    assert not np.allclose(vectors[0], vectors[2], rtol=1e-5, atol=1e-6)
    # The text-mode reranker truncates the same way.
    frame = pd.DataFrame({'qid': ['1'] * 3, 'query': ['neural search'] * 3, 'docno': ['long', 'kept', 'shorter'],
                          'text': [long, keep, shorter]})
    scores = HypencoderReranker(tiny_model, batch_size=1)(frame).set_index('docno').score
    assert scores['long'] == pytest.approx(scores['kept'], rel=1e-5)


# ---- overwriting, interrupted and resumed builds ------------------------------------------------------------------------

def test_existing_path_needs_overwrite(built_index, tiny_model):
    index, docs = built_index
    with pytest.raises(FileExistsError, match='overwrite=True'):
        HypencoderIndexer(tiny_model, index.path, verbose=False).index(docs)


def test_overwrite_replaces_atomically(tiny_model, tmp_path):
    path = tmp_path / 'i'
    HypencoderIndexer(tiny_model, path, neighbours=0, verbose=False).index(make_docs(20))
    index = HypencoderIndexer(tiny_model, path, neighbours=3, overwrite=True, verbose=False).index(make_docs(30, 1))
    assert len(index) == 30 and index.graph_k == 3
    assert sorted(os.listdir(tmp_path)) == ['i']  # no temporary folders left behind


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


def test_interrupted_overwrite_keeps_the_old_index(tiny_model, tmp_path):
    """Ctrl-C while re-indexing with overwrite=True leaves the previous index whole (the build goes to a temp folder)."""
    old = HypencoderIndexer(tiny_model, tmp_path / 'i', neighbours=4, verbose=False).index(make_docs(30))
    before = np.array(old.vectors())

    def interrupted():
        for i, doc in enumerate(make_docs(100, seed=9)):
            if i == 60:
                raise KeyboardInterrupt
            yield doc

    with pytest.raises(KeyboardInterrupt):
        HypencoderIndexer(tiny_model, tmp_path / 'i', neighbours=4, overwrite=True, chunk_size=20,
                          verbose=False).index(interrupted())
    assert os.listdir(tmp_path) == ['i']  # no partial folder left
    index = HypencoderIndex(tmp_path / 'i')
    assert len(index) == 30 and np.array_equal(np.array(index.vectors()), before)
    assert len(HypencoderRetriever(tiny_model, index, num_results=5, **GRAPH)(
        pd.DataFrame({'qid': ['1'], 'query': ['neural search']}))) == 5


class Interrupt(Exception):
    """Stands in for a KeyboardInterrupt or a killed reader."""


def interrupted(docs, after):
    for i, doc in enumerate(docs):
        if i == after:
            raise Interrupt()
        yield doc


class CountingModel:
    """Wraps a model and counts the documents it encodes (to see what a resumed build encodes again)."""

    def __init__(self, model):
        self.model, self.encoded = model, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def encode_docs(self, texts, **kw):
        self.encoded += len(texts)
        return self.model.encode_docs(texts, **kw)


def test_resumed_build_encodes_only_the_rest(tiny_model, tmp_path):
    docs = make_docs(90)
    path = tmp_path / 'idx'
    counting = CountingModel(tiny_model)
    indexer = HypencoderIndexer(tiny_model, path, neighbours=4, chunk_size=20, resume=True, verbose=False)
    indexer.model = counting
    with pytest.raises(Interrupt):
        indexer.index(interrupted(docs, 50))
    assert not path.exists() and (tmp_path / '.idx.building-resume' / 'progress.json').exists()
    # Not resuming: refused, naming both ways on.
    with pytest.raises(FileExistsError, match='resume=True.*overwrite=True'):
        HypencoderIndexer(tiny_model, path, verbose=False).index(docs)
    before = counting.encoded  # 40 documents (two chunks) and the probe text
    index = indexer.index(docs)
    assert counting.encoded - before == 90 - 40 + 1
    assert not list(tmp_path.glob('.idx.building*'))
    fresh = HypencoderIndexer(tiny_model, tmp_path / 'fresh', neighbours=4, chunk_size=20, verbose=False).index(docs)
    np.testing.assert_array_equal(np.asarray(index.vectors()), np.asarray(fresh.vectors()))
    np.testing.assert_array_equal(index.graph_edges(), fresh.graph_edges())
    assert list(index.docnos.fwd[list(range(90))]) == [d['docno'] for d in docs]


def test_resume_refuses_other_documents_or_settings(tiny_model, tmp_path):
    docs = make_docs(60)
    path = tmp_path / 'idx'
    with pytest.raises(Interrupt):
        HypencoderIndexer(tiny_model, path, neighbours=0, chunk_size=20, resume=True, verbose=False).index(
            interrupted(docs, 45))
    with pytest.raises(ValueError, match='same documents in the same order'):
        HypencoderIndexer(tiny_model, path, neighbours=0, chunk_size=20, resume=True, verbose=False).index(
            make_docs(60, seed=1)[::-1])
    with pytest.raises(ValueError, match='other settings.*dtype'):
        HypencoderIndexer(tiny_model, path, neighbours=0, chunk_size=20, fp16=True, resume=True,
                          verbose=False).index(docs)
    with pytest.raises(ValueError, match='had already encoded 40'):
        HypencoderIndexer(tiny_model, path, neighbours=0, chunk_size=20, resume=True, verbose=False).index(docs[:30])
    # overwrite starts over.
    index = HypencoderIndexer(tiny_model, path, neighbours=0, overwrite=True, verbose=False).index(docs)
    assert len(index) == 60 and not list(tmp_path.glob('.idx.building*'))


# ---- relative paths and os.chdir ----------------------------------------------------------------------------------------

def test_relative_index_paths_survive_chdir(tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    indexer = HypencoderIndexer(tiny_model, 'rel.hyp', neighbours=4, verbose=False)
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    os.chdir(elsewhere)  # between building the indexer and indexing
    index = indexer.index(short_docs(20))
    assert index.path == tmp_path / 'rel.hyp' and not (elsewhere / 'rel.hyp').exists()
    os.chdir(tmp_path)
    retriever = HypencoderRetriever(tiny_model, 'rel.hyp')            # built, not yet used
    graph = HypencoderRetriever(tiny_model, 'rel.hyp', mode='graph', n_initial=5)
    reranker = HypencoderReranker(tiny_model, 'rel.hyp')
    os.chdir(elsewhere)
    run = retriever(SHORT_TOPICS)
    assert len(run) == 40
    assert len(graph(SHORT_TOPICS)) > 0
    assert np.allclose(reranker(run)['score'].sort_values().to_numpy(), run['score'].sort_values().to_numpy())
    # From the new working directory the relative path is simply not there: the message says so, with the
    # directory it was taken from, instead of advising to rebuild an index that exists.
    with pytest.raises(HypencoderIndexError, match=re.escape(f'the working directory {elsewhere}')) as e:
        HypencoderRetriever(tiny_model, 'rel.hyp')
    assert 'does not exist' in str(e.value) and 'interrupted' not in str(e.value)


# ---- bad corpora: errors named before the expensive part, nothing left behind -------------------------------------------

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


def test_none_text_is_called_missing_not_absent(tiny_model, tmp_path):
    docs = short_docs(5)
    docs[3]['text'] = None
    with pytest.raises(ValueError, match=r"document 3 \(docno 'd3'\) has a missing 'text' value \(None\)"):
        HypencoderIndexer(tiny_model, tmp_path / 'i', verbose=False).index(docs)
    with pytest.raises(ValueError, match=r"has no 'title' field; it has \['docno', 'text'\]"):
        HypencoderIndexer(tiny_model, tmp_path / 'i', text_field=['title', 'text'], verbose=False).index(short_docs(5))


def test_index_takes_a_dataframe(tiny_model, short_index, tmp_path):
    frame = pd.DataFrame(short_docs(60))
    built = HypencoderIndexer(tiny_model, tmp_path / 'i', neighbours=8, verbose=False).index(frame)
    assert list(built.docnos.fwd[[0, 59]]) == ['d0', 'd59']
    np.testing.assert_allclose(built.vectors(), short_index.vectors(), atol=1e-6)
    with pytest.raises(TypeError, match="document 0 is a str, not a dict.*or a DataFrame"):
        HypencoderIndexer(tiny_model, tmp_path / 'j', verbose=False).index(['a text', 'another'])
    class Dataset:  # what pt.get_dataset gives: not its documents
        def get_corpus_iter(self):
            return iter(short_docs(3))
    dataset = Dataset()
    with pytest.raises(TypeError, match=r'not a dataset: pass Dataset\.get_corpus_iter\(\)'):
        HypencoderIndexer(tiny_model, tmp_path / 'j', verbose=False).index(dataset)


def test_duplicate_docnos_fail_before_the_rest_is_encoded(tiny_model, tmp_path, monkeypatch):
    docs = short_docs(200)
    docs[12]['docno'] = 'd3'
    encoded = []
    real = tiny_model.encode_docs
    monkeypatch.setattr(tiny_model, 'encode_docs', lambda texts, **kw: encoded.append(len(texts)) or real(texts, **kw))
    with pytest.raises(ValueError, match=r"duplicate docno 'd3' \(documents 3 and 12\)"):
        HypencoderIndexer(tiny_model, tmp_path / 'i', chunk_size=8, verbose=False).index(iter(docs))
    assert sum(encoded) <= 8  # the first chunk at most, not the 200 documents
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize('bad', ['duplicate', 'no text', 'one document'])
def test_failed_indexing_closes_its_files(tiny_model, tmp_path, bad):
    docs = {'duplicate': short_docs(10) + short_docs(1), 'no text': short_docs(10) + [{'docno': 'x'}],
            'one document': short_docs(1)}[bad]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        with pytest.raises(ValueError):
            HypencoderIndexer(tiny_model, tmp_path / 'i', chunk_size=4, verbose=False).index(docs)
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], [str(w.message) for w in caught]

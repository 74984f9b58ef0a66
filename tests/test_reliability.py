"""Reliability and security (issue 8): bad inputs, damaged indexes, interrupted writes, threads, determinism.

Every case of the issue's list, with where it is tested. Cases already tested elsewhere are referenced, not repeated.

Bad inputs (each a clear error naming the problem and the fix, or a documented behaviour):

 1. empty or whitespace-only query: ValueError naming the qids (retriever, reranker)
    -> test_empty_and_whitespace_queries_are_named
 2. missing text: a reranker without index and without the text column -> test_transformers.py::test_reranker_errors;
    None text -> the same test; NaN / pd.NA text -> test_missing_text_values; NaN text or docno at indexing
    -> test_missing_text_values; a document without the text field -> test_index.py::test_bad_corpora_leave_nothing
 3. very long query and document: truncated to query_max_length / doc_max_length
    -> test_long_query_is_truncated, test_long_document_is_truncated; max lengths beyond the backbone's positions
    -> test_max_length_beyond_the_backbone
 4. integer qids (kept as given) -> test_integer_qids_are_kept; integer docnos in a reranker's input (kept as given,
    looked up as strings) -> test_integer_docnos_in_reranker_input; at indexing (become strings)
    -> test_index.py::test_integer_docnos_become_strings
 5. duplicate docnos at indexing -> test_index.py::test_bad_corpora_leave_nothing
 6. empty corpus (and a single document) -> test_index.py::test_bad_corpora_leave_nothing
 7. missing docno / query / qid column -> test_missing_columns_are_named
 8. a reranker given neither text nor an index -> test_transformers.py::test_reranker_errors; an index path that
    holds no index, or not an index at all -> test_reranker_index_argument
 9. unknown docnos for stored vectors -> test_transformers.py::test_reranker_errors, test_index.py::
    test_unknown_docnos_are_named; docnos that npids would crash on or mistake for others ('3', '', 'd007')
    -> test_unknown_docnos_never_crash_nor_alias
10. an index built with another model -> test_index.py::test_check_model_catches_other_models (index level);
    at retriever / reranker construction -> test_index_from_another_model_fails_at_construction
11. num_results <= 0 -> test_transformers.py::test_bad_arguments; not an integer -> test_num_results_not_an_integer;
    larger than the corpus (all documents) -> test_transformers.py::test_exhaustive_top1000_equals_brute_force
    (exhaustive), test_num_results_beyond_the_corpus (graph mode)
12. invalid graph-walk parameters at construction -> test_transformers.py::test_bad_arguments (zeros, negative,
    mode='hnsw') and test_invalid_walk_parameters_fail_at_construction (mode='foo', non-integers, seed,
    early_stopping); graph mode without a graph -> test_transformers.py::test_graph_mode_needs_a_graph
13. missing, truncated or corrupt index files -> test_index.py::test_unbuilt_and_corrupt_indexes (never built,
    vectors truncated, pt_meta.json corrupt); every other file, as the retriever reports it at construction
    -> test_damaged_index_fails_at_construction
14. a checkpoint with wrong shapes -> test_model.py::test_wrong_shapes_are_named (released format);
    test_own_format_wrong_shapes_are_named (this package's format)
15. a pickle checkpoint that would run code -> test_model.py::test_code_running_pickle_is_refused;
    test_code_running_pickle_never_runs (the code's side effect does not happen)
16. device='cuda' without CUDA, or not a device -> test_unavailable_device_fails_at_construction
17. non-string query values (NaN, None, numbers) -> test_non_string_queries_are_named

Interrupted indexing: a killed process -> test_index.py::test_interrupted_indexing_leaves_nothing_that_loads;
an interrupted overwrite keeps the previous index -> test_interrupted_overwrite_keeps_the_old_index.
Threads: test_threads_give_sequential_results, test_reranker_copies_have_their_own_lock_and_cache.
Determinism: test_same_seed_same_rankings,
test_same_rankings_in_another_process.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pyterrier as pt
import pytest
import torch
from test_index import WORDS, make_docs

from pyterrier_hypencoder import Hypencoder, HypencoderIndex, HypencoderIndexer, HypencoderReranker, HypencoderRetriever
from pyterrier_hypencoder.index import HypencoderIndexError
from pyterrier_hypencoder.model.checkpoint import CheckpointError

N_DOCS = 300
GRAPH = dict(mode='graph', n_initial=30, n_candidates=8)


@pytest.fixture(scope='module', autouse=True)
def one_torch_thread():
    """One intra-op thread for this module: its many tiny-model calls (4 Python threads at once in the thread test)
    are slower with more on a small busy machine, where OpenMP threads spin while they wait for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope='module')
def docs():
    return make_docs(N_DOCS)


@pytest.fixture(scope='module')
def index(tiny_model, docs, tmp_path_factory):
    path = tmp_path_factory.mktemp('reliability') / 'index'
    return HypencoderIndexer(tiny_model, path, neighbours=8, verbose=False).index(docs)


@pytest.fixture(scope='module')
def topics():
    rng = np.random.default_rng(7)
    return pd.DataFrame({'qid': [f'q{i}' for i in range(12)],
                         'query': [' '.join(rng.choice(WORDS, size=2 + i % 5)) for i in range(12)]})


def frame_key(frame):
    return list(zip(frame.qid, frame.docno, frame['rank']))


# ---- 1, 17: queries ---------------------------------------------------------------------------------------------

def test_empty_and_whitespace_queries_are_named(tiny_model, index):
    topics = pd.DataFrame({'qid': ['ok', 'e1', 'e2', 'e3'], 'query': ['neural search', '', '   ', '\t\n']})
    for transformer in (HypencoderRetriever(tiny_model, index), HypencoderRetriever(tiny_model, index, **GRAPH),
                        HypencoderReranker(tiny_model, index)):
        frame = topics.assign(docno='d1') if isinstance(transformer, HypencoderReranker) else topics
        with pytest.raises(ValueError, match=r"3 queries are empty or whitespace only \(qids \['e1', 'e2', 'e3'\]\).*drop"):
            transformer(frame)
    text_mode = HypencoderReranker(tiny_model)
    with pytest.raises(ValueError, match=r"qids \['e1'"):
        text_mode(topics.assign(docno='d1', text='some text'))
    # The non-empty query alone works.
    assert len(HypencoderRetriever(tiny_model, index, num_results=3)(topics.iloc[:1])) == 3


@pytest.mark.parametrize('bad', [np.nan, None, pd.NA, 42, ['neural', 'search']])
def test_non_string_queries_are_named(tiny_model, index, bad):
    topics = pd.DataFrame({'qid': ['ok', 'bad'], 'query': pd.Series(['neural search', bad], dtype=object)})
    with pytest.raises(TypeError, match="qid 'bad'.*fill or drop"):
        HypencoderRetriever(tiny_model, index)(topics)
    with pytest.raises(TypeError, match="qid 'bad'.*fill or drop"):
        HypencoderReranker(tiny_model, index)(topics.assign(docno='d1'))


# ---- 2: missing text ----------------------------------------------------------------------------------------------

def test_missing_text_values(tiny_model, tmp_path):
    frame = pd.DataFrame({'qid': ['1', '1'], 'query': ['neural search'] * 2, 'docno': ['a', 'b']})
    for missing in (np.nan, pd.NA):
        with pytest.raises(TypeError, match="1 values that are not strings, e.g. for docno 'b'; fill them"):
            HypencoderReranker(tiny_model)(frame.assign(text=pd.Series(['some text', missing], dtype=object)))
    # An empty text is a document like any other (documented), not an error.
    assert len(HypencoderReranker(tiny_model)(frame.assign(text=['some text', '']))) == 2
    # At indexing, str(nan) would silently index the word "nan": a missing value is an error naming the document.
    for missing in (np.nan, pd.NA):
        with pytest.raises(ValueError, match=r"docno 'b'\) has a missing 'text' value"):
            HypencoderIndexer(tiny_model, tmp_path / 'i', neighbours=0, verbose=False).index(
                [{'docno': 'a', 'text': 'x y'}, {'docno': 'b', 'text': missing}, {'docno': 'c', 'text': 'z'}])
        with pytest.raises(ValueError, match='document 1 has no docno'):
            HypencoderIndexer(tiny_model, tmp_path / 'i', neighbours=0, verbose=False).index(
                [{'docno': 'a', 'text': 'x y'}, {'docno': missing, 'text': 'z'}])
    assert not (tmp_path / 'i').exists()


# ---- 3: very long inputs --------------------------------------------------------------------------------------------

def one_token_words(model):
    words = [w for w in WORDS if len(model.tokenizer.tokenize(w)) == 1]
    assert len(words) > 10
    return words


def test_long_query_is_truncated(tiny_model, index):
    words = one_token_words(tiny_model)
    rng = np.random.default_rng(0)
    long = list(rng.choice(words, size=5000))
    keep = tiny_model.query_max_length - 2  # [CLS] and [SEP]
    retriever = HypencoderRetriever(tiny_model, index, num_results=50)

    def run(query_words):
        return retriever(pd.DataFrame({'qid': ['1'], 'query': [' '.join(query_words)]}))

    res = run(long)
    truncated = run(long[:keep])
    assert res.docno.tolist() == truncated.docno.tolist()
    np.testing.assert_array_equal(res.score.to_numpy(), truncated.score.to_numpy())
    # Words past the limit are ignored, words within it are not.
    other_tail = long[:keep] + list(rng.choice(words, size=4000))
    np.testing.assert_array_equal(run(other_tail).score.to_numpy(), res.score.to_numpy())
    assert not np.allclose(run(long[:keep - 5]).score.to_numpy(), res.score.to_numpy())


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


def test_max_length_beyond_the_backbone(tiny_bert, tiny_model):
    # The tiny BERT has 512 positions: more would fail deep inside the backbone with a shape error.
    with pytest.raises(ValueError, match='doc_max_length=1024 is more tokens than the backbone has positions'):
        Hypencoder.from_backbone(str(tiny_bert), qnet_layers=2, doc_max_length=1024, device='cpu')
    model = Hypencoder.from_backbone(str(tiny_bert), qnet_layers=2, device='cpu')
    model.query_max_length = 600
    with pytest.raises(ValueError, match='query_max_length=600.*at most 512'):
        model.encode_queries(['neural search'])
    model.doc_max_length = 0
    with pytest.raises(ValueError, match='doc_max_length must be >= 1'):
        model.encode_docs(['neural search'])


# ---- 4: integer qids and docnos --------------------------------------------------------------------------------

def test_integer_qids_are_kept(tiny_model, index, topics):
    as_int = topics.assign(qid=range(100, 100 + len(topics)))
    for make in (lambda: HypencoderRetriever(tiny_model, index, num_results=10),
                 lambda: HypencoderRetriever(tiny_model, index, num_results=10, **GRAPH)):
        by_str, by_int = make()(topics), make()(as_int)
        assert by_int.qid.dtype == np.int64 and by_int.qid.unique().tolist() == as_int.qid.tolist()
        assert by_int.docno.tolist() == by_str.docno.tolist()
        np.testing.assert_array_equal(by_int.score.to_numpy(), by_str.score.to_numpy())
        reranked = HypencoderReranker(tiny_model, index)(by_int.assign(score=0.0))
        assert reranked.qid.dtype == np.int64 and reranked.qid.unique().tolist() == as_int.qid.tolist()
        want = dict(zip(zip(by_int.qid, by_int.docno), by_int.score))
        got = dict(zip(zip(reranked.qid, reranked.docno), reranked.score))
        assert got.keys() == want.keys()
        np.testing.assert_allclose([got[k] for k in want], list(want.values()), rtol=1e-5, atol=1e-6)


def test_integer_docnos_in_reranker_input(tiny_model, tmp_path):
    docs = [{'docno': 10 + i, 'text': d['text']} for i, d in enumerate(make_docs(40, seed=3))]
    index = HypencoderIndexer(tiny_model, tmp_path / 'i', neighbours=0, verbose=False).index(docs)
    frame = pd.DataFrame({'qid': ['1'] * 5, 'query': ['neural search'] * 5, 'docno': [12, 40, 10, 49, 33]})
    by_int = HypencoderReranker(tiny_model, index)(frame)
    by_str = HypencoderReranker(tiny_model, index)(frame.assign(docno=frame.docno.astype(str)))
    assert by_int.docno.dtype == np.int64  # kept as given
    assert by_int.docno.astype(str).tolist() == by_str.docno.tolist()
    np.testing.assert_array_equal(by_int.score.to_numpy(), by_str.score.to_numpy())
    # '0012' is not '12', and 9 was never indexed.
    with pytest.raises(KeyError, match=r"\['0012', '9'\]"):
        HypencoderReranker(tiny_model, index)(frame.assign(docno=['12', '0012', '9', '40', '10']))


# ---- 7, 8, 9: columns, reranker sources, unknown docnos -----------------------------------------------------------

def test_missing_columns_are_named(tiny_model, index):
    retriever = HypencoderRetriever(tiny_model, index)
    with pytest.raises(pt.validate.InputValidationError, match=r"missing_columns=\['query'\]"):
        retriever(pd.DataFrame({'qid': ['1']}))
    with pytest.raises(pt.validate.InputValidationError, match=r"missing_columns=\['qid'\]"):
        retriever(pd.DataFrame({'query': ['neural search']}))
    reranker = HypencoderReranker(tiny_model, index)
    with pytest.raises(pt.validate.InputValidationError, match=r"missing_columns=\['docno'\]"):
        reranker(pd.DataFrame({'qid': ['1'], 'query': ['neural search']}))
    with pytest.raises(pt.validate.InputValidationError, match=r"missing_columns=\['query'\]"):
        reranker(pd.DataFrame({'qid': ['1'], 'docno': ['d1']}))


def test_reranker_index_argument(tiny_model, index, tmp_path):
    with pytest.raises(HypencoderIndexError, match='nowhere: the folder does not exist'):
        HypencoderReranker(tiny_model, tmp_path / 'nowhere')
    with pytest.raises(TypeError, match='HypencoderIndex or the path'):
        HypencoderReranker(tiny_model, 42)
    (tmp_path / 'other').mkdir()
    (tmp_path / 'other' / 'pt_meta.json').write_text('{"type": "sparse_index", "format": "pisa"}')
    with pytest.raises(HypencoderIndexError, match='sparse_index/pisa artifact, not a Hypencoder index'):
        HypencoderReranker(tiny_model, tmp_path / 'other')


@pytest.mark.parametrize('bad', ['3', '', 'd', 'd007', 'd0300', 'D7', 'd7 ', 'nope'])
def test_unknown_docnos_never_crash_nor_alias(tiny_model, index, bad):
    # npids' integer-sequence lookup crashed on '3', '' and 'd', and returned the row of 'd7' for 'd007'.
    for docnos in ([bad], ['d7', bad], [bad, 'd12', bad]):
        with pytest.raises(KeyError, match=f'{docnos.count(bad)} docno.*' + re.escape(repr(bad))):
            index.rows(docnos)
    frame = pd.DataFrame({'qid': ['1', '1'], 'query': ['neural search'] * 2, 'docno': [bad, bad]})
    with pytest.raises(KeyError, match=re.escape(repr(bad)) + '.*from the indexed corpus'):
        HypencoderReranker(tiny_model, index)(frame)
    assert index.rows(['d7', 'd299', 'd0']).tolist() == [7, 299, 0]


# ---- 10: an index from another model ------------------------------------------------------------------------------

def test_index_from_another_model_fails_at_construction(tiny_model, tiny_bert, index, tmp_path):
    from conftest import make_tiny_bert
    wide = Hypencoder.from_backbone(str(make_tiny_bert(tmp_path / 'wide', hidden=48)), qnet_layers=2, device='cpu')
    other = Hypencoder.from_backbone(str(tiny_bert), qnet_layers=3, pooling='mean', device='cpu')
    for model, match in ((wide, '48-d vectors but the index .* holds 32-d'), (other, 'encodes documents differently')):
        with pytest.raises(HypencoderIndexError, match=match):
            HypencoderRetriever(model, index)
        with pytest.raises(HypencoderIndexError, match=match):
            HypencoderRetriever(model, index, **GRAPH)
        with pytest.raises(HypencoderIndexError, match=match):
            HypencoderReranker(model, index)


# ---- 11, 12: result counts and walk parameters --------------------------------------------------------------------

@pytest.mark.parametrize('value', [2.5, '10', True, None])
def test_num_results_not_an_integer(tiny_model, index, value):
    with pytest.raises(ValueError, match='num_results must be an integer >= 1'):
        HypencoderRetriever(tiny_model, index, num_results=value)


def test_num_results_beyond_the_corpus(tiny_model, index, topics):
    exhaustive = HypencoderRetriever(tiny_model, index, num_results=5000)(topics.iloc[:3])
    # The default sample (10,000) is clamped to the 300 documents: the walk scores them all.
    walk = HypencoderRetriever(tiny_model, index, num_results=5000, mode='graph')(topics.iloc[:3])
    for res in (exhaustive, walk):
        assert res.groupby('qid').size().tolist() == [N_DOCS] * 3
        assert res.groupby('qid').docno.nunique().tolist() == [N_DOCS] * 3
    assert frame_key(walk) == frame_key(exhaustive)


@pytest.mark.parametrize('kwargs, match', [
    ({'mode': 'foo'}, "mode must be one of \\('exhaustive', 'graph', 'adaptive', 'surrogate'\\); got 'foo'"),
    ({'n_initial': 1.5}, 'n_initial must be an integer >= 1; got 1.5'),
    ({'n_candidates': '8'}, "n_candidates must be an integer >= 1; got '8'"),
    ({'max_iter': None}, 'max_iter must be an integer >= 0; got None'),
    ({'seed': -1}, 'seed must be an integer >= 0; got -1'),
    ({'seed': 'abc'}, "seed must be an integer >= 0; got 'abc'"),
    ({'early_stopping': 'yes'}, "early_stopping must be True or False; got 'yes'"),
    ({'batch_size': 0.5}, 'batch_size must be an integer >= 1'),
])
def test_invalid_walk_parameters_fail_at_construction(tiny_model, index, kwargs, match):
    with pytest.raises(ValueError, match=match):
        HypencoderRetriever(tiny_model, index, **{**GRAPH, **kwargs})


# ---- 13: damaged index files --------------------------------------------------------------------------------------

def _truncate(path, keep=None):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2 if keep is None else keep])


def _edit_meta(folder, **changes):
    meta = json.loads((folder / 'pt_meta.json').read_text())
    meta.update(changes)
    (folder / 'pt_meta.json').write_text(json.dumps(meta))


DAMAGE = {
    'docnos missing': (lambda f: (f / 'docnos.npids').unlink(), r'docnos.npids is missing'),
    'docnos truncated': (lambda f: _truncate(f / 'docnos.npids', 10), r'docnos.npids is unreadable'),
    'docnos garbage': (lambda f: (f / 'docnos.npids').write_bytes(b'\x00garbage' * 40), r'docnos.npids is unreadable'),
    'docnos of another corpus': (lambda f: _rebuild_docnos(f / 'docnos.npids', 10), r'has 10 docnos for 300 vectors'),
    'vectors missing': (lambda f: (f / 'vecs.f4').unlink(), r'vecs.f4 should hold 38400 bytes .* but is missing'),
    'vectors too long': (lambda f: (f / 'vecs.f4').write_bytes(b'\x00' * 40000), r'vecs.f4 should hold 38400 bytes'),
    'edges truncated': (lambda f: _truncate(f / 'graph_l2_k8' / 'edges.u32.np'), r'edges.u32.np is missing or truncated'),
    'edges missing': (lambda f: (f / 'graph_l2_k8' / 'edges.u32.np').unlink(), r'edges.u32.np is missing or truncated'),
    'graph weights truncated': (lambda f: _truncate(f / 'graph_l2_k8' / 'weights.f16.np'), r'weights.f16.np is missing'),
    'graph folder missing': (lambda f: shutil.rmtree(f / 'graph_l2_k8'), r'graph_l2_k8/edges.u32.np is missing'),
    'graph meta missing': (lambda f: (f / 'graph_l2_k8' / 'pt_meta.json').unlink(), r'graph_l2_k8/pt_meta.json is missing'),
    'graph docnos missing': (lambda f: (f / 'graph_l2_k8' / 'docnos.npids').unlink(), r'graph_l2_k8/docnos.npids is missing'),
    'meta truncated': (lambda f: _truncate(f / 'pt_meta.json'), r'pt_meta.json is corrupt'),
    'meta not an object': (lambda f: (f / 'pt_meta.json').write_text('[]'), r'pt_meta.json is corrupt \(not a JSON object'),
    'meta without doc_count': (lambda f: (f / 'pt_meta.json').write_text('{"type": "dense_index", "format": "hypencoder"}'),
                               r"pt_meta.json is corrupt \(missing \['doc_count', 'vec_size', 'dtype'\]"),
    'meta unknown dtype': (lambda f: _edit_meta(f, dtype='float64'), r'pt_meta.json is corrupt'),
    'meta graph without k': (lambda f: _edit_meta(f, graph={'metric': 'l2'}), r'pt_meta.json is corrupt'),
    'meta missing': (lambda f: (f / 'pt_meta.json').unlink(), r'pt_meta.json is missing, so it was never built'),
}


def _rebuild_docnos(path, n):
    from npids import Lookup
    path.unlink()
    with Lookup.builder(path) as builder:
        for i in range(n):
            builder.add(f'x{i}')


@pytest.mark.parametrize('damage', sorted(DAMAGE))
def test_damaged_index_fails_at_construction(tiny_model, index, tmp_path, damage):
    folder = tmp_path / 'copy'
    shutil.copytree(index.path, folder)
    fn, match = DAMAGE[damage]
    fn(folder)
    for kwargs in ({}, GRAPH):
        with pytest.raises(HypencoderIndexError, match=match):
            HypencoderRetriever(tiny_model, folder, **kwargs)
    with pytest.raises(HypencoderIndexError, match=match):
        HypencoderReranker(tiny_model, str(folder))
    if not damage.startswith('meta'):  # without readable metadata, pt.Artifact.load cannot tell what it is
        with pytest.raises(HypencoderIndexError, match=match):
            pt.Artifact.load(str(folder)).retriever(tiny_model)
    # The message says what to do.
    with pytest.raises(HypencoderIndexError, match='rebuild|Build it'):
        HypencoderRetriever(tiny_model, folder)


# ---- 14, 15: checkpoints in this package's format -----------------------------------------------------------------

def test_own_format_wrong_shapes_are_named(tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file
    tiny_model.save_pretrained(tmp_path / 'm')
    state = load_file(str(tmp_path / 'm' / 'model.safetensors'))
    name = next(k for k in state if k.startswith('hyperhead.') and state[k].ndim == 2)
    state[name] = torch.zeros(state[name].shape[0] + 1, state[name].shape[1])
    save_file(state, str(tmp_path / 'm' / 'model.safetensors'))
    with pytest.raises(CheckpointError, match=f'wrong shapes: {name}: checkpoint'):
        Hypencoder.from_pretrained(tmp_path / 'm', device='cpu')


class _WritesAFile:
    path = None

    def __reduce__(self):
        return (open, (self.path, 'w'))


def test_code_running_pickle_never_runs(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / 'm')
    (tmp_path / 'm' / 'model.safetensors').unlink()
    marker = tmp_path / 'the-pickle-ran'
    exploit = _WritesAFile()
    exploit.path = str(marker)
    import pickle
    with open(tmp_path / 'm' / 'pytorch_model.bin', 'wb') as f:
        pickle.dump({'backbone.embeddings.word_embeddings.weight': exploit}, f)
    with pytest.raises(CheckpointError, match='refusing to load'):
        Hypencoder.from_pretrained(tmp_path / 'm', device='cpu')
    assert not marker.exists()


# ---- 16: devices ---------------------------------------------------------------------------------------------------

def test_unavailable_device_fails_at_construction(tiny_model, tiny_bert, index, monkeypatch):
    # None picks what there is; 'cpu' always works.
    assert HypencoderRetriever(tiny_model, index, device='cpu').search_device == torch.device('cpu')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    for make in (lambda: Hypencoder.from_backbone(str(tiny_bert), qnet_layers=2, device='cuda'),
                 lambda: HypencoderRetriever(tiny_model, index, device='cuda'),
                 lambda: HypencoderRetriever(tiny_model, index, device=torch.device('cuda:0'), **GRAPH),
                 lambda: HypencoderReranker(tiny_model, device='cuda')):
        with pytest.raises(ValueError, match="device 'cuda(:0)?' was requested but CUDA is not available.*device=\"cpu\""):
            make()
    with pytest.raises(ValueError, match="'gpu' is not a device"):
        HypencoderRetriever(tiny_model, index, device='gpu')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    with pytest.raises(ValueError, match="'cuda:3' was requested but this machine has 1 CUDA device"):
        HypencoderReranker(tiny_model, index, device='cuda:3')


# ---- interrupted writes ------------------------------------------------------------------------------------------

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


# ---- threads -----------------------------------------------------------------------------------------------------

def test_threads_give_sequential_results(tiny_model, index, topics, docs):
    """4 threads on one retriever / reranker give what one thread gives, frame for frame."""
    texts = {d['docno']: d['text'] for d in docs}
    frames = [topics.iloc[[i, (i + 5) % 12]] for i in range(8)]
    first = HypencoderRetriever(tiny_model, index, num_results=10)
    candidates = [first(f) for f in frames]
    # batch_size=1: each query and text is encoded alone, so cached and fresh q-nets are bitwise equal and the
    # frames can be compared exactly. Only 4 q-nets are cached, so threads keep evicting each other's.
    jobs = {
        'exhaustive': (HypencoderRetriever(tiny_model, index, num_results=20, batch_size=1), frames),
        'graph': (HypencoderRetriever(tiny_model, index, num_results=20, batch_size=1, **GRAPH), frames),
        'reranker (index)': (HypencoderReranker(tiny_model, index, batch_size=1), candidates),
        'reranker (text)': (HypencoderReranker(tiny_model, batch_size=1),
                            [c.assign(text=c.docno.map(texts)) for c in candidates]),
    }
    for name, (transformer, inputs) in jobs.items():
        inputs = inputs * 2
        sequential = [transformer(f) for f in inputs]
        with ThreadPoolExecutor(max_workers=4) as pool:
            threaded = list(pool.map(transformer, inputs))
        for want, got in zip(sequential, threaded):
            pd.testing.assert_frame_equal(got, want, obj=name)
    # All four kinds at once on one model, queries and documents tokenised concurrently.
    everything = [(t, f) for t, inputs in jobs.values() for f in inputs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        mixed = list(pool.map(lambda job: job[0](job[1]), everything))
    for (transformer, frame), got in zip(everything, mixed):
        pd.testing.assert_frame_equal(got, transformer(frame), obj=repr(transformer))


def test_reranker_copies_have_their_own_lock_and_cache(tiny_model, index):
    import copy
    import pickle
    reranker = HypencoderReranker(tiny_model, index)
    frame = pd.DataFrame({'qid': ['1', '1'], 'query': ['neural search'] * 2, 'docno': ['d1', 'd2']})
    want = reranker(frame)
    for clone in (copy.copy(reranker), copy.deepcopy(reranker), pickle.loads(pickle.dumps(reranker))):
        assert clone._lock is not reranker._lock and not clone._cache and reranker._cache
        pd.testing.assert_frame_equal(clone(frame), want)


# ---- determinism -------------------------------------------------------------------------------------------------

def test_same_seed_same_rankings(tiny_model, index, topics):
    runs = [HypencoderRetriever(tiny_model, HypencoderIndex(index.path), num_results=20, seed=3, **GRAPH)(topics)
            for _ in range(2)]
    pd.testing.assert_frame_equal(runs[0], runs[1])
    # The seed matters: another one starts from another sample, and finds other documents for some query.
    other = HypencoderRetriever(tiny_model, index, num_results=20, seed=4, **GRAPH)(topics)
    assert frame_key(other) != frame_key(runs[0])


def test_same_rankings_in_another_process(tiny_bert, tiny_model, index, topics):
    graph = HypencoderRetriever(tiny_model, index, num_results=20, seed=3, **GRAPH)
    exhaustive = HypencoderRetriever(tiny_model, index, num_results=20)
    here = {'graph': graph(topics), 'exhaustive': exhaustive(topics)}
    here['reranker'] = HypencoderReranker(tiny_model, index)(here['graph'])
    script = textwrap.dedent(f'''
        import json, sys
        import pandas as pd
        from pyterrier_hypencoder import Hypencoder, HypencoderIndex
        from pyterrier_hypencoder import HypencoderReranker
        from pyterrier_hypencoder import HypencoderRetriever
        model = Hypencoder.from_backbone({str(tiny_bert)!r}, qnet_layers=3, seed=0, device='cpu')
        index = HypencoderIndex({str(index.path)!r})
        topics = pd.DataFrame(json.loads(sys.stdin.read()))
        out = {{'graph': HypencoderRetriever(model, index, num_results=20, seed=3, mode='graph', n_initial=30,
                                            n_candidates=8)(topics),
               'exhaustive': HypencoderRetriever(model, index, num_results=20)(topics)}}
        out['reranker'] = HypencoderReranker(model, index)(out['graph'])
        print(json.dumps({{k: v[['qid', 'docno', 'score', 'rank']].to_dict('list') for k, v in out.items()}}))
    ''')
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1'}  # as this module runs torch
    proc = subprocess.run([sys.executable, '-c', script], input=json.dumps(topics.to_dict('list')), capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    there = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, frame in here.items():
        got = pd.DataFrame(there[name])
        assert frame_key(got) == frame_key(frame), name
        np.testing.assert_allclose(got.score.to_numpy(), frame.score.to_numpy(), rtol=1e-6, atol=1e-7)

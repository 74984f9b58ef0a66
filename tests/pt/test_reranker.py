"""HypencoderReranker: the retriever's scores from stored vectors or from text, its query cache, GAR over the
index's graph, and its inputs (missing text, integer docnos, the index argument, copies)."""
import numpy as np
import pandas as pd
import pyterrier as pt
import pytest
from helpers import N_QUERIES, make_docs

from pyterrier_hypencoder import HypencoderIndexer, HypencoderReranker, HypencoderRetriever
from pyterrier_hypencoder.index import HypencoderIndexError

pytestmark = pytest.mark.usefixtures('one_thread')


def as_pairs(frame):
    return dict(zip(zip(frame.qid, frame.docno), frame.score))


def test_reranker_scores_equal_retriever(tiny_model, vaswani_index, vaswani):
    docs, topics, _ = vaswani
    retrieved = HypencoderRetriever(tiny_model, vaswani_index, num_results=30)(topics)
    # Shuffled, with stale scores: the reranker must rescore and re-sort.
    shuffled = retrieved.sample(frac=1, random_state=0).assign(score=0.0, rank=-1)
    by_vectors = HypencoderReranker(tiny_model, vaswani_index)(shuffled)
    texts = pd.DataFrame(docs)[['docno', 'text']]
    by_text = HypencoderReranker(tiny_model, batch_size=5)(shuffled.merge(texts, on='docno'))
    want = as_pairs(retrieved)
    for out in (by_vectors, by_text):
        assert len(out) == len(retrieved)
        assert out.qid.unique().tolist() == shuffled.qid.unique().tolist()
        got = as_pairs(out)
        assert got.keys() == want.keys()
        np.testing.assert_allclose([got[k] for k in want], list(want.values()), rtol=1e-4, atol=1e-5)
        for _, group in out.groupby('qid', sort=False):
            assert group['rank'].tolist() == list(range(len(group)))
            assert (np.diff(group.score.to_numpy()) <= 0).all()


def test_reranker_query_cache(tiny_model, vaswani_index, vaswani, monkeypatch):
    _, topics, _ = vaswani
    reranker = HypencoderReranker(tiny_model, vaswani_index)
    frame = pd.DataFrame({'qid': ['1'] * 3, 'query': ['dielectric constant'] * 3, 'docno': ['1', '2', '3']})
    first = reranker(frame)
    calls = []
    encode = tiny_model.encode_queries
    monkeypatch.setattr(tiny_model, 'encode_queries', lambda queries, **kw: calls.append(queries) or encode(queries, **kw))
    # GAR-style: the same query again, in small batches, is not encoded again.
    again = as_pairs(reranker(frame.iloc[:2]))
    assert again == {k: v for k, v in as_pairs(first).items() if k[1] in ('1', '2')}
    assert calls == []
    reranker(topics.assign(docno='1'))
    assert calls == [topics['query'].tolist()]
    assert len(reranker._cache) == 4  # only the last few q-nets stay in memory
    reranker.clear_cache()
    assert not reranker._cache


def test_gar_with_the_index_graph(tiny_model, vaswani_index, vaswani):
    pyterrier_adaptive = pytest.importorskip('pyterrier_adaptive')
    _, topics, _ = vaswani
    first_stage = HypencoderRetriever(tiny_model, vaswani_index, num_results=10)
    reranker = HypencoderReranker(tiny_model, vaswani_index)
    gar = pyterrier_adaptive.GAR(reranker, vaswani_index.corpus_graph(), num_results=40, batch_size=10)
    out = (first_stage >> gar)(topics)
    assert set(out.columns) >= {'qid', 'docno', 'score', 'rank', 'iteration'}
    assert out.groupby('qid').size().tolist() == [40] * N_QUERIES
    # Documents beyond the first stage's 10 came from the graph (odd iterations), scored like everything else.
    assert (out.iteration % 2 == 1).any()
    rescored = reranker(out[['qid', 'query', 'docno']])
    want = as_pairs(rescored)
    np.testing.assert_allclose([want[k] for k in as_pairs(out)], list(as_pairs(out).values()), rtol=1e-4, atol=1e-5)


def test_reranker_errors(tiny_model, vaswani_index):
    frame = pd.DataFrame({'qid': ['1', '1'], 'query': ['dielectric constant', 'dielectric constant'],
                          'docno': ['1', 'no-such-doc']})
    with pytest.raises(KeyError, match='no-such-doc'):
        HypencoderReranker(tiny_model, vaswani_index)(frame)
    with pytest.raises(pt.validate.InputValidationError, match="no index.*'text' column"):
        HypencoderReranker(tiny_model)(frame)
    with pytest.raises(pt.validate.InputValidationError, match='body'):
        HypencoderReranker(tiny_model, text_field='body')(frame.assign(text='x'))
    with pytest.raises(TypeError, match='not strings'):
        HypencoderReranker(tiny_model)(frame.assign(text=['some text', None]))


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


def test_reranker_index_argument(tiny_model, words_index, tmp_path):
    with pytest.raises(HypencoderIndexError, match='nowhere: the folder does not exist'):
        HypencoderReranker(tiny_model, tmp_path / 'nowhere')
    with pytest.raises(TypeError, match='HypencoderIndex or the path'):
        HypencoderReranker(tiny_model, 42)
    (tmp_path / 'other').mkdir()
    (tmp_path / 'other' / 'pt_meta.json').write_text('{"type": "sparse_index", "format": "pisa"}')
    with pytest.raises(HypencoderIndexError, match='sparse_index/pisa artifact, not a Hypencoder index'):
        HypencoderReranker(tiny_model, tmp_path / 'other')


def test_reranker_copies_have_their_own_lock_and_cache(tiny_model, words_index):
    import copy
    import pickle
    reranker = HypencoderReranker(tiny_model, words_index)
    frame = pd.DataFrame({'qid': ['1', '1'], 'query': ['neural search'] * 2, 'docno': ['d1', 'd2']})
    want = reranker(frame)
    for clone in (copy.copy(reranker), copy.deepcopy(reranker), pickle.loads(pickle.dumps(reranker))):
        assert clone._lock is not reranker._lock and not clone._cache and reranker._cache
        pd.testing.assert_frame_equal(clone(frame), want)

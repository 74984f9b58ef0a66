"""HypencoderRetriever and HypencoderReranker on a small index of real (vaswani) documents with a tiny model."""
import io
import unittest

import numpy as np
import pandas as pd
import pyterrier as pt
import pytest
import torch
from conftest import qnet_fp32_bound
from ir_measures import R, nDCG

from pyterrier_hypencoder import HypencoderIndexer, HypencoderReranker, HypencoderRetriever

N_QUERIES = 6


@pytest.fixture(scope='module')
def vaswani(irds_home):
    """The first 250 vaswani documents plus those judged for the first queries, with those queries and qrels."""
    dataset = pt.get_dataset('irds:vaswani')
    topics = dataset.get_topics().iloc[:N_QUERIES].reset_index(drop=True)
    qrels = dataset.get_qrels()
    qrels = qrels[qrels.qid.isin(topics.qid)]
    wanted = set(qrels.docno)
    docs = [d for i, d in enumerate(dataset.get_corpus_iter(verbose=False)) if i < 250 or d['docno'] in wanted]
    return docs, topics, qrels.reset_index(drop=True)


@pytest.fixture(scope='module')
def index(tiny_model, vaswani, tmp_path_factory):
    docs, _, _ = vaswani
    path = tmp_path_factory.mktemp('transformers') / 'vaswani.hypencoder'
    return HypencoderIndexer(tiny_model, path, neighbours=16, verbose=False).index(docs)


@pytest.fixture(scope='module')
def plain_index(tiny_model, vaswani, tmp_path_factory):
    docs, _, _ = vaswani
    path = tmp_path_factory.mktemp('transformers') / 'nograph.hypencoder'
    return HypencoderIndexer(tiny_model, path, neighbours=0, verbose=False).index(docs[:50])


@pytest.fixture(scope='module')
def brute(tiny_model, index, vaswani):
    """Every document's score for every query, [queries, docs], in float64 from the stored vectors."""
    _, topics, _ = vaswani
    qnets = tiny_model.encode_queries(topics['query'].tolist()).to(dtype=torch.float64)
    return qnets.score(torch.from_numpy(np.array(index.vectors(), dtype=np.float64))).numpy()


@pytest.fixture(scope='module')
def bound(tiny_model, brute):
    """How far the retrievers' fp32 scores may be from ``brute`` (:func:`conftest.qnet_fp32_bound`)."""
    return qnet_fp32_bound(tiny_model.spec, brute)


def as_pairs(frame):
    return dict(zip(zip(frame.qid, frame.docno), frame.score))


def test_exhaustive_top1000_equals_brute_force(tiny_model, index, vaswani, brute, bound):
    _, topics, _ = vaswani
    n = len(index)
    res = HypencoderRetriever(tiny_model, index, num_results=1000)(topics)
    # More results than documents: every document, once per query.
    assert len(res) == N_QUERIES * n
    assert list(res.columns) == ['qid', 'query', 'docno', 'score', 'rank']
    assert res.qid.unique().tolist() == topics.qid.tolist()
    docnos = index.docnos.fwd[np.arange(n)]
    for i, (_, group) in enumerate(res.groupby('qid', sort=False)):
        order = np.argsort(-brute[i], kind='stable')
        assert group['rank'].tolist() == list(range(n))
        assert (np.diff(group.score.to_numpy()) <= 0).all()
        np.testing.assert_allclose(group.score.to_numpy(), brute[i][order], rtol=0, atol=bound)
        # Same documents at each rank, ties within float noise aside.
        want = brute[i][index.rows(group.docno.tolist())]
        np.testing.assert_allclose(group.score.to_numpy(), want, rtol=0, atol=bound)
        assert set(group.docno) == set(docnos)


def test_exhaustive_top_k_and_input_columns(tiny_model, index, vaswani, brute, bound):
    _, topics, _ = vaswani
    topics = topics.assign(extra=range(N_QUERIES))
    res = HypencoderRetriever(tiny_model, str(index.path), num_results=20, batch_size=4)(topics)
    assert len(res) == 20 * N_QUERIES
    assert res.groupby('qid', sort=False).extra.first().tolist() == list(range(N_QUERIES))
    for i, (_, group) in enumerate(res.groupby('qid', sort=False)):
        top = np.sort(brute[i])[::-1][:20]
        np.testing.assert_allclose(group.score.to_numpy(), top, rtol=0, atol=bound)


def test_graph_mode(tiny_model, index, vaswani, brute, bound):
    _, topics, _ = vaswani
    exact = HypencoderRetriever(tiny_model, index, num_results=10)(topics)
    # The defaults sample 10,000 documents: clamped to this corpus, the walk scores everything and is exact.
    full = HypencoderRetriever(tiny_model, index, num_results=10, mode='graph')(topics)
    assert full.docno.tolist() == exact.docno.tolist()
    small = HypencoderRetriever(tiny_model, index, num_results=10, mode='graph', n_initial=20, n_candidates=4)
    res = small(topics)
    assert len(res) == 10 * N_QUERIES and res['rank'].tolist() == list(range(10)) * N_QUERIES
    for i, (_, group) in enumerate(res.groupby('qid', sort=False)):
        # Scores are the documents' true scores, sorted.
        np.testing.assert_allclose(group.score.to_numpy(), brute[i][index.rows(group.docno.tolist())], rtol=0,
                                   atol=bound)
        assert (np.diff(group.score.to_numpy()) <= 0).all()
    assert res.docno.tolist() == small(topics).docno.tolist()  # deterministic
    # Asking for more than the walk scores returns what it scored: unique documents, ranked 0..m-1.
    many = HypencoderRetriever(tiny_model, index, num_results=1000, mode='graph', n_initial=20, n_candidates=4,
                               max_iter=2)(topics)
    for _, group in many.groupby('qid', sort=False):
        assert 20 < len(group) <= 20 + 2 * 4 * 16 and group.docno.is_unique
        assert group['rank'].tolist() == list(range(len(group)))


def test_graph_mode_needs_a_graph(tiny_model, plain_index):
    with pytest.raises(ValueError, match='no neighbour graph'):
        HypencoderRetriever(tiny_model, plain_index, mode='graph')


def test_rank_cutoff_fusion(tiny_model, index, vaswani):
    _, topics, _ = vaswani
    retriever = HypencoderRetriever(tiny_model, index, num_results=100)
    fused = (retriever % 10).compile()
    assert isinstance(fused, HypencoderRetriever) and fused.num_results == 10 and retriever.num_results == 100
    pd.testing.assert_frame_equal(fused(topics), (retriever % 10)(topics))
    assert retriever.fuse_rank_cutoff(100) is None and retriever.fuse_rank_cutoff(200) is None
    # A graph walk with early stopping depends on num_results, so it is not fused; without, it is exact.
    walk = dict(mode='graph', n_initial=20, n_candidates=4)
    assert HypencoderRetriever(tiny_model, index, **walk).fuse_rank_cutoff(10) is None
    free = HypencoderRetriever(tiny_model, index, num_results=50, early_stopping=False, **walk)
    assert free.fuse_rank_cutoff(10).num_results == 10
    pd.testing.assert_frame_equal(free.fuse_rank_cutoff(10)(topics), (free % 10)(topics))


def test_reranker_scores_equal_retriever(tiny_model, index, vaswani):
    docs, topics, _ = vaswani
    retrieved = HypencoderRetriever(tiny_model, index, num_results=30)(topics)
    # Shuffled, with stale scores: the reranker must rescore and re-sort.
    shuffled = retrieved.sample(frac=1, random_state=0).assign(score=0.0, rank=-1)
    by_vectors = HypencoderReranker(tiny_model, index)(shuffled)
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


def test_pipeline_and_experiment(tiny_model, index, vaswani):
    _, topics, qrels = vaswani
    exhaustive = HypencoderRetriever(tiny_model, index, num_results=50)
    graph = HypencoderRetriever(tiny_model, index, num_results=50, mode='graph', n_initial=40, n_candidates=8)
    rerank = exhaustive % 20 >> HypencoderReranker(tiny_model, index)
    result = pt.Experiment([exhaustive, exhaustive % 10, graph, rerank], topics, qrels,
                           eval_metrics=[nDCG @ 10, R @ 50], names=['exhaustive', 'cutoff', 'graph', 'rerank'])
    assert result.name.tolist() == ['exhaustive', 'cutoff', 'graph', 'rerank']
    assert result[['nDCG@10', 'R@50']].apply(lambda c: c.between(0, 1)).all().all()
    ndcg = dict(zip(result.name, result['nDCG@10']))
    # Re-ranking the exhaustive top 20 with the same scores keeps its top 10.
    assert ndcg['exhaustive'] == pytest.approx(ndcg['cutoff']) == pytest.approx(ndcg['rerank'])


def test_gar_with_the_index_graph(tiny_model, index, vaswani):
    pyterrier_adaptive = pytest.importorskip('pyterrier_adaptive')
    _, topics, _ = vaswani
    first_stage = HypencoderRetriever(tiny_model, index, num_results=10)
    reranker = HypencoderReranker(tiny_model, index)
    gar = pyterrier_adaptive.GAR(reranker, index.corpus_graph(), num_results=40, batch_size=10)
    out = (first_stage >> gar)(topics)
    assert set(out.columns) >= {'qid', 'docno', 'score', 'rank', 'iteration'}
    assert out.groupby('qid').size().tolist() == [40] * N_QUERIES
    # Documents beyond the first stage's 10 came from the graph (odd iterations), scored like everything else.
    assert (out.iteration % 2 == 1).any()
    rescored = reranker(out[['qid', 'query', 'docno']])
    want = as_pairs(rescored)
    np.testing.assert_allclose([want[k] for k in as_pairs(out)], list(as_pairs(out).values()), rtol=1e-4, atol=1e-5)


def test_empty_inputs(tiny_model, index):
    topics = pd.DataFrame({'qid': pd.Series(dtype=str), 'query': pd.Series(dtype=str)})
    for retriever in (HypencoderRetriever(tiny_model, index), HypencoderRetriever(tiny_model, index, mode='graph')):
        res = retriever(topics)
        assert len(res) == 0 and list(res.columns) == ['qid', 'query', 'docno', 'score', 'rank']
        assert res.score.dtype == np.float64 and res['rank'].dtype == np.int64
    results = pd.DataFrame({'qid': pd.Series(dtype=str), 'query': pd.Series(dtype=str), 'docno': pd.Series(dtype=str),
                            'text': pd.Series(dtype=str)})
    for reranker in (HypencoderReranker(tiny_model, index), HypencoderReranker(tiny_model)):
        res = reranker(results)
        assert len(res) == 0 and list(res.columns) == ['qid', 'query', 'docno', 'text', 'score', 'rank']
        assert res.score.dtype == np.float64 and res['rank'].dtype == np.int64


def test_repr(tiny_model, index):
    assert repr(HypencoderRetriever(tiny_model, index, num_results=10)) == \
        f"HypencoderRetriever({str(index.path)!r}, num_results=10, mode='exhaustive')"
    graph = repr(HypencoderRetriever(tiny_model, index, mode='graph', n_initial=50))
    assert "mode='graph'" in graph and 'n_initial=50' in graph and 'n_candidates=64' in graph
    assert repr(HypencoderReranker(tiny_model, index)) == f'HypencoderReranker({str(index.path)!r})'
    assert repr(HypencoderReranker(tiny_model)) == "HypencoderReranker(text_field='text')"


def test_bad_arguments(tiny_model, index):
    for kwargs, match in [({'num_results': 0}, 'num_results'), ({'num_results': -5}, 'num_results'),
                          ({'mode': 'hnsw'}, 'mode'), ({'n_initial': 0}, 'n_initial'),
                          ({'n_candidates': 0}, 'n_candidates'), ({'max_iter': -1}, 'max_iter'),
                          ({'batch_size': 0}, 'batch_size')]:
        with pytest.raises(ValueError, match=match):
            HypencoderRetriever(tiny_model, index, **kwargs)
    with pytest.raises(TypeError, match='HypencoderIndex'):
        HypencoderRetriever(tiny_model, 42)
    with pytest.raises(pt.validate.InputValidationError):
        HypencoderRetriever(tiny_model, index)(pd.DataFrame({'qid': ['1']}))
    with pytest.raises(TypeError, match='not strings'):
        HypencoderRetriever(tiny_model, index)(pd.DataFrame({'qid': ['1'], 'query': [None]}))


def test_reranker_errors(tiny_model, index):
    frame = pd.DataFrame({'qid': ['1', '1'], 'query': ['dielectric constant', 'dielectric constant'],
                          'docno': ['1', 'no-such-doc']})
    with pytest.raises(KeyError, match='no-such-doc'):
        HypencoderReranker(tiny_model, index)(frame)
    with pytest.raises(pt.validate.InputValidationError, match="no index.*'text' column"):
        HypencoderReranker(tiny_model)(frame)
    with pytest.raises(pt.validate.InputValidationError, match='body'):
        HypencoderReranker(tiny_model, text_field='body')(frame.assign(text='x'))
    with pytest.raises(TypeError, match='not strings'):
        HypencoderReranker(tiny_model)(frame.assign(text=['some text', None]))


def test_reranker_query_cache(tiny_model, index, vaswani, monkeypatch):
    _, topics, _ = vaswani
    reranker = HypencoderReranker(tiny_model, index)
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


def test_device_and_verbose(tiny_model, index, vaswani, capsys):
    _, topics, _ = vaswani
    res = HypencoderRetriever(tiny_model, index, num_results=5, device='cpu', verbose=True)(topics)
    assert len(res) == 5 * N_QUERIES
    assert 'query' in capsys.readouterr().err  # the progress bar's unit


def run_transformer_test_class(transformer):
    case = pt.testing.transformer_test_class(lambda: transformer)
    result = unittest.TextTestRunner(stream=io.StringIO(), verbosity=0).run(
        unittest.defaultTestLoader.loadTestsFromTestCase(case))
    assert result.wasSuccessful(), [str(e[1]) for e in result.failures + result.errors]


@pytest.mark.filterwarnings('ignore::UserWarning')
def test_pyterrier_transformer_test_class(tiny_model, index):
    run_transformer_test_class(HypencoderRetriever(tiny_model, index))
    run_transformer_test_class(HypencoderRetriever(tiny_model, index, mode='graph'))
    run_transformer_test_class(HypencoderReranker(tiny_model, index))
    run_transformer_test_class(HypencoderReranker(tiny_model))

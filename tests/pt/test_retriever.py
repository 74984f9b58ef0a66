"""HypencoderRetriever (with the reranker where both are checked alike): results against brute-force scoring on a
small vaswani index, every search mode, pipelines and rank-cutoff fusion, bad arguments and inputs caught at
construction, threads and determinism."""
import io
import json
import os
import subprocess
import sys
import textwrap
import unittest
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pyterrier as pt
import pytest
import torch
from helpers import GRAPH, N_QUERIES, SHORT_TOPICS, WORDS_INDEX_SIZE, make_docs, make_tiny_bert, one_token_words, short_docs
from ir_measures import R, nDCG

from pyterrier_hypencoder import (
    CheckpointError,
    Hypencoder,
    HypencoderIndex,
    HypencoderIndexer,
    HypencoderReranker,
    HypencoderRetriever,
)
from pyterrier_hypencoder.index import HypencoderIndexError

pytestmark = pytest.mark.usefixtures('one_thread')


# ---- exhaustive search against brute-force scoring ----------------------------------------------------------------------

def test_exhaustive_top1000_equals_brute_force(tiny_model, vaswani_index, vaswani, vaswani_brute, vaswani_bound):
    _, topics, _ = vaswani
    n = len(vaswani_index)
    res = HypencoderRetriever(tiny_model, vaswani_index, num_results=1000)(topics)
    # More results than documents: every document, once per query.
    assert len(res) == N_QUERIES * n
    assert list(res.columns) == ['qid', 'query', 'docno', 'score', 'rank']
    assert res.qid.unique().tolist() == topics.qid.tolist()
    docnos = vaswani_index.docnos.fwd[np.arange(n)]
    for i, (_, group) in enumerate(res.groupby('qid', sort=False)):
        order = np.argsort(-vaswani_brute[i], kind='stable')
        assert group['rank'].tolist() == list(range(n))
        assert (np.diff(group.score.to_numpy()) <= 0).all()
        np.testing.assert_allclose(group.score.to_numpy(), vaswani_brute[i][order], rtol=0, atol=vaswani_bound)
        # Same documents at each rank, ties within float noise aside.
        want = vaswani_brute[i][vaswani_index.rows(group.docno.tolist())]
        np.testing.assert_allclose(group.score.to_numpy(), want, rtol=0, atol=vaswani_bound)
        assert set(group.docno) == set(docnos)


def test_exhaustive_top_k_and_input_columns(tiny_model, vaswani_index, vaswani, vaswani_brute, vaswani_bound):
    _, topics, _ = vaswani
    topics = topics.assign(extra=range(N_QUERIES))
    res = HypencoderRetriever(tiny_model, str(vaswani_index.path), num_results=20, batch_size=4)(topics)
    assert len(res) == 20 * N_QUERIES
    assert res.groupby('qid', sort=False).extra.first().tolist() == list(range(N_QUERIES))
    for i, (_, group) in enumerate(res.groupby('qid', sort=False)):
        top = np.sort(vaswani_brute[i])[::-1][:20]
        np.testing.assert_allclose(group.score.to_numpy(), top, rtol=0, atol=vaswani_bound)


def frame_key(frame):
    return list(zip(frame.qid, frame.docno, frame['rank']))


def test_num_results_beyond_the_corpus(tiny_model, words_index, words_topics):
    exhaustive = HypencoderRetriever(tiny_model, words_index, num_results=5000)(words_topics.iloc[:3])
    # The default sample (10,000) is clamped to the 300 documents: the walk scores them all.
    walk = HypencoderRetriever(tiny_model, words_index, num_results=5000, mode='graph')(words_topics.iloc[:3])
    for res in (exhaustive, walk):
        assert res.groupby('qid').size().tolist() == [WORDS_INDEX_SIZE] * 3
        assert res.groupby('qid').docno.nunique().tolist() == [WORDS_INDEX_SIZE] * 3
    assert frame_key(walk) == frame_key(exhaustive)


def test_long_query_is_truncated(tiny_model, words_index):
    words = one_token_words(tiny_model)
    rng = np.random.default_rng(0)
    long = list(rng.choice(words, size=5000))
    keep = tiny_model.query_max_length - 2  # [CLS] and [SEP]
    retriever = HypencoderRetriever(tiny_model, words_index, num_results=50)

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


def test_integer_qids_are_kept(tiny_model, words_index, words_topics):
    as_int = words_topics.assign(qid=range(100, 100 + len(words_topics)))
    for make in (lambda: HypencoderRetriever(tiny_model, words_index, num_results=10),
                 lambda: HypencoderRetriever(tiny_model, words_index, num_results=10, **GRAPH)):
        by_str, by_int = make()(words_topics), make()(as_int)
        assert by_int.qid.dtype == np.int64 and by_int.qid.unique().tolist() == as_int.qid.tolist()
        assert by_int.docno.tolist() == by_str.docno.tolist()
        np.testing.assert_array_equal(by_int.score.to_numpy(), by_str.score.to_numpy())
        reranked = HypencoderReranker(tiny_model, words_index)(by_int.assign(score=0.0))
        assert reranked.qid.dtype == np.int64 and reranked.qid.unique().tolist() == as_int.qid.tolist()
        want = dict(zip(zip(by_int.qid, by_int.docno), by_int.score))
        got = dict(zip(zip(reranked.qid, reranked.docno), reranked.score))
        assert got.keys() == want.keys()
        np.testing.assert_allclose([got[k] for k in want], list(want.values()), rtol=1e-5, atol=1e-6)


# ---- graph, adaptive and surrogate modes --------------------------------------------------------------------------------

def test_graph_mode(tiny_model, vaswani_index, vaswani, vaswani_brute, vaswani_bound):
    _, topics, _ = vaswani
    exact = HypencoderRetriever(tiny_model, vaswani_index, num_results=10)(topics)
    # The defaults sample 10,000 documents: clamped to this corpus, the walk scores everything and is exact.
    full = HypencoderRetriever(tiny_model, vaswani_index, num_results=10, mode='graph')(topics)
    assert full.docno.tolist() == exact.docno.tolist()
    small = HypencoderRetriever(tiny_model, vaswani_index, num_results=10, mode='graph', n_initial=20, n_candidates=4)
    res = small(topics)
    assert len(res) == 10 * N_QUERIES and res['rank'].tolist() == list(range(10)) * N_QUERIES
    for i, (_, group) in enumerate(res.groupby('qid', sort=False)):
        # Scores are the documents' true scores, sorted.
        np.testing.assert_allclose(group.score.to_numpy(), vaswani_brute[i][vaswani_index.rows(group.docno.tolist())], rtol=0,
                                   atol=vaswani_bound)
        assert (np.diff(group.score.to_numpy()) <= 0).all()
    assert res.docno.tolist() == small(topics).docno.tolist()  # deterministic
    # Asking for more than the walk scores returns what it scored: unique documents, ranked 0..m-1.
    many = HypencoderRetriever(tiny_model, vaswani_index, num_results=1000, mode='graph', n_initial=20, n_candidates=4,
                               max_iter=2)(topics)
    for _, group in many.groupby('qid', sort=False):
        assert 20 < len(group) <= 20 + 2 * 4 * 16 and group.docno.is_unique
        assert group['rank'].tolist() == list(range(len(group)))


def test_graph_mode_needs_a_graph(tiny_model, vaswani_plain_index):
    with pytest.raises(ValueError, match='no neighbour graph'):
        HypencoderRetriever(tiny_model, vaswani_plain_index, mode='graph')


def test_graph_repr_shows_the_clamped_sample(tiny_model, short_index):
    assert 'n_initial=60 (clamped to the corpus from 10000)' in repr(HypencoderRetriever(tiny_model, short_index, mode='graph'))
    assert 'n_initial=20,' in repr(HypencoderRetriever(tiny_model, short_index, mode='graph', n_initial=20))


def test_adaptive_mode(tiny_model, vaswani_index, vaswani, vaswani_brute):
    _, topics, _ = vaswani
    retriever = HypencoderRetriever(tiny_model, vaswani_index, num_results=10, mode='adaptive', n_sample=20, n_entry=10,
                                    scored_column='n_scored')
    res = retriever(topics)
    assert len(res) == 10 * N_QUERIES and res['rank'].tolist() == list(range(10)) * N_QUERIES
    assert list(res.columns) == ['qid', 'query', 'docno', 'score', 'rank', 'n_scored']
    for i, (_, group) in enumerate(res.groupby('qid', sort=False)):
        np.testing.assert_allclose(group.score.to_numpy(), vaswani_brute[i][vaswani_index.rows(group.docno.tolist())],
                                   rtol=1e-5, atol=1e-6)
        scored = group.n_scored.unique()
        assert len(scored) == 1 and 30 <= scored[0] < len(vaswani_index)  # sample + at least one round, not the corpus
    assert res.docno.tolist() == retriever(topics).docno.tolist()  # deterministic
    assert 'adaptive' in repr(retriever) and retriever.fuse_rank_cutoff(5) is None
    # The walk on the index's graph; a sample covering the corpus is exhaustive.
    walk = HypencoderRetriever(tiny_model, vaswani_index, num_results=10, mode='adaptive', expand=4, ef=20)(topics)
    assert len(walk) == 10 * N_QUERIES
    exact = HypencoderRetriever(tiny_model, vaswani_index, num_results=10)(topics)
    full = HypencoderRetriever(tiny_model, vaswani_index, num_results=10, mode='adaptive', n_sample=10 ** 6)(topics)
    assert full.docno.tolist() == exact.docno.tolist()


def test_surrogate_mode_and_scored_column(tiny_model, vaswani_index, vaswani):
    _, topics, _ = vaswani
    res = HypencoderRetriever(tiny_model, vaswani_index, num_results=10, mode='surrogate', n_sample=20, n_entry=15,
                              scored_column='cost')(topics)
    assert (res.cost == 35).all() and len(res) == 10 * N_QUERIES
    exh = HypencoderRetriever(tiny_model, vaswani_index, num_results=5, scored_column='cost')(topics)
    assert (exh.cost == len(vaswani_index)).all()
    fused = HypencoderRetriever(tiny_model, vaswani_index, num_results=10, mode='surrogate').fuse_rank_cutoff(5)
    assert fused is not None and fused.num_results == 5


def test_adaptive_mode_needs_no_graph_unless_it_walks(tiny_model, vaswani_plain_index, vaswani):
    _, topics, _ = vaswani
    assert len(HypencoderRetriever(tiny_model, vaswani_plain_index, num_results=5, mode='adaptive')(topics)) == 5 * N_QUERIES
    with pytest.raises(ValueError, match='no neighbour graph'):
        HypencoderRetriever(tiny_model, vaswani_plain_index, mode='adaptive', expand=4)


def test_retriever_draws_from_the_stored_ip_index(tiny_model, tmp_path):
    import pandas as pd

    from pyterrier_hypencoder import HypencoderRetriever
    docs = make_docs(400)
    index = HypencoderIndexer(tiny_model, tmp_path / 'idx', neighbours=0, ip_index='hnsw16', verbose=False).index(docs)
    topics = pd.DataFrame({'qid': ['1', '2', '3'], 'query': [docs[5]['text'], docs[77]['text'], 'unrelated words']})
    exact = HypencoderRetriever(tiny_model, index, num_results=10).transform(topics)
    pooled = HypencoderRetriever(tiny_model, index, num_results=10, mode='adaptive', n_sample=32, pool=400,
                                 n_entry=400, scored_column='scored')
    assert 'pool=400' in repr(pooled) and pooled.corpus().has_ann
    got = pooled.transform(topics)
    # A pool as large as the corpus, scored in one round: the exact top 10.
    pd.testing.assert_frame_equal(got[['qid', 'docno', 'rank']], exact[['qid', 'docno', 'rank']])
    assert (got['scored'] == 400).all()
    # With a graph walk asked for, the exact reference search runs (and needs the graph).
    with pytest.raises(ValueError, match='graph'):
        HypencoderRetriever(tiny_model, index, mode='adaptive', expand=4)


# ---- pipelines, rank-cutoff fusion, PyTerrier conventions ---------------------------------------------------------------

def test_rank_cutoff_fusion(tiny_model, vaswani_index, vaswani):
    _, topics, _ = vaswani
    retriever = HypencoderRetriever(tiny_model, vaswani_index, num_results=100)
    fused = (retriever % 10).compile()
    assert isinstance(fused, HypencoderRetriever) and fused.num_results == 10 and retriever.num_results == 100
    pd.testing.assert_frame_equal(fused(topics), (retriever % 10)(topics))
    assert retriever.fuse_rank_cutoff(100) is None and retriever.fuse_rank_cutoff(200) is None
    # A graph walk with early stopping depends on num_results, so it is not fused; without, it is exact.
    walk = dict(mode='graph', n_initial=20, n_candidates=4)
    assert HypencoderRetriever(tiny_model, vaswani_index, **walk).fuse_rank_cutoff(10) is None
    free = HypencoderRetriever(tiny_model, vaswani_index, num_results=50, early_stopping=False, **walk)
    assert free.fuse_rank_cutoff(10).num_results == 10
    pd.testing.assert_frame_equal(free.fuse_rank_cutoff(10)(topics), (free % 10)(topics))


def test_pipeline_and_experiment(tiny_model, vaswani_index, vaswani):
    _, topics, qrels = vaswani
    exhaustive = HypencoderRetriever(tiny_model, vaswani_index, num_results=50)
    graph = HypencoderRetriever(tiny_model, vaswani_index, num_results=50, mode='graph', n_initial=40, n_candidates=8)
    rerank = exhaustive % 20 >> HypencoderReranker(tiny_model, vaswani_index)
    result = pt.Experiment([exhaustive, exhaustive % 10, graph, rerank], topics, qrels,
                           eval_metrics=[nDCG @ 10, R @ 50], names=['exhaustive', 'cutoff', 'graph', 'rerank'])
    assert result.name.tolist() == ['exhaustive', 'cutoff', 'graph', 'rerank']
    assert result[['nDCG@10', 'R@50']].apply(lambda c: c.between(0, 1)).all().all()
    ndcg = dict(zip(result.name, result['nDCG@10']))
    # Re-ranking the exhaustive top 20 with the same scores keeps its top 10.
    assert ndcg['exhaustive'] == pytest.approx(ndcg['cutoff']) == pytest.approx(ndcg['rerank'])


def test_empty_inputs(tiny_model, vaswani_index):
    topics = pd.DataFrame({'qid': pd.Series(dtype=str), 'query': pd.Series(dtype=str)})
    for retriever in (HypencoderRetriever(tiny_model, vaswani_index),
                      HypencoderRetriever(tiny_model, vaswani_index, mode='graph')):
        res = retriever(topics)
        assert len(res) == 0 and list(res.columns) == ['qid', 'query', 'docno', 'score', 'rank']
        assert res.score.dtype == np.float64 and res['rank'].dtype == np.int64
    results = pd.DataFrame({'qid': pd.Series(dtype=str), 'query': pd.Series(dtype=str), 'docno': pd.Series(dtype=str),
                            'text': pd.Series(dtype=str)})
    for reranker in (HypencoderReranker(tiny_model, vaswani_index), HypencoderReranker(tiny_model)):
        res = reranker(results)
        assert len(res) == 0 and list(res.columns) == ['qid', 'query', 'docno', 'text', 'score', 'rank']
        assert res.score.dtype == np.float64 and res['rank'].dtype == np.int64


def test_repr(tiny_model, vaswani_index):
    assert repr(HypencoderRetriever(tiny_model, vaswani_index, num_results=10)) == \
        f"HypencoderRetriever({str(vaswani_index.path)!r}, num_results=10, mode='exhaustive')"
    graph = repr(HypencoderRetriever(tiny_model, vaswani_index, mode='graph', n_initial=50))
    assert "mode='graph'" in graph and 'n_initial=50' in graph and 'n_candidates=64' in graph
    assert repr(HypencoderReranker(tiny_model, vaswani_index)) == f'HypencoderReranker({str(vaswani_index.path)!r})'
    assert repr(HypencoderReranker(tiny_model)) == "HypencoderReranker(text_field='text')"


def test_device_and_verbose(tiny_model, vaswani_index, vaswani, capsys):
    _, topics, _ = vaswani
    res = HypencoderRetriever(tiny_model, vaswani_index, num_results=5, device='cpu', verbose=True)(topics)
    assert len(res) == 5 * N_QUERIES
    assert 'query' in capsys.readouterr().err  # the progress bar's unit


def test_progress_bars_have_short_labels(tiny_model, short_index, capsys):
    run = HypencoderRetriever(tiny_model, short_index, mode='graph', n_initial=20, verbose=True)(SHORT_TOPICS)
    HypencoderReranker(tiny_model, short_index, verbose=True)(run)
    err = capsys.readouterr().err
    assert 'HypencoderRetriever:' in err and 'HypencoderReranker:' in err
    assert 'n_initial' not in err and str(short_index.path) not in err


def run_transformer_test_class(transformer):
    case = pt.testing.transformer_test_class(lambda: transformer)
    result = unittest.TextTestRunner(stream=io.StringIO(), verbosity=0).run(
        unittest.defaultTestLoader.loadTestsFromTestCase(case))
    assert result.wasSuccessful(), [str(e[1]) for e in result.failures + result.errors]


@pytest.mark.filterwarnings('ignore::UserWarning')
def test_pyterrier_transformer_test_class(tiny_model, vaswani_index):
    run_transformer_test_class(HypencoderRetriever(tiny_model, vaswani_index))
    run_transformer_test_class(HypencoderRetriever(tiny_model, vaswani_index, mode='graph'))
    run_transformer_test_class(HypencoderReranker(tiny_model, vaswani_index))
    run_transformer_test_class(HypencoderReranker(tiny_model))


# ---- bad arguments, caught at construction ------------------------------------------------------------------------------

def test_bad_arguments(tiny_model, vaswani_index):
    for kwargs, match in [({'num_results': 0}, 'num_results'), ({'num_results': -5}, 'num_results'),
                          ({'mode': 'hnsw'}, 'mode'), ({'n_initial': 0}, 'n_initial'),
                          ({'n_candidates': 0}, 'n_candidates'), ({'max_iter': -1}, 'max_iter'),
                          ({'batch_size': 0}, 'batch_size')]:
        with pytest.raises(ValueError, match=match):
            HypencoderRetriever(tiny_model, vaswani_index, **kwargs)
    with pytest.raises(TypeError, match='HypencoderIndex'):
        HypencoderRetriever(tiny_model, 42)
    with pytest.raises(pt.validate.InputValidationError):
        HypencoderRetriever(tiny_model, vaswani_index)(pd.DataFrame({'qid': ['1']}))
    with pytest.raises(TypeError, match='not (a string|strings)'):  # '1 query is not a string'
        HypencoderRetriever(tiny_model, vaswani_index)(pd.DataFrame({'qid': ['1'], 'query': [None]}))


@pytest.mark.parametrize('value', [2.5, '10', True, None])
def test_num_results_not_an_integer(tiny_model, words_index, value):
    with pytest.raises(ValueError, match='num_results must be an integer >= 1'):
        HypencoderRetriever(tiny_model, words_index, num_results=value)


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
def test_invalid_walk_parameters_fail_at_construction(tiny_model, words_index, kwargs, match):
    with pytest.raises(ValueError, match=match):
        HypencoderRetriever(tiny_model, words_index, **{**GRAPH, **kwargs})


@pytest.mark.parametrize('kwargs, match', [
    (dict(n_sample=1), 'n_sample'), (dict(n_entry=-1), 'n_entry'), (dict(max_rounds=-1), 'max_rounds'),
    (dict(expand=-2), 'expand'), (dict(ef=0), 'ef'), (dict(max_scored=0), 'max_scored'),
    (dict(scored_column=''), 'scored_column'), (dict(scored_column=3), 'scored_column'), (dict(mode='walk'), 'mode'),
])
def test_adaptive_parameter_errors(tiny_model, vaswani_index, kwargs, match):
    with pytest.raises(ValueError, match=match):
        HypencoderRetriever(tiny_model, vaswani_index, **(dict(mode='adaptive') | kwargs))


def test_missing_columns_are_named(tiny_model, words_index):
    retriever = HypencoderRetriever(tiny_model, words_index)
    with pytest.raises(pt.validate.InputValidationError, match=r"missing_columns=\['query'\]"):
        retriever(pd.DataFrame({'qid': ['1']}))
    with pytest.raises(pt.validate.InputValidationError, match=r"missing_columns=\['qid'\]"):
        retriever(pd.DataFrame({'query': ['neural search']}))
    reranker = HypencoderReranker(tiny_model, words_index)
    with pytest.raises(pt.validate.InputValidationError, match=r"missing_columns=\['docno'\]"):
        reranker(pd.DataFrame({'qid': ['1'], 'query': ['neural search']}))
    with pytest.raises(pt.validate.InputValidationError, match=r"missing_columns=\['query'\]"):
        reranker(pd.DataFrame({'qid': ['1'], 'docno': ['d1']}))


# ---- the model: given as a path, the wrong object, or not the one that built the index ----------------------------------

def test_model_given_as_a_path(tiny_model, short_index, tmp_path):
    folder = tmp_path / 'model'
    tiny_model.save_pretrained(folder)
    expected = HypencoderRetriever(tiny_model, short_index)(SHORT_TOPICS)
    retriever = HypencoderRetriever(str(folder), short_index, device='cpu')
    assert isinstance(retriever.model, Hypencoder)
    pd.testing.assert_frame_equal(retriever(SHORT_TOPICS), expected, atol=1e-5)
    assert np.allclose(HypencoderReranker(folder, short_index, device='cpu')(expected)['score'], expected['score'], atol=1e-5)
    assert np.allclose(HypencoderReranker(folder, device='cpu')(expected.assign(text='neural graph'))['score'].notna(), 1)
    built = HypencoderIndexer(folder, tmp_path / 'idx', neighbours=0, device='cpu', verbose=False).index(short_docs(5))
    assert np.allclose(built.vectors(), short_index.vectors()[:5], atol=1e-5)


@pytest.mark.parametrize('cls', [HypencoderRetriever, HypencoderReranker, HypencoderIndexer])
def test_bad_models_fail_at_construction(cls, short_index, tmp_path):
    args = (short_index,) if cls is not HypencoderIndexer else (tmp_path / 'idx',)
    with pytest.raises(CheckpointError, match='does not exist'):
        cls(str(tmp_path / 'no' / 'such' / 'model'), *args)
    with pytest.raises(TypeError, match=f'{cls.__name__} needs a Hypencoder .*got int'):
        cls(42, *args)
    if cls is not HypencoderIndexer:
        with pytest.raises(TypeError, match='got HypencoderIndex: the model comes first, then the index'):
            cls(short_index, short_index)


def test_other_pooling_is_named(tiny_model, tiny_bert, short_index):
    mean = Hypencoder.from_backbone(str(tiny_bert), qnet_layers=3, pooling='mean', device='cpu')
    assert mean.name_or_path == tiny_model.name_or_path
    with pytest.raises(HypencoderIndexError, match=r"built with pooling 'cls' \(the model: 'mean'\)"):
        HypencoderRetriever(mean, short_index)
    other = Hypencoder.from_backbone(str(tiny_bert), qnet_layers=3, device='cpu')
    with torch.no_grad():
        other.backbone.embeddings.word_embeddings.weight.mul_(-1)  # the same name and settings, other weights
    with pytest.raises(HypencoderIndexError, match="the model's weights differ from those that built the index"):
        HypencoderReranker(other, short_index)


def test_index_from_another_model_fails_at_construction(tiny_model, tiny_bert, words_index, tmp_path):
    wide = Hypencoder.from_backbone(str(make_tiny_bert(tmp_path / 'wide', hidden=48)), qnet_layers=2, device='cpu')
    other = Hypencoder.from_backbone(str(tiny_bert), qnet_layers=3, pooling='mean', device='cpu')
    for model, match in ((wide, '48-d vectors but the index .* holds 32-d'), (other, 'encodes documents differently')):
        with pytest.raises(HypencoderIndexError, match=match):
            HypencoderRetriever(model, words_index)
        with pytest.raises(HypencoderIndexError, match=match):
            HypencoderRetriever(model, words_index, **GRAPH)
        with pytest.raises(HypencoderIndexError, match=match):
            HypencoderReranker(model, words_index)


# ---- threads and determinism --------------------------------------------------------------------------------------------

def test_threads_give_sequential_results(tiny_model, words_index, words_topics, words_docs):
    """4 threads on one retriever / reranker give what one thread gives, frame for frame."""
    texts = {d['docno']: d['text'] for d in words_docs}
    frames = [words_topics.iloc[[i, (i + 5) % 12]] for i in range(8)]
    first = HypencoderRetriever(tiny_model, words_index, num_results=10)
    candidates = [first(f) for f in frames]
    # batch_size=1: each query and text is encoded alone, so cached and fresh q-nets are bitwise equal and the
    # frames can be compared exactly. Only 4 q-nets are cached, so threads keep evicting each other's.
    jobs = {
        'exhaustive': (HypencoderRetriever(tiny_model, words_index, num_results=20, batch_size=1), frames),
        'graph': (HypencoderRetriever(tiny_model, words_index, num_results=20, batch_size=1, **GRAPH), frames),
        'reranker (index)': (HypencoderReranker(tiny_model, words_index, batch_size=1), candidates),
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


def test_same_seed_same_rankings(tiny_model, words_index, words_topics):
    runs = [HypencoderRetriever(tiny_model, HypencoderIndex(words_index.path), num_results=20, seed=3, **GRAPH)(words_topics)
            for _ in range(2)]
    pd.testing.assert_frame_equal(runs[0], runs[1])
    # The seed matters: another one starts from another sample, and finds other documents for some query.
    other = HypencoderRetriever(tiny_model, words_index, num_results=20, seed=4, **GRAPH)(words_topics)
    assert frame_key(other) != frame_key(runs[0])


def test_same_rankings_in_another_process(tiny_bert, tiny_model, words_index, words_topics):
    graph = HypencoderRetriever(tiny_model, words_index, num_results=20, seed=3, **GRAPH)
    exhaustive = HypencoderRetriever(tiny_model, words_index, num_results=20)
    here = {'graph': graph(words_topics), 'exhaustive': exhaustive(words_topics)}
    here['reranker'] = HypencoderReranker(tiny_model, words_index)(here['graph'])
    script = textwrap.dedent(f'''
        import json, sys
        import pandas as pd
        from pyterrier_hypencoder import Hypencoder, HypencoderIndex
        from pyterrier_hypencoder import HypencoderReranker
        from pyterrier_hypencoder import HypencoderRetriever
        model = Hypencoder.from_backbone({str(tiny_bert)!r}, qnet_layers=3, seed=0, device='cpu')
        index = HypencoderIndex({str(words_index.path)!r})
        topics = pd.DataFrame(json.loads(sys.stdin.read()))
        out = {{'graph': HypencoderRetriever(model, index, num_results=20, seed=3, mode='graph', n_initial=30,
                                            n_candidates=8)(topics),
               'exhaustive': HypencoderRetriever(model, index, num_results=20)(topics)}}
        out['reranker'] = HypencoderReranker(model, index)(out['graph'])
        print(json.dumps({{k: v[['qid', 'docno', 'score', 'rank']].to_dict('list') for k, v in out.items()}}))
    ''')
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1'}  # as this module runs torch
    proc = subprocess.run([sys.executable, '-c', script], input=json.dumps(words_topics.to_dict('list')), capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    there = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, frame in here.items():
        got = pd.DataFrame(there[name])
        assert frame_key(got) == frame_key(frame), name
        np.testing.assert_allclose(got.score.to_numpy(), frame.score.to_numpy(), rtol=1e-6, atol=1e-7)

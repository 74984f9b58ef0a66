"""Searching a sharded index in-process: identical results to one index, per-shard walks and adaptive rounds, the
reranker's routing.

Scores of a document are bit-identical between the sharded and the unsharded index when every shard offset is a
multiple of the scoring block (both sides then score it in the same GEMM; see pyterrier_hypencoder.index.sharded);
otherwise they agree within fp32 rounding of the q-net, ``BOUND_ULPS`` relative to the query's largest |score|
(checked against float64, not tuned on a machine: a worst-case dot product of width w in fp32 is off by at most
w * 2**-24 of its terms' magnitude, summed over the q-net's layers).

Adaptive and surrogate search run their rounds in each shard and the driver merges; ``clustered_shards`` gives each
shard clustered vectors and its own HNSW inner-product index.
"""
import numpy as np
import pandas as pd
import pytest
import torch
from helpers import BLOCK, N_CLUSTERED_DOCS, N_SHARDED_DOCS, make_topics

from pyterrier_hypencoder import HypencoderReranker, HypencoderRetriever, split_index

K = 10
SMALL = dict(n_sample=64, n_entry=32, pool=256, num_results=K, batch_size=4)  # pools smaller than the shards


def bound(tiny_model, scores):
    """The fp32 bound on a q-net score's rounding error, per query: sum of layer widths * 2**-24 * max |score|."""
    dims = tiny_model.spec.vector_dimensions
    return sum(dims[:-1]) * 2.0 ** -24 * np.abs(scores).max(axis=1, keepdims=True)


def float64_scores(tiny_model, index, queries):
    qnets = tiny_model.encode_queries(queries).to(dtype=torch.float64)
    return qnets.score(torch.from_numpy(np.array(index.vectors())).double()).numpy()


# ---- exhaustive search and graph walks: the same results as one index ---------------------------------------------------

@pytest.mark.parametrize('n_shards', [1, 2, 3])
def test_aligned_shards_are_bit_identical_with_ties_in_row_order(tiny_model, tied_index, shard_splits, n_shards):
    queries = make_topics()
    for k in (K, N_SHARDED_DOCS):  # K: shards smaller than k; N_DOCS: every tie group in full
        one = HypencoderRetriever(tiny_model, tied_index, num_results=k, score_block=BLOCK)(queries)
        many = HypencoderRetriever(tiny_model, shard_splits[('aligned', n_shards)], num_results=k, score_block=BLOCK)(queries)
        pd.testing.assert_frame_equal(one, many)  # docnos, order, ranks and scores, bit for bit
    # ties (rows sharing a vector) come out by row, ascending, under both
    for _, group in many.groupby('qid'):
        rows = group['docno'].str[1:].astype(int).to_numpy()
        scores = group['score'].to_numpy()
        same = scores[1:] == scores[:-1]
        assert same.sum() >= 10 and (rows[1:][same] > rows[:-1][same]).all()


@pytest.mark.parametrize('n_shards', [2, 3])
def test_unaligned_shards_same_ranking_scores_within_fp32_bound(tiny_model, untied_index, shard_splits, n_shards):
    queries = make_topics()
    one = HypencoderRetriever(tiny_model, untied_index, num_results=K)(queries)
    many = HypencoderRetriever(tiny_model, shard_splits[('unaligned', n_shards)], num_results=K)(queries)
    exact = float64_scores(tiny_model, untied_index, queries['query'].tolist())
    tol = bound(tiny_model, exact)
    assert many['qid'].tolist() == one['qid'].tolist()
    rows = {name: frame['docno'].str[1:].astype(int).to_numpy().reshape(len(queries), K)
            for name, frame in (('one', one), ('many', many))}
    for name, frame in (('one', one), ('many', many)):
        ref = np.take_along_axis(exact, rows[name], axis=1)
        assert (np.abs(frame['score'].to_numpy().reshape(len(queries), K) - ref) <= tol).all(), name
    # Same docnos in the same order, except where two documents' exact scores are within the rounding bound of
    # each other (either order is then correct): there the exact scores at that rank must agree within it.
    differ = rows['one'] != rows['many']
    near = np.abs(np.take_along_axis(exact, rows['one'], axis=1) - np.take_along_axis(exact, rows['many'], axis=1))
    assert (near[differ] <= 2 * np.broadcast_to(tol, near.shape)[differ]).all()


def test_graph_mode_per_shard_walks(tiny_model, shard_splits):
    index = shard_splits[('aligned', 3)]
    queries = make_topics()
    walk = dict(mode='graph', n_initial=12, n_candidates=4, max_iter=4, num_results=K)
    res = HypencoderRetriever(tiny_model, index, **walk)(queries)
    again = HypencoderRetriever(tiny_model, index, **walk)(queries)
    pd.testing.assert_frame_equal(res, again)  # deterministic given the seed
    exact = HypencoderRetriever(tiny_model, index, num_results=N_SHARDED_DOCS)(queries)
    pairs = dict(zip(zip(exact.qid, exact.docno), exact.score))
    # every returned document carries its true score, and the walk's ranking is a ranking
    assert all(abs(pairs[(q, d)] - s) <= 1e-5 * (1 + abs(s)) for q, d, s in zip(res.qid, res.docno, res.score))
    assert (res.groupby('qid')['score'].apply(lambda s: (np.diff(s.to_numpy()) <= 0).all())).all()


def test_reranker_routes_docnos_to_shards(tiny_model, tied_index, shard_splits):
    queries = make_topics(3)
    res = HypencoderRetriever(tiny_model, tied_index, num_results=20, score_block=BLOCK)(queries)
    res = res.sample(frac=1.0, random_state=0).reset_index(drop=True)  # docnos of every shard, in any order
    one = HypencoderReranker(tiny_model, tied_index)(res)
    many = HypencoderReranker(tiny_model, shard_splits[('aligned', 3)])(res)
    pd.testing.assert_frame_equal(one, many)
    assert 'shards=3' in repr(HypencoderReranker(tiny_model, shard_splits[('aligned', 3)]))
    with pytest.raises(KeyError, match='nope'):
        HypencoderReranker(tiny_model, shard_splits[('aligned', 3)])(res.head(1).assign(docno='nope'))


def test_sharded_index_rebuilt_in_place_is_reloaded(tiny_model, tied_index, tmp_path):
    path = tmp_path / 'resplit'
    split_index(tied_index, path, sizes=[24, 24])
    retriever = HypencoderRetriever(tiny_model, path, num_results=K, score_block=BLOCK)
    before = retriever(make_topics(2))
    split_index(tied_index, path, sizes=[8, 40], overwrite=True)  # new shard folders under the same path
    after = retriever(make_topics(2))
    pd.testing.assert_frame_equal(before, after)
    assert retriever.index.n_shards == 2 and [s['count'] for s in retriever.index.meta['shards']] == [8, 40]


# ---- adaptive and surrogate search: rounds in each shard, merged by the driver ------------------------------------------

@pytest.fixture(scope='module')
def queries():
    return make_topics(8)


@pytest.fixture(scope='module')
def truth(tiny_model, clustered_shards, queries):
    res = HypencoderRetriever(tiny_model, clustered_shards[0], num_results=K)(queries)
    return res.groupby('qid')['docno'].apply(set)


def recall(res, truth):
    found = res.groupby('qid')['docno'].apply(set)
    return np.mean([len(found.get(q, set()) & truth[q]) / len(truth[q]) for q in truth.index])


def in_total_order(res, index):
    """Scores descending within each query, rows ascending among equal scores."""
    rows = index.rows(res['docno'].tolist())
    for _, part in res.assign(row=rows).groupby('qid', sort=False):
        s, r = part['score'].to_numpy(), part['row'].to_numpy()
        assert (np.diff(s) <= 0).all() and all(r[i] < r[i + 1] for i in range(len(s) - 1) if s[i] == s[i + 1])
        assert part['rank'].tolist() == list(range(len(part)))


def test_sharded_adaptive_recall_within_001_of_one_index(tiny_model, clustered_shards, queries, truth):
    single, sharded, _ = clustered_shards
    one = HypencoderRetriever(tiny_model, single, mode='adaptive', **SMALL)
    many = HypencoderRetriever(tiny_model, sharded, mode='adaptive', scored_column='scored', **SMALL)
    assert 'pool=256' in repr(many) and 'shards=3' in repr(many)
    res_one, res_many = one(queries), many(queries)
    assert recall(res_one, truth) >= 0.9
    assert recall(res_many, truth) >= recall(res_one, truth) - 0.01
    in_total_order(res_many, sharded)
    # each shard scores at least its sample, and in all far fewer than the corpus
    scored = res_many.groupby('qid')['scored'].first()
    assert (scored >= 3 * SMALL['n_sample']).all() and (scored < N_CLUSTERED_DOCS / 2).all()
    pd.testing.assert_frame_equal(many(queries), res_many)  # deterministic given the seed


def test_sharded_adaptive_without_ann_indexes_runs_exact_rounds(tiny_model, clustered_shards, queries, truth):
    _, _, exact_shards = clustered_shards
    assert not exact_shards.shard(0).has_ip_index()
    retriever = HypencoderRetriever(tiny_model, exact_shards, mode='adaptive', **SMALL)
    assert 'expand=0' in repr(retriever)
    res = retriever(queries)
    assert recall(res, truth) >= 0.9
    in_total_order(res, exact_shards)


def test_sharded_surrogate_mode(tiny_model, clustered_shards, queries, truth):
    _, sharded, _ = clustered_shards
    res = HypencoderRetriever(tiny_model, sharded, mode='surrogate', n_sample=64, n_entry=200, num_results=K)(queries)
    assert recall(res, truth) >= 0.8
    in_total_order(res, sharded)

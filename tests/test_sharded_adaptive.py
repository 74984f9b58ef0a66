"""Adaptive and surrogate search over a sharded index: each shard runs its own rounds, the driver merges.

The documents' vectors are replaced by clustered ones (the tiny random BERT's vectors of random words are nearly
alike, which leaves nothing to find), and each shard gets its own HNSW inner-product index from ``split_index``.
"""
import numpy as np
import pandas as pd
import pytest
from test_search import clustered
from test_sharded import make_docs, topics

from pyterrier_hypencoder import HypencoderIndexer, HypencoderRetriever, split_index

N = 1600
SIZES = [600, 600, 400]
K = 10
SMALL = dict(n_sample=64, n_entry=32, pool=256, num_results=K, batch_size=4)  # pools smaller than the shards


@pytest.fixture(scope='module')
def indexes(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp('sharded_adaptive')
    single = HypencoderIndexer(tiny_model, folder / 'single', neighbours=0, verbose=False).index(make_docs(N))
    vecs = np.memmap(single.path / 'vecs.f4', mode='r+', dtype=np.float32, shape=(N, tiny_model.dim))
    vecs[:] = clustered(N, tiny_model.dim, clusters=40, seed=3)
    vecs.flush()
    del vecs
    single.add_ip_index(m=16, verbose=False)
    sharded = split_index(single, folder / 'sharded', sizes=SIZES)
    exact_shards = split_index(single, folder / 'exact', sizes=SIZES, ip_index=False)
    return single, sharded, exact_shards


@pytest.fixture(scope='module')
def queries():
    return topics(8)


@pytest.fixture(scope='module')
def truth(tiny_model, indexes, queries):
    res = HypencoderRetriever(tiny_model, indexes[0], num_results=K)(queries)
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


def test_sharded_adaptive_recall_within_001_of_one_index(tiny_model, indexes, queries, truth):
    single, sharded, _ = indexes
    one = HypencoderRetriever(tiny_model, single, mode='adaptive', **SMALL)
    many = HypencoderRetriever(tiny_model, sharded, mode='adaptive', scored_column='scored', **SMALL)
    assert 'pool=256' in repr(many) and 'shards=3' in repr(many)
    res_one, res_many = one(queries), many(queries)
    assert recall(res_one, truth) >= 0.9
    assert recall(res_many, truth) >= recall(res_one, truth) - 0.01
    in_total_order(res_many, sharded)
    # each shard scores at least its sample, and in all far fewer than the corpus
    scored = res_many.groupby('qid')['scored'].first()
    assert (scored >= 3 * SMALL['n_sample']).all() and (scored < N / 2).all()
    pd.testing.assert_frame_equal(many(queries), res_many)  # deterministic given the seed


def test_sharded_adaptive_without_ann_indexes_runs_exact_rounds(tiny_model, indexes, queries, truth):
    _, _, exact_shards = indexes
    assert not exact_shards.shard(0).has_ip_index()
    retriever = HypencoderRetriever(tiny_model, exact_shards, mode='adaptive', **SMALL)
    assert 'expand=0' in repr(retriever)
    res = retriever(queries)
    assert recall(res, truth) >= 0.9
    in_total_order(res, exact_shards)


def test_sharded_surrogate_mode(tiny_model, indexes, queries, truth):
    _, sharded, _ = indexes
    res = HypencoderRetriever(tiny_model, sharded, mode='surrogate', n_sample=64, n_entry=200, num_results=K)(queries)
    assert recall(res, truth) >= 0.8
    in_total_order(res, sharded)


def test_split_index_builds_each_shard_its_ann_index(indexes):
    single, sharded, exact_shards = indexes
    for i, size in enumerate(SIZES):
        entry = sharded.shard(i).meta['ip_index']
        assert entry['m'] == single.meta['ip_index']['m'] and sharded.shard(i).ip_index().n == size
        assert exact_shards.shard(i).meta['ip_index'] is None

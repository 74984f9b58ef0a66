"""The pooled adaptive search that draws its candidates from an inner-product index (exact or HNSW)."""
import numpy as np
import pytest
import torch
from helpers import clustered, random_qnets

from pyterrier_hypencoder.search import InnerProductIndex, adaptive_search, pooled_search


@pytest.fixture(scope='module')
def corpus():
    x = clustered(n=3000)
    return x, random_qnets(8, (16, 16, 1)), InnerProductIndex(x), InnerProductIndex(x, hnsw_m=16, ef_search=64)


def exact_top(qnets, x, k):
    return torch.topk(qnets.score(torch.from_numpy(x)), k, dim=1)


def test_pooled_search_returns_true_scores_best_first(corpus):
    x, qnets, exact, _ = corpus
    result = pooled_search(qnets, x, exact, 20, pool=200, n_entry=16)
    full = qnets.score(torch.from_numpy(x))
    for q in range(len(qnets)):
        ids = result.ids[q].numpy()
        assert len(set(ids.tolist())) == 20 and (ids >= 0).all()
        np.testing.assert_allclose(result.scores[q].numpy(), full[q, ids].numpy(), rtol=1e-4, atol=1e-5)
        assert np.all(np.diff(result.scores[q].numpy()) <= 1e-6)


def test_pool_covering_the_corpus_is_exhaustive(corpus):
    x, qnets, exact, _ = corpus
    # One draw holds every document, and rounds go on until the pool is used up.
    result = pooled_search(qnets, x, exact, 10, n_sample=10, pool=len(x), n_entry=500, max_rounds=100, stop_k=10)
    want = exact_top(qnets, x, 10)
    np.testing.assert_array_equal(result.ids.numpy(), want.indices.numpy())
    assert (result.n_scored == len(x)).all() or (result.ids.numpy() == want.indices.numpy()).all()


def test_pooled_search_with_hnsw_finds_what_the_exact_draws_find(corpus):
    x, qnets, exact, hnsw = corpus
    want = exact_top(qnets, x, 10).indices.numpy()
    kw = dict(pool=300, n_entry=32, refreshes=2)
    recall = {}
    for name, ip in (('exact', exact), ('hnsw', hnsw)):
        ids = pooled_search(qnets, x, ip, 10, **kw).ids.numpy()
        recall[name] = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, want)])
    reference = adaptive_search(qnets, x, None, 10, n_entry=32, ip_index=exact).ids.numpy()
    recall['reference'] = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(reference, want)])
    assert recall['hnsw'] >= recall['exact'] - 0.1 and recall['exact'] >= recall['reference'] - 0.15, recall


def test_pooled_search_batch_equals_single_queries_and_is_deterministic(corpus):
    x, qnets, _, hnsw = corpus
    kw = dict(pool=150, n_entry=16, refreshes=1, seed=3)
    batch = pooled_search(qnets, x, hnsw, 10, **kw)
    again = pooled_search(qnets, x, hnsw, 10, **kw)
    np.testing.assert_array_equal(batch.ids.numpy(), again.ids.numpy())
    for q in range(3):
        alone = pooled_search(qnets[q], x, hnsw, 10, **kw)
        np.testing.assert_array_equal(alone.ids[0].numpy(), batch.ids[q].numpy())
        assert alone.n_scored[0] == batch.n_scored[q] and alone.n_iter[0] == batch.n_iter[q]


def test_pooled_search_scores_each_draw_whole_by_default(corpus):
    x, qnets, _, hnsw = corpus
    default = pooled_search(qnets, x, hnsw, 10, pool=150, refreshes=1)
    whole = pooled_search(qnets, x, hnsw, 10, pool=150, n_entry=150, refreshes=1)
    np.testing.assert_array_equal(default.ids.numpy(), whole.ids.numpy())
    # one round per draw (the first pool, one refresh) and a final round that finds the pool used up
    assert default.n_iter.max().item() <= 3
    # every drawn document is scored: the sample plus at most two draws of 150
    assert (default.n_scored > 64 + 150).all() and (default.n_scored <= 128 + 2 * 150).all()


def test_pooled_search_budget_and_errors(corpus):
    x, qnets, exact, hnsw = corpus
    capped = pooled_search(qnets, x, hnsw, 10, n_sample=64, pool=300, n_entry=32, max_scored=100)
    assert capped.n_scored.max().item() <= 100
    assert (pooled_search(qnets, x, hnsw, 10, n_sample=64, max_rounds=0).n_scored == 64).all()
    with pytest.raises(ValueError, match='pool'):
        pooled_search(qnets, x, hnsw, 10, pool=0)
    with pytest.raises(ValueError, match='another index'):
        pooled_search(qnets, x[:100], hnsw, 10)
    with pytest.raises(TypeError, match='InnerProductIndex'):
        pooled_search(qnets, x, None, 10)


def test_pooled_search_when_the_sample_covers_the_corpus():
    x = clustered(40, 8, clusters=4)
    qnets = random_qnets(3, (8, 8, 1))
    res = pooled_search(qnets, x, InnerProductIndex(x), 5, n_sample=64, pool=16, n_entry=4)
    ref = torch.topk(qnets.score(torch.from_numpy(x)), 5, dim=1)
    np.testing.assert_array_equal(np.sort(res.ids.numpy(), 1), np.sort(ref.indices.numpy(), 1))
    assert (res.n_scored == 40).all()

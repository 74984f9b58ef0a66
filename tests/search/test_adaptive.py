"""The adaptive walk and the two-stage surrogate search against brute-force scoring (tiny data, seconds)."""
import numpy as np
import pytest
import torch
from helpers import clustered, knn_graph, random_qnets, recall

from pyterrier_hypencoder.search import InnerProductIndex, adaptive_search, surrogate_search


def brute_force(qnets, vectors, k):
    """Top-k of every document's fp32 score (ties are vanishingly unlikely with these random vectors)."""
    scores = qnets.score(torch.as_tensor(np.asarray(vectors, dtype=np.float32)))
    return torch.topk(scores, min(k, scores.shape[1]), dim=1)


@pytest.fixture(scope='module')
def corpus():
    x = clustered(n=2000)
    return x, knn_graph(x, 16), random_qnets(10, (16, 16, 16, 1)), InnerProductIndex(x)


def check_true_scores(qnets, x, result):
    """Every returned id is a real, distinct document with its true score, best first."""
    full = qnets.score(torch.from_numpy(x))
    for q, (ids, scores) in enumerate(zip(result.ids.numpy(), result.scores.numpy())):
        found = ids[ids >= 0]
        assert len(set(found.tolist())) == len(found)
        np.testing.assert_allclose(scores[:len(found)], full[q, found].numpy(), rtol=1e-4, atol=1e-5)
        assert np.all(np.diff(scores[:len(found)]) <= 1e-6)


def test_surrogate_search_is_exact_for_a_linear_qnet(corpus):
    x, _, _, ip = corpus
    linear = random_qnets(4, (16, 1), seed=3)
    result = surrogate_search(linear, x, 10, n_sample=64, n_entry=20, ip_index=ip)
    assert recall(result.ids.numpy(), brute_force(linear, x, 10)[1].numpy()) == 1.0
    assert result.n_scored.tolist() == [84] * 4 and result.n_inner.tolist() == [2000] * 4


def test_whole_corpus_sample_is_exhaustive(corpus):
    x, edges, qnets, ip = corpus
    ref = brute_force(qnets, x, 30)
    for result in (surrogate_search(qnets, x, 30, n_sample=5000, ip_index=ip),
                   adaptive_search(qnets, x, edges, 30, n_sample=2000, ip_index=ip)):
        assert recall(result.ids.numpy(), ref[1].numpy()) == 1.0
        torch.testing.assert_close(result.scores, ref[0], rtol=1e-4, atol=1e-5)


def test_walk_with_pool_covering_the_corpus_is_exhaustive(corpus):
    x, _, qnets, ip = corpus
    # A ring on top of the k-NN graph keeps it connected, so an unbounded pool scores every document.
    edges = np.concatenate([knn_graph(x, 4), ((np.arange(2000) + 1) % 2000)[:, None].astype(np.uint32)], axis=1)
    result = adaptive_search(qnets, x, edges, 20, ef=2000, n_sample=16, n_entry=4, max_rounds=1, expand=64, ip_index=ip)
    assert result.n_scored.tolist() == [2000] * len(qnets)
    ref = brute_force(qnets, x, 20)
    assert recall(result.ids.numpy(), ref[1].numpy()) == 1.0
    torch.testing.assert_close(result.scores, ref[0], rtol=1e-4, atol=1e-5)


def test_walk_recall_and_costs(corpus):
    x, edges, qnets, ip = corpus
    ref = brute_force(qnets, x, 10)[1].numpy()
    cheap = adaptive_search(qnets, x, edges, 10, n_sample=64, n_entry=16, max_rounds=1, expand=4, ip_index=ip)
    wide = adaptive_search(qnets, x, edges, 10, ef=120, n_sample=64, n_entry=16, max_rounds=1, expand=4, ip_index=ip)
    assert recall(wide.ids.numpy(), ref) >= 0.9
    assert recall(wide.ids.numpy(), ref) >= recall(cheap.ids.numpy(), ref)
    assert (wide.n_scored >= cheap.n_scored).all() and (wide.n_scored < 2000).all()
    assert (cheap.n_iter >= 2).all() and (cheap.n_inner == 2000).all()
    check_true_scores(qnets, x, wide)
    rounds = adaptive_search(qnets, x, None, 10, n_sample=64, n_entry=32, max_rounds=6, ip_index=ip)
    assert recall(rounds.ids.numpy(), ref) >= 0.8
    check_true_scores(qnets, x, rounds)


def test_rounds_stop_when_nothing_enters_the_top_k(corpus):
    x, _, _, ip = corpus
    linear = random_qnets(3, (16, 1), seed=3)
    # The first surrogate is exact, so round 1 finds the top 10 and round 2 adds nothing to it.
    result = adaptive_search(linear, x, None, 10, n_sample=64, n_entry=20, max_rounds=5, ip_index=ip)
    assert result.n_iter.tolist() == [2] * 3 and result.n_scored.tolist() == [104] * 3
    assert recall(result.ids.numpy(), brute_force(linear, x, 10)[1].numpy()) == 1.0


def test_deterministic_given_seed(corpus):
    x, edges, qnets, ip = corpus
    runs = [adaptive_search(qnets, x, edges, 10, ef=20, n_sample=40, max_rounds=2, expand=2, seed=s, ip_index=ip)
            for s in (1, 1, 2)]
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b)
    assert not torch.equal(runs[0].n_scored, runs[2].n_scored)


def test_queries_with_different_walk_lengths_match_single_queries(corpus):
    x, edges, qnets, ip = corpus
    args = dict(ef=30, n_sample=40, n_entry=8, max_rounds=3, expand=2, ip_index=ip)
    batch = adaptive_search(qnets, x, edges, 10, **args)
    assert len(set(batch.n_iter.tolist())) > 1  # the queries stop at different steps
    for q in range(len(qnets)):
        alone = adaptive_search(qnets[q], x, edges, 10, **args)
        assert torch.equal(alone.ids[0], batch.ids[q])
        assert alone.n_scored.item() == batch.n_scored[q].item() and alone.n_iter.item() == batch.n_iter[q].item()
        torch.testing.assert_close(alone.scores[0], batch.scores[q], rtol=1e-5, atol=1e-6)


def test_budget_caps_qnet_evaluations(corpus):
    x, edges, qnets, ip = corpus
    args = dict(ef=200, n_sample=40, n_entry=10, max_rounds=1, expand=4, ip_index=ip)
    assert adaptive_search(qnets, x, edges, 10, max_scored=150, **args).n_scored.max().item() == 150
    assert adaptive_search(qnets, x, edges, 10, max_iter=0, **args).n_scored.tolist() == [50] * len(qnets)
    rounds = adaptive_search(qnets, x, None, 10, n_sample=40, n_entry=30, max_rounds=5, max_scored=85, ip_index=ip)
    assert rounds.n_scored.max().item() == 85


def test_rows_with_fewer_valid_neighbours(corpus):
    x, edges, qnets, ip = corpus
    sparse = edges.copy()
    rng = np.random.default_rng(0)
    sparse[rng.random(sparse.shape) < 0.5] = np.iinfo(np.uint32).max  # padding, as builders write it
    sparse[:50] = len(x)  # some rows with no valid neighbour at all
    result = adaptive_search(qnets, x, sparse, 10, ef=40, n_sample=40, n_entry=8, expand=4, ip_index=ip)
    check_true_scores(qnets, x, result)
    assert (result.ids >= 0).all() and (result.ids < len(x)).all()
    signed = np.where(sparse == np.iinfo(np.uint32).max, -1, sparse.astype(np.int64))
    again = adaptive_search(qnets, x, signed, 10, ef=40, n_sample=40, n_entry=8, expand=4, ip_index=ip)
    assert torch.equal(again.ids, result.ids)


def test_small_corpus_pads_results():
    x = clustered(n=30)
    qnets = random_qnets(2, (16, 16, 1))
    result = adaptive_search(qnets, x, knn_graph(x, 4), 50, n_sample=8, n_entry=0, ef=50, expand=2)
    assert result.ids.shape == (2, 30)  # k is clamped to the corpus
    check_true_scores(qnets, x, result)


def test_tensor_vectors_and_hnsw_index(corpus):
    x, edges, qnets, _ = corpus
    hnsw = InnerProductIndex(torch.from_numpy(x), hnsw_m=16)
    result = adaptive_search(qnets, torch.from_numpy(x), edges, 10, ef=40, expand=4, ip_index=hnsw)
    assert (result.n_inner > 0).all()  # HNSW counts its own distance computations
    assert recall(result.ids.numpy(), brute_force(qnets, x, 10)[1].numpy()) >= 0.9


@pytest.mark.parametrize('kwargs, match', [
    (dict(k=0), 'k'), (dict(ef=0), 'ef'), (dict(n_sample=1), 'n_sample'), (dict(n_entry=-1), 'n_entry'),
    (dict(expand=-1), 'expand'), (dict(max_scored=0), 'max_scored'), (dict(ridge=0), 'ridge'),
    (dict(ridge='big'), 'ridge'), (dict(max_rounds=1.5), 'max_rounds'), (dict(seed=-1), 'seed'),
    (dict(max_iter=-1), 'max_iter'), (dict(n_sample=True), 'n_sample'),
])
def test_parameter_errors(corpus, kwargs, match):
    x, edges, qnets, ip = corpus
    args = dict(k=10) | kwargs
    with pytest.raises(ValueError, match=match):
        adaptive_search(qnets, x, edges, args.pop('k'), ip_index=ip, **args)


def test_shape_errors(corpus):
    x, edges, qnets, ip = corpus
    with pytest.raises(ValueError, match='edges must have shape'):
        adaptive_search(qnets, x, edges[:10], 10, expand=4, ip_index=ip)
    with pytest.raises(ValueError, match='edges must have shape'):
        adaptive_search(qnets, x, None, 10, expand=4, ip_index=ip)
    with pytest.raises(ValueError, match='refits'):
        surrogate_search(qnets, x, 10, refits=-1, ip_index=ip)
    with pytest.raises(ValueError, match='another index'):
        adaptive_search(qnets, x[:100], edges[:100], 10, expand=4, ip_index=ip)
    with pytest.raises(ValueError, match='shape'):
        surrogate_search(random_qnets(2, (8, 8, 1)), x, 10, ip_index=ip)


def test_stop_k_watches_a_shallower_top(corpus):
    x, _, qnets, ip = corpus
    deep = adaptive_search(qnets, x, None, 50, n_sample=40, n_entry=10, max_rounds=20, ip_index=ip)
    shallow = adaptive_search(qnets, x, None, 50, n_sample=40, n_entry=10, max_rounds=20, stop_k=10, ip_index=ip)
    assert (shallow.n_scored <= deep.n_scored).all() and (shallow.n_scored < deep.n_scored).any()
    assert shallow.ids.shape == (len(qnets), 50)
    with pytest.raises(ValueError, match='stop_k'):
        adaptive_search(qnets, x, None, 50, stop_k=0, ip_index=ip)

"""The graph walk (Algorithm 1) against exhaustive search and a plain one-query version of the algorithm."""
import numpy as np
import pytest
import torch
from helpers import clustered, knn_graph, random_qnets, recall

from pyterrier_hypencoder.search import exhaustive_search, graph_search


@pytest.fixture(scope='module')
def corpus():
    x = clustered()
    return x, knn_graph(x, 16), random_qnets(12, (16, 16, 16, 1))


def test_graph_with_whole_corpus_sample_is_exact(corpus):
    x, edges, qnets = corpus
    ex_scores, ex_ids = exhaustive_search(qnets, x, 50)
    scores, ids, n_scored = graph_search(qnets, x, edges, 50, n_initial=len(x) + 10)
    # Bit-identical, not just close: both score the whole corpus in one chunk of the same rows in the same order.
    assert torch.equal(ids, ex_ids)
    torch.testing.assert_close(scores, ex_scores)
    assert (n_scored == len(x)).all()


def test_graph_walk_recall(corpus):
    x, edges, qnets = corpus
    _, ex_ids = exhaustive_search(qnets, x, 10)
    _, sample_ids, sample_scored = graph_search(qnets, x, edges, 10, n_initial=400, max_iter=0)
    _, ids, n_scored = graph_search(qnets, x, edges, 10, n_initial=400, n_candidates=64)
    assert (sample_scored == 400).all()
    # The walk must do much better than its own starting sample, while scoring a fraction of the corpus.
    assert recall(sample_ids, ex_ids) < 0.5
    assert recall(ids, ex_ids) >= 0.85
    assert (n_scored > 400).all()
    assert n_scored.float().mean() < 0.4 * len(x)


def plain_walk(qnet, x, edges, k, n_initial, n_candidates, max_iter, seed=0):
    """Algorithm 1 for one query, written plainly with Python sets, to check the vectorised walk against."""
    def score(ids):
        return dict(zip(ids, qnet.score(torch.from_numpy(x[ids]))[0].tolist()))
    candidates = score(sorted(np.random.default_rng(seed).choice(len(x), n_initial, replace=False).tolist()))
    seen, results = set(candidates), dict(candidates)
    results = dict(sorted(results.items(), key=lambda kv: -kv[1])[:k])
    for _ in range(max_iter):
        best = sorted(candidates, key=lambda d: -candidates[d])[:n_candidates]
        new = sorted({int(e) for d in best for e in edges[d]} - seen)
        if not new:
            break
        seen.update(new)
        candidates = score(new)
        before = set(results)
        results = dict(sorted({**results, **candidates}.items(), key=lambda kv: -kv[1])[:k])
        if set(results) <= before:
            break
    return set(results), len(seen)


def test_graph_walk_matches_plain_algorithm(corpus):
    x, edges, qnets = corpus
    for k, n_initial, n_candidates in [(10, 50, 8), (100, 200, 16)]:
        _, ids, n_scored = graph_search(qnets, x, edges, k, n_initial=n_initial, n_candidates=n_candidates)
        for i in range(0, len(qnets), 3):
            want_ids, want_scored = plain_walk(qnets[i], x, edges, k, n_initial, n_candidates, 16)
            assert set(ids[i].tolist()) == want_ids
            assert n_scored[i] == want_scored


def test_graph_results_are_true_scores_sorted(corpus):
    x, edges, qnets = corpus
    scores, ids, _ = graph_search(qnets, x, edges, 30, n_initial=100, n_candidates=8)
    assert (ids >= 0).all()
    assert all(len(set(row.tolist())) == 30 for row in ids)
    want = torch.stack([qnets[i].score(torch.from_numpy(x[ids[i].numpy()]))[0] for i in range(len(qnets))])
    torch.testing.assert_close(scores, want)
    assert (scores[:, :-1] >= scores[:, 1:]).all()


def test_graph_deterministic_given_seed(corpus):
    x, edges, qnets = corpus
    a = graph_search(qnets, x, edges, 10, n_initial=50, n_candidates=8, seed=7)
    b = graph_search(qnets, x, edges, 10, n_initial=50, n_candidates=8, seed=7)
    c = graph_search(qnets, x, edges, 10, n_initial=50, n_candidates=8, seed=8)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not torch.equal(a[2], c[2])


def test_graph_queries_are_independent(corpus):
    # Batching pads the queries' candidate sets together; each query's walk must not depend on the others.
    x, edges, qnets = corpus
    together = graph_search(qnets, x, edges, 10, n_initial=60, n_candidates=8)
    for i in (0, 5, 11):
        alone = graph_search(qnets[i], x, edges, 10, n_initial=60, n_candidates=8)
        assert torch.equal(alone[1][0], together[1][i])
        assert alone[2][0] == together[2][i]


def test_graph_max_iter_and_early_stopping(corpus):
    x, edges, qnets = corpus
    counts = [graph_search(qnets, x, edges, 10, n_initial=60, n_candidates=8, max_iter=m, early_stopping=False)[2]
              for m in (0, 1, 2, 8)]
    assert (counts[0] == 60).all()
    # Each iteration scores at most n_candidates * K new documents.
    assert ((counts[1] > 60) & (counts[1] <= 60 + 8 * 16)).all()
    assert (counts[2] >= counts[1]).all() and (counts[3] >= counts[2]).all()
    stopped = graph_search(qnets, x, edges, 10, n_initial=60, n_candidates=8, max_iter=8)[2]
    assert (stopped <= counts[3]).all() and (stopped < counts[3]).any()


def test_graph_topk_prefix_without_early_stopping(corpus):
    # Without early stopping the scored set does not depend on k, so a smaller k is a prefix of a larger one.
    x, edges, qnets = corpus
    big = graph_search(qnets, x, edges, 100, n_initial=80, n_candidates=8, early_stopping=False)
    small = graph_search(qnets, x, edges, 10, n_initial=80, n_candidates=8, early_stopping=False)
    assert torch.equal(small[1], big[1][:, :10])
    assert torch.equal(small[2], big[2])


def test_graph_small_corpus_and_padding():
    x = np.random.default_rng(4).normal(size=(30, 16)).astype(np.float32)
    qnets = random_qnets(2, (16, 1))
    # A sparse graph (a single ring) and a tiny sample: the walk cannot find k documents.
    edges = ((np.arange(30) + 1) % 30).astype(np.uint32)[:, None]
    scores, ids, n_scored = graph_search(qnets, x, edges, 20, n_initial=2, n_candidates=1, max_iter=3,
                                         early_stopping=False)
    assert ids.shape == (2, 20)
    assert (n_scored == 5).all()
    assert ((ids >= 0).sum(1) == 5).all()
    assert torch.isinf(scores[:, 5:]).all() and (ids[:, 5:] == -1).all()
    # k larger than the corpus and a sample larger than the corpus: everything, exactly.
    scores, ids, n_scored = graph_search(qnets, x, edges, 100)
    assert ids.shape == (2, 30) and (n_scored == 30).all()
    assert torch.equal(ids, exhaustive_search(qnets, x, 100)[1])


def test_graph_ignores_out_of_range_edges(corpus):
    x, edges, qnets = corpus
    padded = np.concatenate([edges, np.full((len(x), 2), np.iinfo(np.uint32).max, dtype=np.uint32)], axis=1)
    a = graph_search(qnets, x, edges, 10, n_initial=50, n_candidates=8)
    b = graph_search(qnets, x, padded, 10, n_initial=50, n_candidates=8)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


@pytest.mark.parametrize('kwargs,match', [
    ({'n_initial': 0}, 'n_initial'), ({'n_candidates': 0}, 'n_candidates'), ({'max_iter': -1}, 'max_iter'),
    ({'k': 0}, 'k'), ({'n_initial': 1.5}, 'n_initial'),
])
def test_graph_parameter_errors(corpus, kwargs, match):
    x, edges, qnets = corpus
    args = {'k': 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        graph_search(qnets, x, edges, **args)


def test_graph_edges_shape_error(corpus):
    x, edges, qnets = corpus
    with pytest.raises(ValueError, match='edges'):
        graph_search(qnets, x, edges[:-1], 10)
    with pytest.raises(ValueError, match='edges'):
        graph_search(qnets, x, edges[:, 0], 10)

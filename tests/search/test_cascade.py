"""Cascade search: the whole adaptive search run with narrow (Matryoshka) q-nets, the best re-scored at full width."""
import pytest
import torch
from helpers import clustered

from pyterrier_hypencoder.model.qnet import QNets, QNetSpec
from pyterrier_hypencoder.search import InnerProductIndex, exhaustive_search
from pyterrier_hypencoder.search.cascade import rescore
from pyterrier_hypencoder.search.modes import Adaptive, Corpus, make_mode

D, K = 16, 10


def nested_qnets(n_queries, seed=0, noise=None):
    """Residual-free q-nets [D, D, D, 1] declared nested at widths 4, 8 and 16.

    With ``noise``, they behave as Matryoshka-trained q-nets do: the hidden units past the first 8 copy the first 8
    (so each layer norm sees the same mean and spread), and the full score is the width-8 score plus ``noise`` times
    a random function of those units, so the narrow q-net ranks close to the full one. Without, all weights are
    random (the widths then rank unrelated).
    """
    g = torch.Generator().manual_seed(seed)
    spec = QNetSpec((D, D, D, 1), residual=False, residual_on_last=False, widths=(4, 8))
    weights = [torch.randn(n_queries, a, b, generator=g) / a ** 0.5 for a, b in spec.weight_shapes]
    biases = [0.1 * torch.randn(n_queries, b, generator=g) for b in spec.bias_dims]
    if noise is not None:
        h = 8
        weights[0][:, :, h:] = weights[0][:, :, :h]
        biases[0][:, h:] = biases[0][:, :h]
        weights[1][:, h:, :h] = 0  # the copies feed nothing into the first units...
        weights[1][:, :, h:] = weights[1][:, :, :h]  # ...and the next layer's copies repeat its first units
        biases[1][:, h:] = biases[1][:, :h]
        weights[2][:, h:] = noise * torch.randn(n_queries, D - h, 1, generator=g)
    return QNets(weights, biases, spec)


@pytest.fixture(scope='module')
def vectors():
    return clustered(n=1500, d=D, seed=3)


def test_rescore_ranks_candidates_by_full_width_scores(vectors):
    qnets = nested_qnets(3)
    full = qnets.score(torch.from_numpy(vectors)).float()
    candidates = torch.tensor([[5, 9, 100, -1], [7, 7 + 1, 3, 2], [-1, -1, -1, -1]])
    scores, ids, n = rescore(qnets, vectors, candidates, 3)
    assert n.tolist() == [3, 4, 0]
    for q in range(2):
        rows = [r for r in candidates[q].tolist() if r >= 0]
        want = sorted(rows, key=lambda r: -float(full[q, r]))[:3]
        assert ids[q].tolist() == want
        assert torch.allclose(scores[q], full[q, want], rtol=1e-5, atol=1e-5)
    assert ids[2].tolist() == [-1, -1, -1] and torch.isinf(scores[2]).all()


def test_a_cascade_that_rescores_everything_is_exact(vectors):
    # Every document a candidate (the narrow search scores the whole corpus and keeps all of it): the full-width
    # exhaustive top k, whatever the narrow q-nets thought.
    qnets = nested_qnets(4)
    exact_scores, exact_ids = exhaustive_search(qnets, vectors, K)
    mode = Adaptive(n_sample=len(vectors), cascade_width=4, rescore=len(vectors))
    got = mode.search(qnets, Corpus(vectors), K)
    assert torch.equal(got.ids, exact_ids)
    assert torch.allclose(got.scores, exact_scores, rtol=1e-5, atol=1e-5)
    assert (got.n_scored == len(vectors)).all() and (got.n_narrow == len(vectors)).all()
    assert torch.equal(got.n_evaluations, got.n_scored + got.n_narrow)


@pytest.mark.parametrize('ann', [False, True], ids=['exact rounds', 'pools from an HNSW index'])
def test_cascade_is_the_narrow_search_then_full_width_scores(vectors, ann):
    # The contract: the rounds run at the narrow width for the best `rescore` (stopping on the narrow top k), and
    # the results are those candidates' full-width top k; full width is paid for the candidates only.
    qnets = nested_qnets(8, seed=1, noise=0.05)
    corpus = Corpus(vectors, ann=InnerProductIndex(vectors, hnsw_m=16) if ann else None)
    got = Adaptive(cascade_width=8, rescore=100, pool=300).search(qnets, corpus, K)
    narrow = Adaptive(pool=300, stop_k=K).search(qnets.truncate(8), corpus, 100)
    assert torch.equal(got.n_narrow, narrow.n_scored)
    assert torch.equal(got.n_scored, (narrow.ids >= 0).sum(dim=1))
    full = qnets.score(torch.from_numpy(vectors)).float()
    for q in range(len(qnets)):
        candidates = narrow.ids[q][narrow.ids[q] >= 0]
        best = candidates[torch.argsort(-full[q, candidates], stable=True)][:K]
        assert set(got.ids[q].tolist()) == set(best.tolist())
    assert torch.allclose(got.scores, torch.gather(full, 1, got.ids), rtol=1e-5, atol=1e-5)


def test_narrow_q_nets_that_rank_as_the_full_ones_lose_nothing(vectors):
    # noise=0: the width-8 q-net ranks exactly as the full one, so the cascade finds what the narrow search finds.
    qnets = nested_qnets(8, seed=2, noise=0.0)
    corpus = Corpus(vectors)
    got = Adaptive(cascade_width=8).search(qnets, corpus, K)
    narrow = Adaptive(stop_k=K).search(qnets.truncate(8), corpus, Adaptive(cascade_width=8).rescored(K))
    assert [set(a) for a in got.ids.tolist()] == [set(a[:K]) for a in narrow.ids.tolist()]


def test_cascade_options_are_checked():
    with pytest.raises(ValueError, match='give cascade_width too'):
        make_mode('adaptive', rescore=50)
    with pytest.raises(ValueError, match='cascade_width must be an integer'):
        make_mode('adaptive', cascade_width=0)
    with pytest.raises(ValueError, match='4, 8, 16'):  # a width the q-nets cannot take names those they can
        Adaptive(cascade_width=5).search(nested_qnets(1), Corpus(clustered(n=50, d=D)), 5)

"""Exhaustive search against brute-force scoring in float64."""
import numpy as np
import pytest
import torch
from helpers import N_SHARDED_DOCS, assert_fp32_topk, qnet_fp32_bound, random_qnets

from pyterrier_hypencoder.search import exhaustive_search


def reference64(qnets, vectors):
    """Every document's score in float64, ``[queries, docs]``: what fp32 search is checked against."""
    return qnets.to(dtype=torch.float64).score(torch.as_tensor(np.asarray(vectors, dtype=np.float64))).numpy()


def check_exhaustive(qnets, x, scores, ids, k):
    """Exact top-k up to fp32 rounding (:func:`helpers.assert_fp32_topk`): on random data near-ties are rare but
    a chunking that differs from the reference's may still round two close scores into either order on some CPU."""
    reference = reference64(qnets, x)
    assert scores.shape == ids.shape == (len(qnets), min(k, x.shape[0]))
    assert_fp32_topk(scores, ids, reference, qnet_fp32_bound(qnets.spec, reference))


@pytest.mark.parametrize('n,k,chunk_size', [(1000, 10, 64), (1000, 100, 333), (250, 1000, 100), (37, 5, 1), (10, 10, None)])
def test_exhaustive_equals_brute_force(n, k, chunk_size):
    x = np.random.default_rng(1).normal(size=(n, 16)).astype(np.float32)
    qnets = random_qnets(5, (16, 16, 16, 1))
    scores, ids = exhaustive_search(qnets, x, k, chunk_size=chunk_size)
    assert ids.dtype == torch.int64
    check_exhaustive(qnets, x, scores, ids, k)


def test_exhaustive_float16_memmap(tmp_path):
    x = np.random.default_rng(2).normal(size=(777, 16)).astype(np.float16)
    mm = np.memmap(tmp_path / 'vecs.f2', mode='w+', dtype=np.float16, shape=x.shape)
    mm[:] = x
    mm.flush()
    vectors = np.memmap(tmp_path / 'vecs.f2', mode='r', dtype=np.float16, shape=x.shape)
    qnets = random_qnets(3, (16, 8, 1))
    scores, ids = exhaustive_search(qnets, vectors, 50, chunk_size=100)
    check_exhaustive(qnets, x.astype(np.float32), scores, ids, 50)


def test_exhaustive_tensor_input_and_tiny_model(tiny_model):
    qnets = tiny_model.encode_queries(['first query', 'a second, longer query about something else'])
    x = torch.randn(300, tiny_model.dim, generator=torch.Generator().manual_seed(3))
    scores, ids = exhaustive_search(qnets, x, 20, chunk_size=64)
    check_exhaustive(qnets, x.numpy(), scores, ids, 20)


def test_exhaustive_errors():
    qnets = random_qnets(2, (16, 1))
    x = np.zeros((10, 16), dtype=np.float32)
    for k in (0, -1, 2.5):
        with pytest.raises(ValueError, match=r'k \(the number of results\) must be an integer >= 1'):
            exhaustive_search(qnets, x, k)
    with pytest.raises(ValueError, match='shape'):
        exhaustive_search(qnets, np.zeros((10, 8), dtype=np.float32), 3)
    with pytest.raises(ValueError, match='no document vectors'):
        exhaustive_search(qnets, np.zeros((0, 16), dtype=np.float32), 3)
    with pytest.raises(ValueError, match='chunk_size'):
        exhaustive_search(qnets, x, 3, chunk_size=0)


def test_exhaustive_ties_deterministic_on_one_machine(tiny_model, tied_index):
    qnets = tiny_model.encode_queries(['dense vector'])
    vecs = np.asarray(tied_index.vectors())
    _, ids = exhaustive_search(qnets, vecs, N_SHARDED_DOCS, chunk_size=8, block=4)
    _, ids2 = exhaustive_search(qnets, vecs, N_SHARDED_DOCS, block=4)
    assert ids.tolist() == ids2.tolist()
    tied = [r for r in ids[0].tolist() if r % 4 == 0]
    assert tied == sorted(tied)

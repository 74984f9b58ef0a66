"""The document neighbour graph builders (pyterrier_hypencoder.index.graph)."""
import numpy as np
import pytest

from pyterrier_hypencoder.index import graph
from pyterrier_hypencoder.index.graph import build_knn_graph, exact_neighbours, neighbour_recall


def brute_force(x, k):
    """Reference k-NN in float64 NumPy: the k nearest other rows, nearest first."""
    x = x.astype(np.float64)
    sq = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(sq, np.inf)
    order = np.argsort(sq, axis=1, kind='stable')[:, :k]
    return order, np.sqrt(np.take_along_axis(sq, order, axis=1))


@pytest.fixture(scope='module')
def corpus():
    return np.random.default_rng(0).standard_normal((400, 24), dtype=np.float32)


def _clustered(n, d, topics, seed):
    """A Gaussian mixture with a decaying variance spectrum, like dense text embeddings (smaller than the benchmark's)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((topics, d), dtype=np.float32) * 0.7
    x = centres[rng.integers(0, topics, n)] + rng.standard_normal((n, d), dtype=np.float32)
    return x * np.arange(1, d + 1, dtype=np.float32) ** -0.5


def _spy(monkeypatch, name):
    """Records the arguments of every ``faiss.<name>(...)`` construction; returns that list."""
    import faiss
    calls = []
    original = getattr(faiss, name)

    def spy(*args):
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(faiss, name, spy)
    return calls


def test_exact_matches_brute_force(corpus):
    edges, dists = build_knn_graph(corpus, 12, method='exact', batch_size=64)
    ref_edges, ref_dists = brute_force(corpus, 12)
    assert edges.dtype == np.uint32 and dists.dtype == np.float32
    assert edges.shape == dists.shape == (400, 12)
    np.testing.assert_array_equal(edges, ref_edges)
    np.testing.assert_allclose(dists, ref_dists, rtol=1e-4, atol=1e-4)
    assert (np.diff(dists, axis=1) >= 0).all()


@pytest.mark.parametrize('method', ['exact', 'hnsw', 'ivf'])
def test_self_never_a_neighbour(corpus, method):
    edges, dists = build_knn_graph(corpus, 20, method=method, batch_size=100)
    assert not (edges == np.arange(len(corpus))[:, None]).any()
    assert all(len(set(row)) == 20 for row in edges.tolist())
    assert (dists > 0).all()


@pytest.mark.parametrize('method', ['exact', 'hnsw', 'ivf'])
@pytest.mark.parametrize('copies', [4, 12])
def test_duplicates_are_neighbours_but_self_is_not(corpus, method, copies):
    # copies - 1 >= k: every copy's list is made only of other copies at distance 0 (with 12 copies, ties can hide
    # a row's own id from the k + 1 results: the row must still not list itself).
    x = corpus.copy()
    x[:copies] = x[0]
    k = 3
    edges, dists = build_knn_graph(x, k, method=method)
    for row in range(copies):
        assert row not in edges[row]
        assert set(edges[row]) <= set(range(copies))
        np.testing.assert_array_equal(dists[row], 0)
    if method == 'exact':
        # Other rows see the copies as tied candidates: compare with every copy id mapped to 0.
        ref_edges, ref_dists = brute_force(x, k)
        np.testing.assert_array_equal(np.where(edges < copies, 0, edges), np.where(ref_edges < copies, 0, ref_edges))
        np.testing.assert_allclose(dists, ref_dists, rtol=1e-4, atol=1e-4)


def test_duplicate_pair(corpus):
    x = corpus.copy()
    x[7] = x[300]
    edges, dists = build_knn_graph(x, 5, method='exact')
    assert edges[7, 0] == 300 and edges[300, 0] == 7
    assert dists[7, 0] == 0 and dists[300, 0] == 0


def test_float16_memmap_input(corpus, tmp_path):
    path = tmp_path / 'vecs.f2'
    mm = np.memmap(path, dtype=np.float16, mode='w+', shape=corpus.shape)
    mm[:] = corpus
    mm.flush()
    ro = np.memmap(path, dtype=np.float16, mode='r', shape=corpus.shape)
    edges, dists = build_knn_graph(ro, 10, method='exact', batch_size=50)
    ref_edges, ref_dists = brute_force(corpus.astype(np.float16).astype(np.float32), 10)
    np.testing.assert_array_equal(edges, ref_edges)
    np.testing.assert_allclose(dists, ref_dists, rtol=1e-4, atol=1e-4)


def test_streams_into_memmap_outputs(corpus, tmp_path):
    n, k = len(corpus), 8
    edges_out = np.memmap(tmp_path / 'edges.u32.np', dtype=np.uint32, mode='w+', shape=(n, k))
    dists_out = np.memmap(tmp_path / 'weights.f16.np', dtype=np.float16, mode='w+', shape=(n, k))
    edges, dists = build_knn_graph(corpus, k, method='exact', batch_size=37, edges_out=edges_out, dists_out=dists_out)
    assert edges is edges_out and dists is dists_out
    edges_out.flush()
    dists_out.flush()
    ref_edges, ref_dists = build_knn_graph(corpus, k, method='exact')
    np.testing.assert_array_equal(np.fromfile(tmp_path / 'edges.u32.np', dtype=np.uint32).reshape(n, k), ref_edges)
    np.testing.assert_allclose(np.fromfile(tmp_path / 'weights.f16.np', dtype=np.float16).reshape(n, k), ref_dists,
                               rtol=1e-3)


def test_hnsw_recall_on_random_vectors():
    # Acceptance criterion: >= 0.95 recall against exact on 20,000 uniform random 128-d vectors, the hardest kind of
    # data for approximate search (no cluster structure), so M and efConstruction are raised above the defaults,
    # which are tuned for clustered, embedding-like data (next test).
    x = np.random.default_rng(42).random((20_000, 128), dtype=np.float32)
    k = 10
    exact, _ = build_knn_graph(x, k, method='exact')
    approx, dists = build_knn_graph(x, k, method='hnsw', hnsw_m=32, ef_construction=128, ef_search=128)
    recall = neighbour_recall(approx, exact)
    assert recall >= 0.95, recall
    assert not (approx == np.arange(len(x))[:, None]).any()
    assert (np.diff(dists, axis=1) >= 0).all()


def test_hnsw_defaults_on_clustered_vectors():
    x = _clustered(5000, 64, 20, seed=7)
    exact, _ = build_knn_graph(x, 20, method='exact')
    approx, _ = build_knn_graph(x, 20, method='hnsw')
    assert neighbour_recall(approx, exact) >= 0.95


def test_ivf_probing_every_cluster_is_exact(corpus):
    edges, dists = build_knn_graph(corpus, 12, method='ivf', ivf_lists=7, ivf_probe=7)
    ref_edges, ref_dists = brute_force(corpus, 12)
    np.testing.assert_array_equal(edges, ref_edges)
    np.testing.assert_allclose(dists, ref_dists, rtol=1e-4, atol=1e-4)


def test_ivf_recall_on_clustered_vectors(tmp_path):
    x = _clustered(5000, 64, 20, seed=3)
    path = tmp_path / 'vecs.f2'
    mm = np.memmap(path, dtype=np.float16, mode='w+', shape=x.shape)
    mm[:] = x
    mm.flush()
    ro = np.memmap(path, dtype=np.float16, mode='r', shape=x.shape)
    exact, _ = build_knn_graph(ro, 20, method='exact')
    approx, dists = build_knn_graph(ro, 20, method='ivf', ivf_probe=32, batch_size=700)
    assert neighbour_recall(approx, exact) >= 0.95
    assert not (approx == np.arange(len(x))[:, None]).any()
    assert (np.diff(dists, axis=1) >= 0).all()
    again, _ = build_knn_graph(ro, 20, method='ivf', ivf_probe=32, batch_size=700)
    np.testing.assert_array_equal(approx, again)


def test_ivf_tiny_clusters_still_find_k_neighbours(corpus):
    # 200 clusters of ~2 documents and one probe: too few candidates, so the search widens to further clusters.
    edges, dists = build_knn_graph(corpus, 20, method='ivf', ivf_lists=200, ivf_probe=1)
    assert all(len(set(row)) == 20 for row in edges.tolist())
    assert not (edges == np.arange(len(corpus))[:, None]).any()
    assert (edges < len(corpus)).all() and (dists > 0).all()


def test_auto_switches_to_hnsw_above_threshold(corpus, monkeypatch):
    built = _spy(monkeypatch, 'IndexHNSWFlat')
    exact, _ = build_knn_graph(corpus, 5, method='auto', exact_max_docs=len(corpus))
    assert built == []
    np.testing.assert_array_equal(exact, brute_force(corpus, 5)[0])
    approx, _ = build_knn_graph(corpus, 5, method='auto', exact_max_docs=len(corpus) - 1)
    assert len(built) == 1
    assert neighbour_recall(approx, exact) > 0.9


def test_short_approximate_results_are_redone_exactly(corpus):
    # An approximate index may return -1 for missing results: those rows must be recomputed exactly.
    import faiss
    flat = faiss.IndexFlatL2(corpus.shape[1])
    flat.add(corpus)

    class ShortIndex:
        def search(self, queries, kk):
            d, i = flat.search(queries, kk)
            i[::2, -3:] = -1
            d[::2, -3:] = np.finfo(np.float32).max
            return d, i

    k = 6
    edges = np.empty((len(corpus), k), np.uint32)
    dists = np.empty((len(corpus), k), np.float32)
    graph._search(ShortIndex(), corpus, k, 64, False, 'test', edges, dists)
    ref_edges, ref_dists = brute_force(corpus, k)
    np.testing.assert_array_equal(edges, ref_edges)
    np.testing.assert_allclose(dists, ref_dists, rtol=1e-4, atol=1e-4)


def test_exact_neighbours_of_some_rows(corpus):
    rows = np.array([399, 0, 17, 17, 250])
    edges, dists = exact_neighbours(corpus, rows, 9, batch_size=70)
    ref_edges, ref_dists = brute_force(corpus, 9)
    np.testing.assert_array_equal(edges, ref_edges[rows])
    np.testing.assert_allclose(dists, ref_dists[rows], rtol=1e-4, atol=1e-4)


def test_neighbour_recall():
    exact = np.array([[1, 2, 3, 4], [0, 2, 3, 4]])
    assert neighbour_recall(exact, exact) == 1.0
    assert neighbour_recall(np.array([[4, 3, 9, 8], [5, 6, 7, 8]]), exact) == pytest.approx(0.25)
    assert neighbour_recall(np.array([[1, 2, 3, 4, 5, 6], [0, 7, 8, 9, 10, 11]]), exact) == pytest.approx(5 / 8)
    with pytest.raises(ValueError, match='same number of rows'):
        neighbour_recall(exact[:1], exact)


@pytest.mark.parametrize('kwargs, message', [
    (dict(k=400), r'at least k \+ 1 = 401 documents.*use k <= 399'),
    (dict(k=0), 'k must be a positive integer'),
    (dict(k=-3), 'k must be a positive integer'),
    (dict(k=2.5), 'k must be a positive integer'),
    (dict(method='ivfpq'), "method='ivfpq' is not supported"),
    (dict(method='ivf', ivf_lists=0), r'ivf_lists must be in \[1, 400\]'),
    (dict(method='ivf', ivf_lists=401), r'ivf_lists must be in \[1, 400\]'),
    (dict(method='ivf', ivf_probe=0), 'ivf_probe must be positive'),
    (dict(batch_size=0), 'batch_size must be positive'),
    (dict(edges_out=np.empty((400, 5), np.int64)), 'edges_out must be uint32'),
    (dict(edges_out=np.empty((400, 4), np.uint32)), r'edges_out has shape \(400, 4\), expected \(400, 5\)'),
    (dict(dists_out=np.empty((400, 5), np.int32)), 'dists_out must be a float array'),
])
def test_bad_arguments(corpus, kwargs, message):
    kwargs = {'k': 5, **kwargs}
    with pytest.raises(ValueError, match=message):
        build_knn_graph(corpus, **kwargs)


@pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf])
def test_non_finite_vectors(corpus, bad):
    x = corpus.copy()
    x[123, 4] = bad
    with pytest.raises(ValueError, match='NaN or infinite'):
        build_knn_graph(x, 5, method='exact', batch_size=100)


def test_not_a_matrix():
    with pytest.raises(ValueError, match=r'2-D \[n, d\] array'):
        build_knn_graph(np.zeros(10, np.float32), 3)
    with pytest.raises(ValueError, match=r'2-D \[n, d\] array'):
        build_knn_graph(np.zeros((2, 3, 4), np.float32), 1)
    with pytest.raises(ValueError, match=r'2-D \[n, d\] array with d > 0'):
        build_knn_graph(np.zeros((5, 0), np.float32), 1)
    edges, _ = build_knn_graph([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]], 1)  # nested lists are accepted
    np.testing.assert_array_equal(edges[:, 0], [1, 0, 1])


def test_hnsw_projects_wide_vectors_and_reranks_exactly(monkeypatch):
    made = _spy(monkeypatch, 'PCAMatrix')
    x = _clustered(3000, 512, 10, seed=5)
    exact, exact_dists = build_knn_graph(x, 10, method='exact')
    approx, dists = build_knn_graph(x, 10, method='hnsw')
    assert made == [(512, 256)]
    assert neighbour_recall(approx, exact) >= 0.95
    # re-ranked in the full space: where the lists agree, so do the distances
    same = approx == exact
    np.testing.assert_allclose(dists[same], exact_dists[same], rtol=1e-3, atol=1e-3)
    build_knn_graph(x[:, :64], 10, method='hnsw')
    assert len(made) == 1  # narrow vectors: no projection


@pytest.mark.parametrize('kwargs, message', [
    (dict(hnsw_pca=0), 'hnsw_pca must be an integer in'),
    (dict(hnsw_pca=25), r'hnsw_pca must be an integer in \[1, 24\]'),
    (dict(hnsw_pca='half'), 'hnsw_pca must be an integer'),
    (dict(hnsw_pca=8, refine_factor=0), 'refine_factor must be >= 1'),
])
def test_bad_hnsw_arguments(corpus, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_knn_graph(corpus, 5, method='hnsw', **kwargs)

"""Document neighbour graphs: for every document vector, its k nearest other documents by L2 distance.

The graph feeds the graph walk of adaptive retrieval (pyterrier-adaptive's ``np_topk`` layout): ``edges[i]`` lists the
row ids of the ``k`` documents nearest to row ``i``, nearest first, never ``i`` itself; ``dists[i]`` their L2
distances. Builders:

- ``'exact'``: brute force with ``faiss.IndexFlatL2``; cost grows with n^2 * d.
- ``'hnsw'``: a ``faiss.IndexHNSWFlat`` over all vectors, then every vector is searched in it; cost grows with about
  n * log(n) * d. Knobs: ``hnsw_m`` (M, links per node), ``ef_construction`` and ``ef_search`` (candidate lists while
  inserting and searching); larger values: higher recall, more time. At fixed settings recall falls as the corpus
  grows. Vectors of 512 or more dimensions are by default searched in their first 256 principal components, and
  each document's candidates re-ranked by exact distance (``hnsw_pca``): distances cost a third, at the same recall.
  Structureless data (e.g. uniform random) needs a larger ``ef_construction`` for the same recall.
- ``'ivf'``: k-means partitions the vectors into ``ivf_lists`` clusters; the documents of each cluster are compared
  exactly (one matrix product per cluster) with the documents of the ``ivf_probe`` clusters whose centroids are
  nearest to their own. Cost grows with n^2 * d * ivf_probe / ivf_lists, all of it in large matrix products, which
  CPUs run near their peak; recall is set by ``ivf_probe``, and falls as the corpus grows at fixed settings.
- ``'auto'``: exact up to ``exact_max_docs`` documents, HNSW above.

Build times and recall of each builder, measured: ``docs/indexing.md``.

Vectors may be a float16 or float32 ``np.memmap``: they are read and converted to float32 one batch at a time, so
beyond the FAISS index itself (which holds float32 copies of the vectors) memory stays bounded.
"""
from __future__ import annotations

import math
import shutil
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np

from .layout import DOCNOS_FILE, GRAPH_EDGES_FILE, GRAPH_WEIGHTS_FILE, graph_dirname, graph_meta, write_meta

# Exact search costs about 2 * n^2 * d flops, HNSW about n * log(n) * d. Measured at d = 768, k = 100 (2 CPU cores):
# 100k vectors take 219 CPU-seconds exact (under 2 minutes on an idle machine), 109 with HNSW (M = 16, recall 0.978);
# doubling n quadruples the exact cost but only doubles HNSW's. Up to 100k the exact graph is still cheap enough.
EXACT_MAX_DOCS = 100_000

METHODS = ('auto', 'exact', 'hnsw', 'ivf')


def build_knn_graph(
    vectors: np.ndarray,
    k: int = 100,
    *,
    method: str = 'auto',
    exact_max_docs: int = EXACT_MAX_DOCS,
    batch_size: int = 4096,
    verbose: bool = False,
    edges_out: Optional[np.ndarray] = None,
    dists_out: Optional[np.ndarray] = None,
    seed: int = 0,
    hnsw_m: int = 32,
    ef_construction: int = 64,
    ef_search: Optional[int] = None,
    hnsw_pca: Union[int, str, None] = 'auto',
    refine_factor: int = 2,
    ivf_lists: Optional[int] = None,
    ivf_probe: int = 32,
) -> Tuple[np.ndarray, np.ndarray]:
    """Builds the k-nearest-neighbour graph of ``vectors`` under L2 distance.

    Args:
        vectors: ``[n, d]`` float array (float16 or float32, in memory or an ``np.memmap``).
        k: neighbours per document; needs ``k < n`` (at least ``k + 1`` documents).
        method: ``'exact'``, ``'hnsw'``, ``'ivf'`` or ``'auto'`` (exact up to ``exact_max_docs`` documents, HNSW
            above).
        exact_max_docs: the largest corpus that ``'auto'`` builds exactly.
        batch_size: query rows converted and searched at once.
        verbose: show a progress bar.
        edges_out: optional preallocated ``[n, k]`` uint32 array (e.g. an ``np.memmap``) filled batch by batch.
        dists_out: optional preallocated ``[n, k]`` float array (e.g. float16 or float32 ``np.memmap``).
        seed: random seed of the HNSW level assignment (with several threads, parallel insertion can still make
            graphs differ slightly from run to run).
        hnsw_m: HNSW links per node (``M``); more links: better recall, more memory and time.
        ef_construction: HNSW candidate list size while inserting; larger: a better graph, slower build.
        ef_search: HNSW candidate list size while searching (at least ``k + 1``); default ``max(5 * k // 2, 64)``.
            The main knob that trades time for recall.
        hnsw_pca: ``'hnsw'``: build and search the HNSW graph on the vectors projected to this many principal
            components (fitted on up to 100,000 vectors), then re-rank the ``refine_factor * (k + 1)`` candidates
            of each document by exact L2 distance in the full space. Distances in fewer dimensions cost less
            (``docs/indexing.md``). Holds an extra float32 copy of the vectors for the re-ranking. ``'auto'``:
            256 for vectors of 512 or more dimensions, else None (the full vectors).
        refine_factor: ``hnsw_pca``: candidates re-ranked exactly, as a multiple of ``k + 1``.
        ivf_lists: ``'ivf'``: number of k-means clusters; default about ``sqrt(n)``, at least 1.
        ivf_probe: ``'ivf'``: clusters whose documents each document is compared with (its own and the nearest
            ones); more: higher recall, proportionally more time.

    Returns:
        ``(edges, dists)``: ``edges`` uint32 ``[n, k]`` row ids of the nearest other documents, nearest first (a
        document is never its own neighbour, but its duplicates are); ``dists`` float32 ``[n, k]`` their L2 distances
        (not squared). When ``edges_out``/``dists_out`` are given, those arrays are returned.

    Raises:
        ValueError: for a bad method, ``k``, shape, output array, or NaN/inf values in ``vectors``.
    """
    if method not in METHODS:
        raise ValueError(f'method={method!r} is not supported: use one of {METHODS}')
    if not hasattr(vectors, 'ndim'):
        vectors = np.asarray(vectors)
    if vectors.ndim != 2 or vectors.shape[1] == 0:
        raise ValueError(f'vectors must be a 2-D [n, d] array with d > 0, got shape {vectors.shape}')
    n, d = vectors.shape
    if not isinstance(k, (int, np.integer)) or k <= 0:
        raise ValueError(f'k must be a positive integer, got {k!r}')
    if k >= n:
        raise ValueError(f'k={k} neighbours need at least k + 1 = {k + 1} documents, but there are only {n}: '
                         f'use k <= {n - 1}')
    if n >= 2 ** 32:
        raise ValueError(f'{n} documents do not fit uint32 row ids')
    if batch_size <= 0:
        raise ValueError(f'batch_size must be positive, got {batch_size}')
    edges = _output(edges_out, 'edges_out', (n, k), np.uint32)
    dists = _output(dists_out, 'dists_out', (n, k), np.float32)
    if method == 'auto':
        method = 'exact' if n <= exact_max_docs else 'hnsw'

    if method == 'ivf':
        _ivf_graph(vectors, k, edges, dists, ivf_lists, ivf_probe, seed, batch_size, verbose)
        return edges, dists
    import faiss
    if method == 'exact':
        index = faiss.IndexFlatL2(d)
    else:
        if ef_search is None:
            ef_search = max(5 * k // 2, 64)
        if hnsw_pca == 'auto':
            hnsw_pca = 256 if d >= 512 else None
        if hnsw_pca is not None and not (isinstance(hnsw_pca, (int, np.integer)) and 0 < hnsw_pca <= d):
            raise ValueError(f'hnsw_pca must be an integer in [1, {d}] (the vector size), \'auto\' or None; got '
                             f'{hnsw_pca!r}')
        if refine_factor < 1:
            raise ValueError(f'refine_factor must be >= 1, got {refine_factor}')
        hnsw = faiss.IndexHNSWFlat(hnsw_pca or d, hnsw_m)
        hnsw.hnsw.efConstruction = ef_construction
        # HNSW draws each node's level at random: seeding makes single-threaded builds repeatable.
        hnsw.hnsw.rng = faiss.RandomGenerator(seed)
        hnsw.hnsw.efSearch = max(ef_search, (refine_factor if hnsw_pca else 1) * (k + 1))
        index = hnsw
        if hnsw_pca:
            pca = faiss.PCAMatrix(d, hnsw_pca)
            sample = np.random.default_rng(seed).choice(n, size=min(n, 100_000), replace=False)
            pca.train(_as_f32(vectors[np.sort(sample)]))
            index = faiss.IndexRefineFlat(faiss.IndexPreTransform(pca, hnsw))
            index.k_factor = refine_factor
    _add(index, vectors, batch_size, verbose, method)
    _search(index, vectors, k, batch_size, verbose, method, edges, dists)
    return edges, dists


def neighbour_recall(approx_edges: np.ndarray, exact_edges: np.ndarray) -> float:
    """The mean fraction of each row's exact neighbours that the approximate graph also lists.

    Args:
        approx_edges: ``[m, k']`` neighbour ids from the graph under test.
        exact_edges: ``[m, k]`` true neighbour ids for the same rows (``k <= k'`` measures recall@k within k').

    Returns:
        A value in ``[0, 1]``; 1 when every exact neighbour is found.
    """
    approx_edges, exact_edges = np.asarray(approx_edges), np.asarray(exact_edges)
    if approx_edges.ndim != 2 or exact_edges.ndim != 2 or len(approx_edges) != len(exact_edges):
        raise ValueError(f'need two 2-D arrays with the same number of rows, got {approx_edges.shape} and '
                         f'{exact_edges.shape}')
    if exact_edges.size == 0:
        raise ValueError('exact_edges is empty')
    if approx_edges.shape[1] == 0:
        return 0.0
    # Sort each approx row once, then look every exact id up with a row-offset searchsorted (no Python loop).
    a = np.sort(approx_edges.astype(np.int64), axis=1)
    e = exact_edges.astype(np.int64)
    width = int(max(a.max(initial=0), e.max(initial=0))) + 1
    offsets = np.arange(len(a), dtype=np.int64)[:, None] * width
    flat = (a + offsets).ravel()
    keys = (e + offsets).ravel()
    pos = np.minimum(np.searchsorted(flat, keys), len(flat) - 1)
    return float(np.mean(flat[pos] == keys))


def exact_neighbours(
    vectors: np.ndarray, rows: np.ndarray, k: int, *, batch_size: int = 65536,
) -> Tuple[np.ndarray, np.ndarray]:
    """Exact k nearest other rows for a few query ``rows``, streaming over the corpus (for recall checks on big corpora).

    Args:
        vectors: ``[n, d]`` float array (float16/float32, possibly an ``np.memmap``).
        rows: row ids of the queries.
        k: neighbours per query row, ``k < n``.
        batch_size: corpus rows converted to float32 at once.

    Returns:
        ``(edges, dists)`` as ``build_knn_graph`` returns them, for ``rows`` only.
    """
    import faiss
    rows = np.asarray(rows, dtype=np.int64)
    n = len(vectors)
    if not 0 < k < n:
        raise ValueError(f'k must be in [1, {n - 1}] for {n} documents, got {k}')
    queries = _as_f32(vectors[np.sort(rows)])[np.argsort(np.argsort(rows))]
    best_d = np.full((len(rows), k + 1), np.inf, dtype=np.float32)
    best_i = np.full((len(rows), k + 1), -1, dtype=np.int64)
    for start in range(0, n, batch_size):
        chunk = _as_f32(vectors[start:start + batch_size])
        kk = min(k + 1, len(chunk))
        dd, ii = faiss.knn(queries, chunk, kk)
        cand_d = np.concatenate([best_d, dd], axis=1)
        cand_i = np.concatenate([best_i, ii + start], axis=1)
        # A stable sort on distance keeps earlier (lower) ids first among ties, like IndexFlatL2.
        top = np.argsort(cand_d, axis=1, kind='stable')[:, :k + 1]
        best_d = np.take_along_axis(cand_d, top, axis=1)
        best_i = np.take_along_axis(cand_i, top, axis=1)
    edges, dists = _drop_self(best_i, best_d, rows, k)
    return edges.astype(np.uint32), dists


def _output(out, name, shape, dtype):
    if out is None:
        return np.empty(shape, dtype=dtype)
    if tuple(out.shape) != shape:
        raise ValueError(f'{name} has shape {tuple(out.shape)}, expected {shape}')
    if name == 'edges_out' and out.dtype != np.uint32:
        raise ValueError(f'{name} must be uint32, got {out.dtype}')
    if name == 'dists_out' and not np.issubdtype(out.dtype, np.floating):
        raise ValueError(f'{name} must be a float array, got {out.dtype}')
    return out


def _as_f32(batch: np.ndarray) -> np.ndarray:
    batch = np.ascontiguousarray(batch, dtype=np.float32)
    if not np.isfinite(batch).all():
        raise ValueError('vectors contain NaN or infinite values: fix or drop those documents before building the graph')
    return batch


def _batches(n, batch_size, verbose, desc):
    starts = range(0, n, batch_size)
    if verbose:
        try:
            import pyterrier as pt
            tqdm = pt.tqdm
        except ImportError:  # pragma: no cover - pyterrier is a dependency; plain tqdm is a fallback
            from tqdm import tqdm
        starts = tqdm(starts, desc=desc, unit='batch', total=math.ceil(n / batch_size))
    return starts


def _add(index, vectors, batch_size, verbose, method):
    n = len(vectors)
    for start in _batches(n, batch_size, verbose, f'graph {method}: adding'):
        index.add(_as_f32(vectors[start:start + batch_size]))


def _search(index, vectors, k, batch_size, verbose, method, edges, dists):
    n = len(vectors)
    for start in _batches(n, batch_size, verbose, f'graph {method}: searching'):
        queries = _as_f32(vectors[start:start + batch_size])
        rows = np.arange(start, start + len(queries))
        # Every vector is in the one index, so result ids are global row ids and self is recognised by row id
        # (a batch-local index would need its ids offset by the batch start).
        sq, ids = index.search(queries, k + 1)
        e, dd = _drop_self(ids, sq, rows, k)
        missing = (e < 0).any(axis=1)
        if missing.any():
            # An approximate index can come back short (a poorly connected HNSW region): redo those rows exactly.
            e[missing], dd[missing] = exact_neighbours(vectors, rows[missing], k)
        edges[start:start + len(queries)] = e
        dists[start:start + len(queries)] = dd


def _ivf_graph(vectors, k, edges, dists, n_lists, n_probe, seed, batch_size, verbose):
    import faiss
    n, d = vectors.shape
    if n_lists is None:
        n_lists = max(1, round(math.sqrt(n)))
    if not 0 < n_lists <= n:
        raise ValueError(f'ivf_lists must be in [1, {n}], got {n_lists}')
    if n_probe <= 0:
        raise ValueError(f'ivf_probe must be positive, got {n_probe}')
    n_probe = min(n_probe, n_lists)
    rng = np.random.default_rng(seed)
    # k-means on a sample (256 points per centroid is FAISS's own cap), then every vector to its nearest centroid.
    sample = np.sort(rng.choice(n, size=min(n, 256 * n_lists), replace=False))
    kmeans = faiss.Kmeans(d, n_lists, niter=10, seed=seed, max_points_per_centroid=256, verbose=False)
    kmeans.train(_as_f32(vectors[sample]))
    centroids = kmeans.centroids
    labels = np.empty(n, dtype=np.int64)
    for start in _batches(n, batch_size, verbose, 'graph ivf: assigning'):
        labels[start:start + batch_size] = faiss.knn(_as_f32(vectors[start:start + batch_size]), centroids, 1)[1][:, 0]
    # Vectors grouped by cluster, float32, so that each cluster's candidates are a few contiguous slices.
    order = np.argsort(labels, kind='stable')
    bounds = np.searchsorted(labels[order], np.arange(n_lists + 1))
    grouped = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, batch_size):
        rows = order[start:start + batch_size]
        grouped[start:start + len(rows)] = _as_f32(vectors[np.sort(rows)])[np.argsort(np.argsort(rows))]
    probes = faiss.knn(centroids, centroids, n_probe)[1]
    for c in _batches(n_lists, 1, verbose, 'graph ivf: searching'):
        lo, hi = bounds[c], bounds[c + 1]
        if lo == hi:
            continue
        lists = probes[c][probes[c] >= 0]
        # Too few candidates (tiny clusters): widen to the next nearest clusters until k + 1 documents are in reach.
        if sum(bounds[j + 1] - bounds[j] for j in lists) < k + 1:
            lists = faiss.knn(centroids[c:c + 1], centroids, n_lists)[1][0]
            sizes = np.cumsum(bounds[lists + 1] - bounds[lists])
            lists = lists[:int(np.searchsorted(sizes, k + 1)) + 1]
        ids = np.concatenate([order[bounds[j]:bounds[j + 1]] for j in lists])
        base = np.concatenate([grouped[bounds[j]:bounds[j + 1]] for j in lists])
        sq, found = faiss.knn(grouped[lo:hi], base, k + 1)
        rows = order[lo:hi]
        e, dd = _drop_self(ids[found], sq, rows, k)
        edges[rows] = e
        dists[rows] = dd


def _drop_self(ids: np.ndarray, sq_dists: np.ndarray, rows: np.ndarray, k: int):
    """From ``k + 1`` results per row, drops the row itself (by id, not by distance 0, as duplicates are valid
    neighbours); rows whose own id is absent (ties among duplicates) drop their last result instead."""
    drop = ids == rows[:, None]
    # Each id appears once per row, so at most one entry is dropped per row; without self, drop the last.
    drop[~drop.any(axis=1), k] = True
    keep = ~drop
    e = ids[keep].reshape(len(ids), k)
    d = np.sqrt(np.maximum(sq_dists[keep].reshape(len(ids), k), 0)).astype(np.float32)
    return e, d


def write_graph(vectors: np.ndarray, folder: Path, neighbours: int, method: str = 'auto',
                verbose: bool = False) -> Optional[Dict[str, Any]]:
    """Builds the L2 ``neighbours``-NN graph of ``vectors`` into ``folder`` (which holds their ``docnos.npids``).

    Returns:
        The index metadata's ``graph`` entry, or None when there are too few documents for a graph.
    """
    n = vectors.shape[0]
    k = min(neighbours, n - 1)
    if k < 1:
        warnings.warn('a single document has no neighbours: the index is built without a graph', stacklevel=3)
        return None
    if k < neighbours:
        warnings.warn(f'only {n} documents: the graph keeps {k} neighbours per document, not {neighbours}',
                      stacklevel=3)
    gdir = folder / graph_dirname(k)
    gdir.mkdir()
    # Raw row-major files, as pyterrier-adaptive's np_topk graphs are; weights (L2 distances) in float16.
    edges = np.memmap(gdir / GRAPH_EDGES_FILE, mode='w+', dtype=np.uint32, shape=(n, k))
    dists = np.memmap(gdir / GRAPH_WEIGHTS_FILE, mode='w+', dtype=np.float16, shape=(n, k))
    build_knn_graph(vectors, k, method=method, verbose=verbose, edges_out=edges, dists_out=dists)
    edges.flush()
    dists.flush()
    del edges, dists
    shutil.copy(folder / DOCNOS_FILE, gdir / DOCNOS_FILE)
    write_meta(gdir, graph_meta(n, k))
    return {'k': k, 'metric': 'l2', 'method': method}

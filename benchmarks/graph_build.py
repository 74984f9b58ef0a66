"""Benchmark of the document neighbour graph builders: seconds and recall against exact, exact vs HNSW vs IVF.

Data: SYNTHETIC clustered vectors, a Gaussian mixture made to resemble text embeddings (many topics of Zipf-like
sizes, overlapping; a power-law variance spectrum over the dimensions, as dense text encoders show), written to a
float16 memmap like an index's ``vecs.f2`` and read from there. Not real embeddings: figures on real corpora differ.

Recall is the mean fraction of the exact k nearest neighbours found. Where the exact graph is too slow to build (by
default above 100k vectors), exact neighbours are computed by brute force for a random sample of query rows only,
and recall is measured on those rows; the output says so.

    python benchmarks/graph_build.py --quick                  # 10k and 50k
    python benchmarks/graph_build.py                          # 10k, 100k and 1M (1M takes long on 2 cores)
    python benchmarks/graph_build.py --sizes 100000 --out benchmarks/results/graph_100k.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
from pathlib import Path

import numpy as np
from common import default_out, machine, rel, timed_cpu

from pyterrier_hypencoder.index.graph import EXACT_MAX_DOCS, build_knn_graph, exact_neighbours, neighbour_recall


def clustered_vectors(path, n, d, *, seed=0, docs_per_topic=1000, spread=0.7, alpha=1.0, batch=50_000, dtype='float16'):
    """Writes n synthetic 'text-embedding-like' vectors to a memmap at path and returns it (read-only).

    A Gaussian mixture of n / docs_per_topic topics with Zipf-like weights; topic centres drawn with standard
    deviation ``spread`` relative to the within-topic noise (< 1: topics overlap); every dimension i scaled by
    i^(-alpha/2) so that the variance spectrum decays like a power law.
    """
    rng = np.random.default_rng(seed)
    topics = max(16, n // docs_per_topic)
    weights = np.minimum(rng.zipf(1.5, topics), 50).astype(np.float64)
    weights /= weights.sum()
    centres = rng.standard_normal((topics, d), dtype=np.float32) * spread
    scale = np.arange(1, d + 1, dtype=np.float32) ** (-alpha / 2)
    out = np.memmap(path, dtype=dtype, mode='w+', shape=(n, d))
    for start in range(0, n, batch):
        topic = rng.choice(topics, size=min(batch, n - start), p=weights)
        out[start:start + len(topic)] = (centres[topic] + rng.standard_normal((len(topic), d), dtype=np.float32)) * scale
    out.flush()
    del out
    return np.memmap(path, dtype=dtype, mode='r', shape=(n, d))


def run_size(n, args, workdir):
    vecs = clustered_vectors(Path(workdir) / f'vecs_{n}.f2', n, args.dim, seed=args.seed, dtype=args.dtype)
    rows_out = []
    exact_edges = None
    if n <= args.exact_max:
        (exact_edges, _), wall, cpu = timed_cpu(build_knn_graph, vecs, args.k, method='exact', verbose=args.verbose)
        rows_out.append(dict(n=n, method='exact', seconds=wall, cpu_seconds=cpu, recall=1.0, recall_on='all rows'))
        truth_rows, truth = np.arange(n), exact_edges
    else:
        truth_rows = np.sort(np.random.default_rng(args.seed + 1).choice(n, size=min(args.sample, n), replace=False))
        (truth, _), wall, cpu = timed_cpu(exact_neighbours, vecs, truth_rows, args.k)
        rows_out.append(dict(n=n, method='exact', seconds=None, cpu_seconds=None, recall=1.0,
                             recall_on=f'not built (too slow); brute force for {len(truth_rows)} sampled rows took '
                                       f'{wall:.1f}s'))
    for method in args.methods:
        if method == 'exact':
            continue
        given = (dict(ivf_lists=args.ivf_lists, ivf_probe=args.ivf_probe) if method == 'ivf' else
                 dict(hnsw_m=args.hnsw_m, ef_construction=args.ef_construction, ef_search=args.ef_search,
                      hnsw_pca=args.hnsw_pca))
        params = {name: value for name, value in given.items() if value is not None}
        if params.get('hnsw_pca') == 0:
            params['hnsw_pca'] = None  # --hnsw-pca 0: the full vectors
        (edges, _), wall, cpu = timed_cpu(build_knn_graph, vecs, args.k, method=method, verbose=args.verbose, **params)
        recall = neighbour_recall(edges[truth_rows], truth)
        on = 'all rows' if exact_edges is not None else f'{len(truth_rows)} random rows (exact by brute force)'
        rows_out.append(dict(n=n, method=method, seconds=wall, cpu_seconds=cpu, recall=recall, recall_on=on,
                             params=params))
        print(f'  {method}: {wall:.1f}s recall {recall:.4f}', flush=True)
    for row in rows_out:
        row.update(d=args.dim, k=args.k, dtype=args.dtype)
    del vecs
    os.remove(Path(workdir) / f'vecs_{n}.f2')
    return rows_out


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--quick', action='store_true', help='sizes 10k and 50k')
    parser.add_argument('--sizes', type=lambda s: [int(x) for x in s.split(',')], default=None,
                        help='comma-separated corpus sizes (default 10000,100000,1000000)')
    parser.add_argument('--dim', type=int, default=768)
    parser.add_argument('--k', type=int, default=100)
    parser.add_argument('--dtype', choices=['float16', 'float32'], default='float16')
    parser.add_argument('--methods', type=lambda s: s.split(','), default=['exact', 'hnsw', 'ivf'])
    parser.add_argument('--exact-max', type=int, default=EXACT_MAX_DOCS,
                        help='largest size whose full exact graph is built; above, recall uses sampled rows')
    parser.add_argument('--sample', type=int, default=1000, help='query rows for sampled exact recall')
    parser.add_argument('--hnsw-m', type=int, default=None, help='HNSW M (default: the library default)')
    parser.add_argument('--ef-construction', type=int, default=None, help='HNSW efConstruction (default: library)')
    parser.add_argument('--ef-search', type=int, default=None, help='HNSW efSearch (default: library)')
    parser.add_argument('--hnsw-pca', type=int, default=None,
                        help='HNSW on this many principal components, then exact re-ranking; 0: the full vectors '
                             '(default: the library default)')
    parser.add_argument('--ivf-lists', type=int, default=None, help='IVF k-means clusters (default: the library default)')
    parser.add_argument('--ivf-probe', type=int, default=None, help='IVF clusters probed (default: the library default)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--workdir', default=None, help='folder for the temporary vector files (default: system temp)')
    parser.add_argument('--out', default=None, help='results JSON (default benchmarks/results/graph_build.json; with '
                        '--quick .cache/benchmarks/graph_build-quick.json: a quick run never overwrites the committed figures)')
    parser.add_argument('--verbose', action='store_true')
    args = parser.parse_args(argv)
    args.out = default_out(args.out, args.quick, 'graph_build.json', 'benchmarks/graph_build-quick.json')
    return args


def main(argv=None):
    args = parse_args(argv)
    sizes = args.sizes or ([10_000, 50_000] if args.quick else [10_000, 100_000, 1_000_000])

    import faiss
    info = dict(machine(), faiss=faiss.__version__, load_average_start=os.getloadavg())
    results = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        for n in sizes:
            print(f'n={n:,} d={args.dim} k={args.k}', flush=True)
            results.extend(run_size(n, args, workdir))
            _write(args.out, info, results)
    info['load_average_end'] = os.getloadavg()
    info['peak_rss_gib'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    _write(args.out, info, results)

    print(f'\nSynthetic clustered data (Gaussian mixture), d={args.dim}, k={args.k}, {args.dtype} memmap; '
          f'{info["cpus"]} CPU cores ({info["cpu"]}); load average at start {info["load_average_start"]}')
    print(f'{"n":>10} {"method":>7} {"seconds":>9} {"cpu s":>9} {"recall":>7}  recall measured on')
    for r in results:
        secs = '-' if r['seconds'] is None else f'{r["seconds"]:.1f}'
        cpu = '-' if r['cpu_seconds'] is None else f'{r["cpu_seconds"]:.1f}'
        print(f'{r["n"]:>10,} {r["method"]:>7} {secs:>9} {cpu:>9} {r["recall"]:>7.4f}  {r["recall_on"]}')
    print(f'written to {rel(args.out)}')


def _write(path, info, results):
    path.parent.mkdir(parents=True, exist_ok=True)
    data = dict(benchmark='graph_build', data='synthetic clustered vectors (Gaussian mixture resembling text '
                'embeddings), not real embeddings', machine=info, results=results)
    path.write_text(json.dumps(data, indent=2))


if __name__ == '__main__':
    main()

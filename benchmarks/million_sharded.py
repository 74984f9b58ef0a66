"""Sharded search: one index against its shards, searched in this process and on a local Ray cluster, same cores.

:func:`~pyterrier_hypencoder.split_index` cuts ``--index`` (by default ``million.py``'s software-packages index) into
row ranges, each with its own HNSW inner-product index when the index has one, aligned to 4,096 rows where the
shards are large enough (exhaustive scores are then bit-identical to the single index's). Every configuration runs
the same search mode (``--modes``: ``adaptive`` with ``million.py``'s settings, ``exhaustive``) on the same q-nets:

- ``single``: the unsharded index, ``mode.search(qnets, Corpus(vectors, ann=index.ip_index), k)``;
- ``local-N``: ``LocalShards(...).search(qnets, k, mode)``, the N shards one after another in this process;
- ``ray-N``: ``RayShards``, one actor per shard, the N actors sharing ``--threads`` CPUs.

Configurations are interleaved per q-net and mode; the best of ``--repeats`` counts. Reported per configuration:
ms/query in batches of 32, recall@10 / @100 against exhaustive search of the single index (``million.py``'s cached
ground truth, computed when missing), documents scored per query, whether every merged list is in the total order
(score descending, row ascending among ties), and whether rows and scores equal the single index's; and Ray's time
over the in-process time at each shard count. Each shard runs its own adaptive rounds, so N shards score about N
times the documents.

    python benchmarks/million_sharded.py           # after million.py: splits its index once (about 10 minutes)
    python benchmarks/million_sharded.py --quick   # million.py --quick's 12,000-document index (built if missing)
    python benchmarks/million_sharded.py --index .cache/benchmarks/debian-minilm-mean256.hyp --cache .cache/sharded \\
        --modes exhaustive --shards 1,2 --qnets head2 --queries 256 --repeats 3      # Ray's overhead
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
from common import (
    cost,
    default_out,
    encode_queries,
    fingerprint,
    ground_truth,
    load_model,
    machine,
    million_paths,
    million_quick_setup,
    read_qrels,
    read_queries,
    recall,
    rel,
)

K = 100
MODES = ('adaptive', 'exhaustive')


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
    """The index split into ``n_shards`` row ranges (cached under ``path``) and the seconds the split took."""
    from pyterrier_hypencoder import ShardedHypencoderIndex, split_index
    if (path / 'pt_meta.json').exists():
        sharded = ShardedHypencoderIndex(path)
        if (len(sharded), sharded.n_shards, sharded.meta.get('model')) == (len(index), n_shards, index.meta.get('model')):
            return sharded, None
    started = time.perf_counter()
    # Aligned to the GPU's exhaustive scoring block (a multiple of the CPU's), the shards score bit for bit as the
    # single index; an index too small for that is cut at 1,024 (the CPU's block), or anywhere.
    align = next((a for a in (4096, 1024) if len(index) >= a * n_shards), 1)
    sharded = split_index(index, path, n_shards=n_shards, align=align, graph=False, overwrite=True)
    return sharded, time.perf_counter() - started


def mode_named(name: str, args):
    """The search mode every configuration runs: exhaustive, or adaptive with the run's settings."""
    from pyterrier_hypencoder.search.modes import Adaptive, Exhaustive
    if name == 'exhaustive':
        return Exhaustive()
    return Adaptive(n_sample=args.n_sample, pool=args.pool, n_entry=args.n_entry, max_rounds=args.max_rounds,
                    refreshes=args.refreshes)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--index', default=None, help='default .cache/million/minilm-mean256.hyp')
    parser.add_argument('--heads', default=None, help='default .cache/million/heads (million_heads.py\'s)')
    parser.add_argument('--cache', default=None, help='million.py\'s cache: ground truth, and the shards made here')
    parser.add_argument('--out', default=None, help='results JSON (default benchmarks/results/million_sharded.json; '
                        '--quick: .cache/million-quick/million_sharded.json)')
    parser.add_argument('--shards', default='4', help='shard counts, comma-separated (default 4)')
    parser.add_argument('--modes', default='adaptive', help=f'search modes, comma-separated, from {",".join(MODES)}')
    parser.add_argument('--qnets', default='head2,head6,untrained6')
    parser.add_argument('--queries', type=int, default=200)
    parser.add_argument('--repeats', type=int, default=1, help='timed runs of every configuration; the best counts')
    parser.add_argument('--deep-truth', type=int, default=2000, help='as million.py (it names the cached truth)')
    parser.add_argument('--threads', type=int, default=2, help='cores for the single index and the whole Ray cluster')
    parser.add_argument('--n-sample', type=int, default=128)
    parser.add_argument('--pool', type=int, default=1024)
    parser.add_argument('--n-entry', type=int, default=None,
                        help='pool documents scored per round (default: the whole pool)')
    parser.add_argument('--max-rounds', type=int, default=32)
    parser.add_argument('--refreshes', type=int, default=1)
    parser.add_argument('--quick', action='store_true', help='million.py --quick\'s index and heads, 50 queries, '
                        '1 and 2 shards, both modes')
    parser.add_argument('--quick-docs', type=int, default=12000)
    args = million_paths(parser.parse_args(argv))
    if args.quick:
        args.queries, args.shards, args.modes = 50, '1,2', ','.join(MODES)
    try:
        args.shard_counts = [int(n) for n in args.shards.split(',')]
    except ValueError:
        parser.error(f'--shards takes shard counts such as 4 or 1,2; got {args.shards!r}')
    if any(n < 1 for n in args.shard_counts):
        parser.error(f'--shards: every count must be at least 1; got {args.shards!r}')
    args.mode_names = args.modes.split(',')
    unknown = sorted(set(args.mode_names) - set(MODES))
    if unknown:
        parser.error(f'--modes: unknown {unknown}; choose from {list(MODES)}')
    args.out = default_out(args.out, args.quick, 'million_sharded.json', 'million-quick/million_sharded.json')
    return args


def table(results: dict) -> str:
    """The run in Markdown: one row per q-net, mode and configuration."""
    lines = [f'{results["documents"]:,} documents; {results["queries"]} queries, k={results["k"]}, '
             f'{results["machine"]["threads"]} threads in all ({results["machine"]["cpu"]}); load average before '
             f'{results["load_before"][0]:.2f}, after {results["load_after"][0]:.2f}', '',
             '| q-net | mode | config | ms/q b32 | docs scored | R@10 | R@100 | total order | = single (rows / scores) '
             '| Ray / local |', '|---|---|---|---|---|---|---|---|---|---|']
    for row in results['rows']:
        for name, c in row['configs'].items():
            ratio = row['ray_over_local'].get(name.split('-')[-1]) if name.startswith('ray-') else None
            lines.append(f'| {row["qnet"]} | {row["mode"]} | {name} | {c["ms_b32"]:.1f} | {c["docs_scored"]:,.0f} | '
                         f'{c["recall@10"]:.3f} | {c["recall@100"]:.3f} | {c["total_order"]} | '
                         f'{c["same_rows"]} / {c["same_scores"]} | {"-" if ratio is None else f"{ratio:.2f}"} |')
    return '\n'.join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from pyterrier_hypencoder.optional import require
    require('ray', purpose='benchmarks/million_sharded.py')
    import ray

    from pyterrier_hypencoder import HypencoderIndex
    from pyterrier_hypencoder.distributed.ray_backend import RayShards
    from pyterrier_hypencoder.distributed.shards import LocalShards
    from pyterrier_hypencoder.search.modes import Corpus
    if args.quick:
        million_quick_setup(args.index, args.heads, args.quick_docs, args.threads, args.qnets.split(','))
    index = HypencoderIndex(args.index)
    if not index.built():
        raise SystemExit(f'no index at {args.index}: build it with python examples/index_million.py (or pass --quick)')
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    sharded, split_seconds = {}, {}
    for n in args.shard_counts:
        sharded[n], split_seconds[n] = shards_of(index, cache / f'sharded-{n}', n)
        print(f'{len(index):,} documents in {n} shards of {[s["count"] for s in sharded[n].meta["shards"]]}'
              + (f' (split in {split_seconds[n]:.0f} s)' if split_seconds[n] else ''), flush=True)
    texts, relevant = read_queries(), read_qrels(split='test')
    qids = list(relevant)[:args.queries]
    texts = [texts[q] for q in qids]
    x = np.ascontiguousarray(index.vectors(), dtype=np.float32)
    single = Corpus(x, ann=index.ip_index if index.has_ip_index() else None)
    modes = {name: mode_named(name, args) for name in args.mode_names}
    results = {'benchmark': 'million_sharded', 'argv': sys.argv[1:] if argv is None else list(argv),
               'machine': machine(), 'index': rel(Path(args.index)), 'documents': len(index),
               'ann': index.has_ip_index(), 'shards': {n: [s['count'] for s in sharded[n].meta['shards']]
                                                       for n in args.shard_counts},
               'split_seconds': split_seconds, 'queries': len(qids), 'k': K, 'repeats': args.repeats,
               'modes': {name: repr(mode) for name, mode in modes.items()}, 'load_before': os.getloadavg(), 'rows': []}
    names = args.qnets.split(',')
    qnets_of = {name: encode_queries(load_model('untrained6' if name == 'untrained6' else Path(args.heads) / name),
                                     texts) for name in names}
    truths = {name: ground_truth(name, qnets_of[name], x, len(index), cache, k=args.deep_truth)[0] for name in names}
    # Ray's CPUs are logical: every configuration's actors live through the run, each reserving its share of
    # --threads, but only one configuration searches at a time.
    ray.init(num_cpus=args.threads * len(args.shard_counts), include_dashboard=False, log_to_driver=False)
    cpu, f32 = torch.device('cpu'), torch.float32
    backends = {}
    for n in args.shard_counts:
        backends[f'local-{n}'] = LocalShards(sharded[n], cpu, f32)
        backends[f'ray-{n}'] = RayShards(sharded[n], None, cpu, f32, num_cpus=args.threads / n)
    runs = {'single': lambda q, mode: mode.search(q, single, K),
            **{name: (lambda q, mode, b=b: b.search(q, K, mode)) for name, b in backends.items()}}
    with torch.inference_mode():
        for name in names:
            qnets, exact = qnets_of[name], truths[name][:, :K]
            for mode_name, mode in modes.items():
                row = {'qnet': name, 'mode': mode_name, 'qnets_sha256': fingerprint(qnets)[:16], 'configs': {}}
                seconds, found = {run: [] for run in runs}, {}
                for run in runs.values():  # warm-up: page cache, actors' first calls
                    run(qnets[:32], mode)
                for _ in range(args.repeats):
                    for run_name, run in runs.items():  # interleaved, so a change in load hits every one alike
                        started = time.perf_counter()
                        found[run_name] = [run(qnets[s:s + 32], mode) for s in range(0, len(qnets), 32)]
                        seconds[run_name].append(time.perf_counter() - started)
                ref_scores = torch.cat([p.scores for p in found['single']]).numpy()
                ref_ids = torch.cat([p.ids for p in found['single']]).numpy()
                for run_name, parts in found.items():
                    scores = torch.cat([p.scores for p in parts]).numpy()
                    ids = torch.cat([p.ids for p in parts]).numpy()
                    row['configs'][run_name] = {
                        'ms_b32': 1e3 * min(seconds[run_name]) / len(qnets), 'seconds_all': seconds[run_name],
                        'recall@10': recall(ids, exact, 10), 'recall@100': recall(ids, exact, 100),
                        'docs_scored': float(np.concatenate([cost(p, 'n_scored') for p in parts]).mean()),
                        'total_order': in_total_order(scores, ids), 'same_rows': bool(np.array_equal(ids, ref_ids)),
                        'same_scores': bool(np.array_equal(scores, ref_scores)),
                        'max_abs_score_diff': float(np.nanmax(np.abs(np.where(np.isfinite(scores), scores, 0) -
                                                                     np.where(np.isfinite(ref_scores), ref_scores, 0))))}
                row['ray_over_local'] = {str(n): min(seconds[f'ray-{n}']) / min(seconds[f'local-{n}'])
                                         for n in args.shard_counts}
                row['ray_same_as_local'] = {str(n): bool(np.array_equal(
                    torch.cat([p.ids for p in found[f'ray-{n}']]).numpy(),
                    torch.cat([p.ids for p in found[f'local-{n}']]).numpy())) for n in args.shard_counts}
                row['load'] = os.getloadavg()[0]
                results['rows'].append(row)
                c = row['configs']
                print(f'{name} {mode_name}: recall@10 ' + ', '.join(f'{k} {v["recall@10"]:.3f}' for k, v in c.items())
                      + '; ms/query (b32) ' + ', '.join(f'{k} {v["ms_b32"]:.1f}' for k, v in c.items()), flush=True)
    for name, backend in backends.items():
        if name.startswith('ray-'):
            backend.close()
    ray.shutdown()
    results['load_after'] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(table(results))
    print(f'wrote {rel(args.out)}')
    return results


if __name__ == '__main__':
    main()

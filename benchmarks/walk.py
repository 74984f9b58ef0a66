"""Adaptive search, the paper's graph walk and the two-stage surrogate baseline against exhaustive search, as n grows.

Corpus: a BEIR-layout folder (``--data``, default ``../shared/datasets/debian-packages``) whose documents were indexed
into a HypencoderIndex (``--index``) or, while one is still being written, the first ``--limit`` rows of its raw
``vecs.f4`` (``--vectors``; rows in corpus.jsonl order). Nested random subsamples (``--sizes``) get their own exact
100-NN L2 graphs (cached in ``--cache``). Queries: the first ``--queries`` test queries whose relevant document is in
the smallest subsample, so nDCG@10 / RR@10 mean the same at every size.

Every search runs through the package's dispatch (``make_mode(...).search``): ``exhaustive``, ``algorithm1`` (mode
``graph``: the paper's walk; a setting may add ``max_iter``, ``early_stopping`` and ``neighbours``, the nearest that
many of each document's 100 graph neighbours), ``surrogate`` and, for every other method name, ``adaptive``. For every
setting: recall@10 / @100 against exhaustive top-100, nDCG@10 and RR@10 against the qrels, q-net evaluations per
query (mean, p95) and ms per query in batches of 32. Each method's cheapest setting at recall@10 0.95 / 0.99 is timed
again one query at a time. ``walk_report.py`` makes the tables, power-law fits and plot.

    python benchmarks/walk.py --quick      # indexes debian's first 3,000 documents here; one setting per method
    python benchmarks/walk.py --index .cache/debian/minilm-mean256.hyp --model untrained6 \\
        --model path/to/trained/hypencoder --sizes 5000,10000,20000,45741
    python benchmarks/walk.py --data ../shared/datasets/beir/scifact --index .cache/quickstart/scifact.hypencoder \\
        --model runs/train_beir/scifact/hypencoder/best --sizes 5183 --queries 300 --sweep graph   # walk settings
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
    CACHE,
    DEBIAN,
    cost,
    default_out,
    encode_queries,
    load_model,
    machine,
    mean_or_none,
    minilm_path,
    per_batch,
    rank_quality,
    read_docs,
    read_qrels,
    read_queries,
    recall,
    rel,
)

K = 100
TARGETS = (0.95, 0.99)

# method -> settings (keyword arguments of its mode)
SWEEPS = {
    'algorithm1': [dict(n_initial=1000, n_candidates=16), dict(n_initial=4000, n_candidates=32),
                   dict(n_initial=10000, n_candidates=64)],
    'surrogate': [dict(n_sample=s, n_entry=m) for s in (128, 256, 512, 1024) for m in (128, 256, 512, 1024, 1536)],
    'adaptive': [dict(n_sample=s, n_entry=m, max_rounds=32, stop_k=t) for t in (10, 20, 50, 100)
                 for s, m in ((64, 32), (128, 64))] + [dict(n_sample=s, n_entry=m, max_rounds=32, stop_k=100)
                                                       for s, m in ((128, 32), (256, 64))],
    'adaptive+walk': [dict(n_sample=128, n_entry=64, max_rounds=16, expand=4, ef=100)],
    'walk, surrogate entries': [dict(n_sample=128, n_entry=64, max_rounds=1, expand=4, ef=100)],
    'walk, random entries': [dict(n_sample=512, n_entry=0, max_rounds=0, expand=4, ef=100)],
}
# The paper's walk scaled down to a corpus of a few thousand documents: n_initial, n_candidates, max_iter,
# early stopping, neighbours used (--sweep graph).
GRAPH_SETTINGS = [
    (100, 4, 16, True, 100), (100, 8, 16, True, 100), (200, 8, 16, True, 100), (200, 16, 16, True, 100),
    (500, 16, 16, True, 100), (200, 8, 16, False, 100), (200, 8, 4, False, 100), (100, 16, 16, True, 32),
    (200, 16, 16, True, 32), (200, 32, 16, True, 16), (500, 32, 16, True, 16), (1000, 64, 16, True, 100),
]
PRESETS = {'default': SWEEPS, 'graph': {'algorithm1': [
    dict(zip(('n_initial', 'n_candidates', 'max_iter', 'early_stopping', 'neighbours'), s)) for s in GRAPH_SETTINGS]}}
# A method's search mode; every other method name is an adaptive setting.
MODE_OF = {'exhaustive': 'exhaustive', 'algorithm1': 'graph', 'surrogate': 'surrogate'}


def load_vectors(args):
    """The corpus' vectors (float32) and docnos, in row order."""
    if args.index:
        from pyterrier_hypencoder import HypencoderIndex
        index = HypencoderIndex(args.index)
        if not index.built():
            raise SystemExit(f'no index at {args.index}: build one of {args.data} (or pass --quick)')
        vectors = np.asarray(index.vectors(), dtype=np.float32)
        return vectors, [str(d) for d in index.docnos.fwd[np.arange(len(vectors))]]
    raw = np.memmap(args.vectors, dtype=np.float32, mode='r')
    n = min(args.limit or len(raw) // args.dim, len(raw) // args.dim)
    return np.array(raw[:n * args.dim]).reshape(n, args.dim), [d['docno'] for d in read_docs(args.data, n)]


def pick_queries(folder, docnos_small: set, n: int):
    """The first ``n`` test queries with a relevant document in ``docnos_small``: ids, texts, relevant docnos."""
    texts, relevant = read_queries(folder), read_qrels(folder, 'test')
    picked = [qid for qid in relevant if relevant[qid] & docnos_small][:n]
    return picked, [texts[q] for q in picked], {q: relevant[q] for q in picked}


def graph_for(x: np.ndarray, key: str, cache: Path) -> np.ndarray:
    """The exact ``K``-NN L2 graph of ``x``, cached under ``key``."""
    from pyterrier_hypencoder.index.graph import exact_neighbours
    path = cache / f'graph-{key}.npy'
    if path.exists():
        return np.load(path)
    edges = exact_neighbours(x, np.arange(len(x)), K)[0]
    np.save(path, edges)
    return edges


def mode_and_corpus(method: str, setting: dict, corpus):
    """The search mode of a setting, and the corpus it searches (its graph cut to ``neighbours`` when given)."""
    from pyterrier_hypencoder.search.modes import Corpus, make_mode
    options = {key: value for key, value in setting.items() if key != 'neighbours'}
    mode = make_mode(MODE_OF.get(method, 'adaptive'), **options)
    neighbours = setting.get('neighbours')
    if neighbours is not None and neighbours < corpus.edges().shape[1]:
        corpus = Corpus(corpus.vectors, edges=np.ascontiguousarray(corpus.edges()[:, :neighbours]))
    return mode, corpus


def run(method: str, setting: dict, qnets, corpus, batch: int):
    """One setting over every query, ``batch`` at a time: row ids, per-query costs (None where not reported)
    and the seconds spent searching."""
    mode, corpus = mode_and_corpus(method, setting, corpus)
    parts, seconds = per_batch(lambda q: mode.search(q, corpus, K), qnets, batch)
    ids = np.concatenate([p.ids.numpy() for p in parts])
    scored = np.concatenate([cost(p, 'n_scored') for p in parts])
    return ids, scored, [cost(p, 'n_inner') for p in parts], [cost(p, 'n_iter') for p in parts], float(seconds.sum())


def cheapest(rows, method, target):
    ok = [r for r in rows if r['method'] == method and r['recall@10'] >= target]
    return min(ok, key=lambda r: r['docs']) if ok else None


def build_index(path: Path, data, n=None) -> str:
    """An index of the first ``n`` documents of ``data`` (all when None; corpus order), built once: all-MiniLM-L6-v2
    with mean pooling and 256 document tokens (the head does not change document vectors), no graph."""
    from pyterrier_hypencoder import HypencoderIndex, HypencoderIndexer
    if not HypencoderIndex(path).built():
        from pyterrier_hypencoder.train import warm_start_hypencoder
        model = warm_start_hypencoder(minilm_path('benchmarks/walk.py --build'), qnet_layers=2, doc_max_length=256,
                                      device='cpu')
        HypencoderIndexer(model, path, neighbours=0, verbose=True, overwrite=True).index(read_docs(data, n))
    return str(path)


def check_sweep(parser, sweep: str) -> dict:
    """The sweep ``--sweep`` names (a preset, or JSON of ``{method: [settings]}``), every setting checked by its mode."""
    if sweep in PRESETS:
        return PRESETS[sweep]
    try:
        sweeps = json.loads(sweep)
    except json.JSONDecodeError as e:
        parser.error(f'--sweep is neither a preset ({", ".join(PRESETS)}) nor JSON: {e}')
    if not isinstance(sweeps, dict) or not all(isinstance(v, list) and all(isinstance(s, dict) for s in v)
                                               for v in sweeps.values()):
        parser.error('--sweep must map each method to a list of settings, e.g. \'{"adaptive": [{"n_sample": 128}]}\'')
    from pyterrier_hypencoder.search.modes import make_mode
    for method, settings in sweeps.items():
        for setting in settings:
            try:
                make_mode(MODE_OF.get(method, 'adaptive'), **{k: v for k, v in setting.items() if k != 'neighbours'})
            except (TypeError, ValueError) as e:
                parser.error(f'--sweep {method} {setting}: {e}')
    return sweeps


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data', default=str(DEBIAN), help='BEIR-layout folder of the corpus (default debian-packages)')
    parser.add_argument('--index', default=None)
    parser.add_argument('--build', action='store_true', help='build --index from --data first when it is missing (its '
                        'first --limit documents; MiniLM, mean pooling, 256 tokens; 10-20 minutes for debian-packages)')
    parser.add_argument('--vectors', default=None, help='raw float32 vecs.f4 of an index still being written')
    parser.add_argument('--limit', type=int, default=None)
    parser.add_argument('--dim', type=int, default=384)
    parser.add_argument('--model', action='append', default=None, help='untrained6 or a Hypencoder folder; repeat')
    parser.add_argument('--name', action='append', default=None, help='display name per --model')
    parser.add_argument('--sizes', default='5000,10000,20000')
    parser.add_argument('--queries', type=int, default=64)
    parser.add_argument('--latency-queries', type=int, default=4)
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--cache', default=None, help='graphs per size (default .cache/walk; --quick .cache/walk-quick)')
    parser.add_argument('--sweep', default=None,
                        help=f'JSON {{method: [settings]}} or a preset ({", ".join(PRESETS)}) to run instead of the '
                             'default sweeps (exhaustive always runs)')
    parser.add_argument('--out', default=None, help='results JSON (default benchmarks/results/walk.json; with --quick '
                        '.cache/walk-quick/walk.json)')
    parser.add_argument('--quick', action='store_true', help='debian\'s first 3,000 documents indexed here, untrained6, '
                        '16 queries, the first setting of each method')
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.sizes, args.queries, args.latency_queries = args.model or ['untrained6'], '1000,3000', 16, 2
        args.sweep = args.sweep or json.dumps({method: settings[:1] for method, settings in SWEEPS.items()})
    if not args.model:
        parser.error('--model is required (untrained6 or a Hypencoder folder), unless --quick')
    if args.name and len(args.name) != len(args.model):
        parser.error(f'--name given {len(args.name)} times for {len(args.model)} --model; give one per --model')
    if args.build and not args.index:
        parser.error('--build needs --index PATH: where to build the index')
    if not (args.index or args.vectors or args.quick):
        parser.error('pass --index PATH (or --vectors of an index being written), or --quick')
    args.sweeps = check_sweep(parser, args.sweep or 'default')
    args.cache = Path(args.cache or CACHE / ('walk-quick' if args.quick else 'walk'))
    args.out = default_out(args.out, args.quick, 'walk.json', 'walk-quick/walk.json')
    return args


def main(argv=None):
    from pyterrier_hypencoder.search.modes import Corpus
    args = parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    # Indexed on torch's default threads, as users index.
    if args.quick and not (args.index or args.vectors):
        args.index = build_index(args.cache / 'debian-3000.hyp', DEBIAN, 3000)
    elif args.build and args.index:
        build_index(Path(args.index), args.data, args.limit)
    torch.set_num_threads(args.threads)
    full, all_docnos = load_vectors(args)
    sizes = [min(int(s), len(full)) for s in args.sizes.split(',')]
    perm = np.random.default_rng(0).permutation(len(full))
    subsets = {n: np.sort(perm[:n]) for n in sizes}  # nested: each is a prefix of one permutation
    picked, texts, relevant = pick_queries(args.data, {all_docnos[i] for i in subsets[min(sizes)]}, args.queries)
    names = args.name or args.model
    results = {'data': rel(args.data), 'n_full': len(full), 'sizes': sizes, 'queries': len(picked),
               'threads': args.threads, 'k': K, 'argv': sys.argv[1:] if argv is None else list(argv),
               'machine': machine(), 'load_before': os.getloadavg(), 'models': {}}
    started = time.time()
    for spec, name in zip(args.model, names):
        qnets = encode_queries(load_model(spec), texts)
        per_size = {}
        for n in sizes:
            x = np.ascontiguousarray(full[subsets[n]])
            docnos = [all_docnos[i] for i in subsets[n]]
            corpus = Corpus(x, edges=graph_for(x, f'{Path(args.data).name}-{len(full)}-{n}', args.cache))
            corpus.exact_ip()  # the surrogates' exact inner-product index, built before anything is timed
            rows = []
            with torch.inference_mode():
                exact, scored, inner, iters, secs = run('exhaustive', {}, qnets, corpus, 32)
                alone = run('exhaustive', {}, qnets[:args.latency_queries], corpus, 1)[-1]
                rows.append(dict(method='exhaustive', setting={}, docs=float(scored.mean()), docs_p95=float(n),
                                 inner=mean_or_none(inner), iters=mean_or_none(iters), ms=1e3 * secs / len(picked),
                                 ms_single=1e3 * alone / args.latency_queries,
                                 **{f'recall@{k}': recall(exact, exact, k) for k in (10, 100)},
                                 **rank_quality(exact, docnos, picked, relevant)))
                for method, settings in args.sweeps.items():
                    for setting in settings:
                        ids, scored, inner, iters, secs = run(method, setting, qnets, corpus, 32)
                        rows.append(dict(method=method, setting=setting, docs=float(scored.mean()),
                                         docs_p95=float(np.percentile(scored, 95)), inner=mean_or_none(inner),
                                         iters=mean_or_none(iters), ms=1e3 * secs / len(picked),
                                         **{f'recall@{k}': recall(ids, exact, k) for k in (10, 100)},
                                         **rank_quality(ids, docnos, picked, relevant)))
                        print(f'{name} n={n} {method} {setting}: R@10 {rows[-1]["recall@10"]:.3f} docs '
                              f'{rows[-1]["docs"]:.0f} {rows[-1]["ms"]:.1f} ms/q', flush=True)
                # Single-query latency of each method's read-off settings.
                for method in args.sweeps:
                    for target in TARGETS:
                        best = cheapest(rows, method, target)
                        if best is not None and 'ms_single' not in best:
                            best['ms_single'] = 1e3 * run(method, best['setting'], qnets[:args.latency_queries],
                                                          corpus, 1)[-1] / args.latency_queries
            per_size[n] = rows
            results['models'][name] = per_size
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1))  # partial results survive an interrupted run
    results['seconds'] = time.time() - started
    results['load_after'] = os.getloadavg()
    args.out.write_text(json.dumps(results, indent=1))
    print(f'wrote {rel(args.out)} in {results["seconds"]:.0f} s; load {os.getloadavg()}')


if __name__ == '__main__':
    main()

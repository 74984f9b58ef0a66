"""Tables, power-law fits and the plot from ``benchmarks/walk.py`` results (one JSON per model, or one with several).

    python benchmarks/walk_report.py benchmarks/results/walk-*.json --plot benchmarks/results/walk.png > report.md

For each model and corpus size, each method's cheapest setting at recall@10 >= 0.95 and >= 0.99 against exhaustive
search: documents scored per query (mean, p95), how many times fewer than exhaustive, than the two-stage surrogate
baseline and than Algorithm 1 (the paper's walk) at the same target, time per query (batches of 32 and alone) and
time per scored document relative to exhaustive search's. Then ``docs = a * n ** b`` fitted by least squares on
log-log over the sizes where a method reached the target, extrapolated to 1M and 8.8M documents.
"""
from __future__ import annotations

import argparse
import json
import math

TARGETS = (0.95, 0.99)
EXTRAPOLATE = (45_741, 1_000_000, 8_841_823)  # the whole debian-packages corpus, 1M, MS MARCO's 8.8M passages


def cheapest(rows, method, target):
    ok = [r for r in rows if r['method'] == method and r['recall@10'] >= target]
    return min(ok, key=lambda r: r['docs']) if ok else None


def fit_power(points):
    """Least-squares ``log docs = log a + b log n``; None with fewer than two sizes."""
    if len(points) < 2:
        return None
    xs = [math.log(n) for n, _ in points]
    ys = [math.log(d) for _, d in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return math.exp(my - b * mx), b


def _num(value, spec: str) -> str:
    """A figure, or '-' where the run did not report it (inner products and rounds of the search dispatch)."""
    return '-' if value is None else format(value, spec)


def _setting(s):
    return ' '.join(f'{k}={v}' for k, v in s.items()) or '-'


def report(data):
    lines = []
    for model, per_size in data['models'].items():
        sizes = sorted(per_size, key=int)
        methods = list(dict.fromkeys(r['method'] for r in per_size[sizes[0]] if r['method'] != 'exhaustive'))
        lines.append(f'\n### {model}\n')
        for n in sizes:
            rows = per_size[n]
            ex = rows[0]
            us_ex = 1e3 * ex['ms'] / ex['docs']
            us_ex1 = 1e3 * ex['ms_single'] / ex['docs']
            lines.append(f'\n**{int(n):,} documents** (exhaustive: {ex["ms"]:.1f} ms/query in batches of 32, '
                         f'{ex["ms_single"]:.1f} ms alone; nDCG@10 {ex["ndcg@10"]:.3f}, RR@10 {ex["rr@10"]:.3f})\n')
            lines.append('| target | method | docs scored (p95) | fewer than exhaustive | vs surrogate baseline '
                         '| vs Algorithm 1 | R@10 | R@100 | nDCG@10 | inner products | iters | ms/q (32) | ms alone '
                         '| time/doc vs exhaustive (32; alone) | setting |')
            lines.append('|' + '---|' * 15)
            for target in TARGETS:
                base = cheapest(rows, 'surrogate', target)
                alg1 = cheapest(rows, 'algorithm1', target)
                for method in methods:
                    r = cheapest(rows, method, target)
                    if r is None:
                        best = max((x for x in rows if x['method'] == method), key=lambda x: x['recall@10'])
                        lines.append(f'| {target} | {method} | not reached (best R@10 {best["recall@10"]:.3f} at '
                                     f'{best["docs"]:.0f} docs) |' + ' |' * 13)
                        continue
                    vs_base = f'{base["docs"] / r["docs"]:.2f}x' if base else 'baseline n/a'
                    vs_alg1 = f'{alg1["docs"] / r["docs"]:.1f}x' if alg1 else 'Alg. 1 never reaches it'
                    single = r.get('ms_single')
                    t32 = 1e3 * r['ms'] / r['docs'] / us_ex
                    t1 = f'{1e3 * single / r["docs"] / us_ex1:.2f}' if single else '-'
                    lines.append(
                        f'| {target} | {method} | {r["docs"]:,.0f} ({r["docs_p95"]:,.0f}) | {ex["docs"] / r["docs"]:.1f}x '
                        f'| {vs_base} | {vs_alg1} | {r["recall@10"]:.3f} | {r["recall@100"]:.3f} | {r["ndcg@10"]:.3f} '
                        f'| {_num(r.get("inner"), ",.0f")} | {_num(r.get("iters"), ".1f")} | {r["ms"]:.1f} | '
                        f'{"-" if single is None else f"{single:.1f}"} | {t32:.2f}; {t1} | {_setting(r["setting"])} |')
        lines.append(f'\n**Growth of documents scored with corpus size, {model}** (fit over the sizes where the method '
                     'reached the target; the 45,741, 1M and 8.8M columns are EXTRAPOLATIONS, not measurements)\n')
        lines.append('| method | target | exponent b | a | sizes fitted | docs at 45,741 (extrap.) | at 1M (extrap.) '
                     '| at 8.8M (extrap.) |')
        lines.append('|---|---|---|---|---|---|---|---|')
        for method in methods:
            for target in TARGETS:
                pts = [(int(n), r['docs']) for n in sizes if (r := cheapest(per_size[n], method, target))]
                fit = fit_power(pts)
                if fit is None:
                    lines.append(f'| {method} | {target} | - (reached at {len(pts)} sizes) | | | | | |')
                    continue
                a, b = fit
                ext = ' | '.join(f'{a * m ** b:,.0f}' for m in EXTRAPOLATE)
                lines.append(f'| {method} | {target} | {b:.2f} | {a:.3g} | {len(pts)} | {ext} |')
    return '\n'.join(lines)


def summary(data):
    """One row per q-net, size and target: the three contenders' cheapest settings, in documents scored."""
    lines = ['| q-net | docs | target | Algorithm 1 | surrogate baseline | adaptive | adaptive vs exhaustive '
             '| adaptive vs baseline | time/doc vs exhaustive, batch 32 (adaptive; baseline) |',
             '|---|---|---|---|---|---|---|---|---|']
    for model, per_size in data['models'].items():
        for n in sorted(per_size, key=int):
            rows = per_size[n]
            us_ex = rows[0]['ms'] / rows[0]['docs']
            for target in TARGETS:
                best = {m: cheapest(rows, m, target) for m in ('algorithm1', 'surrogate', 'adaptive')}
                cells = [f'{best[m]["docs"]:,.0f}' if best[m] else 'not reached' for m in best]
                ada, base = best['adaptive'], best['surrogate']
                fewer = f'{rows[0]["docs"] / ada["docs"]:.1f}x' if ada else '-'
                vs = f'{base["docs"] / ada["docs"]:.2f}x' if ada and base else '-'
                t = '; '.join(f'{r["ms"] / r["docs"] / us_ex:.1f}' if r else '-' for r in (ada, base))
                lines.append(f'| {model} | {int(n):,} | {target} | ' + ' | '.join(cells) + f' | {fewer} | {vs} | {t} |')
    return '\n'.join(lines)


def plot(data, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter
    models = list(data['models'])
    sizes = sorted(data['models'][models[0]], key=int)
    fig, axes = plt.subplots(len(models), len(sizes), figsize=(4 * len(sizes), 3.2 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        for j, n in enumerate(sizes):
            ax = axes[i][j]
            rows = data['models'][model][n]
            for method in dict.fromkeys(r['method'] for r in rows if r['method'] != 'exhaustive'):
                pts = sorted((r['docs'], r['recall@10']) for r in rows if r['method'] == method)
                front, best = [], -1.0
                for d, rc in pts:  # the method's Pareto frontier: more documents must buy more recall
                    if rc > best:
                        front.append((d, rc))
                        best = rc
                ax.plot([p[0] for p in front], [p[1] for p in front], marker='o', ms=3, label=method)
            ax.axhline(0.95, color='grey', lw=0.5, ls='--')
            ax.axhline(0.99, color='grey', lw=0.5, ls=':')
            ax.set_xscale('log')
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f'{v:,.0f}'))
            ax.set_ylim(0.5, 1.005)
            ax.set_title(f'{model}, {int(n):,} docs', fontsize=9)
            ax.set_xlabel('documents scored per query', fontsize=8)
            ax.set_ylabel('recall@10 vs exhaustive', fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=6, loc='lower right')
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('results', nargs='+', help='walk.py results (JSON); runs of the same q-net are merged')
    parser.add_argument('--plot', default=None, help='write the PNG here')
    parser.add_argument('--summary', action='store_true', help='print only the one-table summary')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    merged = None
    for path in args.results:
        data = json.load(open(path))
        if merged is None:
            merged = data
        else:
            for model, per_size in data['models'].items():
                if model not in merged['models']:
                    merged['models'][model] = per_size
                    continue
                # A later run of the same q-net adds its settings (its own exhaustive row is dropped).
                for n, rows in per_size.items():
                    merged['models'][model].setdefault(n, rows[:1]).extend(rows[1:])
    print(f'{merged["queries"]} queries, k={merged["k"]}, {merged["threads"]} thread(s); corpus of '
          f'{merged["n_full"]:,} documents, nested random subsamples {merged["sizes"]}')
    if args.summary:
        print(summary(merged))
        return
    print(report(merged))
    if args.plot:
        plot(merged, args.plot)


if __name__ == '__main__':
    main()

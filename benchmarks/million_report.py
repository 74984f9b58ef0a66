"""Markdown tables from ``benchmarks/million.py`` results (and ``million_sharded.py``'s, when given).

    python benchmarks/million_report.py benchmarks/results/million.json
    python benchmarks/million_report.py benchmarks/results/million.json --sharded benchmarks/results/million_sharded.json

For each corpus size and q-net: exhaustive ms/query (batch 32, batch 1); adaptive ms/query (batch 32; batch 1 p50
and p95); speed-ups; documents scored; recall@10 / @100 against exhaustive search; RR@10 of both; the FAISS
BE-Base search's latency and RR@10. Then the growth exponents and, where a sharded run is given, its recall against
the single index's.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def fmt(value, digits=1):
    return '-' if value is None else f'{value:,.{digits}f}'


def size_table(results: dict, n: int) -> list:
    rows = [r for r in results['rows'] if r['n'] == n]
    lines = [f'**{n:,} documents**', '',
             '| q-net | exhaustive ms/q b32 / b1 | adaptive ms/q b32 | adaptive b1 p50 / p95 | speed-up b32 / b1 '
             '| docs scored | R@10 | R@100 | RR@10 exhaustive / adaptive |',
             '|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        if r['qnet'] == 'bebase-faiss':
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
    return lines + ['']


def exponents(results: dict) -> list:
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


def sharded_table(sharded: dict) -> list:
    lines = [f'**{sharded["documents"]:,} documents in {len(sharded["shards"])} shards** (Ray on this machine, '
             f'{sharded["machine"]["threads"]} threads in all):', '',
             '| q-net | R@10 single / local shards / Ray shards | R@100 single / Ray shards | ms/q b32 single / local / '
             'Ray | docs scored single / shards | total order | Ray = local |', '|---|---|---|---|---|---|---|']
    for r in sharded['rows']:
        s, lo, ray = r['single'], r['local'], r['ray']
        lines.append(f'| {r["qnet"]} | {s["recall@10"]:.3f} / {lo["recall@10"]:.3f} / {ray["recall@10"]:.3f} | '
                     f'{s["recall@100"]:.3f} / {ray["recall@100"]:.3f} | {fmt(s["ms_b32"])} / {fmt(lo["ms_b32"])} / '
                     f'{fmt(ray["ms_b32"])} | {fmt(s["docs_scored"], 0)} / {fmt(ray["docs_scored"], 0)} | '
                     f'{all(x["total_order"] for x in (s, lo, ray))} | {r["ray_same_as_local"]} |')
    return lines + ['']


def report(results: dict, sharded: dict | None = None) -> str:
    m = results['machine']
    lines = [f'Machine: {m["cpu"]}, {m["threads"]} threads ({m["cpu_capability"]}), torch {m["torch"]}; '
             f'{results["queries"]} debian test queries, k={results["k"]}; load average before '
             f'{results["load_before"][0]:.2f}, after {results.get("load_after", [float("nan")])[0]:.2f}.', '']
    for n in results['sizes']:
        lines += size_table(results, n)
    lines += exponents(results)
    if sharded:
        lines += sharded_table(sharded)
    return '\n'.join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('results', help='million.py\'s JSON')
    parser.add_argument('--sharded', default=None, help='million_sharded.py\'s JSON')
    args = parser.parse_args(argv)
    text = report(json.loads(Path(args.results).read_text()),
                  json.loads(Path(args.sharded).read_text()) if args.sharded else None)
    print(text)
    return text


if __name__ == '__main__':
    main()

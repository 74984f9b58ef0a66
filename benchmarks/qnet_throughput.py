"""Q-net throughput against the matrix-multiply peak measured in the same run, with the same dtype.

Scores ``n_docs`` random document vectors with ``n_queries`` random q-nets of the released architecture (6 layers:
five hidden blocks and a final matrix, 768-d; and the 384-d MiniLM size) through ``QNets.score``, and compares the
useful FLOP rate with a large square GEMM's rate.

    python benchmarks/qnet_throughput.py            # full sizes
    python benchmarks/qnet_throughput.py --quick    # smaller sizes, a few seconds
"""
import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from pyterrier_hypencoder import QNets, QNetSpec


def timed(fn, repeat: int) -> float:
    """Best wall time of ``repeat`` runs after one warm-up, synchronising CUDA."""
    fn()
    best = float('inf')
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def gemm_peak(dtype, device, size: int, repeat: int) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = timed(lambda: torch.matmul(a, b), repeat)
    return 2 * size ** 3 / seconds


def random_qnets(n_queries: int, dims, dtype, device, seed: int = 0) -> QNets:
    gen = torch.Generator().manual_seed(seed)
    spec = QNetSpec(vector_dimensions=tuple(dims))
    weights = [torch.randn(n_queries, i, o, generator=gen) / i ** 0.5 for i, o in spec.weight_shapes]
    biases = [torch.randn(n_queries, d, generator=gen) * 0.1 for d in spec.bias_dims]
    return QNets(weights, biases, spec).to(device=device, dtype=dtype)


def qnet_flops(dims, n_queries: int, n_docs: int) -> float:
    per_pair = sum(2 * i * o for i, o in zip(dims[:-1], dims[1:]))
    return per_pair * n_queries * n_docs


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--quick', action='store_true', help='smaller sizes')
    parser.add_argument('--queries', type=int, default=None)
    parser.add_argument('--docs', type=int, default=None)
    parser.add_argument('--out', default='benchmarks/results/qnet_throughput.json')
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device('cuda' if cuda else 'cpu')
    dtype = torch.bfloat16 if cuda else torch.float32
    n_queries = args.queries or (8 if args.quick else 32)
    n_docs = args.docs or ((20_000 if args.quick else 100_000) * (10 if cuda else 1))
    repeat = 2 if args.quick else 3
    peak = gemm_peak(dtype, device, 2048 if args.quick else 4096, repeat)

    rows = []
    for name, dims in (('768-d, 6 layers', [768] * 6 + [1]), ('384-d, 6 layers', [384] * 6 + [1])):
        qnets = random_qnets(n_queries, dims, dtype, device)
        docs = torch.randn(n_docs, dims[0], device=device, dtype=dtype)
        seconds = timed(lambda q=qnets, d=docs: q.score(d), repeat)
        rate = qnet_flops(dims, n_queries, n_docs) / seconds
        rows.append({'qnet': name, 'dims': dims, 'n_queries': n_queries, 'n_docs': n_docs, 'seconds': seconds,
                     'docs_per_s_per_query': n_docs / seconds, 'gflops': rate / 1e9, 'ratio_to_peak': rate / peak})

    print(f'device: {device} ({torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()}), '
          f'dtype: {str(dtype).replace("torch.", "")}, threads: {torch.get_num_threads()}, '
          f'GEMM peak: {peak / 1e9:.1f} GFLOP/s')
    print(f'{"q-net":<18}{"queries":>8}{"docs":>10}{"seconds":>10}{"docs/s/query":>15}{"GFLOP/s":>10}{"of peak":>9}')
    for r in rows:
        print(f'{r["qnet"]:<18}{r["n_queries"]:>8}{r["n_docs"]:>10}{r["seconds"]:>10.3f}'
              f'{r["docs_per_s_per_query"]:>15,.0f}{r["gflops"]:>10.1f}{r["ratio_to_peak"]:>9.2f}')
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({'device': str(device), 'dtype': str(dtype), 'threads': torch.get_num_threads(),
                               'cpu_count': os.cpu_count(), 'gemm_peak_gflops': peak / 1e9, 'rows': rows}, indent=1))
    print(f'wrote {out}')


if __name__ == '__main__':
    main()

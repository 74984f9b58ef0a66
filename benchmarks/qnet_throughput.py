"""Q-net throughput against the matrix-multiply peak measured in the same run, with the same dtype.

Scores ``n_docs`` random document vectors with ``n_queries`` random q-nets of the released architecture (6 layers:
five hidden blocks and a final matrix, 768-d; and the 384-d MiniLM size) through ``QNets.score`` (inference, no
autograd), and compares the useful FLOP rate (the GEMMs' 2 * in * out per layer, document and query) with a large
square GEMM's rate: float32 on CPU, bfloat16 on a GPU.

On a shared machine the rates move with the other processes' load, so each trial times the peak GEMM right before
and right after the q-nets, and its ratio uses the better of the two. Over ``--trials`` trials the table shows the
median ratio and its range; ``best/best`` divides the best q-net time by the best GEMM time of the whole run.

    python benchmarks/qnet_throughput.py --quick      # 8 queries x 4,096 docs, 3 trials: about a minute on 2 cores
    python benchmarks/qnet_throughput.py              # 32 queries x 8,192 docs, 5 trials: a few minutes
    python benchmarks/qnet_throughput.py --profile    # adds a per-operator profile of one scoring call
"""
import argparse
import json
import os
import statistics

import torch
from common import default_out, machine, qnet_flops, random_qnets, rel, sync, timed

QNETS = (('768-d, 6 layers', [768] * 6 + [1]), ('384-d, 6 layers', [384] * 6 + [1]))


def profile(qnets, docs: torch.Tensor) -> str:
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if docs.is_cuda else [])
    with profile(activities=activities) as prof:
        qnets.score(docs)
        sync(docs.device)
    key = 'self_cuda_time_total' if docs.is_cuda else 'self_cpu_time_total'
    return prof.key_averages().table(sort_by=key, row_limit=10)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--quick', action='store_true', help='smaller sizes, fewer trials')
    parser.add_argument('--queries', type=int, default=None)
    parser.add_argument('--docs', type=int, default=None)
    parser.add_argument('--trials', type=int, default=None)
    parser.add_argument('--peak-size', type=int, default=2048, help='side of the square GEMM that measures the peak')
    parser.add_argument('--profile', action='store_true', help='print a per-operator profile of one scoring call')
    parser.add_argument('--out', default=None, help='results JSON (default benchmarks/results/qnet_throughput.json; '
                        'with --quick .cache/benchmarks/qnet_throughput-quick.json: a quick run never overwrites the '
                        'committed figures)')
    args = parser.parse_args(argv)
    args.out = default_out(args.out, args.quick, 'qnet_throughput.json', 'benchmarks/qnet_throughput-quick.json')
    return args


def main(argv=None):
    args = parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device('cuda' if cuda else 'cpu')
    dtype = torch.bfloat16 if cuda else torch.float32
    n_queries = args.queries or (8 if args.quick else 32)
    n_docs = args.docs or ((4096 if args.quick else 8192) * (16 if cuda else 1))
    trials = args.trials or (3 if args.quick else 5)
    size = args.peak_size * (4 if cuda else 1)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    peak_flops = 2 * size ** 3

    def gemm():
        torch.matmul(a, b)

    load_before = os.getloadavg()
    rows = []
    with torch.inference_mode():
        gemm()
        for name, dims in QNETS:
            qnets = random_qnets(n_queries, dims, dtype, device)
            docs = torch.randn(n_docs, dims[0], device=device, dtype=dtype)
            flops = qnet_flops(dims, n_queries, n_docs)
            qnets.score(docs)  # warm-up
            ratios, qnet_times, gemm_times = [], [], []
            for _ in range(trials):
                before = timed(gemm, device=device)[1]
                seconds = timed(qnets.score, docs, device=device)[1]
                after = timed(gemm, device=device)[1]
                gemm_best = min(before, after)
                qnet_times.append(seconds)
                gemm_times += [before, after]
                ratios.append((flops / seconds) / (peak_flops / gemm_best))
            best = min(qnet_times)
            peak = peak_flops / min(gemm_times)
            group, chunk = qnets._score_plan(n_docs, None)
            rows.append({'qnet': name, 'dims': dims, 'n_queries': n_queries, 'n_docs': n_docs, 'trials': trials,
                         'query_group': group, 'doc_chunk': chunk,
                         'seconds_best': best, 'seconds_median': statistics.median(qnet_times),
                         'docs_per_s_per_query': n_docs / best, 'gflops': flops / best / 1e9,
                         'peak_gflops': peak / 1e9, 'ratio_median': statistics.median(ratios),
                         'ratio_min': min(ratios), 'ratio_max': max(ratios), 'ratio_best_over_best': flops / best / peak,
                         'ratios': ratios})
            if args.profile:
                print(f'{name}: profile of one QNets.score call')
                print(profile(qnets, docs))
    load_after = os.getloadavg()

    info = machine(device)
    proc = info['name']
    print(f'device: {device} ({proc}), dtype: {str(dtype).replace("torch.", "")}, threads: {torch.get_num_threads()}, '
          f'cpus: {os.cpu_count()}, load average {load_before[0]:.1f} -> {load_after[0]:.1f}, '
          f'peak GEMM {size}x{size}, {trials} trials')
    print(f'{"q-net":<17}{"queries":>8}{"docs":>7}{"best s":>8}{"docs/s/query":>14}{"GFLOP/s":>9}{"peak":>7}'
          f'{"ratio median [min-max]":>24}{"best/best":>10}')
    for r in rows:
        spread = f'{r["ratio_median"]:.2f} [{r["ratio_min"]:.2f}-{r["ratio_max"]:.2f}]'
        print(f'{r["qnet"]:<17}{r["n_queries"]:>8}{r["n_docs"]:>7}{r["seconds_best"]:>8.2f}'
              f'{r["docs_per_s_per_query"]:>14,.0f}{r["gflops"]:>9.1f}{r["peak_gflops"]:>7.1f}{spread:>24}'
              f'{r["ratio_best_over_best"]:>10.2f}')
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({'device': str(device), 'device_name': proc, 'dtype': str(dtype), 'machine': info,
                                    'loadavg_before': load_before, 'loadavg_after': load_after,
                                    'peak_gemm_size': size, 'rows': rows}, indent=1))
    print(f'wrote {rel(args.out)}')


if __name__ == '__main__':
    main()

"""One check of the CUDA path, ready for the first GPU: correctness and speed of every stage, in one run.

On one CUDA GPU (in under 8 minutes at the default sizes) it checks and times:

1. ``parity``: the parity fixture (``../shared/fixtures/hypencoder-parity``) on the device: fp32 scores within 2e-4
   of the reference implementation's, bf16 and fp16 the same top 10 for every query (score error stated);
2. ``exhaustive``: exhaustive search over a synthetic 1M x 768 corpus held on the device in float16, with random
   6-layer bf16 q-nets of the released shape, batch 32 and batch 1: ms/query and achieved TFLOP/s against the
   device's dense bf16 peak (a table of known peaks by ``torch.cuda.get_device_name``, and a measured GEMM); the top
   10 checked against float32 (float64 on a CPU) up to bf16 rounding;
3. ``adaptive``: adaptive (pooled) search with the q-nets on the device and an HNSW inner-product index (CPU FAISS),
   against exhaustive search on the same device: recall@10, ms/query at batch 32 and 1, documents scored;
4. ``indexing``: ``HypencoderIndexer`` encoding 10,000 debian-packages documents with all-MiniLM-L6-v2 in bf16
   (docs/s; vectors checked against fp32 encoding), then the FAISS neighbour graph (``build_knn_graph``);
5. ``training``: 20 steps of full fine-tuning (bf16 autocast on CUDA) of a MiniLM warm start on one fixed batch of
   debian-packages training queries with hard negatives: the loss must fall; steps/s;
6. peak device memory of each stage (the process's peak RSS on a CPU); a stage that runs out of memory is reported
   in one message, not a traceback, and the other stages still run.

Results go to one JSON file (``--out``; by default under ``.cache/gpu_check/``, never over ``benchmarks/results/``
unless asked) and a table. The exit status is 0 only when every check of every stage passed.

    python benchmarks/gpu_check.py                               # on the GPU (CUDA)
    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json   # to record a run
    python benchmarks/gpu_check.py --device cpu --quick          # the same checks at tiny sizes (CI: seconds)
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import resource
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent
for _path in (ROOT / 'benchmarks', ROOT):  # this checkout's package and the sibling benchmark scripts
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from gpu_check_stages import STAGES, sync  # noqa: E402

SIZES = {
    'full': dict(docs=1_000_000, dim=768, layers=6, queries=32, latency_queries=8, repeats=3, n_sample=512,
                 pool=4096, n_entry=128, hnsw_m=32, index_docs=10_000, doc_max_length=256, encode_batch=256,
                 index_chunk=4096, graph_k=100, train_queries=32, train_negatives=7, train_doc_length=128,
                 train_steps=20),
    'quick': dict(docs=4096, dim=64, layers=6, queries=8, latency_queries=2, repeats=1, n_sample=128, pool=512,
                  n_entry=32, hnsw_m=16, index_docs=128, doc_max_length=64, encode_batch=32, index_chunk=64,
                  graph_k=16, train_queries=4, train_negatives=1, train_doc_length=32, train_steps=20),
}

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from NVIDIA's datasheets, matched against
# torch.cuda.get_device_name() in this order (the first match wins). Other devices use the measured GEMM.
BF16_PEAK_TFLOPS = (
    (r'H100.*NVL', 835.0), (r'H100.*PCIe', 756.0), (r'H100', 989.0), (r'H200.*NVL', 835.0), (r'H200', 989.0),
    (r'A100', 312.0), (r'L40S', 362.0), (r'L40\b', 181.0), (r'L4\b', 121.0), (r'A10\b', 125.0),
)
BUDGET_SECONDS = 480


def known_peak(name: str):
    """The datasheet's dense bf16 peak (TFLOP/s) of a device named ``name``, or None when the table lacks it."""
    return next((peak for pattern, peak in BF16_PEAK_TFLOPS if re.search(pattern, name)), None)


def gemm_tflops(device: torch.device, size: int, reps: int) -> float:
    """The rate of a square bf16 matrix product on ``device``, best of three timings of ``reps`` products."""
    a, b = (torch.randn(size, size, device=device).to(torch.bfloat16) for _ in range(2))
    torch.matmul(a, b)
    best = float('inf')
    for _ in range(3):
        sync(device)
        started = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b)
        sync(device)
        best = min(best, time.perf_counter() - started)
    return 2 * size ** 3 * reps / best / 1e12


def device_info(device: torch.device) -> dict:
    info = {'type': device.type, 'torch': torch.__version__, 'threads': torch.get_num_threads(),
            'cpus': os.cpu_count(), 'cpu': platform.processor() or platform.machine(),
            'cpu_capability': torch.backends.cpu.get_cpu_capability()}
    try:
        names = [line.split(':', 1)[1].strip() for line in open('/proc/cpuinfo') if line.startswith('model name')]
        info['cpu'] = names[0] if names else info['cpu']
    except OSError:
        pass
    if device.type == 'cuda':
        props = torch.cuda.get_device_properties(device)
        info.update({'name': torch.cuda.get_device_name(device), 'cuda': torch.version.cuda,
                     'capability': f'{props.major}.{props.minor}', 'memory_gib': props.total_memory / 2 ** 30,
                     'tf32_matmul': torch.backends.cuda.matmul.allow_tf32})
    else:
        info['name'] = info['cpu']
    return info


class Context:
    """What the stages share: the device, the sizes, the seed, and the exhaustive stage's corpus for the adaptive one."""

    def __init__(self, device: torch.device, sizes: SimpleNamespace, seed: int):
        self.device, self.sizes, self.seed, self.shared = device, sizes, seed, {}
        self._peak = None

    def peak(self) -> dict:
        """The device's bf16 peak: known (datasheet, CUDA only) and measured (a square GEMM), in TFLOP/s."""
        if self._peak is None:
            cuda = self.device.type == 'cuda'
            name = torch.cuda.get_device_name(self.device) if cuda else 'cpu'
            size = 8192 if cuda else 1024
            self._peak = {'device_name': name, 'known_tflops': known_peak(name) if cuda else None,
                          'gemm_tflops': gemm_tflops(self.device, size, 10 if cuda else 2), 'gemm_size': size}
        return self._peak


class Record:
    """One stage's outcome: status, metrics, checks (each a condition that can fail) and a summary line."""

    def __init__(self, name: str):
        self.name, self.status, self.summary, self.metrics, self.checks = name, 'pass', '', {}, []

    def check(self, what: str, ok: bool, detail: str = '') -> bool:
        self.checks.append({'check': what, 'ok': bool(ok), 'detail': detail})
        return bool(ok)

    def to_dict(self) -> dict:
        return {'status': self.status, 'summary': self.summary, 'checks': self.checks, 'metrics': self.metrics}


def _is_oom(error: BaseException) -> bool:
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and any(s in str(error) for s in ('out of memory', "can't allocate memory"))


def _memory(device: torch.device) -> dict:
    if device.type == 'cuda':
        return {'peak_allocated_gib': torch.cuda.max_memory_allocated(device) / 2 ** 30,
                'peak_reserved_gib': torch.cuda.max_memory_reserved(device) / 2 ** 30}
    # ru_maxrss is KiB on Linux: the process's peak so far (a CPU has no per-stage counter to reset)
    return {'peak_rss_gib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}


def run_stage(ctx: Context, name: str) -> Record:
    """Runs one stage; out of memory becomes a message and status ``oom``, another error status ``error``."""
    rec = Record(name)
    if name == 'adaptive' and 'x' not in ctx.shared:
        rec.status, rec.summary = 'skipped', 'needs the exhaustive stage\'s corpus and results (run it first)'
        return rec
    if ctx.device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(ctx.device)
    started = time.perf_counter()
    try:
        STAGES[name](ctx, rec)
        if not all(c['ok'] for c in rec.checks):
            rec.status = 'fail'
    except Exception as error:  # noqa: BLE001 - a stage's failure is recorded, and the next stage still runs
        if not _is_oom(error):
            rec.status, rec.summary = 'error', f'{type(error).__name__}: {error}'
            rec.metrics['traceback'] = traceback.format_exc()
            traceback.print_exc()
        else:
            rec.status = 'oom'
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            where = ctx.device.type
            if ctx.device.type == 'cuda':
                total = torch.cuda.get_device_properties(ctx.device).total_memory / 2 ** 30
                where = f'{torch.cuda.get_device_name(ctx.device)} ({total:.0f} GiB)'
            rec.summary = (f'out of memory on {where}: {first[:200]}. The other stages still run; rerun this one with '
                           'smaller sizes (--docs, --queries, --index-docs) or leave it out (--stages)')
            print(f'{name}: {rec.summary}', flush=True)
    finally:
        if name != 'exhaustive':
            ctx.shared.clear()  # only the exhaustive stage's corpus lives on, for the adaptive stage
        rec.metrics.update(_memory(ctx.device))
        rec.metrics['seconds'] = time.perf_counter() - started
        gc.collect()
        if ctx.device.type == 'cuda':
            torch.cuda.empty_cache()
    return rec


def table(results: dict) -> str:
    lines = [f'gpu_check ({results["mode"]}) on {results["device"]["name"]}, torch {results["device"]["torch"]}, '
             f'{results["seconds"]:.0f} s in all',
             f'{"stage":<11}{"status":<8}{"seconds":>8}{"peak mem":>10}  result']
    for name, rec in results['stages'].items():
        m = rec['metrics']
        mem = m.get('peak_allocated_gib', m.get('peak_rss_gib'))
        mem = f'{mem:.2f} GiB' if mem is not None else '-'
        lines.append(f'{name:<11}{rec["status"]:<8}{m.get("seconds", 0):>8.1f}{mem:>10}  {rec["summary"]}')
    failed = [(name, c) for name, rec in results['stages'].items() for c in rec['checks'] if not c['ok']]
    lines += [f'FAILED {name}: {c["check"]} ({c["detail"]})' for name, c in failed]
    if results['device']['type'] == 'cpu':
        lines.append('peak mem on a CPU: the process\'s peak RSS so far, not per stage')
    lines.append('all checks passed' if results['passed'] else 'NOT all checks passed')
    return '\n'.join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cuda', help='cuda, cuda:N or cpu (default cuda)')
    parser.add_argument('--quick', action='store_true', help='tiny sizes: the same checks in seconds (CI)')
    parser.add_argument('--stages', default=','.join(STAGES), help=f'comma-separated, from {",".join(STAGES)}')
    parser.add_argument('--out', default=None, help='results JSON (default .cache/gpu_check/<mode>-<device>.json)')
    parser.add_argument('--docs', type=int, default=None, help='synthetic corpus size of the search stages')
    parser.add_argument('--queries', type=int, default=None, help='q-nets of the search stages (batch size)')
    parser.add_argument('--index-docs', type=int, default=None, help='debian-packages documents indexed')
    parser.add_argument('--threads', type=int, default=None,
                        help='torch and FAISS threads (default: theirs; --quick: 1, so its HNSW builds repeat exactly)')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    unknown = [s for s in args.stages.split(',') if s not in STAGES]
    if unknown:
        parser.error(f'unknown stages {unknown}; choose from {list(STAGES)}')
    return args


def main(argv=None) -> dict:
    """Runs the check; returns the results (also written to ``--out``) with ``passed`` True when every check held."""
    import faiss

    from pyterrier_hypencoder.devices import default_device
    args = parse_args(argv)
    try:
        device = default_device(args.device)
    except ValueError as e:
        raise SystemExit(f'gpu_check: {e}') from None
    mode = 'quick' if args.quick else 'full'
    sizes = dict(SIZES[mode])
    sizes.update({key: value for key, value in (('docs', args.docs), ('queries', args.queries),
                                                 ('index_docs', args.index_docs)) if value is not None})
    sizes['latency_queries'] = min(sizes['latency_queries'], sizes['queries'])
    out = Path(args.out) if args.out else ROOT / '.cache' / 'gpu_check' / f'{mode}-{device.type}.json'
    threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    if args.quick and args.threads is None:
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    try:
        ctx = Context(device, SimpleNamespace(**sizes), args.seed)
        results = {'benchmark': 'gpu_check', 'argv': list(sys.argv[1:] if argv is None else argv), 'mode': mode,
                   'device': device_info(device), 'sizes': sizes, 'load_before': os.getloadavg(), 'stages': {},
                   'seconds': 0.0, 'passed': False}
        started = time.perf_counter()
        out.parent.mkdir(parents=True, exist_ok=True)
        for name in args.stages.split(','):
            print(f'{name} ...', flush=True)
            results['stages'][name] = run_stage(ctx, name).to_dict()
            results['seconds'] = time.perf_counter() - started
            out.write_text(json.dumps(results, indent=1))  # partial results survive a killed run
        results['passed'] = all(rec['status'] == 'pass' for rec in results['stages'].values())
        results['load_after'] = os.getloadavg()
        if mode == 'full' and device.type == 'cuda':
            results['within_budget'] = {'seconds': results['seconds'], 'budget': BUDGET_SECONDS,
                                        'ok': results['seconds'] <= BUDGET_SECONDS}
        out.write_text(json.dumps(results, indent=1))
    finally:
        torch.set_num_threads(threads[0])
        faiss.omp_set_num_threads(threads[1])
    print(table(results))
    where = out.absolute()
    print(f'wrote {where.relative_to(ROOT) if where.is_relative_to(ROOT) else where}')
    return results


if __name__ == '__main__':
    sys.exit(0 if main()['passed'] else 1)

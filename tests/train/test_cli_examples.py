"""Every example of ``python -m pyterrier_hypencoder.train --help`` runs end to end (issue #29, item 1), on a tiny
BEIR-layout folder standing in for the datasets it names; the command line's defaults (items 1 and 6).

The first example used to stop with ``AttributeError: ... no attribute 'pisa_bm25'`` (with ``--dev-fraction``,
earlier, on ``split_topics``) and leave an empty output folder behind: no test ran the command line with ``--train``.
"""
import json
import shlex
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import fruit_frame

from pyterrier_hypencoder import Hypencoder
from pyterrier_hypencoder.train import DotEncoder, save_frame
from pyterrier_hypencoder.train import __main__ as cli

pytestmark = pytest.mark.usefixtures('one_thread')

FRUITS = 'apple banana cherry grape lemon mango olive peach pear plum lime kiwi'.split()
SPLITS = {'train': FRUITS[:8], 'dev': FRUITS[8:10], 'test': FRUITS[10:]}
# What makes an example fast here; the example's own options stay (the tiny model and data stand in for its names).
FAST = ['--device', 'cpu', '--quiet', '--threads', '1', '--steps', '2', '--batch-size', '4', '--negatives', '3',
        '--candidates', '8', '--doc-max-length', '32']


@pytest.fixture(scope='module')
def beir_folder(tmp_path_factory) -> Path:
    """24 documents about 12 fruits, a query per fruit, and train / dev / test qrels, in the BEIR layout."""
    folder = tmp_path_factory.mktemp('beir') / 'fruits'
    (folder / 'qrels').mkdir(parents=True)
    docs = [{'_id': f'{f}-{k}', 'title': f.title(), 'text': text.format(f=f)} for f in FRUITS
            for k, text in (('a', 'the {f} tree grows {f} fruit in the garden'), ('b', 'a recipe with {f} and sugar'))]
    (folder / 'corpus.jsonl').write_text(''.join(json.dumps(d) + '\n' for d in docs))
    (folder / 'queries.jsonl').write_text(''.join(json.dumps({'_id': f'q-{f}', 'text': f'{f} tree'}) + '\n'
                                                  for f in FRUITS))
    for split, fruits in SPLITS.items():
        pd.DataFrame({'query-id': [f'q-{f}' for f in fruits], 'corpus-id': [f'{f}-a' for f in fruits],
                      'score': 1}).to_csv(folder / 'qrels' / f'{split}.tsv', sep='\t', index=False)
    return folder


def help_examples():
    """The argument lists of the examples in the command line's ``--help`` (``...`` continues the one before)."""
    text = cli._parser().format_help()
    lines = text.replace('\\\n', ' ').splitlines()
    examples = []
    for line in lines:
        words = shlex.split(line.strip()) if line.strip().startswith('python -m pyterrier_hypencoder.train') else []
        if words:
            args = words[3:]
            if args and args[0] == '...':
                args = examples[-1] + args[1:]
            examples.append(args)
    return examples


def localise(args, tiny_bert, folder, tmp_path, n):
    """An example's arguments with the tiny model, the tiny folder for every dataset, and a short run."""
    save_frame(fruit_frame(), tmp_path / 'train.jsonl')
    swap = {'--backbone': str(tiny_bert), '--train': str(folder), '--dev': str(folder), '--test': str(folder),
            '--train-data': str(tmp_path / 'train.jsonl'), '--output': str(tmp_path / f'run{n}'), '--eval-every': '1'}
    out = list(args)
    for i, word in enumerate(out[:-1]):
        if word in swap:
            out[i + 1] = swap[word]
    return out + FAST


def test_the_help_has_the_examples_the_tests_run():
    examples = help_examples()
    assert len(examples) >= 3
    used = {word for args in examples for word in args}
    assert {'--train', '--dev-fraction', '--test', '--train-data', '--dev', '--full', '--head'} <= used


@pytest.mark.parametrize('n', range(len(help_examples())))
def test_every_help_example_runs(tiny_bert, beir_folder, tmp_path, capsys, n):
    args = localise(help_examples()[n], tiny_bert, beir_folder, tmp_path, n)
    assert cli.main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    output = Path(args[args.index('--output') + 1])
    assert json.loads((output / 'trainer_state.json').read_text())['step'] == 2
    head = args[args.index('--head') + 1] if '--head' in args else 'hypencoder'
    model = (DotEncoder if head == 'dot' else Hypencoder).from_pretrained(output / 'final', device='cpu')
    assert model.doc_max_length == 32
    if '--dev-fraction' in args or '--dev' in args:
        assert 0 <= summary['dev_Rprec'] <= 1
    if '--test' in args:
        assert set(summary['test']) == {'nDCG@10', 'Rprec', 'R@100'}
    if '--train' in args:  # BM25 over the folder's corpus gave the candidates, cached beside the run
        assert (output / 'bm25.pisa').is_dir()


def test_a_run_that_fails_before_its_first_step_leaves_no_folder(tiny_bert, beir_folder, tmp_path):
    args = ['--backbone', str(tiny_bert), '--train', str(beir_folder), '--output', str(tmp_path / 'new' / 'run')
            ] + FAST + ['--batch-size', '50']  # more queries per batch than the 8 training queries
    with pytest.raises(ValueError, match='exceeds the 8 training queries'):
        cli.main(args)
    assert not (tmp_path / 'new' / 'run').exists()  # the BM25 index built meanwhile went with it
    # A folder that was there before is left as it was, with what it held.
    (tmp_path / 'kept').mkdir()
    (tmp_path / 'kept' / 'notes.txt').write_text('mine')
    args[args.index('--output') + 1] = str(tmp_path / 'kept')
    with pytest.raises(ValueError, match='exceeds'):
        cli.main(args)
    assert (tmp_path / 'kept' / 'notes.txt').read_text() == 'mine'


def test_beir_folder_mistakes_are_named_before_loading(tiny_bert, beir_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, '_load_model', lambda args: pytest.fail('loaded the model before the check'))
    (tmp_path / 'no_dev' / 'qrels').mkdir(parents=True)
    for name in ('corpus.jsonl', 'queries.jsonl'):
        (tmp_path / 'no_dev' / name).write_text((beir_folder / name).read_text())
    (tmp_path / 'no_dev' / 'qrels' / 'train.tsv').write_text((beir_folder / 'qrels' / 'train.tsv').read_text())
    (tmp_path / 'plain').mkdir()
    base = ['--backbone', str(tiny_bert), '--output', str(tmp_path / 'out'), '--train', str(tmp_path / 'no_dev')]
    cases = {"has no dev split (no qrels/dev.tsv); it has ['train']": base + ['--dev', str(tmp_path / 'no_dev')],
             'not in the BEIR layout': base + ['--test', str(tmp_path / 'plain')],
             './missing: no such folder': base + ['--test', './missing']}
    for message, argv in cases.items():
        with pytest.raises(SystemExit):
            cli.main(argv)
        err = capsys.readouterr().err
        assert message in err and 'Traceback' not in err, err
    assert not (tmp_path / 'out').exists()


def test_defaults_match_the_library_and_the_help(tiny_bert, tmp_path, monkeypatch):
    parser = cli._parser()
    args = parser.parse_args(['--backbone', 'x', '--train-data', 'f.jsonl', '--output', 'o'])
    assert args.qnet_layers == 6  # as Hypencoder.from_backbone
    assert cli._warm_start(args)  # head-only training, as the help recommends
    assert not cli._warm_start(parser.parse_args(['--backbone', 'x', '--train-data', 'f', '--output', 'o', '--full']))
    assert not cli._warm_start(parser.parse_args(['--backbone', 'x', '--train-data', 'f', '--output', 'o',
                                                  '--no-warm-start']))
    # A head-only run from --backbone is warm-started, with the --threads asked for.
    calls = []
    real = cli.warm_start_hypencoder
    monkeypatch.setattr(cli, 'warm_start_hypencoder', lambda *a, **k: calls.append(k) or real(*a, **k))
    save_frame(fruit_frame(), tmp_path / 'train.jsonl')
    threads = torch.get_num_threads()
    try:
        assert cli.main(['--backbone', str(tiny_bert), '--pooling', 'mean', '--train-data', str(tmp_path / 'train.jsonl'),
                         '--output', str(tmp_path / 'out'), '--steps', '1', '--device', 'cpu', '--quiet',
                         '--batch-size', '4', '--negatives', '3', '--threads', '2']) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert len(calls) == 1 and calls[0]['qnet_layers'] == 6
    assert Hypencoder.from_pretrained(tmp_path / 'out' / 'final', device='cpu').spec.num_blocks == 5

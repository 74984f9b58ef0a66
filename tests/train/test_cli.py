"""The training command line (``python -m pyterrier_hypencoder.train``): training from a file, testing on a
dataset, its output folder, and its early, traceback-free errors (issue 16, item 5)."""
import json
import os
import subprocess
import sys

import pytest
from helpers import fruit_frame

from pyterrier_hypencoder import Hypencoder
from pyterrier_hypencoder.train import DevSet, DotEncoder, save_frame
from pyterrier_hypencoder.train.__main__ import main

pytestmark = pytest.mark.usefixtures('one_thread')


def test_cli_help():
    out = subprocess.run([sys.executable, '-m', 'pyterrier_hypencoder.train', '--help'], capture_output=True, text=True,
                         check=True).stdout
    for option in ('--backbone', '--head', '--train', '--train-data', '--dev', '--teacher', '--full', '--resume',
                   '--steps', '--lr'):
        assert option in out


@pytest.mark.parametrize('head', [['--head', 'hypencoder', '--warm-start'], ['--head', 'dot', '--normalize']])
def test_cli_trains_from_a_file(tiny_bert, tmp_path, head):
    save_frame(fruit_frame(), tmp_path / 'train.jsonl')
    cmd = [sys.executable, '-m', 'pyterrier_hypencoder.train', '--backbone', str(tiny_bert), '--pooling', 'mean',
           '--train-data', str(tmp_path / 'train.jsonl'), '--output', str(tmp_path / 'out'), '--steps', '4',
           '--batch-size', '5', '--negatives', '3', '--qnet-layers', '2', '--device', 'cpu', '--quiet'] + head
    # one thread: tiny models gain nothing from more, and a busy machine makes thread hand-offs slow
    subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert json.loads((tmp_path / 'out' / 'trainer_state.json').read_text())['step'] == 4
    if head[1] == 'dot':
        model = DotEncoder.from_pretrained(tmp_path / 'out' / 'final', device='cpu')
        assert model.normalize
    else:
        model = Hypencoder.from_pretrained(tmp_path / 'out' / 'final', device='cpu')
        assert model.spec.vector_dimensions == (32, 32, 1)
        # the warm start (the default start: standardised, residual-free), not a random paper-style head
        assert not model.spec.residual and not model.spec.residual_on_last


def test_cli_evaluates_on_a_test_dataset(tiny_bert, tmp_path, irds_home, capsys):
    from pyterrier_hypencoder.train.__main__ import main
    save_frame(fruit_frame(), tmp_path / 'train.jsonl')
    assert main(['--backbone', str(tiny_bert), '--pooling', 'mean', '--train-data', str(tmp_path / 'train.jsonl'),
                 '--output', str(tmp_path / 'out'), '--steps', '2', '--batch-size', '5', '--negatives', '3',
                 '--doc-max-length', '32', '--device', 'cpu', '--quiet', '--test', 'irds:beir/scifact/test']) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary['test']) == {'nDCG@10', 'Rprec', 'R@100'}
    assert all(0 <= v <= 1 for v in summary['test'].values())


def _cli(tiny_bert, tmp_path, *extra):
    save_frame(fruit_frame(), tmp_path / 'train.jsonl')
    return main(['--backbone', str(tiny_bert), '--pooling', 'mean', '--train-data', str(tmp_path / 'train.jsonl'),
                 '--output', str(tmp_path / 'out'), '--steps', '2', '--batch-size', '4', '--negatives', '3',
                 '--qnet-layers', '2', '--device', 'cpu', '--quiet', *extra])


def _cli_error(capsys, fn, *args):
    with pytest.raises(SystemExit) as e:
        fn(*args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert 'Traceback' not in err
    return err


def test_cli_output_folder(tiny_bert, tmp_path, capsys, monkeypatch):
    assert _cli(tiny_bert, tmp_path) == 0
    capsys.readouterr()
    loaded = []
    monkeypatch.setattr(Hypencoder, 'from_backbone', lambda *a, **k: loaded.append(1))  # nothing may be loaded
    assert 'already holds a training run' in _cli_error(capsys, _cli, tiny_bert, tmp_path)
    assert 'exclude each other' in _cli_error(capsys, _cli, tiny_bert, tmp_path, '--resume', '--overwrite')
    err = _cli_error(capsys, _cli, tiny_bert, tmp_path, '--resume', '--steps', '4', '--lr', '0.5')
    assert "config.lr: None then, 0.5 now" in err
    assert not loaded
    monkeypatch.undo()
    assert _cli(tiny_bert, tmp_path, '--resume', '--steps', '4') == 0
    assert json.loads((tmp_path / 'out' / 'trainer_state.json').read_text())['step'] == 4
    assert _cli(tiny_bert, tmp_path, '--overwrite') == 0
    assert json.loads((tmp_path / 'out' / 'trainer_state.json').read_text())['step'] == 2
    assert not (tmp_path / 'out' / 'checkpoint-4').exists()


def test_cli_errors_come_before_loading_and_without_traceback(tiny_bert, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Hypencoder, 'from_backbone', lambda *a, **k: pytest.fail('loaded weights before the check'))
    base = ['--backbone', str(tiny_bert), '--output', str(tmp_path / 'out'), '--quiet']
    save_frame(fruit_frame(), tmp_path / 'train.jsonl')
    (tmp_path / 'train.csv').write_text('qid,query\n')
    data = ['--train-data', str(tmp_path / 'train.jsonl')]
    cases = {
        'no such file': base + ['--train-data', 'missing.jsonl'],
        '--dev-fraction needs --train': base + data + ['--dev-fraction', '0.2'],
        '--dev-data missing.tsv: no such file': base + data + ['--dev-data', 'missing.tsv'],
        '--backbone ./nowhere: no such folder': ['--backbone', './nowhere', '--output', str(tmp_path / 'o')] + data,
        '--normalize applies to --head dot only': base + data + ['--normalize'],
        'nothing to resume': base + data + ['--resume'],
        'metric=': base + data + ['--metric', 'nonsense'],
        "train.csv: unknown format '.csv'": base + ['--train-data', str(tmp_path / 'train.csv')],
        '--save-train-data': base + data + ['--save-train-data', str(tmp_path / 'no' / 'dir' / 'x.jsonl')],
        "--test irds:beir/nosuch: Dataset 'irds:beir/nosuch' not found": base + data + ['--test', 'irds:beir/nosuch'],
        "--test-metrics: 'nDCG10' is not": base + data + ['--test-metrics', 'nDCG10'],
    }
    for message, argv in cases.items():
        assert message in _cli_error(capsys, main, argv), message
    monkeypatch.undo()
    err = _cli_error(capsys, main, ['--init', str(tmp_path), '--output', str(tmp_path / 'o2')] + data)
    assert 'config.json is missing' in err


def test_cli_dev_set_from_a_file(tiny_bert, tmp_path, capsys):
    frame = fruit_frame()
    save_frame(frame[frame['qid'].isin(['q0', 'q1', 'q2'])], tmp_path / 'dev.tsv')
    assert _cli(tiny_bert, tmp_path, '--dev-data', str(tmp_path / 'dev.tsv'), '--eval-every', '1') == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary['best_step'] is not None and 0 <= summary['dev_Rprec'] <= 1
    dev = DevSet.from_frame(frame)
    assert len(dev.topics) == 10 and len(dev.docs) == 10 and len(dev.qrels) == 100

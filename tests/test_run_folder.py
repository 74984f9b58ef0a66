"""Training output folders (issue 16, item 2) and the command line's early, traceback-free errors (item 5).

A reused --output used to mix runs: a second run overwrote final/ and trainer_state.json, left the first run's
checkpoints beside its own, and --resume continued the first run. Each test failed before the fix.
"""
import json
import os

import pandas as pd
import pytest

from pyterrier_hypencoder import Hypencoder
from pyterrier_hypencoder.train import DevSet, TrainConfig, Trainer, save_frame
from pyterrier_hypencoder.train.__main__ import main
from pyterrier_hypencoder.train.run_folder import RunSettingsError, run_outputs

FRUITS = 'apple banana cherry grape lemon mango olive peach pear plum'.split()


pytestmark = pytest.mark.usefixtures('one_thread')


def fruit_frame() -> pd.DataFrame:
    return pd.DataFrame([{'qid': f'q{i}', 'query': f'{w} fruit', 'docno': d, 'text': f'a text about the {d} tree',
                          'label': int(i == j)} for i, w in enumerate(FRUITS) for j, d in enumerate(FRUITS)])


def _model(tiny_bert, **kw):
    return Hypencoder.from_backbone(str(tiny_bert), qnet_layers=2, pooling='mean', device='cpu', **kw)


def _config(**kw):
    return TrainConfig(**{'steps': 2, 'batch_size': 4, 'num_negatives': 3, 'warmup_steps': 1, 'loss': 'ce', **kw})


def _train(tiny_bert, out, model_kw=None, resume=None, **kw):
    trainer = Trainer(_model(tiny_bert, **(model_kw or {})), fruit_frame(), _config(**kw.pop('config', {})),
                      output_dir=out, verbose=False, **kw)
    trainer.train(resume_from=resume)
    return trainer


def test_a_folder_holding_a_run_is_refused(tiny_bert, tmp_path):
    out = tmp_path / 'run'
    _train(tiny_bert, out, config={'steps': 4, 'save_every': 2, 'keep_checkpoints': 0})
    before = {p.name: p.stat().st_mtime_ns for p in run_outputs(out)}
    assert {'checkpoint-2', 'checkpoint-4', 'run.json', 'trainer_state.json'} <= set(before)
    with pytest.raises(FileExistsError, match=r'already holds a training run \(checkpoint-2, checkpoint-4.*--overwrite'):
        _train(tiny_bert, out)
    assert {p.name: p.stat().st_mtime_ns for p in run_outputs(out)} == before  # untouched
    # overwrite: the old run's outputs go (no checkpoint-4 beside the new checkpoint-2); caches stay
    (out / 'features').mkdir()
    (out / 'final').mkdir()
    _train(tiny_bert, out, overwrite=True)
    assert [p.name for p in run_outputs(out)] == ['checkpoint-2', 'run.json', 'trainer_state.json']
    assert (out / 'features').is_dir()
    assert json.loads((out / 'trainer_state.json').read_text())['step'] == 2


def test_relative_output_dir_survives_chdir(tiny_bert, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = Trainer(_model(tiny_bert), fruit_frame(), _config(), output_dir='rel', cache_dir='cache', verbose=False)
    (tmp_path / 'elsewhere').mkdir()
    os.chdir(tmp_path / 'elsewhere')
    trainer.train()
    assert (tmp_path / 'rel' / 'checkpoint-2').is_dir() and not (tmp_path / 'elsewhere' / 'rel').exists()


def test_resume_with_other_settings_names_them(tiny_bert, tmp_path):
    out = tmp_path / 'run'
    _train(tiny_bert, out, config={'steps': 2})
    with pytest.raises(RunSettingsError, match=r"config.lr: None then, 0.001 now"):
        _train(tiny_bert, out, resume=True, config={'steps': 4, 'lr': 1e-3})
    with pytest.raises(RunSettingsError, match=r"model.doc_max_length: 512 then, 64 now"):
        _train(tiny_bert, out, resume=True, model_kw={'doc_max_length': 64}, config={'steps': 4})
    with pytest.raises(RunSettingsError, match=r"model.pooling: 'mean' then, 'cls' now"):
        trainer = Trainer(Hypencoder.from_backbone(str(tiny_bert), qnet_layers=2, pooling='cls', device='cpu'),
                          fruit_frame(), _config(steps=4), output_dir=out, verbose=False)
        trainer.train(resume_from=out / 'checkpoint-2')
    other_data = fruit_frame().assign(query=lambda f: f['query'] + ' tree')
    with pytest.raises(RunSettingsError, match=r'data.sha256'):
        Trainer(_model(tiny_bert), other_data, _config(steps=4), output_dir=out, verbose=False).train(resume_from=True)
    # the same settings, more steps: resumed (the history continues this run's)
    resumed = _train(tiny_bert, out, resume=True, config={'steps': 4})
    assert resumed.state.step == 4 and [h['step'] for h in resumed.state.history if 'loss' in h] == [2, 4]


def test_resume_from_another_folder_is_a_new_run_here(tiny_bert, tmp_path):
    _train(tiny_bert, tmp_path / 'a')
    _train(tiny_bert, tmp_path / 'b')
    with pytest.raises(FileExistsError, match='already holds a training run'):
        _train(tiny_bert, tmp_path / 'b', resume=tmp_path / 'a' / 'checkpoint-2', config={'steps': 4})
    _train(tiny_bert, tmp_path / 'c', resume=tmp_path / 'a' / 'checkpoint-2', config={'steps': 4})
    assert json.loads((tmp_path / 'c' / 'trainer_state.json').read_text())['step'] == 4


def test_resume_without_a_checkpoint_records_nothing(tiny_bert, tmp_path):
    with pytest.raises(FileNotFoundError, match='not a training checkpoint'):
        _train(tiny_bert, tmp_path / 'empty', resume=True)
    assert not run_outputs(tmp_path / 'empty')


# ---- the command line ---------------------------------------------------------------------------------------------

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


def test_pisa_bm25_is_not_reused_for_other_documents(tmp_path):
    pytest.importorskip('pyterrier_pisa')
    from pyterrier_hypencoder.train import pisa_bm25
    docs = pd.DataFrame({'docno': ['a', 'b', 'c'], 'text': ['apple tree', 'banana tree', 'cherry tree']})
    pisa_bm25(docs, tmp_path / 'bm25.pisa')
    assert len(pisa_bm25(docs, tmp_path / 'bm25.pisa')(pd.DataFrame({'qid': ['1'], 'query': ['apple']}))) == 1
    with pytest.raises(FileExistsError, match='holds a BM25 index of other documents'):
        pisa_bm25(docs.assign(text=['plum', 'pear', 'peach']), tmp_path / 'bm25.pisa')

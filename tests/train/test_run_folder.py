"""Training output folders (issue 16, item 2).

A reused --output used to mix runs: a second run overwrote final/ and trainer_state.json, left the first run's
checkpoints beside its own, and --resume continued the first run. Each test failed before the fix.
"""
import json
import os

import pytest
from helpers import fruit_frame

from pyterrier_hypencoder import Hypencoder
from pyterrier_hypencoder.train import TrainConfig, Trainer
from pyterrier_hypencoder.train.run_folder import RunSettingsError, run_outputs

pytestmark = pytest.mark.usefixtures('one_thread')


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

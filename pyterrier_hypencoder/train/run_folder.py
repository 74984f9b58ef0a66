"""A training run's output folder: one run per folder, as an index is one index per folder.

A folder that already holds a run (``run.json``, ``trainer_state.json``, ``final/``, ``best/`` or a checkpoint) is
refused unless the new run overwrites it (its run outputs are removed first; caches such as ``features/`` and
``bm25.pisa`` are kept, as they are keyed by content) or resumes it. A resumed run must have the settings of the
run it continues: ``run.json``, written when training starts and into each checkpoint, records them, and a
difference is named. Settings that do not change the weights of the steps already taken (``steps``, how often to
evaluate, save or log, ``keep_checkpoints``, batch sizes of encoding and dev ranking) may change on resume, so a
run can be extended.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional, Union

__all__ = ['RUN_FILE', 'RunSettingsError', 'check_output', 'check_resume', 'claim', 'run_outputs', 'run_settings',
           'write_settings']

RUN_FILE = 'run.json'
_OUTPUTS = re.compile(r'^(run\.json|trainer_state\.json|final|best|checkpoint-\d+|\.checkpoint-\d+\.tmp)$')
_CHECKPOINT = re.compile(r'^checkpoint-\d+$')
# May differ between a run and its resumption (see the module docstring).
RESUMABLE_CHANGES = ('steps', 'eval_every', 'save_every', 'keep_checkpoints', 'log_every', 'encode_batch_size',
                     'num_results')


class RunSettingsError(ValueError):
    """A run resumed with other settings than it was started with."""


def run_outputs(folder: Union[str, os.PathLike]) -> List[Path]:
    """What a training run wrote into ``folder`` (sorted); empty for a missing folder or one holding caches only."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _OUTPUTS.match(p.name))


def _checkpoints(folder: Path) -> List[Path]:
    return [p for p in run_outputs(folder) if _CHECKPOINT.match(p.name)]


def check_output(folder: Union[str, os.PathLike], *, resume: bool = False, overwrite: bool = False) -> None:
    """Fails now, before anything is loaded, when ``folder`` cannot take this run; changes nothing.

    Raises:
        ValueError: for ``resume`` and ``overwrite`` together.
        FileExistsError: when ``folder`` holds a run and neither ``resume`` nor ``overwrite`` is set.
        FileNotFoundError: for ``resume`` when ``folder`` has no checkpoint to resume.
    """
    folder = Path(folder)
    if resume and overwrite:
        raise ValueError('resume and overwrite exclude each other: resume continues the run in the output folder, '
                         'overwrite replaces it')
    found = run_outputs(folder)
    if resume:
        if not _checkpoints(folder):
            raise FileNotFoundError(f'nothing to resume: {folder.absolute()} has no checkpoint-<step> folder (it holds '
                                    f'{[p.name for p in found] or "no training run"})')
    elif found and not overwrite:
        raise FileExistsError(f'{folder.absolute()} already holds a training run ({", ".join(p.name for p in found)}); '
                              'resume it (--resume, or train(resume_from=True)), replace it (--overwrite, or '
                              'Trainer(overwrite=True)), or choose another output folder')


def _name(value) -> Optional[str]:
    # The same local folder named relatively or absolutely is the same backbone.
    if value is None:
        return None
    return str(Path(value).absolute()) if Path(str(value)).expanduser().exists() else str(value)


def run_settings(model, config, groups) -> Dict[str, object]:
    """What makes two runs the same run: the model's architecture and options, the training options, the data."""
    model_settings = {'class': type(model).__name__, 'name_or_path': _name(getattr(model, 'name_or_path', None))}
    for key in ('pooling', 'query_max_length', 'doc_max_length', 'dim', 'normalize'):
        if hasattr(model, key):
            model_settings[key] = getattr(model, key)
    if hasattr(model, 'spec'):
        model_settings['qnet'] = model.spec.to_dict()
    if hasattr(model, 'query_projection'):
        model_settings['query_projection'] = model.query_projection is not None
    digest = hashlib.sha256()
    for text in list(groups.queries) + ['\0'] + list(groups.doc_texts):
        digest.update(text.encode('utf-8', 'surrogatepass') + b'\0')
    return {'model': model_settings, 'config': asdict(config),
            'data': {'queries': len(groups.queries), 'documents': len(groups.doc_texts), 'sha256': digest.hexdigest()}}


def _flatten(d: dict, prefix: str = '') -> Dict[str, object]:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f'{prefix}{key}.'))
        else:
            out[f'{prefix}{key}'] = value
    return out


def _differences(old: dict, new: dict, partial: bool = False) -> List[str]:
    old, new = _flatten(old), _flatten(json.loads(json.dumps(new)))  # as JSON reads it back: tuples are lists
    skip = {f'config.{k}' for k in RESUMABLE_CHANGES}
    keys = set(new) if partial else set(old) | set(new)
    return [f'{key}: {old.get(key, "(unset)")!r} then, {new.get(key, "(unset)")!r} now'
            for key in sorted(keys) if key not in skip and old.get(key) != new.get(key)]


def write_settings(folder: Path, settings: dict) -> None:
    """Writes ``run.json`` into ``folder`` (whole or not at all)."""
    tmp = folder / f'.{RUN_FILE}.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
        json.dump(settings, f, indent=1)
    os.replace(tmp, folder / RUN_FILE)


def check_resume(folder: Optional[Path], settings: dict, resume_from=True, partial: bool = False) -> None:
    """Checks that the checkpoint ``resume_from`` (True: the latest in ``folder``) was made with ``settings``.

    Args:
        partial: compare only the settings given (e.g. ``{'config': ...}`` before the model is loaded).

    Raises:
        FileNotFoundError: when there is no such checkpoint.
        RunSettingsError: naming each setting that differs.
    """
    if resume_from is True:
        checkpoints = sorted(_checkpoints(folder), key=lambda p: int(p.name.split('-')[1])) if folder else []
        source = checkpoints[-1] if checkpoints else None
    else:
        source = Path(resume_from)
    if source is None or not (source / 'trainer_state.pt').exists():
        # checked here too, so that a failed resume records nothing
        raise FileNotFoundError(f'{source or folder} is not a training checkpoint (no checkpoint-<step> folder with '
                                'trainer_state.pt); pass one written by the trainer, or train without resuming')
    # Runs written before run.json existed are resumed unchecked.
    recorded = next((f / RUN_FILE for f in (source, folder) if f is not None and (f / RUN_FILE).exists()), None)
    if recorded is not None:
        differs = _differences(json.loads(recorded.read_text(encoding='utf-8')), settings, partial)
        if differs:
            raise RunSettingsError(f'cannot resume {source}: it was trained with other settings ({recorded}): '
                                   + '; '.join(differs) + '. Resume with the same settings, or start a new run '
                                   '(another output folder, or overwrite)')


def claim(folder: Optional[Path], settings: dict, *, resume_from=None, overwrite: bool = False) -> None:
    """Makes ``folder`` this run's: checks it, removes a run being overwritten, and records the settings.

    Args:
        folder: the output folder (None: nothing is written, nothing checked).
        settings: :func:`run_settings` of this run.
        resume_from: None, True (the latest checkpoint in ``folder``) or a checkpoint folder.
        overwrite: replace a run in ``folder``.

    Raises:
        FileExistsError: when ``folder`` holds a run and neither ``resume_from`` nor ``overwrite`` is given.
        RunSettingsError: when resuming a run made with other settings, naming each difference.
    """
    if resume_from:
        check_resume(folder, settings, resume_from)
    # A run resumed from a checkpoint of another folder is a new run for this one.
    elsewhere = resume_from and resume_from is not True and Path(resume_from).absolute().parent != folder
    if (not resume_from or elsewhere) and folder is not None:
        if overwrite:
            for path in run_outputs(folder):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        check_output(folder)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        write_settings(folder, settings)

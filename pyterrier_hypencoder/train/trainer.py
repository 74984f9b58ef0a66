"""The trainer: AdamW with warm-up, gradient clipping, checkpoints, resume, and best-checkpoint selection on a dev set.

It trains a :class:`~pyterrier_hypencoder.Hypencoder` or a :class:`~pyterrier_hypencoder.train.DotEncoder`
(BE-Base) with the same data, losses and schedule, either

- head-only (``head_only=True``): the backbone is frozen, document vectors and query token states are computed
  once (and optionally cached on disk), and only the hyperhead (or the DotEncoder's query projection) learns;
  this runs on a CPU in minutes; or
- fully (``head_only=False``): the backbone learns too, with bf16 autocast on CUDA.

Either way a Hypencoder can be trained nested (``TrainConfig(matryoshka_widths=...)``, the Matryoshka Hypencoder):
each step's loss is summed over the q-nets cut to each width, all scored on the same batch.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import pandas as pd
import pyterrier as pt
import torch

from ..model.checkpoint import load_state_dict
from ..model.hypencoder import Hypencoder
from .biencoder import DotEncoder
from .config import TrainConfig, default_temperature, lr_factor
from .data import DevSet, QuerySampler, TrainingGroups
from .evaluation import evaluate_run, exhaustive_retrieve, rank_rows, results_frame
from .features import FeatureStore, check_trainable, pad_states
from .losses import distillation_loss, hard_negative_cross_entropy
from .run_folder import claim, run_settings, write_settings

__all__ = ['Trainer']

Model = Union[Hypencoder, DotEncoder]
_STATE_FILE = 'trainer_state.pt'
_CHECKPOINT = re.compile(r'^checkpoint-(\d+)$')


# ---- the trainer --------------------------------------------------------------------------------------------

@dataclass
class _State:
    step: int = 0
    best_metric: Optional[float] = None
    best_step: Optional[int] = None
    history: List[dict] = field(default_factory=list)


class Trainer:
    """Trains a Hypencoder or a DotEncoder (BE-Base) on PyTerrier-style training data.

    Example::

        model = warm_start_hypencoder(minilm_path, qnet_layers=2, doc_max_length=256)
        data = training_data_from_dataset('irds:beir/scifact/train', bm25)
        trainer = Trainer(model, data, TrainConfig(steps=400, eval_every=100), dev=dev_set,
                          output_dir='runs/scifact', cache_dir='runs/features')
        trainer.train()          # the model ends with the best dev weights; runs/scifact/best holds them too
    """

    def __init__(self, model: Model, data: Union[pd.DataFrame, TrainingGroups], config: Optional[TrainConfig] = None, *,
                 dev: Optional[DevSet] = None, output_dir: Optional[Union[str, os.PathLike]] = None,
                 cache_dir: Optional[Union[str, os.PathLike]] = None, overwrite: bool = False, verbose: bool = True):
        """
        Args:
            model: the model to train (in place).
            data: training data (a frame, see :mod:`pyterrier_hypencoder.train.data`) or prepared groups.
            config: options; defaults to :class:`TrainConfig()`.
            dev: dev queries for periodic evaluation and best-checkpoint selection.
            output_dir: where checkpoints (``checkpoint-<step>``), the best model (``best``), ``run.json`` (the
                settings) and ``trainer_state.json`` go; None keeps everything in memory. One run per folder: a
                folder holding a run is refused unless ``overwrite`` or ``train(resume_from=...)`` with the same
                settings (see :mod:`~pyterrier_hypencoder.train.run_folder`). Relative paths are resolved now.
            cache_dir: where head-only training caches frozen encodings between runs (None: memory only).
            overwrite: replace a run already in ``output_dir`` (its caches are kept).
            verbose: progress bars.
        """
        self.model = model
        check_trainable(model)
        self.config = config or TrainConfig()
        self.groups = data if isinstance(data, TrainingGroups) else TrainingGroups(
            data, use_teacher=None if self.config.loss == 'auto' else self.config.loss == 'distill')
        self.loss_name = self.config.loss
        if self.loss_name == 'auto':
            self.loss_name = 'distill' if self.groups.use_teacher else 'ce'
        if self.loss_name == 'distill' and not self.groups.use_teacher:
            raise ValueError('the distill loss needs teacher scores (a score column); use loss="ce" for labels only')
        self.temperature = self.config.temperature
        if self.temperature is None:
            self.temperature = default_temperature(model)
        if self.config.batch_size > len(self.groups):
            raise ValueError(f'batch_size {self.config.batch_size} exceeds the {len(self.groups)} training queries')
        self.dev = dev
        self.output_dir = Path(output_dir).absolute() if output_dir else None
        self.overwrite = overwrite
        self.verbose = verbose
        self.features = FeatureStore(model, cache_dir, self.config.encode_batch_size, verbose)
        self.lr = self.config.lr
        if self.lr is None:
            self.lr = 2e-5 if not self.config.head_only else model.default_head_lr
        self.widths = self._matryoshka_widths()
        self._train_docs: Optional[torch.Tensor] = None
        self._train_queries: Optional[List[torch.Tensor]] = None
        self._dev_docs: Optional[torch.Tensor] = None
        self._dev_queries: Optional[List[torch.Tensor]] = None
        self.state = _State()

    def __repr__(self) -> str:
        kind = type(self.model).__name__
        mode = 'head-only' if self.config.head_only else 'full'
        widths = f', matryoshka_widths={list(self.widths)}' if self.widths else ''
        return f'Trainer({kind}, {mode}, loss={self.loss_name!r}{widths}, {self.groups!r})'

    # ---- setup ----------------------------------------------------------------------------------------------

    def _matryoshka_widths(self) -> tuple:
        """The widths whose losses each step sums (empty: the full q-nets alone); declares the model nested at them."""
        widths = self.config.matryoshka_widths
        if widths is None:
            return tuple(getattr(self.model, 'matryoshka_widths', ()))
        if not hasattr(self.model, 'set_matryoshka_widths'):
            raise ValueError(f'matryoshka_widths trains nested q-nets, which a {type(self.model).__name__} does not have; '
                             'train a Hypencoder, or leave matryoshka_widths unset')
        self.model.set_matryoshka_widths(widths)  # a ValueError names widths the q-nets cannot take
        return tuple(widths)

    def _head_parameters(self) -> List[torch.nn.Parameter]:
        head = self.model.trainable_head
        if head is None:
            if not self.config.head_only:
                return []
            raise ValueError('a DotEncoder without a query projection has nothing to train head-only; build it with '
                             'query_projection=True or train the backbone (head_only=False)')
        return list(head.parameters())

    def _head_groups(self, head: List[torch.nn.Parameter], lr: float) -> List[dict]:
        """The head's parameter groups: the hyperhead's hidden-block generators at ``hidden_lr_scale`` times ``lr``."""
        module = self.model.trainable_head
        scale = self.config.hidden_lr_scale
        if not head:
            return []
        if scale == 1.0 or not hasattr(module, 'hidden_parameters'):
            return [{'params': head, 'lr': lr}]
        hidden = {id(p) for p in module.hidden_parameters()}
        return [{'params': [p for p in head if id(p) not in hidden], 'lr': lr},
                {'params': [p for p in head if id(p) in hidden], 'lr': lr * scale}]

    def _trainable(self) -> List[dict]:
        """Optimizer parameter groups: the head alone, or the backbone and the head (with ``head_lr``)."""
        head = self._head_parameters()
        if self.config.head_only:
            self.model.requires_grad_(False)
            for p in head:
                p.requires_grad_(True)
            return self._head_groups(head, self.lr)
        self.model.requires_grad_(True)
        head_ids = {id(p) for p in head}
        rest = [p for p in self.model.parameters() if id(p) not in head_ids]
        head_lr = self.config.head_lr if self.config.head_lr is not None else self.lr
        return [{'params': rest, 'lr': self.lr}] + self._head_groups(head, head_lr)

    def _train_mode(self) -> None:
        if self.config.head_only:
            self.model.eval()  # the frozen backbone's dropout stays off
            self.model.trainable_head.train()
        else:
            self.model.train()

    def _autocast(self):
        cuda = self.model.device.type == 'cuda'
        return torch.autocast('cuda', dtype=torch.bfloat16, enabled=cuda and self.config.bf16)

    def _prepare_features(self) -> None:
        if self.config.head_only and self._train_docs is None:
            self._train_docs = self.features.docs(self.groups.doc_texts)
            self._train_queries = self.features.queries(self.groups.queries)

    # ---- one step -------------------------------------------------------------------------------------------

    def _reps_and_docs(self, batch):
        """The batch's query representations (q-nets) and its ``[B, 1 + negatives, dim]`` document vectors."""
        device = self.model.device
        if self.config.head_only:
            states, mask = pad_states([self._train_queries[i] for i in batch.query_index.tolist()])
            reps = self.model.reps_from_states(states.to(self.model.dtype), mask)
            docs = self._train_docs[batch.doc_index.to(device)].to(self.model.dtype)
        else:
            q = self.model.tokenize(batch.queries, self.model.query_max_length)
            reps = self.model.query_reps(q['input_ids'], q['attention_mask'])
            texts = [self.groups.doc_texts[i] for i in batch.doc_index.reshape(-1).tolist()]
            d = self.model.tokenize(texts, self.model.doc_max_length)
            docs = self.model.doc_vectors(d['input_ids'], d['attention_mask']).view(*batch.doc_index.shape, -1)
        return reps, docs

    def _losses(self, batch) -> List[torch.Tensor]:
        """The batch's loss at each of ``self.widths`` (the q-nets cut to it), or of the full q-nets without widths."""
        reps, docs = self._reps_and_docs(batch)
        if not self.widths:
            return [self._loss_of(reps, docs, batch)]
        return [self._loss_of(reps.truncate(w), docs, batch) for w in self.widths]

    def _loss(self, batch) -> torch.Tensor:
        """The training loss of a batch: summed over the Matryoshka widths when there are any."""
        losses = self._losses(batch)
        return losses[0] if len(losses) == 1 else torch.stack(losses).sum()

    def _loss_of(self, reps, docs: torch.Tensor, batch) -> torch.Tensor:
        group = self.model.score_pairs(reps, docs)
        in_batch = self.model.score_all(reps, docs[:, 0])
        ignore = batch.ignore.to(group.device)
        if self.loss_name == 'distill':
            return distillation_loss(group.float(), batch.teacher.to(group.device), in_batch.float(), ignore,
                                     self.temperature)
        if self.config.in_batch:
            return hard_negative_cross_entropy(group.float(), in_batch.float(), ignore, self.temperature)
        return hard_negative_cross_entropy(group.float(), temperature=self.temperature)

    def frozen_doc_vectors(self, texts: Sequence[str]) -> torch.Tensor:
        """Document vectors from the frozen backbone, through the trainer's feature store (encoded once, cached).

        After head-only training these equal ``model.encode_docs(texts)``, since documents never pass the head.
        """
        if not self.config.head_only:
            raise ValueError('frozen_doc_vectors is for head-only training; after full fine-tuning use '
                             'model.encode_docs')
        return self.features.docs(list(texts))

    # ---- evaluation -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, dev: Optional[DevSet] = None, metric: Optional[str] = None) -> float:
        """The current model's dev measure (``config.metric`` by default), ranking ``dev.docs`` exhaustively."""
        dev = dev or self.dev
        if dev is None:
            raise ValueError('no dev set: pass one to Trainer(dev=...) or to evaluate()')
        metric = metric or self.config.metric
        was_training = self.model.training
        self.model.eval()
        try:
            if self.config.head_only:
                if dev is not self.dev or self._dev_docs is None:
                    docs = self.features.docs(dev.docs['text'].tolist())
                    queries = self.features.queries(dev.topics['query'].tolist())
                    if dev is self.dev:
                        self._dev_docs, self._dev_queries = docs, queries
                else:
                    docs, queries = self._dev_docs, self._dev_queries

                def score_fn(sl, d):
                    states, mask = pad_states(queries[sl])
                    return self.model.score_all(self.model.reps_from_states(states.to(self.model.dtype), mask), d)
                scores, rows = rank_rows(score_fn, len(dev.topics), docs.to(self.model.dtype), self.config.num_results)
                run = results_frame(dev.topics, dev.docs['docno'].tolist(), scores, rows)
            else:
                vectors = self.model.encode_docs(dev.docs['text'].tolist(), batch_size=self.config.encode_batch_size,
                                                 verbose=self.verbose)
                run = exhaustive_retrieve(self.model, dev.topics, vectors, dev.docs['docno'].tolist(),
                                          num_results=self.config.num_results)
        finally:
            self.model.train(was_training)
        return evaluate_run(run, dev.qrels, metric)

    # ---- checkpoints ----------------------------------------------------------------------------------------

    def _trainer_state(self, optimizer, scheduler, sampler, negatives) -> dict:
        return {
            'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict(), 'sampler': sampler.state_dict(),
            'negatives': negatives.get_state(), 'torch_rng': torch.get_rng_state(),
            'cuda_rng': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            'step': torch.tensor(self.state.step),
        }

    def _write_json(self, folder: Path) -> None:
        info = {'step': self.state.step, 'best_metric': self.state.best_metric, 'best_step': self.state.best_step,
                'metric': self.config.metric, 'loss': self.loss_name, 'lr': self.lr, 'config': asdict(self.config),
                'model': type(self.model).__name__, 'history': self.state.history}
        with open(folder / 'trainer_state.json', 'w', encoding='utf-8') as f:
            json.dump(info, f, indent=1)

    def _save_checkpoint(self, optimizer, scheduler, sampler, negatives) -> Path:
        """Writes ``checkpoint-<step>``: the model (``save_pretrained``) and everything needed to resume."""
        folder = self.output_dir / f'checkpoint-{self.state.step}'
        tmp = self.output_dir / f'.checkpoint-{self.state.step}.tmp'
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(tmp)
        torch.save(self._trainer_state(optimizer, scheduler, sampler, negatives), tmp / _STATE_FILE)
        self._write_json(tmp)
        write_settings(tmp, self._settings)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        old = sorted(self._checkpoints())[:-self.config.keep_checkpoints] if self.config.keep_checkpoints > 0 else []
        for _, path in old:
            shutil.rmtree(path, ignore_errors=True)
        return folder

    def _checkpoints(self):
        if self.output_dir is None or not self.output_dir.exists():
            return []
        return [(int(m.group(1)), p) for p in self.output_dir.iterdir()
                if (m := _CHECKPOINT.match(p.name)) and (p / _STATE_FILE).exists()]

    def _resume(self, resume_from, optimizer, scheduler, sampler, negatives) -> None:
        if resume_from is True:
            found = sorted(self._checkpoints())
            if not found:
                raise FileNotFoundError(f'resume=True but {self.output_dir} has no checkpoint-<step> folder to resume')
            folder = found[-1][1]
        else:
            folder = Path(resume_from)
        if not (folder / _STATE_FILE).exists():
            raise FileNotFoundError(f'{folder} is not a training checkpoint (no {_STATE_FILE}); pass a checkpoint-<step> '
                                    'folder written by the trainer')
        self.model.load_state_dict(load_state_dict(folder), strict=True)
        state = torch.load(folder / _STATE_FILE, map_location='cpu', weights_only=True)
        optimizer.load_state_dict(state['optimizer'])
        scheduler.load_state_dict(state['scheduler'])
        sampler.load_state_dict(state['sampler'])
        negatives.set_state(state['negatives'])
        torch.set_rng_state(state['torch_rng'])
        if state['cuda_rng'] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state['cuda_rng'])
        info = json.loads((folder / 'trainer_state.json').read_text())
        self.state = _State(step=int(state['step']), best_metric=info['best_metric'], best_step=info['best_step'],
                            history=info['history'])
        if self.dev is not None and self.output_dir is not None and (self.output_dir / 'best').exists():
            self._best = {k: v.detach().cpu().clone() for k, v in load_state_dict(self.output_dir / 'best').items()}

    def _maybe_keep_best(self, value: float) -> None:
        if self.state.best_metric is None or value > self.state.best_metric:
            self.state.best_metric, self.state.best_step = value, self.state.step
            self._best = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
            if self.output_dir is not None:
                self.model.save_pretrained(self.output_dir / 'best')
                with open(self.output_dir / 'best' / 'eval.json', 'w', encoding='utf-8') as f:
                    json.dump({'step': self.state.step, self.config.metric: value}, f)

    # ---- the loop -------------------------------------------------------------------------------------------

    def train(self, resume_from: Union[None, bool, str, os.PathLike] = None) -> Model:
        """Runs training.

        Args:
            resume_from: a ``checkpoint-<step>`` folder to continue from, or True for the latest one in
                ``output_dir``. Resuming restores weights, optimizer, schedule and sampling state, so a resumed run
                continues exactly as an uninterrupted one would; it must have the settings of the run it continues
                (``steps`` may grow).

        Raises:
            FileExistsError: when ``output_dir`` holds another run and neither ``overwrite`` nor ``resume_from``.
            RunSettingsError: (a ValueError) when resuming a run made with other settings, naming the differences.

        Returns:
            The model, holding the best dev weights when a dev set was given (else the final weights).
        """
        cfg = self.config
        torch.manual_seed(cfg.seed)
        groups = self._trainable()
        params = [p for g in groups for p in g['params']]
        optimizer = torch.optim.AdamW(groups, lr=self.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps, cfg.schedule))
        sampler = QuerySampler(len(self.groups), cfg.seed)
        negatives = torch.Generator().manual_seed(cfg.seed + 1)
        self._best: Optional[Dict[str, torch.Tensor]] = None
        # Before anything is computed: refuses a folder holding another run, or a resume with other settings.
        self._settings = run_settings(self.model, cfg, self.groups)
        claim(self.output_dir, self._settings, resume_from=resume_from, overwrite=self.overwrite)
        if resume_from:
            self._resume(resume_from, optimizer, scheduler, sampler, negatives)
        self._prepare_features()
        if self.dev is not None and self.state.step == 0 and cfg.eval_every:
            self._log_eval()

        self._train_mode()
        bar = pt.tqdm(total=cfg.steps, initial=self.state.step, desc='training', unit='step', disable=not self.verbose)
        running: List[float] = []
        running_widths: List[List[float]] = []
        while self.state.step < cfg.steps:
            batch = self.groups.batch(sampler.next(cfg.batch_size), cfg.num_negatives, negatives)
            with self._autocast():
                parts = self._losses(batch)
                loss = parts[0] if len(parts) == 1 else torch.stack(parts).sum()
            # one device-to-host sync per step, for the check and the log
            value, *by_width = torch.stack([loss] + parts).detach().tolist() if self.widths else [loss.item()]
            if not math.isfinite(value):
                raise FloatingPointError(f'the loss became {value} at step {self.state.step}; lower the learning '
                                         f'rate (now {self.lr}) or enable gradient clipping')
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            self.state.step += 1
            if hasattr(self.model, 'head_trained'):
                self.model.head_trained = True  # trained now: no "untrained q-nets" warning (checkpoints say so)
            running.append(value)
            running_widths.append(by_width)
            bar.update(1)
            if self.state.step % cfg.log_every == 0 or self.state.step == cfg.steps:
                mean = float(np.mean(running))
                entry = {'step': self.state.step, 'loss': mean, 'lr': scheduler.get_last_lr()[0]}
                if self.widths:  # each width's mean loss, keyed by width (JSON keys are strings)
                    entry['loss_by_width'] = {str(w): float(v) for w, v in zip(self.widths, np.mean(running_widths, 0))}
                self.state.history.append(entry)
                bar.set_postfix(loss=f'{mean:.4f}')
                running, running_widths = [], []
            if self.dev is not None and cfg.eval_every and self.state.step % cfg.eval_every == 0:
                self._log_eval()
                self._train_mode()
            if self.output_dir is not None and cfg.save_every and self.state.step % cfg.save_every == 0:
                self._save_checkpoint(optimizer, scheduler, sampler, negatives)
        bar.close()

        if self.dev is not None and (not cfg.eval_every or self.state.step % cfg.eval_every):
            self._log_eval()
        if self.output_dir is not None:
            if not any(s == self.state.step for s, _ in self._checkpoints()):
                self._save_checkpoint(optimizer, scheduler, sampler, negatives)
            self._write_json(self.output_dir)
        if self._best is not None:
            self.model.load_state_dict(self._best)
        self.model.requires_grad_(False)
        self.model.eval()
        return self.model

    def _log_eval(self) -> None:
        value = self.evaluate()
        self.state.history.append({'step': self.state.step, self.config.metric: value})
        if self.verbose:
            pt.tqdm.write(f'step {self.state.step}: dev {self.config.metric} = {value:.4f}')
        self._maybe_keep_best(value)

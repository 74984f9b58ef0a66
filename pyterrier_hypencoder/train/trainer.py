"""The trainer: AdamW with warm-up, gradient clipping, checkpoints, resume, and best-checkpoint selection on a dev set.

It trains a :class:`~pyterrier_hypencoder.Hypencoder` or a :class:`~pyterrier_hypencoder.train.DotEncoder`
(BE-Base) with the same data, losses and schedule, either

- head-only (``head_only=True``): the backbone is frozen, document vectors and query token states are computed
  once (and optionally cached on disk), and only the hyperhead (or the DotEncoder's query projection) learns;
  this runs on a CPU in minutes; or
- fully (``head_only=False``): the backbone learns too, with bf16 autocast on CUDA.
"""
from __future__ import annotations

import hashlib
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

from ..checkpoint import load_state_dict
from ..model import Hypencoder, _progress, pool
from ..qnet import QNets
from .biencoder import DotEncoder
from .data import DevSet, QuerySampler, TrainingGroups
from .losses import distillation_loss, hard_negative_cross_entropy
from .run_folder import claim, run_settings, write_settings

__all__ = ['FeatureStore', 'ModelScorer', 'TrainConfig', 'Trainer', 'exhaustive_retrieve']

Model = Union[Hypencoder, DotEncoder]
_STATE_FILE = 'trainer_state.pt'
_CHECKPOINT = re.compile(r'^checkpoint-(\d+)$')


@dataclass
class TrainConfig:
    """Training options.

    Attributes:
        steps: optimizer steps.
        batch_size: queries per step; each also brings 1 positive and ``num_negatives`` negatives.
        num_negatives: sampled negatives per query (the paper: 7).
        lr: peak learning rate; None means 2e-5 (the paper's) for full fine-tuning, and for head-only training
            3e-5 for a Hypencoder (its hyperhead turns small steps into large changes of the q-nets) and 1e-3 for
            a DotEncoder's query projection.
        head_lr: learning rate of the hyperhead (or query projection) in full fine-tuning, where a freshly
            initialised head often wants a larger one than the pretrained backbone; None means ``lr``.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps (the paper: 6,000 of a much longer run).
        schedule: after warm-up, ``constant`` (the paper) or ``linear`` decay to zero at ``steps``.
        grad_clip: maximum global gradient norm (0 disables clipping).
        loss: ``distill`` (Margin-MSE on teacher scores + in-batch cross-entropy, the paper's), ``ce``
            (cross-entropy against hard negatives and, with ``in_batch``, the other queries' positives), or
            ``auto`` (``distill`` when the data has teacher scores, else ``ce``).
        in_batch: use the other queries' positives as negatives in the ``ce`` loss.
        temperature: cross-entropy logits are ``scores / temperature``; None means 0.05 for cosine models and 1
            otherwise.
        head_only: freeze the backbone and train only the hyperhead (or the DotEncoder's query projection).
        seed: seeds query order, negative sampling and dropout.
        eval_every: evaluate on the dev set every this many steps (0: only at the end).
        save_every: write a resumable checkpoint every this many steps (0: only at the end).
        keep_checkpoints: resumable checkpoints kept on disk (older ones are deleted; 0 keeps them all).
        metric: the dev measure used to keep the best checkpoint (an ir_measures name; the paper uses R-precision).
        num_results: documents ranked per dev query.
        log_every: steps between loss log entries.
        bf16: bf16 autocast on CUDA (ignored on CPU).
        encode_batch_size: texts per forward pass when encoding.
    """
    steps: int = 1000
    batch_size: int = 32
    num_negatives: int = 7
    lr: Optional[float] = None
    head_lr: Optional[float] = None
    weight_decay: float = 0.0
    warmup_steps: int = 100
    schedule: str = 'constant'
    grad_clip: float = 1.0
    loss: str = 'auto'
    in_batch: bool = True
    temperature: Optional[float] = None
    head_only: bool = True
    seed: int = 0
    eval_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    metric: str = 'Rprec'
    num_results: int = 1000
    log_every: int = 10
    bf16: bool = True
    encode_batch_size: int = 32

    def __post_init__(self):
        if self.schedule not in ('constant', 'linear'):
            raise ValueError(f'schedule must be "constant" or "linear"; got {self.schedule!r}')
        if self.loss not in ('auto', 'distill', 'ce'):
            raise ValueError(f'loss must be "auto", "distill" or "ce"; got {self.loss!r}')
        for name in ('steps', 'batch_size', 'num_negatives', 'num_results', 'log_every', 'encode_batch_size'):
            if getattr(self, name) < 1:
                raise ValueError(f'{name} must be >= 1; got {getattr(self, name)}')
        for name in ('warmup_steps', 'eval_every', 'save_every', 'keep_checkpoints', 'weight_decay', 'grad_clip'):
            if getattr(self, name) < 0:
                raise ValueError(f'{name} must be >= 0; got {getattr(self, name)}')
        for name in ('lr', 'head_lr', 'temperature'):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f'{name} must be > 0 (or None for the default); got {getattr(self, name)}')
        import ir_measures
        try:
            ir_measures.parse_measure(self.metric)
        except Exception as e:  # ir_measures raises several kinds for a bad name
            raise ValueError(f'metric={self.metric!r} is not an ir_measures measure (e.g. "Rprec", "nDCG@10")') from e


def _lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == 'linear':
        return max(0.0, (total - step) / max(1, total - warmup))
    return 1.0


# ---- model-specific operations ------------------------------------------------------------------------------

class _Ops:
    """What the trainer needs from a model, for Hypencoder (q-nets) and DotEncoder (vectors) alike."""

    def __init__(self, model: Model):
        self.model = model
        self.is_hypencoder = isinstance(model, Hypencoder)
        if not self.is_hypencoder and not isinstance(model, DotEncoder):
            raise TypeError(f'can train a Hypencoder or a DotEncoder, not {type(model).__name__}')

    def head_parameters(self, required: bool = True) -> List[torch.nn.Parameter]:
        if self.is_hypencoder:
            return list(self.model.hyperhead.parameters())
        if self.model.query_projection is None:
            if not required:
                return []
            raise ValueError('a DotEncoder without a query projection has nothing to train head-only; build it with '
                             'query_projection=True or train the backbone (head_only=False)')
        return list(self.model.query_projection.parameters())

    def head_module(self) -> torch.nn.Module:
        return self.model.hyperhead if self.is_hypencoder else self.model.query_projection

    def reps_from_states(self, states: torch.Tensor, mask: torch.Tensor):
        if self.is_hypencoder:
            return self.model.hyperhead(states, mask)
        from ..model import pool
        return self.model.project_queries(pool(states, mask, self.model.pooling))

    def reps_from_tokens(self, input_ids: torch.Tensor, mask: torch.Tensor):
        if self.is_hypencoder:
            return self.model.query_qnets(input_ids, mask)
        return self.model.query_vectors(input_ids, mask)

    def doc_vectors(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model.doc_vectors(input_ids, mask)

    @staticmethod
    def score_pairs(reps, docs: torch.Tensor) -> torch.Tensor:
        if isinstance(reps, QNets):
            return reps.score_pairs(docs)
        return torch.einsum('bd,bmd->bm', reps, docs.to(reps.dtype))

    @staticmethod
    def score_all(reps, docs: torch.Tensor) -> torch.Tensor:
        if isinstance(reps, QNets):
            return reps.score(docs)
        return reps @ docs.to(reps.dtype).T

    @torch.no_grad()
    def query_states(self, texts: Sequence[str], batch_size: int, verbose: bool) -> List[torch.Tensor]:
        """Frozen backbone token states, one ``[tokens, hidden]`` tensor per query (padding removed)."""
        model = self.model
        out: List[Optional[torch.Tensor]] = [None] * len(texts)
        it = model._length_sorted_batches(list(texts), model.query_max_length, batch_size, 'query_max_length')
        for pos, batch in _progress(it, verbose, len(texts), batch_size, 'encoding queries (frozen)'):
            states = model.backbone(**batch).last_hidden_state
            lengths = batch['attention_mask'].sum(1).tolist()
            for row, i in enumerate(pos.tolist()):
                out[i] = states[row, :lengths[row]].detach().clone()
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def pooled_docs(self, texts: Sequence[str], batch_size: int, verbose: bool) -> torch.Tensor:
        """Frozen pooled document vectors ``[n, dim]`` straight from the backbone (before any normalisation)."""
        model = self.model
        backbone = model.doc_backbone or model.backbone
        out = torch.empty(len(texts), model.dim)
        it = model._length_sorted_batches(list(texts), model.doc_max_length, batch_size, 'doc_max_length')
        for pos, batch in _progress(it, verbose, len(texts), batch_size, 'encoding documents (frozen)'):
            states = backbone(**batch).last_hidden_state
            out[pos] = pool(states, batch['attention_mask'], model.pooling).float().cpu()
        return out

    def finish_docs(self, pooled: torch.Tensor) -> torch.Tensor:
        """What the model does to pooled document vectors after the backbone (a DotEncoder may normalise them)."""
        return pooled if self.is_hypencoder else self.model.finish_docs(pooled)


def _pad_states(states: Sequence[torch.Tensor]):
    """Token states of different lengths as one zero-padded ``[B, tokens, hidden]`` batch and its attention mask."""
    lengths = torch.tensor([s.shape[0] for s in states], device=states[0].device)
    mask = (torch.arange(int(lengths.max()), device=lengths.device) < lengths[:, None]).long()
    return torch.nn.utils.rnn.pad_sequence(list(states), batch_first=True), mask


def _backbone_fingerprint(backbone: torch.nn.Module) -> str:
    """A short key of a backbone's weights (a sample of every 7th tensor), so a changed backbone misses the cache."""
    h = hashlib.sha256()
    for name, p in list(backbone.named_parameters())[::7]:
        h.update(name.encode())
        # sample before converting: copying whole tensors (the embedding matrix) to the CPU was the slow part
        h.update(np.ascontiguousarray(p.detach().flatten()[:256].float().cpu().numpy()).tobytes())
    return h.hexdigest()[:16]


def _text_key(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


class FeatureStore:
    """Frozen backbone outputs per text, computed once and (with a cache folder) kept on disk between runs.

    Head-only training needs two things from the frozen backbone: pooled document vectors and query token
    states. Both are stored per text (keyed by a hash of the text), so overlapping texts (training candidates and
    the dev corpus) are encoded once, and a later run with the same backbone and options encodes nothing.
    """

    def __init__(self, model: Model, cache_dir: Optional[Union[str, os.PathLike]] = None, batch_size: int = 32,
                 verbose: bool = False):
        """
        Args:
            model: the Hypencoder or DotEncoder whose frozen backbone produces the features.
            cache_dir: folder for the on-disk stores; None keeps features in memory only.
            batch_size: texts per forward pass.
            verbose: progress bars.
        """
        self.ops = _Ops(model)
        self.model = model
        self.cache_dir = Path(cache_dir).absolute() if cache_dir else None  # unmoved by a later os.chdir
        self.batch_size = batch_size
        self.verbose = verbose
        # documents come from the document backbone where the model has its own (Hypencoder's doc_backbone)
        doc_backbone = _backbone_fingerprint(model.doc_backbone or model.backbone)
        query_backbone = _backbone_fingerprint(model.backbone)
        self._names = {
            'docs': f'docs-{doc_backbone}-{model.pooling}-{model.doc_max_length}.pt',
            'queries': f'queries-{query_backbone}-{model.query_max_length}.pt',
        }
        self._stores: Dict[str, Dict[str, torch.Tensor]] = {}

    def _store(self, kind: str) -> Dict[str, torch.Tensor]:
        if kind not in self._stores:
            store: Dict[str, torch.Tensor] = {}
            path = self.cache_dir / self._names[kind] if self.cache_dir else None
            if path is not None and path.exists():
                saved = torch.load(path, map_location='cpu', weights_only=True)
                store = dict(zip(saved['keys'], saved['values']))
            self._stores[kind] = store
        return self._stores[kind]

    def _save(self, kind: str) -> None:
        if self.cache_dir is None:
            return
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        path = self.cache_dir / self._names[kind]
        tmp = path.with_suffix(f'.{os.getpid()}.tmp')
        store = self._stores[kind]
        torch.save({'keys': list(store), 'values': list(store.values())}, tmp)
        os.replace(tmp, path)

    def _get(self, kind: str, texts: Sequence[str], compute) -> List[torch.Tensor]:
        store = self._store(kind)
        keys = [_text_key(t) for t in texts]
        missing = list(dict.fromkeys(k for k in keys if k not in store))
        if missing:
            first = dict(zip(keys, texts))
            for k, value in zip(missing, compute([first[k] for k in missing])):
                store[k] = value.detach().float().cpu()
            self._save(kind)
        return [store[k] for k in keys]

    def put(self, kind: str, texts: Sequence[str], values: Sequence[torch.Tensor]) -> None:
        """Adds precomputed features: ``kind='docs'``: pooled backbone vectors (before any normalisation);
        ``kind='queries'``: ``[tokens, hidden]`` token states."""
        store = self._store(kind)
        for t, v in zip(texts, values):
            store[_text_key(t)] = v.detach().float().cpu()
        self._save(kind)

    def docs(self, texts: Sequence[str]) -> torch.Tensor:
        """Frozen document vectors ``[n, dim]`` as ``model.encode_docs`` makes them (float32, on the model's device).

        The store keeps the backbone's pooled vectors, so models on the same backbone and pooling share them.
        """
        pooled = self._get('docs', texts, lambda todo: self.ops.pooled_docs(todo, self.batch_size, self.verbose))
        if not pooled:
            return torch.empty(0, self.model.dim, device=self.model.device)
        return self.ops.finish_docs(torch.stack(pooled).to(self.model.device))

    def queries(self, texts: Sequence[str]) -> List[torch.Tensor]:
        """Frozen query token states, one ``[tokens, hidden]`` tensor per query (on the model's device)."""
        states = self._get('queries', texts, lambda todo: self.ops.query_states(todo, self.batch_size, self.verbose))
        return [s.to(self.model.device) for s in states]


# ---- retrieval for evaluation -------------------------------------------------------------------------------

@torch.no_grad()
def _rank(score_fn, n_queries: int, doc_vectors: torch.Tensor, num_results: int, query_batch: int = 64):
    """Top ``num_results`` rows of ``doc_vectors`` per query; ``score_fn(slice)`` scores a slice of queries."""
    k = min(num_results, doc_vectors.shape[0])
    scores, rows = [], []
    for start in range(0, n_queries, query_batch):
        s = score_fn(slice(start, min(n_queries, start + query_batch)), doc_vectors).float()
        top = torch.topk(s, k, dim=1)
        scores.append(top.values.cpu())
        rows.append(top.indices.cpu())
    return torch.cat(scores).numpy(), torch.cat(rows).numpy()


def _results_frame(topics: pd.DataFrame, docnos: Sequence[str], scores: np.ndarray, rows: np.ndarray) -> pd.DataFrame:
    k = scores.shape[1]
    docnos = np.asarray(docnos, dtype=object)
    frame = pd.DataFrame({
        'qid': np.repeat(topics['qid'].to_numpy(), k),
        'query': np.repeat(topics['query'].to_numpy(), k),
        'docno': docnos[rows.reshape(-1)],
        'score': scores.reshape(-1).astype(np.float64),
        'rank': np.tile(np.arange(k), len(topics)),
    })
    return frame


@torch.no_grad()
def exhaustive_retrieve(model: Model, topics: pd.DataFrame, doc_vectors: torch.Tensor, docnos: Sequence[str], *,
                        num_results: int = 1000, batch_size: int = 64) -> pd.DataFrame:
    """Ranks every document for every query in memory: a PyTerrier results frame.

    Args:
        model: a Hypencoder or DotEncoder.
        topics: ``qid, query``.
        doc_vectors: ``[n_docs, dim]`` from ``model.encode_docs``.
        docnos: the documents' docnos, in ``doc_vectors`` order.
        num_results: documents kept per query.
        batch_size: queries encoded and scored at once.

    Returns:
        ``qid, query, docno, score, rank``.
    """
    if len(docnos) != doc_vectors.shape[0]:
        raise ValueError(f'{len(docnos)} docnos for {doc_vectors.shape[0]} document vectors')
    topics = topics[['qid', 'query']].reset_index(drop=True)
    if not len(topics):
        return pd.DataFrame({'qid': [], 'query': [], 'docno': [], 'score': [], 'rank': []})
    reps = model.encode_queries(topics['query'].tolist(), batch_size=batch_size)
    scores, rows = _rank(lambda sl, d: _Ops.score_all(reps[sl], d), len(topics), doc_vectors.to(model.device),
                         num_results, batch_size)
    return _results_frame(topics, docnos, scores, rows)


class ModelScorer(pt.Transformer):
    """Scores ``qid, query, docno, text`` rows with a Hypencoder or DotEncoder (e.g. as a teacher for training data).

    Adds ``score`` and ``rank``. Each distinct query and text is encoded once.
    """

    def __init__(self, model: Model, batch_size: int = 32, verbose: bool = False):
        """
        Args:
            model: a Hypencoder or DotEncoder.
            batch_size: texts per encoding batch.
            verbose: progress bars.
        """
        _Ops(model)
        self.model = model
        self.batch_size = batch_size
        self.verbose = verbose

    @classmethod
    def from_pretrained(cls, folder: Union[str, os.PathLike], device=None, **kwargs) -> ModelScorer:
        """A scorer over a model saved by this package (Hypencoder or DotEncoder, told apart by its config)."""
        from ..checkpoint import read_json, resolve_folder
        from .biencoder import FORMAT_NAME as DOT_FORMAT
        path = resolve_folder(folder)
        if DOT_FORMAT in read_json(path / 'config.json'):
            return cls(DotEncoder.from_pretrained(path, device=device), **kwargs)
        return cls(Hypencoder.from_pretrained(path, device=device), **kwargs)

    def __repr__(self) -> str:
        return f'ModelScorer({self.model!r})'

    @torch.no_grad()
    def transform(self, inp: pd.DataFrame) -> pd.DataFrame:
        with pt.validate.any(inp) as v:
            v.result_frame(extra_columns=['query', 'text'])
            v.columns(includes=['qid', 'query', 'docno', 'text'])
        if not len(inp):
            return inp.assign(score=pd.Series(dtype=float), rank=pd.Series(dtype=int))
        inp = inp.reset_index(drop=True)
        q_codes, queries = pd.factorize(inp['query'])
        d_codes, texts = pd.factorize(inp['text'])
        reps = self.model.encode_queries(list(queries), batch_size=self.batch_size, verbose=self.verbose)
        docs = self.model.encode_docs(list(texts), batch_size=self.batch_size, verbose=self.verbose)
        scores = np.empty(len(inp), dtype=np.float64)
        for qi in range(len(queries)):
            rows = np.flatnonzero(q_codes == qi)
            doc_rows = torch.as_tensor(d_codes[rows], device=docs.device)
            scores[rows] = _Ops.score_all(reps[qi:qi + 1], docs[doc_rows]).float().cpu().numpy()[0]
        return pt.model.add_ranks(inp.drop(columns=['score', 'rank'], errors='ignore').assign(score=scores))


def _evaluate_run(run: pd.DataFrame, qrels: pd.DataFrame, metric: str) -> float:
    import ir_measures
    measure = ir_measures.parse_measure(metric)
    return float(pt.Evaluate(run, qrels, [measure])[str(measure)])


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
        self.ops = _Ops(model)
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
            self.temperature = 0.05 if getattr(model, 'normalize', False) else 1.0
        if self.config.batch_size > len(self.groups):
            raise ValueError(f'batch_size {self.config.batch_size} exceeds the {len(self.groups)} training queries')
        self.dev = dev
        self.output_dir = Path(output_dir).absolute() if output_dir else None
        self.overwrite = overwrite
        self.verbose = verbose
        self.features = FeatureStore(model, cache_dir, self.config.encode_batch_size, verbose)
        self.lr = self.config.lr
        if self.lr is None:
            self.lr = 2e-5 if not self.config.head_only else 3e-5 if self.ops.is_hypencoder else 1e-3
        self._train_docs: Optional[torch.Tensor] = None
        self._train_queries: Optional[List[torch.Tensor]] = None
        self._dev_docs: Optional[torch.Tensor] = None
        self._dev_queries: Optional[List[torch.Tensor]] = None
        self.state = _State()

    def __repr__(self) -> str:
        kind = 'Hypencoder' if self.ops.is_hypencoder else 'DotEncoder'
        mode = 'head-only' if self.config.head_only else 'full'
        return f'Trainer({kind}, {mode}, loss={self.loss_name!r}, {self.groups!r})'

    # ---- setup ----------------------------------------------------------------------------------------------

    def _trainable(self) -> List[dict]:
        """Optimizer parameter groups: the head alone, or the backbone and the head (with ``head_lr``)."""
        head = self.ops.head_parameters(required=self.config.head_only)
        if self.config.head_only:
            self.model.requires_grad_(False)
            for p in head:
                p.requires_grad_(True)
            return [{'params': head, 'lr': self.lr}]
        self.model.requires_grad_(True)
        head_ids = {id(p) for p in head}
        rest = [p for p in self.model.parameters() if id(p) not in head_ids]
        head_lr = self.config.head_lr if self.config.head_lr is not None else self.lr
        return [{'params': rest, 'lr': self.lr}] + ([{'params': head, 'lr': head_lr}] if head else [])

    def _train_mode(self) -> None:
        if self.config.head_only:
            self.model.eval()  # the frozen backbone's dropout stays off
            self.ops.head_module().train()
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

    def _scores(self, batch):
        device = self.model.device
        if self.config.head_only:
            states, mask = _pad_states([self._train_queries[i] for i in batch.query_index.tolist()])
            reps = self.ops.reps_from_states(states.to(self.model.dtype), mask)
            docs = self._train_docs[batch.doc_index.to(device)].to(self.model.dtype)
        else:
            q = self.model.tokenize(batch.queries, self.model.query_max_length)
            reps = self.ops.reps_from_tokens(q['input_ids'], q['attention_mask'])
            texts = [self.groups.doc_texts[i] for i in batch.doc_index.reshape(-1).tolist()]
            d = self.model.tokenize(texts, self.model.doc_max_length)
            docs = self.ops.doc_vectors(d['input_ids'], d['attention_mask']).view(*batch.doc_index.shape, -1)
        group = self.ops.score_pairs(reps, docs)
        in_batch = self.ops.score_all(reps, docs[:, 0])
        return group, in_batch

    def _loss(self, batch) -> torch.Tensor:
        group, in_batch = self._scores(batch)
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
                    states, mask = _pad_states(queries[sl])
                    return self.ops.score_all(self.ops.reps_from_states(states.to(self.model.dtype), mask), d)
                scores, rows = _rank(score_fn, len(dev.topics), docs.to(self.model.dtype), self.config.num_results)
                run = _results_frame(dev.topics, dev.docs['docno'].tolist(), scores, rows)
            else:
                vectors = self.model.encode_docs(dev.docs['text'].tolist(), batch_size=self.config.encode_batch_size,
                                                 verbose=self.verbose)
                run = exhaustive_retrieve(self.model, dev.topics, vectors, dev.docs['docno'].tolist(),
                                          num_results=self.config.num_results)
        finally:
            self.model.train(was_training)
        return _evaluate_run(run, dev.qrels, metric)

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
            optimizer, lambda s: _lr_factor(s, cfg.warmup_steps, cfg.steps, cfg.schedule))
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
        while self.state.step < cfg.steps:
            batch = self.groups.batch(sampler.next(cfg.batch_size), cfg.num_negatives, negatives)
            with self._autocast():
                loss = self._loss(batch)
            value = loss.item()  # one device-to-host sync per step, for the check and the log
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
            running.append(value)
            bar.update(1)
            if self.state.step % cfg.log_every == 0 or self.state.step == cfg.steps:
                mean = float(np.mean(running))
                self.state.history.append({'step': self.state.step, 'loss': mean, 'lr': scheduler.get_last_lr()[0]})
                bar.set_postfix(loss=f'{mean:.4f}')
                running = []
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

"""Frozen backbone features for head-only training: computed once per text, optionally cached on disk."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from ..model.text_encoder import TextEncoder, batch_progress, pool

__all__ = ['FeatureStore', 'frozen_pooled_docs', 'frozen_query_states']


def check_trainable(model) -> None:
    """Raises a TypeError unless ``model`` is a Hypencoder or a DotEncoder (anything with the training interface)."""
    if not isinstance(model, TextEncoder) or not hasattr(model, 'reps_from_states'):
        raise TypeError(f'can train a Hypencoder or a DotEncoder, not {type(model).__name__}')


@torch.no_grad()
def frozen_query_states(model: TextEncoder, texts: Sequence[str], batch_size: int = 32,
                        verbose: bool = False) -> List[torch.Tensor]:
    """Frozen backbone token states, one ``[tokens, hidden]`` tensor per query (padding removed)."""
    out: List[Optional[torch.Tensor]] = [None] * len(texts)
    it = model._length_sorted_batches(list(texts), model.query_max_length, batch_size, 'query_max_length')
    for pos, batch in batch_progress(it, verbose, len(texts), batch_size, 'encoding queries (frozen)'):
        states = model.backbone(**batch).last_hidden_state
        lengths = batch['attention_mask'].sum(1).tolist()
        for row, i in enumerate(pos.tolist()):
            out[i] = states[row, :lengths[row]].detach().clone()
    return out  # type: ignore[return-value]


@torch.no_grad()
def frozen_pooled_docs(model: TextEncoder, texts: Sequence[str], batch_size: int = 32,
                       verbose: bool = False) -> torch.Tensor:
    """Frozen pooled document vectors ``[n, dim]`` straight from the backbone (before any normalisation)."""
    backbone = model.doc_backbone or model.backbone
    out = torch.empty(len(texts), model.dim)
    it = model._length_sorted_batches(list(texts), model.doc_max_length, batch_size, 'doc_max_length')
    for pos, batch in batch_progress(it, verbose, len(texts), batch_size, 'encoding documents (frozen)'):
        states = backbone(**batch).last_hidden_state
        out[pos] = pool(states, batch['attention_mask'], model.pooling).float().cpu()
    return out


def pad_states(states: Sequence[torch.Tensor]):
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

    def __init__(self, model: TextEncoder, cache_dir: Optional[Union[str, os.PathLike]] = None, batch_size: int = 32,
                 verbose: bool = False):
        """
        Args:
            model: the Hypencoder or DotEncoder whose frozen backbone produces the features.
            cache_dir: folder for the on-disk stores; None keeps features in memory only.
            batch_size: texts per forward pass.
            verbose: progress bars.
        """
        check_trainable(model)
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
        pooled = self._get('docs', texts, lambda todo: frozen_pooled_docs(self.model, todo, self.batch_size, self.verbose))
        if not pooled:
            return torch.empty(0, self.model.dim, device=self.model.device)
        return self.model.finish_docs(torch.stack(pooled).to(self.model.device))

    def queries(self, texts: Sequence[str]) -> List[torch.Tensor]:
        """Frozen query token states, one ``[tokens, hidden]`` tensor per query (on the model's device)."""
        states = self._get('queries', texts, lambda todo: frozen_query_states(self.model, todo, self.batch_size, self.verbose))
        return [s.to(self.model.device) for s in states]

"""What every text encoder here shares: a tokenizer, backbones on one device and dtype, length-sorted batches and
pooling. :class:`~pyterrier_hypencoder.Hypencoder` builds on it, and so does the training package's ``DotEncoder``."""
from __future__ import annotations

from typing import Iterator, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..devices import DTypeLike, as_dtype, default_device

__all__ = ['TextEncoder', 'backbone_from_config', 'batch_progress', 'check_texts', 'length_sorted_batches', 'pool']


def backbone_from_config(config) -> nn.Module:
    """A transformers backbone with random weights from ``config`` (weights are loaded into it afterwards)."""
    from transformers import AutoModel
    # transformers 4.4x saves configs marked "attention implementation already chosen", so a reloaded model would
    # fall back to eager attention while the original ran SDPA (scores differing by ~1e-4): let it choose again.
    if getattr(config, '_attn_implementation_autoset', False):
        config._attn_implementation_autoset = False
    return AutoModel.from_config(config)


class TextEncoder(nn.Module):
    """What :class:`Hypencoder` and the training package's ``DotEncoder`` share: a tokenizer and one or two
    backbones (``backbone``, optional ``doc_backbone``) on one device and dtype.

    Both also give the trainer one interface, so it never asks which of the two it trains: ``trainable_head``
    (what head-only training learns), ``query_reps`` (query representations from tokens, differentiable),
    ``reps_from_states`` (the same from frozen token states), ``doc_vectors`` and ``finish_docs`` (documents,
    from tokens or from pooled frozen states), ``score_pairs`` / ``score_all`` (scores of representations
    against per-query or shared documents), and ``default_head_lr``.
    """

    doc_backbone: Optional[nn.Module] = None

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _check_max_length(self, max_length: int, name: str = 'max_length') -> None:
        # Longer inputs than the position embeddings fail deep inside the backbone with a shape error.
        limits = [getattr(b.config, 'max_position_embeddings', None) for b in (self.backbone, self.doc_backbone)
                  if b is not None]
        limit = min((x for x in limits if isinstance(x, int)), default=None)
        if max_length < 1:
            raise ValueError(f'{name} must be >= 1; got {max_length}')
        if limit is not None and max_length > limit:
            raise ValueError(f'{name}={max_length} is more tokens than the backbone has positions ({limit}); set '
                             f'{name} to at most {limit}')

    def _place(self, device, dtype: DTypeLike):
        self._check_max_length(self.query_max_length, 'query_max_length')
        self._check_max_length(self.doc_max_length, 'doc_max_length')
        self.to(device=default_device(device), dtype=as_dtype(dtype) or torch.float32)
        return self.eval()

    def tokenize(self, texts: Sequence[str], max_length: int) -> dict:
        """Tokenises ``texts`` padded to the longest, truncated to ``max_length``, on the model's device."""
        check_texts(texts)
        self._check_max_length(max_length)
        enc = self.tokenizer(list(texts), padding='longest', truncation=True, max_length=max_length,
                             return_tensors='pt', return_token_type_ids=False)
        return {'input_ids': enc['input_ids'].to(self.device), 'attention_mask': enc['attention_mask'].to(self.device)}

    def _length_sorted_batches(self, texts: Sequence[str], max_length: int, batch_size: int,
                               name: str = 'max_length') -> Iterator[Tuple[torch.Tensor, dict]]:
        self._check_max_length(max_length, name)
        return length_sorted_batches(self.tokenizer, texts, max_length, batch_size, self.device)


def length_sorted_batches(tokenizer, texts: Sequence[str], max_length: int, batch_size: int,
                          device) -> Iterator[Tuple[torch.Tensor, dict]]:
    """Yields ``(positions, batch)``: texts grouped by token length, so little compute is spent on padding.

    ``positions`` are the texts' indexes in ``texts``; ``batch`` holds ``input_ids`` and ``attention_mask`` on
    ``device``, padded to the longest text of the batch.
    """
    check_texts(texts)
    if len(texts) == 0:
        return  # the tokenizer fails on an empty list
    ids = tokenizer(list(texts), truncation=True, max_length=max_length, add_special_tokens=True,
                    return_attention_mask=False, return_token_type_ids=False)['input_ids']
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    pad = tokenizer.pad_token_id or 0
    for start in range(0, len(order), batch_size):
        positions = order[start:start + batch_size]
        width = len(ids[positions[0]])
        input_ids = torch.full((len(positions), width), pad, dtype=torch.long)
        mask = torch.zeros((len(positions), width), dtype=torch.long)
        for row, i in enumerate(positions):
            input_ids[row, :len(ids[i])] = torch.tensor(ids[i])
            mask[row, :len(ids[i])] = 1
        yield torch.tensor(positions), {'input_ids': input_ids.to(device), 'attention_mask': mask.to(device)}


def pool(states: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pools token states ``[batch, tokens, dim]`` into one vector per text: ``cls`` or masked ``mean``."""
    if pooling == 'cls':
        return states[:, 0]
    mask = attention_mask.unsqueeze(-1).to(states.dtype)
    return (states * mask).sum(1) / mask.sum(1).clamp(min=1)


def check_texts(texts) -> None:
    """Fails unless ``texts`` is a list of strings (a single string is the usual mistake)."""
    if isinstance(texts, str):
        raise TypeError('expected a list of texts, got a single string; wrap it in a list')
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f'text {i} is {type(t).__name__} ({t!r}), not str')


def batch_progress(it, verbose: bool, n: int, batch_size: int, desc: str):
    """``it`` (batches of ``batch_size`` out of ``n`` texts) behind a progress bar when ``verbose``."""
    if not verbose:
        return it
    import pyterrier as pt
    return pt.tqdm(it, total=(n + batch_size - 1) // batch_size, desc=desc, unit='batch')

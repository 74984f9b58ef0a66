"""BE-Base: the inner-product bi-encoder that the paper compares Hypencoder with, on the same backbone.

A :class:`DotEncoder` pools the backbone's token states into one vector per text (CLS or mean), maps the
query vector through a learned linear layer (initialised to the identity, so an untrained model is the backbone's
own dot product), and scores a document by the inner product (or the cosine, ``normalize=True``).
:meth:`DotEncoder.biencoder` wraps it as a ``pyterrier_dr.BiEncoder``, so ``pyterrier_dr.FlexIndex`` indexes and
retrieves with it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model.checkpoint import CheckpointError, load_backbone, load_state_dict, read_json, resolve_folder
from ..model.text_encoder import TextEncoder, backbone_from_config, batch_progress, pool
from ..optional import require

__all__ = ['DotEncoder']

FORMAT_NAME = 'pyterrier-hypencoder-dot'
FORMAT_VERSION = 1
_POOLINGS = ('cls', 'mean')


class DotEncoder(TextEncoder):
    """A single-vector bi-encoder: ``score(q, d) = (P pool(q)) . pool(d)`` (BE-Base in the Hypencoder paper).

    The interface mirrors :class:`~pyterrier_hypencoder.Hypencoder` (``encode_queries``, ``encode_docs``,
    ``query_vectors``, ``doc_vectors``, ``save_pretrained``/``from_pretrained``), so the trainer handles both.

    Example::

        model = DotEncoder.from_backbone('sentence-transformers/all-MiniLM-L6-v2', pooling='mean', normalize=True)
        model.encode_queries(['what is a q-net']) @ model.encode_docs(['A q-net is a small network.']).T
    """

    def __init__(self, backbone: nn.Module, tokenizer, *, pooling: str = 'cls', normalize: bool = False,
                 query_projection: bool = True, query_norm: bool = False, doc_norm: bool = False,
                 query_max_length: int = 64, doc_max_length: int = 512, name_or_path: Optional[str] = None):
        """
        Args:
            backbone: a Hugging Face encoder shared by queries and documents.
            tokenizer: its tokenizer.
            pooling: ``cls`` (the paper's BE-Base) or ``mean`` (masked mean of the token states).
            normalize: L2-normalise both vectors, so scores are cosines.
            query_projection: a learned ``dim x dim`` query-side linear map, initialised to the identity (the
                trainable part when the backbone is frozen).
            query_norm: standardise the pooled query (a layer norm without parameters) before the projection:
                ``score = (P layer_norm(pool(q))) . pool(d)``. With ``normalize=False`` and mean pooling, this is
                a BE-Base that a q-net expresses exactly, so a Hypencoder can start from it
                (:func:`~pyterrier_hypencoder.train.warm_start_from_dot`); the standardisation only rescales and
                centres each query, so it changes the ranking by no more than the centring does.
            doc_norm: standardise each document vector too: ``score = (P layer_norm(pool(q))) .
                layer_norm(pool(d))``. Dividing each document by its own spread makes this nearly a cosine
                (exactly one for zero-mean vectors), yet a q-net still expresses it exactly, through its hidden
                block's layer norm: the BE-Base to warm-start a Hypencoder from when cosine scoring ranks best.
            query_max_length: query tokens kept, special tokens included.
            doc_max_length: document tokens kept, special tokens included.
            name_or_path: where the model came from.
        """
        super().__init__()
        if pooling not in _POOLINGS:
            raise ValueError(f'unknown pooling {pooling!r}; use one of {_POOLINGS}')
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.normalize = bool(normalize)
        self.query_norm = bool(query_norm)
        self.doc_norm = bool(doc_norm)
        if self.doc_norm and self.normalize:
            raise ValueError('doc_norm=True standardises document vectors that normalize=True would then rescale; '
                             'choose one of them')
        self.query_max_length = int(query_max_length)
        self.doc_max_length = int(doc_max_length)
        self.name_or_path = name_or_path
        dim = backbone.config.hidden_size
        self.query_projection = None
        if query_projection:
            self.query_projection = nn.Linear(dim, dim, bias=False)
            with torch.no_grad():
                self.query_projection.weight.copy_(torch.eye(dim))

    # ---- construction ---------------------------------------------------------------------------------------

    @classmethod
    def from_backbone(cls, encoder_name_or_path: Union[str, os.PathLike], *, pooling: Optional[str] = None,
                      normalize: bool = False, query_projection: bool = True, query_norm: bool = False,
                      doc_norm: bool = False, query_max_length: int = 64, doc_max_length: int = 512, device=None,
                      dtype=None) -> DotEncoder:
        """A new bi-encoder on a pretrained encoder (the query projection starts as the identity).

        Args:
            encoder_name_or_path: a Hugging Face encoder folder or hub name.
            pooling: ``cls`` or ``mean``; None follows a sentence-transformers model's pooling config, else ``cls``.
            normalize: score by cosine instead of inner product.
            query_projection: add the learned query-side linear map.
            query_norm: standardise the pooled query before the projection (see :class:`DotEncoder`).
            doc_norm: standardise the pooled documents (see :class:`DotEncoder`).
            query_max_length: query tokens kept.
            doc_max_length: document tokens kept.
            device: where to put the model; None means cuda when available.
            dtype: ``fp32`` (default), ``bf16`` or ``fp16``.
        """
        backbone, tokenizer, pooling = load_backbone(encoder_name_or_path, pooling)
        model = cls(backbone, tokenizer, pooling=pooling, normalize=normalize, query_projection=query_projection,
                    query_norm=query_norm, doc_norm=doc_norm, query_max_length=query_max_length,
                    doc_max_length=doc_max_length, name_or_path=str(encoder_name_or_path))
        return model._place(device, dtype)

    @classmethod
    def from_pretrained(cls, folder: Union[str, os.PathLike], *, device=None, dtype=None) -> DotEncoder:
        """Loads a model saved with :meth:`save_pretrained`.

        Raises:
            CheckpointError: the folder is missing, is not a saved DotEncoder, or its weights do not fit.
        """
        from transformers import AutoConfig, AutoTokenizer
        path = resolve_folder(folder)
        config = read_json(path / 'config.json')
        if FORMAT_NAME not in config:
            raise CheckpointError(f'{path / "config.json"} is not a saved DotEncoder (no {FORMAT_NAME!r} entry); '
                                  'Hypencoder checkpoints load with Hypencoder.from_pretrained')
        meta = config[FORMAT_NAME]
        if meta.get('format_version', 0) > FORMAT_VERSION:
            raise CheckpointError(f'{path} was saved by a newer pyterrier-hypencoder; upgrade the package')
        backbone = backbone_from_config(AutoConfig.from_pretrained(str(path / 'backbone')))
        model = cls(backbone, AutoTokenizer.from_pretrained(str(path)), pooling=meta['pooling'],
                    normalize=meta['normalize'], query_projection=meta['query_projection'],
                    query_norm=meta.get('query_norm', False), doc_norm=meta.get('doc_norm', False),
                    query_max_length=meta['query_max_length'],
                    doc_max_length=meta['doc_max_length'], name_or_path=str(folder))
        state = load_state_dict(path)
        own = model.state_dict()
        missing = [k for k in own if k not in state and not k.endswith('position_ids')]
        unexpected = [k for k in state if k not in own]
        if missing or unexpected:
            raise CheckpointError(f'{path} does not fit its config: missing {missing[:3]}, unexpected {unexpected[:3]}')
        model.load_state_dict(state, strict=False)
        return model._place(device, dtype)

    def save_pretrained(self, folder: Union[str, os.PathLike]) -> None:
        """Saves weights (safetensors), configs and tokenizer, so :meth:`from_pretrained` restores the model exactly."""
        from safetensors.torch import save_file
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backbone.config.save_pretrained(str(folder / 'backbone'))
        self.tokenizer.save_pretrained(str(folder))
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(folder / 'model.safetensors'), metadata={'format': 'pt'})
        config = {FORMAT_NAME: {
            'format_version': FORMAT_VERSION, 'pooling': self.pooling, 'normalize': self.normalize,
            'query_projection': self.query_projection is not None, 'query_norm': self.query_norm,
            'doc_norm': self.doc_norm,
            'query_max_length': self.query_max_length,
            'doc_max_length': self.doc_max_length, 'dim': self.dim,
        }}
        with open(folder / 'config.json', 'w', encoding='utf-8') as f:
            json.dump(config, f, indent=2)

    # ---- properties -----------------------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        """Size of the query and document vectors."""
        return self.backbone.config.hidden_size

    def __repr__(self) -> str:
        sim = 'cos' if self.normalize else 'dot'
        norm = ''.join(f', {name}=True' for name in ('query_norm', 'doc_norm') if getattr(self, name))
        return (f'DotEncoder({self.name_or_path!r}, pooling={self.pooling!r}, sim={sim!r}, '
                f'projection={self.query_projection is not None}{norm}, device={str(self.device)!r})')

    # ---- differentiable encoders ----------------------------------------------------------------------------

    def project_queries(self, pooled: torch.Tensor) -> torch.Tensor:
        """Query vectors from pooled query states: standardisation and the projection, then normalisation, as
        enabled."""
        if self.query_norm:
            pooled = F.layer_norm(pooled, (pooled.shape[-1],))  # as the q-net's own layer norm (eps 1e-5)
        if self.query_projection is not None:
            pooled = self.query_projection(pooled)
        return F.normalize(pooled, dim=-1) if self.normalize else pooled

    def finish_docs(self, pooled: torch.Tensor) -> torch.Tensor:
        """Document vectors from pooled document states (normalised or standardised, if enabled)."""
        if self.doc_norm:
            return F.layer_norm(pooled, (pooled.shape[-1],))  # as the q-net's hidden-block layer norm (eps 1e-5)
        return F.normalize(pooled, dim=-1) if self.normalize else pooled

    def query_vectors(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Query vectors ``[batch, dim]`` for tokenised queries (differentiable)."""
        states = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.project_queries(pool(states, attention_mask, self.pooling))

    def doc_vectors(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Document vectors ``[batch, dim]`` for tokenised documents (differentiable)."""
        states = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.finish_docs(pool(states, attention_mask, self.pooling))

    # ---- the training interface (see TextEncoder) -----------------------------------------------------------

    # a linear map over frozen vectors takes larger steps than a hyperhead
    default_head_lr = 1e-3

    @property
    def trainable_head(self) -> Optional[nn.Module]:
        """What head-only training learns: the query projection (None without one)."""
        return self.query_projection

    def query_reps(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Query vectors (differentiable): :meth:`query_vectors`."""
        return self.query_vectors(input_ids, attention_mask)

    def reps_from_states(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Query vectors from the backbone's token states of the queries (e.g. cached, frozen ones)."""
        return self.project_queries(pool(states, attention_mask, self.pooling))

    @staticmethod
    def score_pairs(reps: torch.Tensor, docs: torch.Tensor) -> torch.Tensor:
        """``[B, m]`` inner products of each query vector with its own ``[B, m, dim]`` documents."""
        return torch.einsum('bd,bmd->bm', reps, docs.to(reps.dtype))

    @staticmethod
    def score_all(reps: torch.Tensor, docs: torch.Tensor) -> torch.Tensor:
        """``[B, n]`` inner products of every query vector with the same ``[n, dim]`` documents."""
        return reps @ docs.to(reps.dtype).T

    # ---- text in, tensors out -------------------------------------------------------------------------------

    def _encode(self, texts: Sequence[str], max_length: int, batch_size: int, verbose: bool, fn, desc: str,
                name: str):
        texts = list(texts)
        out = torch.empty(len(texts), self.dim, device=self.device, dtype=self.dtype)
        batches = self._length_sorted_batches(texts, max_length, batch_size, name)
        for pos, batch in batch_progress(batches, verbose, len(texts), batch_size, desc):
            out[pos.to(self.device)] = fn(**batch).to(self.dtype)
        return out

    @torch.no_grad()
    def encode_queries(self, queries: Sequence[str], batch_size: int = 64, verbose: bool = False) -> torch.Tensor:
        """Encodes queries into vectors ``[n, dim]`` (input order)."""
        return self._encode(queries, self.query_max_length, batch_size, verbose, self.query_vectors, 'encoding queries',
                            'query_max_length')

    @torch.no_grad()
    def encode_docs(self, docs: Sequence[str], batch_size: int = 32, verbose: bool = False) -> torch.Tensor:
        """Encodes documents into vectors ``[n, dim]`` (input order)."""
        return self._encode(docs, self.doc_max_length, batch_size, verbose, self.doc_vectors, 'encoding documents',
                            'doc_max_length')

    def biencoder(self, batch_size: int = 32, text_field: str = 'text', verbose: bool = False):
        """This model as a ``pyterrier_dr.BiEncoder``: ``FlexIndex`` indexing, retrieval and text scoring.

        Example::

            index = pyterrier_dr.FlexIndex('scifact.flex')
            (model.biencoder() >> index.indexer()).index(dataset.get_corpus_iter())
            retriever = model.biencoder() >> index.retriever()

        Raises:
            ImportError: pyterrier-dr is not installed.
        """
        return _dr_biencoder_class()(self, batch_size=batch_size, text_field=text_field, verbose=verbose)


_DR_CLASS = None


def _dr_biencoder_class():
    """The pyterrier_dr.BiEncoder adapter, defined on first use so pyterrier-dr stays an optional dependency."""
    global _DR_CLASS
    if _DR_CLASS is not None:
        return _DR_CLASS
    require('pyterrier_dr', purpose='DotEncoder.biencoder()')
    import pyterrier_dr

    class DotBiEncoder(pyterrier_dr.BiEncoder):
        """A :class:`DotEncoder` as a ``pyterrier_dr.BiEncoder`` (query/doc encoders, text scorer, FlexIndex)."""

        def __init__(self, model: DotEncoder, batch_size: int = 32, text_field: str = 'text', verbose: bool = False):
            super().__init__(batch_size=batch_size, text_field=text_field, verbose=verbose)
            self.model = model
            self.model_name = model.name_or_path

        @property
        def sim_fn(self):
            # Vectors are normalised by the model itself when normalize=True, so the inner product is right.
            return pyterrier_dr.SimFn.dot

        def encode_queries_torch(self, texts, batch_size=None) -> torch.Tensor:
            return self.model.encode_queries(list(texts), batch_size=batch_size or self.batch_size).float()

        def encode_docs(self, texts, batch_size=None):
            return self.model.encode_docs(list(texts), batch_size=batch_size or self.batch_size).float().cpu().numpy()

        def __repr__(self) -> str:
            return f'{self.model!r}.biencoder()'

    _DR_CLASS = DotBiEncoder
    return _DR_CLASS

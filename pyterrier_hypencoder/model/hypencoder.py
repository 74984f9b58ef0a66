"""The Hypencoder model: a backbone encoder, a hyperhead for queries, and pooled vectors for documents."""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

from ..devices import DTypeLike
from .checkpoint import (
    CheckpointError,
    backbone_config,
    load_backbone,
    load_into,
    load_state_dict,
    read_json,
    reference_qnet_spec,
    resolve_folder,
)
from .hyperhead import HyperHead
from .qnet import QNets, QNetSpec
from .text_encoder import TextEncoder, backbone_from_config, batch_progress, pool

__all__ = ['Hypencoder', 'load_model']

FORMAT_NAME = 'pyterrier-hypencoder'
# Version 2: q-nets with nested (Matryoshka) widths ("widths" in the q-net spec). Models without them are still saved
# as version 1, which older releases of this package read; those refuse a version 2 folder with "upgrade".
FORMAT_VERSION = 2
_WEIGHTS = 'model.safetensors'
_POOLINGS = ('cls', 'mean')

class Hypencoder(TextEncoder):
    """A Hypencoder: queries become q-nets, documents become vectors, and ``q_net(doc_vector)`` is the score.

    Load a released checkpoint with :meth:`from_pretrained`, start training from any Hugging Face encoder with
    :meth:`from_backbone`, and save with :meth:`save_pretrained`.

    Example::

        model = Hypencoder.from_pretrained('jfkback/hypencoder.6_layer')
        qnets = model.encode_queries(['how many states are there in india'])
        docs = model.encode_docs(['India has 28 states and 8 union territories.'])
        qnets.score(docs)   # tensor [1, 1]
    """

    def __init__(self, backbone: nn.Module, tokenizer, spec: QNetSpec, *, doc_backbone: Optional[nn.Module] = None,
                 pooling: str = 'cls', query_max_length: int = 64, doc_max_length: int = 512,
                 name_or_path: Optional[str] = None):
        """
        Args:
            backbone: a Hugging Face encoder (e.g. ``BertModel``) for queries, and for documents when
                ``doc_backbone`` is None (the released models share one encoder).
            tokenizer: its tokenizer.
            spec: the q-net architecture; ``spec.vector_dimensions[0]`` must equal the document vector size.
            doc_backbone: a separate document encoder, or None to share ``backbone``.
            pooling: document pooling, ``cls`` (the paper) or ``mean`` (masked mean of token states).
            query_max_length: query tokens kept, special tokens included.
            doc_max_length: document tokens kept, special tokens included.
            name_or_path: where the model came from, recorded in indexes built with it.
        """
        super().__init__()
        if pooling not in _POOLINGS:
            raise ValueError(f'unknown pooling {pooling!r}; use one of {_POOLINGS}')
        self.backbone = backbone
        self.doc_backbone = doc_backbone
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.query_max_length = int(query_max_length)
        self.doc_max_length = int(doc_max_length)
        self.name_or_path = name_or_path
        # The cross-entropy temperature that suits this model's score scale, when it is not the trainer's default of
        # 1 (a warm start from a doc_norm BE-Base scores dim times a correlation); saved and loaded with the model.
        self.train_temperature: Optional[float] = None
        # False while the hyperhead is a random initialisation (from_backbone) that no training or warm start has
        # set: its q-nets rank at about chance, and the retriever and reranker say so. Saved with the model.
        self.head_trained = True
        hidden = backbone.config.hidden_size
        doc_hidden = (doc_backbone or backbone).config.hidden_size
        if spec.vector_dimensions[0] != doc_hidden:
            raise ValueError(f'the q-net input size ({spec.vector_dimensions[0]}) must equal the document encoder\'s '
                             f'hidden size ({doc_hidden})')
        self.hyperhead = HyperHead(spec, hidden)

    # ---- construction ---------------------------------------------------------------------------------------

    @classmethod
    def from_backbone(cls, encoder_name_or_path: str, qnet_layers: int = 6, *, qnet_width: Optional[int] = None,
                      pooling: Optional[str] = None, query_max_length: int = 64, doc_max_length: int = 512,
                      qnet_residual: Optional[bool] = None, matryoshka_widths: Sequence[int] = (),
                      seed: int = 0, device=None, dtype: DTypeLike = None) -> Hypencoder:
        """A new Hypencoder on a pretrained encoder, with a freshly initialised hyperhead (for training).

        Until it is trained its q-nets rank at about chance (``head_trained`` is False, and retrieval or re-ranking
        with it warns once); ``warm_start_hypencoder`` starts them at the backbone's own similarity instead.

        Args:
            encoder_name_or_path: a Hugging Face encoder folder or hub name (e.g. bert-base-uncased, MiniLM).
            qnet_layers: q-net depth counted as the paper does: hidden blocks plus the final matrix (so 6 means
                five hidden blocks).
            qnet_width: hidden width of the q-net; must equal the encoder's hidden size when residuals are used
                (the default, and the paper's architecture).
            qnet_residual: residual connections in the q-net's hidden blocks (all but the last). None (default):
                yes, as in the paper, unless ``matryoshka_widths`` are given: then no, as in the released
                Matryoshka Hypencoder, which was trained and is scored without them. A model trained here is then
                the same architecture as that checkpoint (comparable, and further trainable from it), and each
                narrow q-net is the same kind of function as the full one; with residuals, the first block of a
                narrow q-net adds the document vector's first ``w`` coordinates (see
                :mod:`~pyterrier_hypencoder.model.qnet_spec`), which a backbone's pooled vector does not order by
                importance.
            matryoshka_widths: nested q-net widths to train (e.g. ``(48, 96, 192, 384)``); see
                :meth:`set_matryoshka_widths`. Empty (default): an original Hypencoder.
            pooling: document pooling, ``cls`` or ``mean``; None (the default) follows a sentence-transformers
                model's pooling config (``1_Pooling/config.json``: mean for all-MiniLM-L6-v2), else ``cls``.
            query_max_length: query tokens kept.
            doc_max_length: document tokens kept.
            seed: seed of the hyperhead initialisation.
            device: where to put the model; None means cuda when available.
            dtype: ``fp32`` (default), ``bf16`` or ``fp16``.
        """
        if qnet_layers < 1:
            raise ValueError(f'qnet_layers must be >= 1; got {qnet_layers}')
        backbone, tokenizer, pooling = load_backbone(encoder_name_or_path, pooling)
        hidden = backbone.config.hidden_size
        width = qnet_width or hidden
        residual = not matryoshka_widths if qnet_residual is None else bool(qnet_residual)
        spec = QNetSpec(vector_dimensions=(hidden,) + (width,) * (qnet_layers - 1) + (1,), residual=residual,
                        widths=tuple(matryoshka_widths))
        model = cls(backbone, tokenizer, spec, pooling=pooling, query_max_length=query_max_length,
                    doc_max_length=doc_max_length, name_or_path=str(encoder_name_or_path))
        model.hyperhead.reset_parameters(torch.Generator().manual_seed(seed))
        model.head_trained = False
        return model._place(device, dtype)

    @classmethod
    def from_pretrained(cls, name_or_path: Union[str, os.PathLike], *, query_max_length: Optional[int] = None,
                        doc_max_length: Optional[int] = None, device=None, dtype: DTypeLike = None) -> Hypencoder:
        """Loads a Hypencoder: a released checkpoint (``jfkback/hypencoder.6_layer``) or one saved by this package.

        Args:
            name_or_path: a local folder or a Hugging Face hub repository id.
            query_max_length: query tokens kept (default: the checkpoint's, else 64).
            doc_max_length: document tokens kept (default: the checkpoint's, else 512).
            device: where to put the model; None means cuda when available.
            dtype: ``fp32`` (default), ``bf16`` or ``fp16``.

        Raises:
            CheckpointError: missing files, unsafe pickles, or weights that do not fit the config.
        """
        folder = resolve_folder(name_or_path)
        config = read_json(folder / 'config.json')
        if FORMAT_NAME in config:
            model = cls._from_own_format(folder, config[FORMAT_NAME])
        elif 'query_encoder_kwargs' in config:
            model = cls._from_reference_format(folder, config)
        else:
            raise CheckpointError(f'{folder / "config.json"} is neither a pyterrier-hypencoder nor a released Hypencoder '
                                  'config (no query_encoder_kwargs). To start from a plain encoder use '
                                  'Hypencoder.from_backbone.')
        model.name_or_path = str(folder) if Path(name_or_path).expanduser().is_dir() else str(name_or_path)
        if query_max_length is not None:
            model.query_max_length = int(query_max_length)
        if doc_max_length is not None:
            model.doc_max_length = int(doc_max_length)
        return model._place(device, dtype)

    @classmethod
    def _from_reference_format(cls, folder: Path, config: dict) -> Hypencoder:
        q_kwargs = config['query_encoder_kwargs']
        d_kwargs = config.get('passage_encoder_kwargs', {})
        spec = reference_qnet_spec(config, folder / 'config.json')
        shared = bool(config.get('shared_encoder', False))
        backbone_name = q_kwargs.get('model_name_or_path')
        if not backbone_name:
            raise CheckpointError(f'{folder / "config.json"} names no backbone (query_encoder_kwargs.model_name_or_path)')
        backbone = backbone_from_config(backbone_config(backbone_name, folder))
        doc_backbone = None
        if not shared:
            doc_backbone = backbone_from_config(backbone_config(d_kwargs.get('model_name_or_path', backbone_name), folder))
        state = load_state_dict(folder)
        tokenizer = cls._tokenizer(folder, backbone_name)
        model = cls(backbone, tokenizer, spec, doc_backbone=doc_backbone, pooling=d_kwargs.get('pooling_type', 'cls'))
        q_prefix, d_prefix, h_prefix = 'query_encoder.transformer.', 'passage_encoder.transformer.', 'query_encoder.'
        load_into(model.backbone, {k[len(q_prefix):]: v for k, v in state.items() if k.startswith(q_prefix)},
                   'query encoder')
        if doc_backbone is not None:
            load_into(doc_backbone, {k[len(d_prefix):]: v for k, v in state.items() if k.startswith(d_prefix)},
                       'passage encoder')
        load_into(model.hyperhead, {k[len(h_prefix):]: v for k, v in state.items()
                                     if k.startswith(h_prefix) and not k.startswith(q_prefix)}, 'hyperhead')
        return model

    @classmethod
    def _from_own_format(cls, folder: Path, meta: dict) -> Hypencoder:
        from transformers import AutoConfig
        if meta.get('format_version', 0) > FORMAT_VERSION:
            raise CheckpointError(f'{folder} was saved by a newer pyterrier-hypencoder (format '
                                  f'{meta["format_version"]}); upgrade the package')
        try:
            spec = QNetSpec(**meta['qnet'])
        except (TypeError, ValueError) as e:
            raise CheckpointError(f'{folder / "config.json"} has a q-net spec this package cannot build ({e})') from None
        backbone = backbone_from_config(AutoConfig.from_pretrained(str(folder / 'backbone')))
        doc_backbone = None
        if not meta.get('shared_encoder', True):
            doc_backbone = backbone_from_config(AutoConfig.from_pretrained(str(folder / 'doc_backbone')))
        model = cls(backbone, cls._tokenizer(folder, None), spec, doc_backbone=doc_backbone,
                    pooling=meta.get('pooling', 'cls'), query_max_length=meta.get('query_max_length', 64),
                    doc_max_length=meta.get('doc_max_length', 512))
        load_into(model, load_state_dict(folder), 'model')
        model.train_temperature = meta.get('train_temperature')
        model.head_trained = meta.get('head_trained', True)
        return model

    @staticmethod
    def _tokenizer(folder: Path, fallback: Optional[str]):
        from transformers import AutoTokenizer
        if any((folder / f).exists() for f in ('tokenizer.json', 'vocab.txt', 'tokenizer_config.json')):
            return AutoTokenizer.from_pretrained(str(folder))
        if fallback is None:
            raise CheckpointError(f'{folder} has no tokenizer files')
        local = folder / fallback
        return AutoTokenizer.from_pretrained(str(local) if (local / 'tokenizer_config.json').exists() else fallback)

    def save_pretrained(self, folder: Union[str, os.PathLike]) -> None:
        """Saves weights (safetensors), configs and tokenizer, so :meth:`from_pretrained` restores the model exactly.

        Args:
            folder: the folder to write; created if missing.
        """
        from safetensors.torch import save_file
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backbone.config.save_pretrained(str(folder / 'backbone'))
        if self.doc_backbone is not None:
            self.doc_backbone.config.save_pretrained(str(folder / 'doc_backbone'))
        self.tokenizer.save_pretrained(str(folder))
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(folder / _WEIGHTS), metadata={'format': 'pt'})
        config = {FORMAT_NAME: {
            'format_version': 2 if self.spec.widths else 1,
            'qnet': self.spec.to_dict(),
            'pooling': self.pooling,
            'shared_encoder': self.doc_backbone is None,
            'query_max_length': self.query_max_length,
            'doc_max_length': self.doc_max_length,
            'dim': self.dim,
            'train_temperature': self.train_temperature,
            'head_trained': self.head_trained,
        }}
        # config.json last: a folder without it is not a loadable model.
        with open(folder / 'config.json', 'w', encoding='utf-8') as f:
            json.dump(config, f, indent=2)

    # ---- properties -----------------------------------------------------------------------------------------

    @property
    def spec(self) -> QNetSpec:
        """The q-net architecture."""
        return self.hyperhead.spec

    @property
    def dim(self) -> int:
        """Size of the document vectors."""
        return self.spec.vector_dimensions[0]

    @property
    def matryoshka_widths(self) -> tuple:
        """The nested q-net widths (ascending) that ``qnets.truncate(width)`` accepts; empty for an original Hypencoder.

        They always include the full hidden width, even where a checkpoint's ``matryoshka_dims`` omit it: the uncut
        q-net is what :meth:`encode_queries` returns.
        """
        return self.spec.widths

    def set_matryoshka_widths(self, widths: Sequence[int]) -> None:
        """Declares the q-nets nested at ``widths`` (the trainer does, for ``TrainConfig(matryoshka_widths=...)``).

        No weight changes: this only sets which widths :meth:`QNets.truncate` accepts and :meth:`save_pretrained`
        records. An empty sequence makes the model an original Hypencoder again.

        Raises:
            ValueError: for widths the q-nets cannot take (above the hidden width, or unequal hidden widths).
        """
        self.hyperhead.spec = replace(self.spec, widths=tuple(widths))

    def __repr__(self) -> str:
        name = self.name_or_path or type(self.backbone).__name__
        return (f'Hypencoder({name!r}, qnet={list(self.spec.vector_dimensions)}, pooling={self.pooling!r}, '
                f'dtype={str(self.dtype).replace("torch.", "")}, device={str(self.device)!r})')

    def query_encoder(self, batch_size: int = 32, verbose: bool = False):
        """A transformer adding each query's q-net as a ``query_qnet`` column (pyterrier-dr's ``query_encoder``)."""
        from .encoders import HypencoderQueryEncoder
        return HypencoderQueryEncoder(self, batch_size=batch_size, verbose=verbose)

    def doc_encoder(self, text_field: str = 'text', batch_size: int = 32, verbose: bool = False):
        """A transformer adding document vectors as a ``doc_vec`` column (pyterrier-dr's ``doc_encoder``)."""
        from .encoders import HypencoderDocEncoder
        return HypencoderDocEncoder(self, text_field=text_field, batch_size=batch_size, verbose=verbose)

    # ---- differentiable encoders (used by training) ---------------------------------------------------------

    def _backbone_states(self, backbone: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # Token type ids stay zeros (not passed), as in the reference code.
        return backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def query_qnets(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> QNets:
        """Q-nets for tokenised queries (differentiable)."""
        return self.hyperhead(self._backbone_states(self.backbone, input_ids, attention_mask), attention_mask)

    def doc_vectors(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Document vectors ``[batch, dim]`` for tokenised documents (differentiable)."""
        states = self._backbone_states(self.doc_backbone or self.backbone, input_ids, attention_mask)
        return pool(states, attention_mask, self.pooling)

    # ---- the training interface (see TextEncoder) -----------------------------------------------------------

    # the hyperhead turns small steps into large changes of the q-nets
    default_head_lr = 3e-5

    @property
    def trainable_head(self) -> nn.Module:
        """What head-only training learns: the hyperhead."""
        return self.hyperhead

    def query_reps(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> QNets:
        """The queries' q-nets (differentiable): :meth:`query_qnets`."""
        return self.query_qnets(input_ids, attention_mask)

    def reps_from_states(self, states: torch.Tensor, attention_mask: torch.Tensor) -> QNets:
        """Q-nets from the backbone's token states of the queries (e.g. cached, frozen ones)."""
        return self.hyperhead(states, attention_mask)

    def finish_docs(self, pooled: torch.Tensor) -> torch.Tensor:
        """Document vectors from pooled document states: the pooled vectors themselves."""
        return pooled

    @staticmethod
    def score_pairs(reps: QNets, docs: torch.Tensor) -> torch.Tensor:
        """``[B, m]`` scores of each query's own ``[B, m, dim]`` documents."""
        return reps.score_pairs(docs)

    @staticmethod
    def score_all(reps: QNets, docs: torch.Tensor) -> torch.Tensor:
        """``[B, n]`` scores of every query against the same ``[n, dim]`` documents."""
        return reps.score(docs)

    # ---- text in, tensors out -------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_queries(self, queries: Sequence[str], batch_size: int = 64, verbose: bool = False) -> QNets:
        """Encodes queries into q-nets.

        Args:
            queries: query texts.
            batch_size: queries per backbone forward pass.
            verbose: show a progress bar.

        Returns:
            :class:`QNets` in input order; ``.score(doc_vectors)`` gives ``[n_queries, n_docs]``.
        """
        parts, positions = [], []
        batches = self._length_sorted_batches(queries, self.query_max_length, batch_size, 'query_max_length')
        for pos, batch in batch_progress(batches, verbose, len(queries), batch_size, 'encoding queries'):
            parts.append(self.query_qnets(**batch))
            positions.append(pos)
        if not parts:
            raise ValueError('encode_queries got no queries')
        qnets = QNets.cat(parts)
        return qnets[torch.argsort(torch.cat(positions)).to(qnets.device)]

    @torch.no_grad()
    def encode_docs(self, docs: Sequence[str], batch_size: int = 32, verbose: bool = False) -> torch.Tensor:
        """Encodes documents into vectors (length-sorted batches; output in input order).

        Args:
            docs: document texts.
            batch_size: documents per backbone forward pass.
            verbose: show a progress bar.

        Returns:
            ``[n_docs, dim]`` tensor on the model's device, in the model's dtype.
        """
        out = torch.empty(len(docs), self.dim, device=self.device, dtype=self.dtype)
        batches = self._length_sorted_batches(docs, self.doc_max_length, batch_size, 'doc_max_length')
        for pos, batch in batch_progress(batches, verbose, len(docs), batch_size, 'encoding documents'):
            out[pos.to(self.device)] = self.doc_vectors(**batch)
        return out


def load_model(model, *, device=None, user: str = 'this transformer', docs_only: bool = False):
    """``model`` itself, or the Hypencoder saved at a folder or hub name (as the transformers take index paths).

    Args:
        model: a :class:`Hypencoder`, or a folder / hub name for :meth:`Hypencoder.from_pretrained`.
        device: where a model given by name is loaded (None: cuda when available).
        user: the class asking, for messages.
        docs_only: any document encoder will do (``encode_docs`` and ``dim``, e.g. a ``DotEncoder``).

    Raises:
        TypeError: for anything else, e.g. a transformers model, saying what to pass.
        CheckpointError: when the folder or hub name holds no loadable Hypencoder.
    """
    if isinstance(model, (str, os.PathLike)):
        return Hypencoder.from_pretrained(model, device=device)
    if isinstance(model, Hypencoder) or (docs_only and hasattr(model, 'encode_docs') and hasattr(model, 'dim')):
        return model
    swapped = ': the model comes first, then the index' if type(model).__name__ == 'HypencoderIndex' else ''
    raise TypeError(f'{user} needs a Hypencoder (or the folder or hub name of one, e.g. "jfkback/hypencoder.6_layer"); '
                    f'got {type(model).__name__}{swapped}. Load one with Hypencoder.from_pretrained(...)')

"""Warm starts: Hypencoders whose q-nets begin as a similarity that is already known to rank well.

- :func:`warm_start_hypencoder`: the backbone's own zero-shot similarity: by default the correlation of the mean query
  state with the standardised document vector, which no rescaling of a document changes (``start='cosine'``: the
  earlier start, about the cosine, whose residual path also passes the raw vector and so its norm).
- :func:`warm_start_from_dot`: a trained BE-Base (:class:`~pyterrier_hypencoder.train.DotEncoder`), exactly, so
  that training can only move away from it where the data rewards that.

Both take ``principal_axes_of=`` (document vectors): the hidden units then follow the documents' principal axes
(:mod:`.principal_axes`), which changes no full-width score and gives a Matryoshka head's narrow widths their start.
"""
from __future__ import annotations

import copy
import os
from typing import Union

import numpy as np
import torch

from ..model.hypencoder import Hypencoder
from ..model.qnet import QNetSpec
from .biencoder import DotEncoder
from .config import default_temperature
from .principal_axes import principal_rotation

__all__ = ['warm_start_hypencoder', 'warm_start_from_dot']

_PROBE_TEXTS = (
    'what causes the seasons on earth',
    'The mitochondria is the powerhouse of the cell, producing most of its chemical energy.',
    'Statins lower cholesterol and reduce the risk of heart disease in adults.',
    'how to bake sourdough bread at home',
    'The treaty was signed in 1648, ending thirty years of war in central Europe.',
    'Vitamin D deficiency is common in northern latitudes during winter months.',
    'best practices for securing a home wireless network',
    'Protein folding determines the three-dimensional structure and function of enzymes.',
)


STARTS = ('standardised', 'cosine')


def warm_start_hypencoder(encoder_name_or_path: Union[str, os.PathLike], qnet_layers: int = 2, *, pooling: str = 'mean',
                          query_max_length: int = 64, doc_max_length: int = 512, temperature: float = 0.05,
                          start: str = 'standardised', principal_axes_of=None, seed: int = 0, device=None,
                          dtype=None) -> Hypencoder:
    """A new Hypencoder whose q-nets start out as the backbone's own similarity, ready for (head-only) training.

    A hyperhead initialised at random, as in the paper, first has to rediscover what the pretrained encoder
    already knows, which a small training set cannot teach it. This warm start begins from it instead. In both
    starts the first hidden q-net block standardises the document vector (``ReLU(a x + shift)`` passes ``a x``
    unchanged and the q-net's parameter-free layer norm turns it into ``(x - mean(x)) / std(x)``), and the final
    q-net matrix attends uniformly over the query's token states and is the standardised mean query state times
    ``1 / (temperature * dim)``. They differ in how the hidden blocks carry the document on:

    - ``start='standardised'`` (default): no residual connections (as in the Matryoshka Hypencoder); every further
      hidden block starts as the identity on standardised vectors (identity matrix, a bias larger than any
      standardised component, so the ReLU passes it and the layer norm returns it). The initial score is the
      correlation of the mean query state with the document vector, divided by ``temperature``: positive rescaling
      of a document vector leaves it unchanged, so long and short documents whose encoder norms differ widely are
      ranked by direction only. A q-net cannot divide by a document's norm, and this is the start that needs none.
    - ``start='cosine'``: the earlier start. Every hidden block has a residual connection (``residual_on_last=True``)
      and further blocks start as the identity through it; the first block's residual adds the raw vector, so the
      score is about ``cos(mean query state, document vector) / temperature`` plus a term that grows with the
      document's norm. Among many short distractor documents with other norms it ranks worse
      (``docs/training.md``).

    Every part stays trainable and receives gradients; training moves away from the start wherever the data says so.

    Args:
        encoder_name_or_path: a Hugging Face encoder (e.g. all-MiniLM-L6-v2).
        qnet_layers: q-net depth counted as in the paper (hidden blocks + final matrix); at least 2.
        pooling: document pooling; ``mean`` matches sentence-transformers encoders.
        query_max_length: query tokens kept.
        doc_max_length: document tokens kept.
        temperature: initial scores are about ``similarity / temperature`` (0.05: the usual contrastive scale).
        start: ``standardised`` (default) or ``cosine``, as above.
        principal_axes_of: ``[n_docs, dim]`` document vectors of the corpus, or document texts to encode (a
            sample of a thousand or so will do), for heads trained at nested Matryoshka widths: hidden unit ``i``
            then carries the documents' ``i``-th principal axis rather than encoder coordinate ``i``, so a q-net cut
            to width ``w`` starts as the correlation over the ``w - 1`` leading axes. Full-width scores are
            unchanged. Standardised start only.
        seed: seeds the parts of the head not set here (the attention of the hidden matrices).
        device: where to put the model; None means cuda when available.
        dtype: ``fp32`` (default), ``bf16`` or ``fp16``.

    Raises:
        ValueError: on ``qnet_layers < 2``, an unknown ``start``, or ``principal_axes_of`` with the cosine start
            (whose residual path passes the raw vector, which no rotation of the hidden units leaves unchanged).
    """
    if qnet_layers < 2:
        raise ValueError(f'the warm start needs a hidden q-net block: qnet_layers >= 2, got {qnet_layers}')
    if start not in STARTS:
        raise ValueError(f'start must be one of {STARTS}; got {start!r}')
    if principal_axes_of is not None and start == 'cosine':
        raise ValueError("principal_axes_of needs start='standardised': the cosine start's residuals pass the raw "
                         'vector, so rotating its hidden units would change its scores')
    base = Hypencoder.from_backbone(encoder_name_or_path, qnet_layers=qnet_layers, pooling=pooling,
                                    query_max_length=query_max_length, doc_max_length=doc_max_length, seed=seed,
                                    device='cpu')
    if start == 'cosine':
        spec = QNetSpec(vector_dimensions=base.spec.vector_dimensions, residual_on_last=True)
    else:
        spec = QNetSpec(vector_dimensions=base.spec.vector_dimensions, residual=False, residual_on_last=False)
    model = Hypencoder(base.backbone, base.tokenizer, spec, pooling=base.pooling, query_max_length=query_max_length,
                       doc_max_length=doc_max_length, name_or_path=str(encoder_name_or_path))
    model.hyperhead.load_state_dict(base.hyperhead.state_dict())
    # Calibrate on a few probe texts: document components scaled to unit spread keep the first block's layer norm
    # well conditioned, and the shifts keep every ReLU input positive.
    docs = model.encode_docs(list(_PROBE_TEXTS))
    enc = model.tokenize(list(_PROBE_TEXTS), query_max_length)
    with torch.no_grad():
        states = model.backbone(**enc).last_hidden_state
    doc_gain = 1.0 / float(docs.std(dim=1).mean().clamp(min=1e-6))
    if principal_axes_of is not None and len(principal_axes_of) and isinstance(principal_axes_of[0], str):
        principal_axes_of = model.encode_docs(list(principal_axes_of))
    rotation = _rotation(principal_axes_of, model.dim)
    shift = 4.0 * max(float(states.abs().max()), _largest_unit(docs * doc_gain, rotation),
                      _largest_unit(principal_axes_of, rotation, doc_gain), 1.0)
    _warm_start(model.hyperhead, 1.0 / (temperature * model.dim), doc_gain, shift, residual=start == 'cosine',
                rotation=rotation)
    return model._place(device, dtype)


def _identity_hidden_blocks(head, hidden_bias: float) -> None:
    """Zero generated matrices and a constant bias in every hidden block: with residuals, each block is the identity."""
    for k in range(len(head.spec.weight_shapes) - 1):
        # generated hidden matrix = projection(...) + base = base (the projection starts at zero)
        head.hyper_base_matrices[k].zero_()
        head.weight_hyper_projection[k].weight.zero_()
        head.weight_hyper_projection[k].bias.zero_()
    for k in range(head.spec.num_blocks):
        # a small positive bias keeps the ReLU open; the layer norm of a constant vector is 0, so the block is the
        # identity while gradients still flow
        head.hyper_base_vectors[k].fill_(hidden_bias)
        head.bias_hyper_projection[k].weight.zero_()
        head.bias_hyper_projection[k].bias.zero_()


def _rotation(doc_vectors, dim: int) -> torch.Tensor:
    """The hidden units' rotation: principal axes of ``doc_vectors``, or the identity when None."""
    if doc_vectors is None:
        return torch.eye(dim, dtype=torch.float64)
    return principal_rotation(doc_vectors, dim)


def _largest_unit(doc_vectors, rotation: torch.Tensor, gain: float = 1.0) -> float:
    """The largest ``|gain * R x|`` component over these documents (0 for None): what a ReLU's shift must exceed."""
    if doc_vectors is None:
        return 0.0
    x = torch.as_tensor(np.asarray(doc_vectors), dtype=torch.float64)
    return float((gain * x @ rotation.T).abs().max())


@torch.no_grad()
def _warm_start(head, scale: float, doc_gain: float, shift: float, hidden_bias: float = 1e-2, residual: bool = True,
                rotation: torch.Tensor = None) -> None:
    spec = head.spec
    last = len(spec.weight_shapes) - 1
    if head.model_dim != spec.vector_dimensions[0]:
        raise ValueError('the warm start needs the q-net input size to equal the backbone hidden size')
    eye = torch.eye(head.model_dim)
    rotation = eye if rotation is None else rotation
    _identity_hidden_blocks(head, hidden_bias)
    if not residual:
        # Without residuals a further block carries the standardised vector z itself: layer_norm(ReLU(z + b)) = z
        # when b exceeds every |z_i|, and a standardised vector of n components has |z_i| <= sqrt(n - 1).
        for k in range(1, spec.num_blocks):
            head.hyper_base_matrices[k].copy_(eye)
            head.hyper_base_vectors[k].fill_(float(head.model_dim) ** 0.5 + 1.0)
    # first block: ReLU(doc_gain * R x + shift) = doc_gain * R x + shift, whose layer norm is R times the
    # standardised x (R fixes 1, so it commutes with the layer norm; the identity without principal axes)
    head.hyper_base_matrices[0].copy_(rotation.unsqueeze(0) * doc_gain)
    head.hyper_base_vectors[0].fill_(shift)
    # final matrix: zero attention query = uniform attention over the query's tokens; values = states + shift pass
    # the ReLU, the layer norm standardises their mean, and the projection scales it
    head.weight_query_embeddings[last].zero_()
    head.value_projections[last].weight.copy_(eye)
    head.value_projections[last].bias.fill_(shift)
    head.weight_hyper_projection[last].weight.copy_(rotation * scale)
    head.weight_hyper_projection[last].bias.zero_()
    head.hyper_base_matrices[last].zero_()


def _shift_for(model: Hypencoder, texts) -> float:
    """A constant that keeps ``states + shift`` positive for these texts' token states, with room to spare."""
    enc = model.tokenize(list(texts), model.query_max_length)
    with torch.no_grad():
        states = model.backbone(**{k: v.to(model.device) for k, v in enc.items()}).last_hidden_state
    return 4.0 * max(float(states.abs().max()), 1.0)


def warm_start_from_dot(dot: DotEncoder, qnet_layers: int = 2, *, hidden_bias: float = 1e-2, principal_axes_of=None,
                        seed: int = 0, device=None, dtype=None) -> Hypencoder:
    """A Hypencoder whose q-nets score exactly as a trained BE-Base does, ready for training.

    The q-net contains BE-Base's inner product. The final matrix attends uniformly over the query's tokens (their
    mean, as mean pooling takes it), shifted past the ReLU, standardised by the hyperhead's layer norm and mapped by
    BE-Base's query projection ``P``. The hidden blocks carry the document vector ``d`` to it:

    - ``doc_norm=False``: every hidden block gets a residual connection and a zero generated matrix, so it adds
      ``layer_norm(ReLU(b))``, which is exactly 0 for the constant bias ``b`` it starts with. The score is
      ``(P layer_norm(mean(q))) . d``.
    - ``doc_norm=True``: the last hidden block has no residual connection (as in the released models) and starts
      with the identity matrix and a bias ``s`` larger than any document component, so it outputs
      ``layer_norm(ReLU(d + s)) = layer_norm(d)``; the blocks before it are identities as above. The score is
      ``(P layer_norm(mean(q))) . layer_norm(d)``.

    A q-net cannot divide by each document's norm, so a cosine BE-Base has no exact counterpart; the
    ``doc_norm=True`` variant (``DotEncoder(pooling='mean', query_norm=True, doc_norm=True)``) is the nearest one,
    exactly a cosine for zero-mean vectors. Every parameter stays trainable.

    Args:
        dot: the trained BE-Base: mean pooling, ``normalize=False``, ``query_norm=True`` (with or without a
            query projection, with or without ``doc_norm``). Its backbone is copied, not shared.
        qnet_layers: q-net depth counted as in the paper (hidden blocks + final matrix); at least 2, so that
            training has a hidden block to grow into.
        hidden_bias: the hidden blocks' constant starting bias (positive, so the ReLUs pass gradients).
        principal_axes_of: ``[n_docs, dim]`` document vectors (a sample of the corpus), for heads trained at
            nested Matryoshka widths: the last hidden block then outputs ``R layer_norm(d)`` for the documents'
            principal-axes rotation ``R`` and the final matrix is rotated alike, so full-width scores are still
            BE-Base's while a q-net cut to width ``w`` starts from the ``w`` leading axes. Needs ``doc_norm=True``.
        seed: seeds the parts of the head not set here.
        device: where to put the model; None means the BE-Base's device.
        dtype: ``fp32``, ``fp64``, ``bf16`` or ``fp16``; None means the BE-Base's.

    Raises:
        ValueError: ``dot`` is a BE-Base a q-net cannot express, naming the option to change.
    """
    if not isinstance(dot, DotEncoder):
        raise TypeError(f'dot must be a DotEncoder (BE-Base); got {type(dot).__name__}')
    wrong = [f'{name}={getattr(dot, name)!r} (needs {want!r})'
             for name, want in (('pooling', 'mean'), ('normalize', False), ('query_norm', True))
             if getattr(dot, name) != want]
    if wrong:
        raise ValueError(f'a q-net expresses BE-Base exactly only as DotEncoder(pooling="mean", normalize=False, '
                         f'query_norm=True) (doc_norm=True or False); this one has {", ".join(wrong)}. Train that '
                         'variant to start from it')
    if qnet_layers < 2:
        raise ValueError(f'the warm start needs a hidden q-net block: qnet_layers >= 2, got {qnet_layers}')
    if not hidden_bias > 0:
        raise ValueError(f'hidden_bias must be > 0 (a ReLU at 0 passes no gradient); got {hidden_bias}')
    if principal_axes_of is not None and not dot.doc_norm:
        raise ValueError('principal_axes_of needs a BE-Base trained with doc_norm=True: without the layer norm on '
                         'documents no rotation of the hidden units keeps its scores')
    dim = dot.dim
    rotation = _rotation(principal_axes_of, dim)
    # a residual on the last hidden block would add the raw vector to the standardised one
    spec = QNetSpec(vector_dimensions=(dim,) * qnet_layers + (1,), residual_on_last=not dot.doc_norm)
    model = Hypencoder(copy.deepcopy(dot.backbone), dot.tokenizer, spec, pooling='mean',
                       query_max_length=dot.query_max_length, doc_max_length=dot.doc_max_length,
                       name_or_path=dot.name_or_path)
    model.hyperhead.reset_parameters(torch.Generator().manual_seed(seed))
    # placed first, so the values set below are not rounded through float32 on their way to a float64 model
    model = model._place(device if device is not None else dot.device, dtype if dtype is not None else dot.dtype)
    head = model.hyperhead
    last = len(spec.weight_shapes) - 1
    projection = dot.query_projection.weight.detach() if dot.query_projection is not None else torch.eye(dim)
    shift = max(_shift_for(model, _PROBE_TEXTS), 4.0 * _largest_unit(principal_axes_of, rotation))
    with torch.no_grad():
        _identity_hidden_blocks(head, hidden_bias)
        if dot.doc_norm:
            # layer_norm(ReLU(R d + s)) = R layer_norm(d): the shift passes the ReLU and the layer norm removes it
            # (R fixes 1; the identity without principal axes)
            head.hyper_base_matrices[last - 1].copy_(rotation)
            head.hyper_base_vectors[last - 1].fill_(shift)
        head.weight_query_embeddings[last].zero_()
        head.value_projections[last].weight.copy_(torch.eye(dim))
        head.value_projections[last].bias.fill_(shift)
        head.weight_hyper_projection[last].weight.copy_(rotation.to(projection) @ projection)
        head.weight_hyper_projection[last].bias.zero_()
        head.hyper_base_matrices[last].zero_()
    # The scores are BE-Base's, so training goes on at BE-Base's temperature (0.05 * dim when doc_norm=True).
    model.train_temperature = default_temperature(dot)
    return model

"""The neural model: checkpoints, the hyperhead, q-nets, the text encoder, :class:`Hypencoder` and its encoders.

Layer 1 (the bottom). It may import the leaves (``errors``, ``devices``, ``optional``, ``checks``) and nothing
else of the package: no index, search, shards, Ray or PyTerrier transformer, so it can be read, tested and reused
on its own.

- :mod:`.checkpoint`: reading released checkpoints and backbones (safetensors, ``torch.load(weights_only=True)``).
- :mod:`.qnet`: :class:`QNets`, a batch of generated networks that score document vectors (``truncate`` cuts nested
  ones to a narrower width).
- :mod:`.qnet_spec`: :class:`QNetSpec`, their architecture, and the semantics of nested (Matryoshka) widths.
- :mod:`.hyperhead`: the hyperhead layers that turn query token states into q-net weights.
- :mod:`.text_encoder`: the BERT backbone and its batching.
- :mod:`.hypencoder`: :class:`Hypencoder` (``from_pretrained``, ``encode_queries``, ``encode_docs``).
- :mod:`.encoders`: the PyTerrier query and document encoders a model hands out.
"""
from .checkpoint import CheckpointError
from .hypencoder import Hypencoder, load_model
from .qnet import QNets, QNetSpec

__all__ = ['CheckpointError', 'Hypencoder', 'QNetSpec', 'QNets', 'load_model']

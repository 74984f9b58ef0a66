"""Where a sharded index's shards are searched: in this process, or by Ray actors (chosen by ``backend``)."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from ..errors import HypencoderIndexError
from ..index.open import IndexLike
from ..index.sharded import ShardedIndexFiles
from ..optional import require
from .shards import LocalShards

__all__ = ['check_backend', 'open_shards']


def check_backend(index: IndexLike, backend: Optional[str]) -> None:
    """Fails unless ``backend`` suits ``index``: backends choose where a sharded index's shards are searched."""
    if backend is None:
        return
    if not isinstance(backend, str) or not backend:
        raise ValueError(f"backend must be 'local', 'ray' or a Ray address (e.g. 'ray://head:10001'); got {backend!r}")
    if not isinstance(index, ShardedIndexFiles) and backend != 'local':
        raise HypencoderIndexError(f'backend={backend!r} searches the shards of a ShardedHypencoderIndex, but {index.path} '
                                   'is a single index; split it with pyterrier_hypencoder.split_index(index, path, '
                                   'n_shards=...) or use backend=None')


def open_shards(index: ShardedIndexFiles, backend: Optional[str], device: torch.device, dtype: torch.dtype,
                ray_options: Optional[Dict[str, Any]] = None):
    """The search backend for ``index``: ``'local'`` (or None), ``'ray'``, or a Ray address such as ``'ray://head:10001'``."""
    if backend in (None, 'local'):
        if ray_options:
            raise ValueError(f'ray_options {sorted(ray_options)} need backend="ray" (or a Ray address)')
        return LocalShards(index, device, dtype)
    require('ray', purpose=f'backend={backend!r}')
    from .ray_backend import RayShards  # only here, so the package imports without Ray
    return RayShards(index, None if backend == 'ray' else backend, device, dtype, **(ray_options or {}))

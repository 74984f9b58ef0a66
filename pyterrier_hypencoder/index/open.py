"""Opening an index folder, single or sharded, from a path or an index object."""
from __future__ import annotations

from pathlib import Path
from typing import Union

from .files import HypencoderIndexFiles
from .layout import SHARDED_TYPE, artifact_type
from .sharded import ShardedIndexFiles

__all__ = ['IndexLike', 'open_index']

IndexLike = Union[HypencoderIndexFiles, ShardedIndexFiles]


def open_index(index) -> IndexLike:
    """``index`` as an index object: a (sharded) Hypencoder index as given, or the one at a path.

    Raises:
        TypeError: when ``index`` is neither an index nor a path.
    """
    if isinstance(index, (HypencoderIndexFiles, ShardedIndexFiles)):
        return index
    if isinstance(index, (str, bytes)) or hasattr(index, '__fspath__'):
        path = Path(index.decode() if isinstance(index, bytes) else index)
        # The manifest says which kind of folder it is; anything unreadable is left to the single index's checks,
        # which explain what is missing.
        return ShardedIndexFiles(path) if artifact_type(path) == SHARDED_TYPE else HypencoderIndexFiles(path)
    raise TypeError(f'index must be a HypencoderIndex or the path of one (or a ShardedHypencoderIndex); got '
                    f'{type(index).__name__}')

"""What the retriever and the reranker share: loading an index (single or sharded), device and query checks.

Its own module so that neither transformer borrows the other's private helpers, and so that the import graph
stays a tree: ``common`` -> ``index``, ``sharded`` (storage); ``retriever``, ``reranker`` -> ``common``;
``artifacts`` (the index classes with their ``retriever()`` / ``reranker()`` hand-outs) -> all of them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Union

import pandas as pd
import torch

from .devices import default_device
from .index import HypencoderIndexError, HypencoderIndexFiles
from .optional import require
from .shard_search import LocalShards
from .sharded import ShardedIndexFiles

__all__ = ['check_backend', 'check_device', 'check_queries', 'load_index', 'open_shards']

IndexLike = Union[HypencoderIndexFiles, ShardedIndexFiles]


def load_index(index) -> IndexLike:
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
        try:
            kind = json.loads((path / 'pt_meta.json').read_text()).get('type')
        except (OSError, ValueError, AttributeError):
            kind = None
        return ShardedIndexFiles(path) if kind == ShardedIndexFiles.ARTIFACT_TYPE else HypencoderIndexFiles(path)
    raise TypeError(f'index must be a HypencoderIndex or the path of one (or a ShardedHypencoderIndex); got '
                    f'{type(index).__name__}')


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


def check_queries(inp: pd.DataFrame) -> list:
    """The ``query`` column as a list of strings.

    Raises:
        TypeError: naming the qids whose query is not a string (NaN, None, a number, a token list).
        ValueError: naming the qids whose query is empty or whitespace only: a Hypencoder would still make a
            q-net from the special tokens alone, and rank the corpus for no query at all.
    """
    queries = inp['query'].tolist()
    bad = [(qid, q) for qid, q in zip(inp['qid'], queries) if not isinstance(q, str)]
    if bad:
        raise TypeError(f'{len(bad)} queries are not strings, e.g. qid {bad[0][0]!r}: {bad[0][1]!r}; fill or drop them '
                        'before retrieval')
    empty = [qid for qid, q in zip(inp['qid'], queries) if not q.strip()]
    if empty:
        raise ValueError(f'{len(empty)} queries are empty or whitespace only (qids {empty[:5]}); drop them (e.g. '
                         'topics[topics["query"].str.strip() != ""]) or fill them before retrieval')
    return queries


def check_device(device) -> Optional[torch.device]:
    """``device`` as a ``torch.device`` (None stays None), failing now if this machine does not have it."""
    return default_device(device) if device is not None else None


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

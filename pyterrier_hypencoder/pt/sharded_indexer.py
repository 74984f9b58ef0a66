"""ShardedHypencoderIndexer: one document iterator in, N shard folders and a manifest out, in-process or on Ray."""
from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Union

import numpy as np
import pyterrier as pt

from ..checks import check_int
from ..index.files import HypencoderIndexFiles
from ..index.layout import shard_dirname
from ..index.sharded import building, write_manifest
from ..optional import require
from .indexer import HypencoderIndexer

__all__ = ['ShardedHypencoderIndexer']


class ShardedHypencoderIndexer(pt.Indexer):
    """Encodes a corpus into a :class:`~pyterrier_hypencoder.ShardedHypencoderIndex` of ``shard_size``-document shards.

    Documents are read once, in order, and cut into contiguous shards; each shard is an ordinary index built by
    :class:`~pyterrier_hypencoder.HypencoderIndexer` (vectors, docnos, its own neighbour graph). With
    ``backend='local'`` the shards are built one after another in this process; with ``backend='ray'`` (or a Ray
    address) each shard is a Ray task (on a GPU when ``ray_options={'num_gpus': 1}``), retried by Ray on failure.
    Shards are written into a hidden sibling folder that is moved into place, manifest last, only when every
    shard is built and the docnos are unique across shards: an interrupted or failed build leaves nothing that
    loads. On a multi-machine cluster the path must be on a file system that every node sees.

    Example::

        indexer = ShardedHypencoderIndexer(model, 'msmarco.sharded', shard_size=1_048_576, backend='ray')
        index = indexer.index(dataset.get_corpus_iter())
    """

    def __init__(self, model, path: Union[str, os.PathLike], *, shard_size: int, backend: str = 'local',
                 ray_options: Optional[Dict[str, Any]] = None, overwrite: bool = False, verbose: bool = True,
                 **indexer_kwargs):
        """
        Args:
            model: the Hypencoder that encodes documents.
            path: the sharded index folder to create.
            shard_size: documents per shard (a multiple of 4,096 keeps scores bit-identical to one index); the
                last shard holds the rest (a remainder of one document joins the shard before it).
            backend: ``'local'``, ``'ray'`` or a Ray address.
            ray_options: Ray task options: ``num_cpus``, ``num_gpus`` (per shard task), ``max_retries`` (default 2),
                ``max_pending`` (shards read ahead and in flight, default 4: bounds the driver's memory).
            overwrite: replace an existing folder at ``path``.
            verbose: show progress bars (local backend).
            **indexer_kwargs: passed to each shard's ``HypencoderIndexer`` (``neighbours``, ``graph``,
                ``text_field``, ``batch_size``, ``chunk_size``, ``fp16``, ``ip_index``).
        """
        check_int('shard_size', shard_size, 2)
        if not isinstance(backend, str) or not backend:
            raise ValueError(f"backend must be 'local', 'ray' or a Ray address; got {backend!r}")
        if backend == 'local' and ray_options:
            raise ValueError(f'ray_options {sorted(ray_options)} need backend="ray" (or a Ray address)')
        bad = set(indexer_kwargs) - {'neighbours', 'graph', 'text_field', 'batch_size', 'chunk_size', 'fp16', 'ip_index'}
        if bad:
            raise TypeError(f'unknown argument(s) {sorted(bad)} for ShardedHypencoderIndexer')
        # Checks the shard indexer's arguments now, not after the first shard is encoded.
        HypencoderIndexer(model, Path(path) / 'check', **indexer_kwargs)
        self.model = model
        self.path = Path(path)
        self.shard_size = int(shard_size)
        self.backend = backend
        self.ray_options = dict(ray_options or {})
        self.overwrite = overwrite
        self.verbose = verbose
        self.indexer_kwargs = indexer_kwargs

    def __repr__(self) -> str:
        return f'ShardedHypencoderIndexer({str(self.path)!r}, shard_size={self.shard_size}, backend={self.backend!r})'

    def index(self, docs: Iterable[Dict[str, Any]]):
        """Indexes ``docs`` (dicts with ``docno`` and the text field(s)) and returns the sharded index.

        Raises:
            FileExistsError: when ``path`` exists and ``overwrite`` is False.
            ValueError: on an empty corpus, a bad document, or a docno that appears in two shards.
            HypencoderIndexError: when a shard cannot be built (after Ray's retries), naming the shard.
        """
        with building(self.path, self.overwrite) as tmp:
            shards = _shard_lists(docs, self.shard_size)
            if self.backend == 'local':
                sizes = []
                for i, shard_docs in enumerate(shards):
                    HypencoderIndexer(self.model, tmp / shard_dirname(i), verbose=self.verbose,
                                      **self.indexer_kwargs).index(shard_docs)
                    sizes.append(len(shard_docs))
            else:
                require('ray', purpose=f'ShardedHypencoderIndexer(backend={self.backend!r})')
                from ..distributed.ray_indexing import build_shards
                sizes = build_shards(index_shard, self.model, shards, tmp, None if self.backend == 'ray' else self.backend,
                                     self.indexer_kwargs, **self.ray_options)
            if not sizes:
                raise ValueError('the corpus is empty: no documents were given to index')
            folders = [tmp / shard_dirname(i) for i in range(len(sizes))]
            _check_unique_across(folders)
            write_manifest(tmp, HypencoderIndexFiles(folders[0]).meta, sizes)
        return pt.Artifact.load(str(self.path))


def index_shard(model, docs: list, path: str, indexer_kwargs: Dict[str, Any]) -> None:
    """Indexes one shard's documents into ``path`` (a Ray task's work; ``overwrite``: a retry replaces what a dead
    attempt left)."""
    HypencoderIndexer(model, path, overwrite=True, verbose=False, **indexer_kwargs).index(docs)


def _shard_lists(docs: Iterable[Dict[str, Any]], size: int) -> Iterator[List[Dict[str, Any]]]:
    """Consecutive lists of ``size`` documents; a last list of one document is appended to the one before."""
    it = iter(docs)
    current = list(itertools.islice(it, size))
    while current:
        following = list(itertools.islice(it, size))
        if len(following) == 1:
            current += following
            following = []
        yield current
        current = following


def _check_unique_across(folders: Sequence[Path], block: int = 1 << 16) -> None:
    """Each shard checks its own docnos; a docno in two shards would make docno -> row ambiguous."""
    shards = [HypencoderIndexFiles(f) for f in folders]
    for j in range(1, len(shards)):
        n = len(shards[j])
        for start in range(0, n, block):
            docnos = list(shards[j].docnos.fwd[np.arange(start, min(start + block, n))])
            for i in range(j):
                found = shards[i].find_rows(docnos)
                if (found >= 0).any():
                    dup = docnos[int(np.nonzero(found >= 0)[0][0])]
                    raise ValueError(f'duplicate docno {dup!r} (in shards {i} and {j}); docnos must be unique in a '
                                     'corpus')

"""A sharded Hypencoder index: a manifest and N ordinary index folders over contiguous row ranges.

Layout of ``path/``: ``shard-000/``, ``shard-001/``, ... (each a complete single index, with its own vectors,
docnos and neighbour graph over its own rows) and ``pt_meta.json``, the manifest, written last: the model, dtype,
vector size, and each shard's folder, ``offset`` and ``count``. A document's global row is its shard's offset plus
its row in the shard, so the pure search functions of :mod:`~pyterrier_hypencoder.search` run unchanged per shard
and only :func:`~pyterrier_hypencoder.search.merge_topk` joins their results. This module is the storage;
searching the shards is :mod:`~pyterrier_hypencoder.distributed.shards` (in this process) and
:mod:`~pyterrier_hypencoder.distributed.ray_backend` (on Ray actors).

Scores are bit-identical to the unsharded index's when every shard offset is a multiple of the exhaustive-search
block (:func:`~pyterrier_hypencoder.search.score_block`: 1,024 documents on CPU, 4,096 on GPU), as every document
is then scored in the same GEMM, of the same shape, on both sides (given the same BLAS thread count: Ray actors
with fewer threads than the driver may round differently, within the bound below); :func:`split_index` and the
sharded indexer align shards to ``align=4096`` documents by default for this reason. Unaligned shards score each document in
a differently shaped GEMM, which may round differently: scores then agree within fp32 rounding of the q-net
(``depth * width * 2**-24`` relative to the query's score scale), and rankings agree except between documents
whose scores differ by less than that.
"""
from __future__ import annotations

import os
import shutil
import uuid
from functools import cached_property
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pyterrier as pt
import pyterrier_alpha as pta

from ..checks import check_int
from .files import (
    HypencoderIndexError,
    HypencoderIndexFiles,
    build_ip_index,
    read_index_meta,
    was_rebuilt,
    write_docnos,
)
from .graph import write_graph
from .layout import (
    DOCNOS_FILE,
    FORMAT,
    META_FILE,
    PACKAGE_HINT,
    SHARDED_TYPE,
    VEC_FILES,
    shard_dirname,
    sharded_meta,
    write_meta,
)

__all__ = ['ShardedIndexFiles', 'building', 'shard_sizes', 'split_index', 'write_manifest']


class ShardedIndexFiles(pta.Artifact):
    """The files of a sharded Hypencoder index (see the module docstring); users hold its subclass
    :class:`pyterrier_hypencoder.ShardedHypencoderIndex`, which adds the ``retriever()`` / ``reranker()`` hand-outs.
    """
    ARTIFACT_TYPE = SHARDED_TYPE
    ARTIFACT_FORMAT = FORMAT
    ARTIFACT_PACKAGE_HINT = PACKAGE_HINT

    def __init__(self, path: Union[str, os.PathLike]):
        """
        Args:
            path: the sharded index folder (a relative path is resolved against the working directory now).
        """
        super().__init__(Path(os.fspath(path)).expanduser().absolute())
        self._generation = 0
        self._stamp = None

    def __repr__(self) -> str:
        if not self.built():
            return f'ShardedHypencoderIndex({str(self.path)!r}, not built)'
        counts = [s['count'] for s in self.meta['shards']]
        return (f'ShardedHypencoderIndex({str(self.path)!r}, {len(self)} docs in {len(counts)} shards {counts}, '
                f'dim={self.dim}, {self.meta["dtype"]})')

    def built(self) -> bool:
        """True when the index is complete (its manifest, written last, exists)."""
        return (self.path / META_FILE).exists()

    @cached_property
    def meta(self) -> Dict[str, Any]:
        """The manifest, checked for consistency (the shard folders themselves are checked by :meth:`validate`)."""
        meta_path = self.path / META_FILE
        meta, self._stamp = read_index_meta(
            self, 'sharded Hypencoder index', rebuild='rebuild the sharded index',
            missing=f'no complete sharded Hypencoder index at {self.path} (pt_meta.json is missing, so it was never '
                    'built or its build was interrupted); build it again')
        shards = meta.get('shards')
        ok = isinstance(shards, list) and shards and all(isinstance(s, dict) and {'path', 'offset', 'count'} <= set(s)
                                                         for s in shards)
        if not ok or meta.get('dtype') not in VEC_FILES or 'vec_size' not in meta or 'doc_count' not in meta:
            raise HypencoderIndexError(f'{meta_path} is corrupt (no shard list, or no dtype/vec_size/doc_count); rebuild '
                                       'the sharded index')
        offset = 0
        for i, s in enumerate(shards):
            if s['offset'] != offset or s['count'] < 1:
                raise HypencoderIndexError(f'{meta_path} is corrupt: shard {i} starts at row {s["offset"]}, not {offset} '
                                           '(shards must hold contiguous row ranges); rebuild the sharded index')
            offset += s['count']
        if offset != meta['doc_count']:
            raise HypencoderIndexError(f'{meta_path} is corrupt: its shards hold {offset} documents, not doc_count='
                                       f'{meta["doc_count"]}; rebuild the sharded index')
        return meta

    def generation(self) -> int:
        """A number that changes when the sharded index was rebuilt since it was read (as for a single index).

        Raises:
            HypencoderIndexError: when the folder was deleted (or left incomplete) since it was read.
        """
        if was_rebuilt(self.path, self._stamp, 'sharded index'):
            for name in ('meta', '_shards'):
                self.__dict__.pop(name, None)
            self._stamp = None
            self._generation += 1
        return self._generation

    def __len__(self) -> int:
        return self.meta['doc_count']

    @property
    def dim(self) -> int:
        """Size of the stored document vectors."""
        return self.meta['vec_size']

    @property
    def n_shards(self) -> int:
        return len(self.meta['shards'])

    @property
    def offsets(self) -> np.ndarray:
        """``[n_shards + 1]`` row boundaries: shard ``i`` holds global rows ``offsets[i]:offsets[i + 1]``."""
        counts = [s['count'] for s in self.meta['shards']]
        return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def shard_path(self, i: int) -> Path:
        return self.path / self.meta['shards'][i]['path']

    @cached_property
    def _shards(self) -> List[HypencoderIndexFiles]:
        return [HypencoderIndexFiles(self.shard_path(i)) for i in range(self.n_shards)]

    def shard(self, i: int) -> HypencoderIndexFiles:
        """Shard ``i`` as a single index (its rows are local: global row = ``offsets[i]`` + local row)."""
        return self._shards[i]

    def validate(self, graph: bool = False) -> None:
        """Opens every shard and checks it against the manifest, so a missing or damaged shard fails now.

        Args:
            graph: also require each shard's neighbour graph (for graph-mode search).

        Raises:
            HypencoderIndexError: naming the shard, its folder and the problem.
        """
        meta = self.meta
        for i, entry in enumerate(meta['shards']):
            shard = self.shard(i)
            try:
                smeta = shard.meta
                shard.docnos  # noqa: B018 -- reads the docno codecs, so a damaged file fails here
                if graph:
                    shard.graph_edges()
            except HypencoderIndexError as e:
                raise HypencoderIndexError(f'shard {i} of {self.path} is damaged: {e}') from None
            mine = (smeta['doc_count'], smeta['vec_size'], smeta['dtype'])
            want = (entry['count'], meta['vec_size'], meta['dtype'])
            if mine != want:
                raise HypencoderIndexError(f'shard {i} ({shard.path}) holds {mine[0]} x {mine[1]} {mine[2]} vectors but '
                                           f'the manifest says {want[0]} x {want[1]} {want[2]}: it was replaced or '
                                           'damaged; rebuild the sharded index')

    def check_model(self, model) -> None:
        """Checks that ``model`` encodes documents like the model that built the shards (see the single index)."""
        self.shard(0).check_model(model)

    def has_graph(self) -> bool:
        """True when every shard holds a neighbour graph."""
        return all(self.shard(i).has_graph() for i in range(self.n_shards))

    def locate(self, rows: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """``(shard number, local row)`` of each global row."""
        rows = np.asarray(rows, dtype=np.int64)
        shard = np.searchsorted(self.offsets, rows, side='right') - 1
        return shard, rows - self.offsets[shard]

    def find_rows(self, docnos: Sequence[str]) -> np.ndarray:
        """Global rows of ``docnos`` (-1 where absent): each docno is looked up shard by shard."""
        docnos = [str(d) for d in docnos]
        rows = np.full(len(docnos), -1, dtype=np.int64)
        for i in range(self.n_shards):
            todo = np.nonzero(rows < 0)[0]
            if len(todo) == 0:
                break
            local = self.shard(i).find_rows([docnos[j] for j in todo])
            hit = local >= 0
            rows[todo[hit]] = local[hit] + self.offsets[i]
        return rows

    def rows(self, docnos: Sequence[str]) -> np.ndarray:
        """Global row ids of ``docnos``.

        Raises:
            KeyError: naming the docnos that are in no shard.
        """
        docnos = [str(d) for d in docnos]
        rows = self.find_rows(docnos)
        if (rows < 0).any():
            unknown = [d for d, r in zip(docnos, rows) if r < 0]
            raise KeyError(f'{len(unknown)} docno(s) are not in the sharded index {self.path}, e.g. {unknown[:5]}')
        return rows

    @property
    def docnos(self) -> _ShardedDocnos:
        """Docnos of global rows: ``index.docnos.fwd[rows]``, as for a single index."""
        return _ShardedDocnos(self)


class _ShardedDocnos:
    """``.fwd[global rows]`` over the shards' docno lookups (the part of ``npids.Lookup`` the transformers use)."""

    def __init__(self, index: ShardedIndexFiles):
        self.index = index
        self.fwd = self

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, rows) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        shard, local = self.index.locate(rows.reshape(-1))
        out = np.empty(len(local), dtype=object)
        for i in np.unique(shard):
            sel = np.nonzero(shard == i)[0]
            out[sel] = self.index.shard(int(i)).docnos.fwd[local[sel]]
        return out.reshape(rows.shape)


def shard_sizes(n: int, n_shards: Optional[int] = None, shard_size: Optional[int] = None, align: int = 4096) -> List[int]:
    """Documents per shard for ``n`` documents: ``n_shards`` shards, or shards of ``shard_size`` documents.

    Every shard but the last holds a multiple of ``align`` documents (so scores stay bit-identical to one index,
    see the module docstring); the last holds the rest, at least 2 (a remainder of 1 joins the shard before it).

    Raises:
        ValueError: when both or neither of ``n_shards`` / ``shard_size`` are given, or the split is impossible.
    """
    if (n_shards is None) == (shard_size is None):
        raise ValueError('give exactly one of n_shards (how many shards) or shard_size (documents per shard)')
    check_int('align', align)
    if n_shards is not None:
        check_int('n_shards', n_shards)
        per_shard = -(-n // n_shards)  # ceil
        shard_size = -(-per_shard // align) * align  # rounded up to a multiple of align
    check_int('shard_size', shard_size, 2)
    sizes = [min(shard_size, n - start) for start in range(0, n, shard_size)]
    if len(sizes) > 1 and sizes[-1] < 2:
        last = sizes.pop()
        sizes[-1] += last
    if n_shards is not None and len(sizes) != n_shards:
        raise ValueError(f'{n} documents do not make {n_shards} shards aligned to {align} documents (that gives '
                         f'{len(sizes)}); pass a smaller align (e.g. align=1, giving up bit-identical scores) or fewer shards')
    return sizes


def split_index(index, path: Union[str, os.PathLike], *, n_shards: Optional[int] = None, shard_size: Optional[int] = None,
                sizes: Optional[Sequence[int]] = None, align: int = 4096, graph: bool = True, ip_index: bool = True,
                overwrite: bool = False, verbose: bool = False):
    """Splits a single index into a sharded one without re-encoding: vectors and docnos are copied by row range.

    Each shard's neighbour graph is rebuilt over the shard's own rows (with the source's k and method), not cut
    out of the source graph: a cut graph would lose every edge to another shard, leaving documents near shard
    boundaries with fewer than k neighbours, which the fixed-width ``np_topk`` layout cannot hold.

    Args:
        index: a :class:`~pyterrier_hypencoder.HypencoderIndex` or its path.
        path: the sharded index folder to create.
        n_shards, shard_size, align: how to cut the rows (see :func:`shard_sizes`).
        sizes: explicit documents per shard, in row order (instead of ``n_shards`` / ``shard_size``).
        graph: rebuild each shard's graph when the source has one; False gives shards for exhaustive search only.
        ip_index: build each shard its own inner-product ANN index (adaptive search's candidates) when the source
            has one, with the source's settings; False leaves the shards without (exact adaptive rounds).
        overwrite: replace an existing folder at ``path``.
        verbose: show progress of the graph builds.

    Returns:
        The :class:`~pyterrier_hypencoder.ShardedHypencoderIndex`.
    """
    if isinstance(index, ShardedIndexFiles):
        raise TypeError(f'split_index splits a single HypencoderIndex; {index.path} is already sharded')
    # a path to a sharded index fails in HypencoderIndexFiles.meta, naming what the folder holds
    source = index if isinstance(index, HypencoderIndexFiles) else HypencoderIndexFiles(index)
    n = len(source)
    if sizes is None:
        sizes = shard_sizes(n, n_shards, shard_size, align)
    sizes = [int(s) for s in sizes]
    if sum(sizes) != n or min(sizes) < 2:
        raise ValueError(f'sizes {sizes} must be at least 2 each and add up to the index size {n}')
    smeta, offsets = source.meta, np.concatenate([[0], np.cumsum(sizes)])
    graph = smeta.get('graph') if graph else None
    ip = smeta.get('ip_index') if ip_index else None
    with building(Path(path), overwrite) as tmp:
        for i, count in enumerate(sizes):
            folder = tmp / shard_dirname(i)
            folder.mkdir()
            lo, hi = int(offsets[i]), int(offsets[i + 1])
            vec_file = folder / VEC_FILES[smeta['dtype']]
            with open(vec_file, 'wb') as f:
                for start in range(lo, hi, 1 << 16):
                    f.write(np.ascontiguousarray(source.vectors()[start:min(start + (1 << 16), hi)]).tobytes())
            write_docnos(folder / DOCNOS_FILE, (str(d) for start in range(lo, hi, 1 << 16)
                                                   for d in source.docnos.fwd[np.arange(start, min(start + (1 << 16), hi))]))
            meta = dict(smeta, doc_count=count, graph=None)
            if graph:
                vecs = np.memmap(vec_file, mode='r', dtype=smeta['dtype'], shape=(count, smeta['vec_size']))
                meta['graph'] = write_graph(vecs, folder, graph['k'], graph.get('method') or 'auto', verbose)
            meta['ip_index'] = None
            if ip:
                vecs = np.memmap(vec_file, mode='r', dtype=smeta['dtype'], shape=(count, smeta['vec_size']))
                meta['ip_index'] = build_ip_index(vecs, folder, ip['m'], ip.get('ef_construction', 80),
                                                  ip.get('metric', 'lifted'), verbose)
            write_meta(folder, meta)
        write_manifest(tmp, smeta, sizes)
    return pt.Artifact.load(str(path))


def write_manifest(folder: Path, shard_meta: Dict[str, Any], sizes: Sequence[int]) -> None:
    """Writes the manifest (last: a folder without one never loads) from a shard's metadata and the shard sizes."""
    write_meta(folder, sharded_meta(shard_meta, sizes))


class building:
    """Context manager: a hidden sibling of ``path`` to build in, moved into place only when the block succeeds."""

    def __init__(self, path: Path, overwrite: bool):
        if path.exists() and not overwrite:
            raise FileExistsError(f'{path} already exists; pass overwrite=True to replace it, or choose another path')
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for stale in path.parent.glob(f'.{path.name}.building-*'):  # partial folders of earlier, killed builds
                shutil.rmtree(stale, ignore_errors=True)
        self.tmp = path.parent / f'.{path.name}.building-{uuid.uuid4().hex[:8]}'

    def __enter__(self) -> Path:
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                old = None
                if self.path.exists():
                    old = self.path.parent / f'.{self.path.name}.old-{uuid.uuid4().hex[:8]}'
                    os.rename(self.path, old)
                os.rename(self.tmp, self.path)
                if old is not None:
                    shutil.rmtree(old, ignore_errors=True)
        finally:
            if self.tmp.exists():
                shutil.rmtree(self.tmp, ignore_errors=True)

"""The Hypencoder index: document vectors, docnos and an L2 neighbour graph, stored as a PyTerrier artifact."""
from __future__ import annotations

import os
import shutil
import time
import uuid
from functools import cached_property
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Sequence, Union

import numpy as np
import pyterrier_alpha as pta
from npids import Lookup
from npids.builder import FwdLookupBuilder, InvLookupBuilder

from ..errors import HypencoderIndexError
from ..optional import require
from .layout import (
    DOCNOS_FILE,
    FORMAT,
    GRAPH_EDGES_FILE,
    GRAPH_WEIGHTS_FILE,
    INDEX_TYPE,
    META_FILE,
    PACKAGE_HINT,
    PROBE_TEXT,
    VEC_FILES,
    file_stamp,
    graph_dirname,
    ip_index_file,
    read_index_meta,
    write_meta,
)

__all__ = ['AUTO_IP_INDEX_DOCS', 'HypencoderIndexFiles', 'HypencoderIndexError', 'build_ip_index', 'file_stamp',
           'read_index_meta', 'was_rebuilt', 'write_docnos']

# From this many documents on, adaptive search is faster with an inner-product ANN index than ranking the whole
# corpus by inner product every round: HypencoderIndexer(ip_index='auto') builds one, and adaptive search on a
# larger index without one warns. Measured by benchmarks/ip_index_crossover.py (docs/ip-index-default.md).
AUTO_IP_INDEX_DOCS = 50_000



class _DocnoBuilder(FwdLookupBuilder):
    """npids' builder, less its one failure: a block of one docno that no earlier format could take (e.g. a last
    docno longer than the ones before it) gets the fixed-bytes format of width 0, which npids 0.1.3 writes but
    cannot read back (ZeroDivisionError on load). Formats of width 0 are dropped here, unless nothing else fits,
    in which case the fixed-bytes prefix gives up a byte."""

    def _commit(self):
        if self.seeds:
            fits = {name: f for name, f in self.seeded_formats.items() if f.size() > 0}
            if fits:
                self.seeded_formats = fits
            elif getattr(self.seeded_formats.get('fixedbytes'), 'prefix', None):
                self.seeded_formats['fixedbytes'].prefix = self.seeded_formats['fixedbytes'].prefix[:-1]
        super()._commit()


def write_docnos(path: Union[str, os.PathLike], docnos: Iterable[str]) -> None:
    """Writes ``docnos`` (in index order) as an npids lookup at ``path`` (``docnos.npids``), both directions."""
    builder = _DocnoBuilder(path)
    try:
        for docno in docnos:
            builder.add(docno)
    finally:
        builder.close()
    InvLookupBuilder.build(path)


def build_ip_index(vectors: np.ndarray, folder: Path, m: int, ef_construction: int = 80, metric: str = 'cosine',
                   verbose: bool = False) -> Dict[str, Any]:
    """Builds the HNSW inner-product index of ``vectors`` (degree ``m``, graph ``metric``: see
    :class:`~pyterrier_hypencoder.search.ip_index.InnerProductIndex`) into ``folder``, for adaptive search.

    Returns:
        The index metadata's ``ip_index`` entry.
    """
    from ..search.ip_index import InnerProductIndex
    name = ip_index_file(m)
    started = time.perf_counter()
    index = InnerProductIndex(vectors, hnsw_m=m, ef_construction=ef_construction, metric=metric, verbose=verbose)
    tmp = folder / (name + '.tmp')
    index.save(tmp)
    os.replace(tmp, folder / name)
    return {'kind': 'hnsw', 'm': int(m), 'ef_construction': int(ef_construction), 'metric': metric, 'file': name,
            'seconds': round(time.perf_counter() - started, 1)}


class HypencoderIndexFiles(pta.Artifact):
    """The files of a Hypencoder index: document vectors, docnos and a k-nearest-neighbour graph.

    This class reads and validates them; the transformers read an index through it. Users normally hold its
    subclass :class:`pyterrier_hypencoder.HypencoderIndex` (what ``pt.Artifact.load`` returns), which adds the
    ``retriever()`` and ``reranker()`` hand-outs: they live one module up (``artifacts.py``) so that this module
    never imports the transformers, which import it.
    """
    ARTIFACT_TYPE = INDEX_TYPE
    ARTIFACT_FORMAT = FORMAT
    ARTIFACT_PACKAGE_HINT = PACKAGE_HINT

    def __init__(self, path: Union[str, os.PathLike]):
        """
        Args:
            path: the index folder. It need not exist yet: an unbuilt index can hand out an indexer. A relative
                path is resolved against the working directory now, so the index (and the retrievers, rerankers
                and indexers made from it) keep working after an ``os.chdir``.
        """
        given = Path(os.fspath(path)).expanduser() if isinstance(path, (str, os.PathLike)) else None
        # Remembered for messages: "does not exist" then names the directory a relative path was taken from.
        self._cwd = os.getcwd() if given is not None and not given.is_absolute() else None
        super().__init__(given.absolute() if given is not None else path)  # (not a path: pyterrier's _NoPath)
        self._generation = 0  # bumped by _forget(), so transformers holding this index know to reload
        self._stamp = None

    def __repr__(self) -> str:
        if not self.built():
            return f'HypencoderIndex({str(self.path)!r}, not built)'
        graph = f'graph=k{self.graph_k}' if self.has_graph() else 'no graph'
        ip = self.meta.get('ip_index')
        # adaptive search draws from an ANN index when there is one, and ranks the whole corpus per round otherwise
        ann = f'ip_index={ip.get("kind", "hnsw")}{ip.get("m", "")}' if ip else 'no ip_index'
        return (f'HypencoderIndex({str(self.path)!r}, {len(self)} docs, dim={self.dim}, {self.meta["dtype"]}, {graph}, '
                f'{ann})')

    def built(self) -> bool:
        """True when the index is complete (its metadata, written last, exists)."""
        return (self.path / META_FILE).exists()

    @cached_property
    def meta(self) -> Dict[str, Any]:
        """The index metadata (model, vec_size, dtype, doc_count, graph); validated against the files on disk."""
        if not self.path.exists():
            where = f' (the relative path was taken from the working directory {self._cwd})' if self._cwd else ''
            raise HypencoderIndexError(f'no Hypencoder index at {self.path}: the folder does not exist{where}. Check the '
                                       'path, or build the index with HypencoderIndexer(model, path).index(docs).')
        meta_path = self.path / META_FILE
        meta, self._stamp = read_index_meta(
            self, 'Hypencoder index', rebuild='rebuild the index',
            missing=f'no complete Hypencoder index at {self.path} (the folder exists but pt_meta.json is missing, so '
                    'it was never built as an index, or its build was interrupted). Build it with '
                    'HypencoderIndexer(model, path, overwrite=True).index(docs).')
        missing = [key for key in ('doc_count', 'vec_size', 'dtype') if key not in meta]
        graph = meta.get('graph')
        if missing or meta.get('dtype') not in VEC_FILES or (graph and (not isinstance(graph, dict) or 'k' not in graph)):
            raise HypencoderIndexError(f'{meta_path} is corrupt (missing {missing}, or an unknown dtype or graph entry); '
                                       'rebuild the index')
        vec_file = self.path / VEC_FILES[meta['dtype']]
        want = meta['doc_count'] * meta['vec_size'] * np.dtype(meta['dtype']).itemsize
        if not vec_file.exists() or vec_file.stat().st_size != want:
            have = vec_file.stat().st_size if vec_file.exists() else 'missing'
            raise HypencoderIndexError(f'{vec_file} should hold {want} bytes ({meta["doc_count"]} x {meta["vec_size"]} '
                              f'{meta["dtype"]}) but is {have}: the index is truncated or corrupt; rebuild it')
        if not (self.path / DOCNOS_FILE).exists():
            raise HypencoderIndexError(f'{self.path / DOCNOS_FILE} is missing: the index is incomplete; rebuild it')
        if graph:
            gdir = self.path / graph_dirname(graph['k'])
            n_edges = meta['doc_count'] * graph['k']
            # Sizes are checked, not just presence: a truncated edges file would otherwise be read as a shorter graph.
            for name, want in ((GRAPH_EDGES_FILE, 4 * n_edges), (GRAPH_WEIGHTS_FILE, 2 * n_edges), (META_FILE, None),
                               (DOCNOS_FILE, None)):
                f = gdir / name
                if not f.exists() or (want is not None and f.stat().st_size != want):
                    expected = f' (expected {want} bytes)' if want is not None else ''
                    raise HypencoderIndexError(f'{f} is missing or truncated{expected}: the neighbour graph is corrupt; '
                                               'rebuild the index')
        ip = meta.get('ip_index')
        if ip and (not isinstance(ip, dict) or not (self.path / str(ip.get('file'))).is_file()):
            raise HypencoderIndexError(f'the inner-product index of {self.path} ({ip!r}) is missing or corrupt; add it '
                                       'again with index.add_ip_index(), or rebuild the index')
        return meta

    def __len__(self) -> int:
        return self.meta['doc_count']

    @property
    def dim(self) -> int:
        """Size of the stored document vectors."""
        return self.meta['vec_size']

    def vectors(self) -> np.ndarray:
        """The document vectors, ``[n_docs, dim]``, memory-mapped read-only (float16 or float32)."""
        return self._vectors

    @cached_property
    def _vectors(self) -> np.ndarray:
        meta = self.meta
        return np.memmap(self.path / VEC_FILES[meta['dtype']], mode='r', dtype=meta['dtype'],
                         shape=(meta['doc_count'], meta['vec_size']))

    @cached_property
    def docnos(self) -> Lookup:
        """Docno lookup: ``docnos.fwd[rows]`` gives docnos; prefer :meth:`rows` for docno -> row."""
        self.meta  # noqa: B018 -- validates the folder first
        lookup = None
        try:
            lookup = Lookup(self.path / DOCNOS_FILE)
            lookup.fwd[[0, len(lookup) - 1]]  # reads the codecs, so a damaged file fails here and not mid-search
        except Exception as e:  # npids raises struct, JSON, index and OS errors on damaged files
            if lookup is not None:
                lookup.close()
            raise HypencoderIndexError(f'{self.path / DOCNOS_FILE} is unreadable ({type(e).__name__}: {e}); the index '
                                       'is corrupt; rebuild it') from None
        if len(lookup) != len(self):
            n = len(lookup)
            lookup.close()
            raise HypencoderIndexError(f'{self.path / DOCNOS_FILE} has {n} docnos for {len(self)} vectors; '
                                       'the index is corrupt; rebuild it')
        return lookup

    def rows(self, docnos: Sequence[str]) -> np.ndarray:
        """Row ids of ``docnos``.

        Raises:
            KeyError: naming the docnos that are not in the index.
        """
        docnos = [str(d) for d in docnos]
        rows = self.find_rows(docnos)
        if (rows < 0).any():
            unknown = [d for d, r in zip(docnos, rows) if r < 0]
            raise KeyError(f'{len(unknown)} docno(s) are not in the index {self.path}, e.g. {unknown[:5]}')
        return rows

    def find_rows(self, docnos: Sequence[str]) -> np.ndarray:
        """Row ids of ``docnos``, -1 for those not in the index (a sharded index asks each shard)."""
        docnos = [str(d) for d in docnos]
        if not docnos:
            return np.zeros(0, dtype=np.int64)
        lookup = self.docnos
        try:
            rows = np.asarray(lookup.inv[docnos], dtype=np.int64)
        except ValueError:
            # npids' integer-sequence codec fails on keys no longer than its prefix ('3' or '' when the docnos are
            # 'd0', 'd1', ...); such keys are not in the index. One by one, only the failing keys come out unknown.
            rows = np.array([_lookup_one(lookup, d) for d in docnos], dtype=np.int64)
        # That codec also maps 'd007' to the row of 'd7' (and '0012' to '12'): only an exact round trip counts.
        found = np.nonzero(rows >= 0)[0]
        if len(found):
            back = np.asarray(lookup.fwd[rows[found]], dtype=object)
            rows[found[back != np.asarray([docnos[i] for i in found], dtype=object)]] = -1
        return rows

    def has_graph(self) -> bool:
        """True when the index holds a neighbour graph (needed by graph-mode retrieval)."""
        return bool(self.meta.get('graph'))

    @property
    def graph_k(self) -> Optional[int]:
        """Neighbours per document in the graph, or None without a graph."""
        return self.meta['graph']['k'] if self.has_graph() else None

    def graph_edges(self) -> np.ndarray:
        """``[n_docs, k]`` uint32 neighbour rows, nearest first, memory-mapped."""
        return self.corpus_graph().edges_data

    def corpus_graph(self, k: Optional[int] = None):
        """The neighbour graph as a ``pyterrier_adaptive`` corpus graph (e.g. for ``pyterrier_adaptive.GAR``).

        The graph follows the index: after a rebuild in place it reads the new graph (or, when the rebuilt index has
        none, fails with a clear error) instead of serving the old neighbours.

        Args:
            k: keep only the nearest ``k`` neighbours (at most the stored k).
        """
        from .corpus_graph import IndexCorpusGraph  # pyterrier-adaptive is imported only when a graph is asked for
        return IndexCorpusGraph(self, k=k)

    def has_ip_index(self) -> bool:
        """True when the index holds an HNSW inner-product index (adaptive search's candidates at scale)."""
        return bool(self.meta.get('ip_index'))

    def ip_index(self, ef_search: int = 256):
        """The inner-product index adaptive search draws candidates from (loaded once, kept).

        Args:
            ef_search: HNSW search beam (a draw of ``pool`` candidates widens it to at least ``pool``).

        Returns:
            An :class:`~pyterrier_hypencoder.search.ip_index.InnerProductIndex`: the stored HNSW index, or, for an index
            without one, an exact one over the vectors (one inner product per document per draw).
        """
        from ..search.ip_index import InnerProductIndex
        key = ('hnsw', ef_search) if self.has_ip_index() else ('exact',)
        cached = self.__dict__.get('_ip')
        if cached is None or cached[0] != key:
            if self.has_ip_index():
                index = InnerProductIndex.load(self.path / self.meta['ip_index']['file'], ef_search=ef_search)
                if index.n != len(self) or index.dim != self.dim:
                    raise HypencoderIndexError(f'the inner-product index of {self.path} holds {index.n} x {index.dim} '
                                               f'vectors, the index {len(self)} x {self.dim}; add it again with '
                                               'index.add_ip_index(overwrite=True)')
            else:
                index = InnerProductIndex(self.vectors())
            self.__dict__['_ip'] = cached = (key, index)
        return cached[1]

    def add_ip_index(self, m: int = 32, ef_construction: int = 80, overwrite: bool = False, metric: str = 'cosine',
                     verbose: bool = True) -> None:
        """Builds an HNSW inner-product index over a built index's vectors (what ``HypencoderIndexer(...,
        ip_index='hnsw32')`` builds with it), so adaptive search on a large corpus never ranks every document.

        Args:
            m: the HNSW graph degree.
            ef_construction: the HNSW build beam.
            overwrite: replace an inner-product index the index already has.
            metric: the graph's geometry (``'cosine'``, or ``'lifted'``: see
                :class:`~pyterrier_hypencoder.search.ip_index.InnerProductIndex`).
            verbose: a progress bar while it is built.

        Raises:
            FileExistsError: when the index has one and ``overwrite`` is False.
        """
        if self.has_ip_index() and not overwrite:
            raise FileExistsError(f'{self.path} already has an inner-product index ({self.meta["ip_index"]}); pass '
                                  'overwrite=True to replace it')
        entry = build_ip_index(self.vectors(), self.path, m, ef_construction, metric=metric, verbose=verbose)
        meta = dict(self.meta, ip_index=entry)
        write_meta(self.path, meta)  # the metadata changes last, and atomically
        self._forget()

    def check_model(self, model) -> None:
        """Checks that ``model`` encodes documents like the model that built this index.

        Raises:
            HypencoderIndexError: on a dimension mismatch, or when the model encodes a probe text differently.
        """
        built_with = self.meta.get('model')
        if model.dim != self.dim:
            raise HypencoderIndexError(f'the model makes {model.dim}-d vectors but the index {self.path} holds {self.dim}-d '
                                       f'vectors (built with {built_with!r}); use the same model for both')
        probe = self.meta.get('probe')
        if probe is None:
            return
        got = model.encode_docs([PROBE_TEXT]).float().cpu().numpy()[0]
        ref = np.asarray(probe, dtype=np.float32)
        # fp16/bf16 encoders differ from fp32 by ~1e-2 relative; a different model differs by O(1).
        if np.linalg.norm(got - ref) > 0.1 * max(np.linalg.norm(ref), 1e-6):
            # Name what differs: the recorded settings first, as two models of one name (a folder trained again,
            # or loaded with other options) differ only there or in their weights.
            differs = [f'{key} {self.meta[key]!r} (the model: {getattr(model, key)!r})'
                       for key in ('pooling', 'doc_max_length')
                       if key in self.meta and getattr(model, key, self.meta[key]) != self.meta[key]]
            name = getattr(model, 'name_or_path', None)
            how = (f'the index was built with {", ".join(differs)}' if differs else
                   'the model\'s weights differ from those that built the index' if name == built_with else
                   f'this model is {name!r}')
            raise HypencoderIndexError(f'the index {self.path} was built with {built_with!r}, and this model encodes '
                                       f'documents differently: {how}. Rebuild the index with this model, or load the '
                                       'model as it was when it built the index')

    def __getstate__(self) -> dict:
        # Open files (the docno lookup, memory maps, the FAISS index) do not pickle; a copy reopens them lazily.
        state = self.__dict__.copy()
        for name in ('_vectors', 'docnos', '_ip'):
            state.pop(name, None)
        return state

    def _forget(self) -> None:
        """Drops the cached metadata, vectors and docnos, e.g. after the folder was rebuilt (overwrite=True)."""
        for name in ('meta', '_vectors', 'docnos', '_ip'):
            self.__dict__.pop(name, None)
        self._stamp = None
        self._generation += 1

    def generation(self) -> int:
        """A number that changes whenever the index folder was rebuilt since this object read it.

        Transformers holding the index call it before each use and reload what they cached when it changed: an
        index rebuilt in place (``overwrite=True``, by this or any other process) replaces its files, and the old
        memory maps would otherwise keep serving the old documents.

        Raises:
            HypencoderIndexError: when the index folder was deleted (or left incomplete) since it was read.
        """
        if was_rebuilt(self.path, self._stamp, 'index'):
            self._forget()
        return self._generation

    def flex_index(self, **kwargs):
        """The same vectors as a ``pyterrier_dr.FlexIndex`` (float32 indexes only), e.g. for a dot-product baseline.

        A float32 index stores vectors in FlexIndex's layout (``vecs.f4`` + ``docnos.npids``); the FlexIndex lives
        in the ``flex`` sub-folder, whose files link to them, so pyterrier-dr's retrievers read the vectors in place:
        ``bi_encoder >> index.flex_index().retriever()`` ranks by inner product, with no copy made.

        Args:
            **kwargs: passed to ``FlexIndex`` (e.g. ``sim_fn``, ``verbose``).
        """
        if self.meta['dtype'] != 'float32':
            raise HypencoderIndexError(f'{self.path} stores {self.meta["dtype"]} vectors; FlexIndex reads float32 only '
                                       '(build the index with fp16=False)')
        require('pyterrier_dr', purpose='HypencoderIndex.flex_index()')
        from pyterrier_dr import FlexIndex
        flex = self.path / 'flex'
        if not (flex / META_FILE).exists():
            tmp = self.path / f'.flex-{uuid.uuid4().hex[:8]}'
            tmp.mkdir()
            for name in (VEC_FILES['float32'], DOCNOS_FILE):
                os.symlink(os.path.join('..', name), tmp / name)  # relative, so the index folder can move
            write_meta(tmp, {'type': INDEX_TYPE, 'format': 'flex', 'vec_size': self.dim, 'doc_count': len(self)})
            try:
                os.rename(tmp, flex)
            except OSError:  # another process made it first
                shutil.rmtree(tmp, ignore_errors=True)
        return FlexIndex(flex, **kwargs)


def was_rebuilt(path: Path, stamp: Optional[tuple], what: str) -> bool:
    """Whether the index folder ``path`` was rebuilt since its metadata was read with :func:`file_stamp` ``stamp``
    (False when it was not read yet): the one rebuild check of single and sharded indexes.

    Raises:
        HypencoderIndexError: when the folder was deleted (or left incomplete) since it was read.
    """
    if stamp is None:
        return False
    try:
        return file_stamp(path / META_FILE) != stamp
    except FileNotFoundError:
        raise HypencoderIndexError(f'the {what} {path} was deleted (or is being replaced) while in use; rebuild it, '
                                   'or make a new retriever once it is back') from None


def _lookup_one(lookup: Lookup, docno: str) -> int:
    try:
        return int(lookup.inv[[docno]][0])
    except ValueError:
        return -1

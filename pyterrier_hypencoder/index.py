"""The Hypencoder index: document vectors, docnos and an L2 neighbour graph, stored as a PyTerrier artifact."""
from __future__ import annotations

import copy
import json
import os
import shutil
import uuid
import warnings
from functools import cached_property
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
import pandas as pd
import pyterrier as pt
import pyterrier_alpha as pta
from npids import Lookup

from .optional import require

__all__ = ['HypencoderIndexFiles', 'HypencoderIndexer', 'HypencoderIndexError', 'write_graph']

_VEC_FILES = {'float32': 'vecs.f4', 'float16': 'vecs.f2'}
_PROBE_TEXT = 'pyterrier-hypencoder probe: does this model encode documents like the one that built the index?'


class HypencoderIndexError(ValueError):
    """An index that is missing, incomplete, corrupt, or does not fit the model it is used with."""


def _graph_dirname(k: int) -> str:
    # "l2" in the name keeps it apart from pyterrier-dr's cosine graphs (corpusgraph_k*).
    return f'graph_l2_k{k}'


class HypencoderIndexFiles(pta.Artifact):
    """The files of a Hypencoder index: document vectors, docnos and a k-nearest-neighbour graph.

    This class reads and validates them; the transformers read an index through it. Users normally hold its
    subclass :class:`pyterrier_hypencoder.HypencoderIndex` (what ``pt.Artifact.load`` returns), which adds the
    ``retriever()`` and ``reranker()`` hand-outs: they live one module up (``artifacts.py``) so that this module
    never imports the transformers, which import it.
    """
    ARTIFACT_TYPE = 'dense_index'
    ARTIFACT_FORMAT = 'hypencoder'
    ARTIFACT_PACKAGE_HINT = 'pyterrier-hypencoder'

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
        return f'HypencoderIndex({str(self.path)!r}, {len(self)} docs, dim={self.dim}, {self.meta["dtype"]}, {graph})'

    def built(self) -> bool:
        """True when the index is complete (its metadata, written last, exists)."""
        return (self.path / 'pt_meta.json').exists()

    @cached_property
    def meta(self) -> Dict[str, Any]:
        """The index metadata (model, vec_size, dtype, doc_count, graph); validated against the files on disk."""
        meta_path = self.path / 'pt_meta.json'
        if not self.path.exists():
            where = f' (the relative path was taken from the working directory {self._cwd})' if self._cwd else ''
            raise HypencoderIndexError(f'no Hypencoder index at {self.path}: the folder does not exist{where}. Check the '
                                       'path, or build the index with HypencoderIndexer(model, path).index(docs).')
        if not meta_path.exists():
            raise HypencoderIndexError(f'no complete Hypencoder index at {self.path} (the folder exists but pt_meta.json '
                                       'is missing, so it was never built as an index, or its build was interrupted). '
                                       'Build it with HypencoderIndexer(model, path, overwrite=True).index(docs).')
        try:
            self._stamp = _file_stamp(meta_path)
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise HypencoderIndexError(f'{meta_path} is corrupt ({e}); rebuild the index') from None
        if not isinstance(meta, dict):
            raise HypencoderIndexError(f'{meta_path} is corrupt (not a JSON object); rebuild the index')
        if meta.get('type') != self.ARTIFACT_TYPE or meta.get('format') != self.ARTIFACT_FORMAT:
            kind = f'{meta.get("type")}/{meta.get("format")}'
            raise HypencoderIndexError(f'{self.path} holds a {kind} artifact, not a Hypencoder index')
        missing = [key for key in ('doc_count', 'vec_size', 'dtype') if key not in meta]
        graph = meta.get('graph')
        if missing or meta.get('dtype') not in _VEC_FILES or (graph and (not isinstance(graph, dict) or 'k' not in graph)):
            raise HypencoderIndexError(f'{meta_path} is corrupt (missing {missing}, or an unknown dtype or graph entry); '
                                       'rebuild the index')
        vec_file = self.path / _VEC_FILES[meta['dtype']]
        want = meta['doc_count'] * meta['vec_size'] * np.dtype(meta['dtype']).itemsize
        if not vec_file.exists() or vec_file.stat().st_size != want:
            have = vec_file.stat().st_size if vec_file.exists() else 'missing'
            raise HypencoderIndexError(f'{vec_file} should hold {want} bytes ({meta["doc_count"]} x {meta["vec_size"]} '
                              f'{meta["dtype"]}) but is {have}: the index is truncated or corrupt; rebuild it')
        if not (self.path / 'docnos.npids').exists():
            raise HypencoderIndexError(f'{self.path / "docnos.npids"} is missing: the index is incomplete; rebuild it')
        if graph:
            gdir = self.path / _graph_dirname(graph['k'])
            n_edges = meta['doc_count'] * graph['k']
            # Sizes are checked, not just presence: a truncated edges file would otherwise be read as a shorter graph.
            for name, want in (('edges.u32.np', 4 * n_edges), ('weights.f16.np', 2 * n_edges), ('pt_meta.json', None),
                               ('docnos.npids', None)):
                f = gdir / name
                if not f.exists() or (want is not None and f.stat().st_size != want):
                    expected = f' (expected {want} bytes)' if want is not None else ''
                    raise HypencoderIndexError(f'{f} is missing or truncated{expected}: the neighbour graph is corrupt; '
                                               'rebuild the index')
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
        return np.memmap(self.path / _VEC_FILES[meta['dtype']], mode='r', dtype=meta['dtype'],
                         shape=(meta['doc_count'], meta['vec_size']))

    @cached_property
    def docnos(self) -> Lookup:
        """Docno lookup: ``docnos.fwd[rows]`` gives docnos; prefer :meth:`rows` for docno -> row."""
        self.meta  # noqa: B018 -- validates the folder first
        lookup = None
        try:
            lookup = Lookup(self.path / 'docnos.npids')
            lookup.fwd[[0, len(lookup) - 1]]  # reads the codecs, so a damaged file fails here and not mid-search
        except Exception as e:  # npids raises struct, JSON, index and OS errors on damaged files
            if lookup is not None:
                lookup.close()
            raise HypencoderIndexError(f'{self.path / "docnos.npids"} is unreadable ({type(e).__name__}: {e}); the index '
                                       'is corrupt; rebuild it') from None
        if len(lookup) != len(self):
            n = len(lookup)
            lookup.close()
            raise HypencoderIndexError(f'{self.path / "docnos.npids"} has {n} docnos for {len(self)} vectors; '
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

        Args:
            k: keep only the nearest ``k`` neighbours (at most the stored k).
        """
        from pyterrier_adaptive.corpus_graph import NpTopKCorpusGraph
        if not self.has_graph():
            raise HypencoderIndexError(f'the index {self.path} has no neighbour graph; rebuild it with '
                                       'HypencoderIndexer(..., neighbours=100) to use graph-mode retrieval')
        return NpTopKCorpusGraph(self.path / _graph_dirname(self.graph_k), k=k)

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
        got = model.encode_docs([_PROBE_TEXT]).float().cpu().numpy()[0]
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

    def indexer(self, model, **kwargs) -> HypencoderIndexer:
        """A :class:`HypencoderIndexer` that builds this index with ``model`` (this object then reads the new one)."""
        indexer = HypencoderIndexer(model, self.path, **kwargs)
        indexer._built_for = self
        return indexer

    def _forget(self) -> None:
        """Drops the cached metadata, vectors and docnos, e.g. after the folder was rebuilt (overwrite=True)."""
        for name in ('meta', '_vectors', 'docnos'):
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
        if self._stamp is not None:
            try:
                current = _file_stamp(self.path / 'pt_meta.json')
            except FileNotFoundError:
                raise HypencoderIndexError(f'the index {self.path} was deleted (or is being replaced) while in use; '
                                           'rebuild it, or make a new retriever once it is back') from None
            if current != self._stamp:
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
        if not (flex / 'pt_meta.json').exists():
            tmp = self.path / f'.flex-{uuid.uuid4().hex[:8]}'
            tmp.mkdir()
            for name in ('vecs.f4', 'docnos.npids'):
                os.symlink(os.path.join('..', name), tmp / name)  # relative, so the index folder can move
            with open(tmp / 'pt_meta.json', 'w') as f:
                json.dump({'type': 'dense_index', 'format': 'flex', 'vec_size': self.dim, 'doc_count': len(self)}, f)
            try:
                os.rename(tmp, flex)
            except OSError:  # another process made it first
                shutil.rmtree(tmp, ignore_errors=True)
        return FlexIndex(flex, **kwargs)


class HypencoderIndexer(pt.Indexer):
    """Encodes documents with a Hypencoder, streams their vectors to disk, and builds the L2 neighbour graph.

    Example::

        indexer = HypencoderIndexer(model, 'vaswani.hypencoder')
        index = indexer.index(pt.get_dataset('irds:vaswani').get_corpus_iter())
    """

    def __init__(self, model, path: Union[str, os.PathLike], *, neighbours: Optional[int] = 100,
                 graph: Optional[str] = 'auto', text_field: Union[str, Sequence[str]] = 'text',
                 batch_size: int = 32, chunk_size: int = 1024, fp16: bool = False, overwrite: bool = False,
                 device=None, verbose: bool = True):
        """
        Args:
            model: the :class:`~pyterrier_hypencoder.Hypencoder` that encodes documents, or its folder or hub
                name (loaded now, on ``device``).
            path: the index folder to create (a relative path is resolved against the working directory now).
            neighbours: neighbours per document in the graph (the paper: 100); 0 or None for no graph.
            graph: graph builder (see :func:`~pyterrier_hypencoder.graph.build_knn_graph`): ``auto`` (exact up to a
                size threshold, then approximate), ``exact``, ``hnsw`` or ``ivf``; None for no graph.
            text_field: the field to encode, or several fields joined by a space (e.g. ``['title', 'text']``).
            batch_size: documents per encoder forward pass.
            chunk_size: documents read and written per step (length-sorted within a chunk); bounds memory.
            fp16: store vectors in float16, halving disk and memory.
            overwrite: replace an existing index at ``path`` (and partial folders that killed runs left beside it).
            device: where documents are encoded (default: the model's device). A model on another device is not
                moved: a copy on ``device`` encodes, for the duration of :meth:`index`.
            verbose: show progress bars.

        Raises:
            ValueError: on a bad parameter or an unavailable device.
            TypeError: when ``model`` is neither a document encoder nor the name of a Hypencoder.
        """
        if neighbours is not None and neighbours < 0:
            raise ValueError(f'neighbours must be >= 0 (0 or None: no graph); got {neighbours}')
        if batch_size < 1 or chunk_size < 1:
            raise ValueError('batch_size and chunk_size must be >= 1')
        from .graph import METHODS
        if neighbours and graph is not None and graph not in METHODS:
            # checked here, not after hours of encoding
            raise ValueError(f'graph={graph!r} is not supported: use one of {METHODS}, or None for no graph')
        from .model import default_device, load_model
        self.device = default_device(device) if device is not None else None
        self.model = load_model(model, device=device, user='HypencoderIndexer', docs_only=True)
        self.path = Path(os.fspath(path)).expanduser().absolute()
        self.neighbours = neighbours or 0
        self.graph = graph if self.neighbours else None
        self.text_fields = [text_field] if isinstance(text_field, str) else list(text_field)
        self.batch_size = batch_size
        self.chunk_size = chunk_size
        self.dtype = 'float16' if fp16 else 'float32'
        self.overwrite = overwrite
        self.verbose = verbose
        self._built_for: Optional[HypencoderIndexFiles] = None  # set by HypencoderIndex.indexer()

    def index_inputs(self) -> List[List[str]]:
        """The columns :meth:`index` reads (for ``pt.inspect.indexer_inputs``)."""
        return [['docno'] + self.text_fields]

    def __repr__(self) -> str:
        return (f'HypencoderIndexer({str(self.path)!r}, neighbours={self.neighbours}, text_field={self.text_fields}, '
                f'dtype={self.dtype})')

    def index(self, docs: Iterable[Dict[str, Any]]) -> HypencoderIndexFiles:
        """Indexes documents.

        Args:
            docs: dicts with ``docno`` and the text field(s), e.g. ``dataset.get_corpus_iter()``, or a DataFrame
                with those columns.

        Returns:
            The built index, as the artifact class registered for it (:class:`pyterrier_hypencoder.HypencoderIndex`).

        Raises:
            FileExistsError: when ``path`` exists and ``overwrite`` is False.
            ValueError: on an empty corpus, a document without docno or text, or duplicate docnos. Each is found
                as the chunk that holds it is read, before it is encoded, and nothing is left on disk.
        """
        if isinstance(docs, pd.DataFrame):
            docs = _FrameRows(docs)
        elif hasattr(docs, 'get_corpus_iter'):
            raise TypeError(f'index() takes the documents, not a dataset: pass {type(docs).__name__}.get_corpus_iter()')
        if self.path.exists() and not self.overwrite:
            raise FileExistsError(f'{self.path} already exists; pass overwrite=True to replace it, or choose another path')
        # Everything is written to a hidden sibling and moved into place at the end, so an interrupted run never
        # leaves a folder that loads.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.overwrite:
            # Partial folders of earlier, killed runs at this path.
            for stale in self.path.parent.glob(f'.{self.path.name}.building-*'):
                shutil.rmtree(stale, ignore_errors=True)
        tmp = self.path.parent / f'.{self.path.name}.building-{uuid.uuid4().hex[:8]}'
        tmp.mkdir()
        try:
            meta = self._build(docs, tmp)
            with open(tmp / 'pt_meta.json', 'w') as f:
                json.dump(meta, f, indent=1)
            self._move_into_place(tmp)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        if self._built_for is not None:
            self._built_for._forget()  # it may hold the replaced index's metadata and memory maps
            return self._built_for
        # Resolved through the pyterrier.artifact entry point, so the caller gets the class with the hand-outs
        # (defined above this module) without this module importing it.
        return pt.Artifact.load(str(self.path))

    def _move_into_place(self, tmp: Path) -> None:
        old = None
        if self.path.exists():
            old = self.path.parent / f'.{self.path.name}.old-{uuid.uuid4().hex[:8]}'
            os.rename(self.path, old)
        os.rename(tmp, self.path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def _texts(self, chunk: List[Dict[str, Any]], start: int) -> List[str]:
        texts = []
        for i, doc in enumerate(chunk):
            parts = []
            for field in self.text_fields:
                if field not in doc:
                    raise ValueError(f'document {start + i} (docno {doc.get("docno")!r}) has no {field!r} field; it '
                                     f'has {sorted(doc)}. Choose the text field(s) with text_field=...')
                value = doc[field]
                if _is_missing(value):
                    # str(nan) would index the word "nan" in place of the document.
                    raise ValueError(f'document {start + i} (docno {doc.get("docno")!r}) has a missing {field!r} value '
                                     f'({value!r}); fill it (e.g. with "") or drop the document')
                parts.append(str(value))
            texts.append(' '.join(parts))
        return texts

    def _encoder(self):
        """The model, or a copy of it on ``device`` (the model the user passed is not moved)."""
        model, want = self.model, self.device
        have = getattr(model, 'device', want)
        # 'cuda' and 'cuda:0' are one device here (default_device keeps the name as given).
        if want is None or (have.type == want.type and (have.index or 0) == (want.index or 0)):
            return model
        return copy.deepcopy(model).to(want)

    def _encode_into(self, docs, model, fvec, builder, progress) -> int:
        """Checks, encodes and writes the documents chunk by chunk; returns how many there were."""
        import torch
        count = 0
        # Every docno seen so far, so a duplicate fails before the chunks after it are encoded (an exact set: about
        # 100 bytes per document, far less than the vectors; the final check below also catches npids aliasing).
        seen: Dict[str, int] = {}
        for chunk in _chunks(docs, self.chunk_size):
            for i, doc in enumerate(chunk):
                if not isinstance(doc, dict):
                    raise TypeError(f'document {count + i} is a {type(doc).__name__}, not a dict: index() takes dicts '
                                    f'with a "docno" and {self.text_fields} (e.g. dataset.get_corpus_iter()) or a '
                                    'DataFrame with those columns')
                docno = doc.get('docno')
                if _is_missing(docno):
                    raise ValueError(f'document {count + i} has no docno: each document must be a dict with a '
                                     f'"docno" and {self.text_fields}; it has {sorted(doc)}')
                docno = str(docno)
                if seen.setdefault(docno, count + i) != count + i:
                    raise ValueError(f'duplicate docno {docno!r} (documents {seen[docno]} and {count + i}); docnos '
                                     'must be unique in a corpus')
                builder.add(docno)
            texts = self._texts(chunk, count)
            with torch.inference_mode():
                vecs = model.encode_docs(texts, batch_size=self.batch_size)
            fvec.write(vecs.float().cpu().numpy().astype(self.dtype).tobytes())
            count += len(chunk)
            progress.update(len(chunk))
        # Checked before the builder closes: npids cannot finish a lookup of fewer than two docnos.
        if count == 0:
            raise ValueError('the corpus is empty: no documents were given to index')
        if count == 1:
            raise ValueError('a Hypencoder index needs at least 2 documents; score a single document with '
                             'HypencoderReranker(model) instead')
        return count

    def _build(self, docs: Iterable[Dict[str, Any]], folder: Path) -> Dict[str, Any]:
        import torch
        model = self._encoder()
        total = len(docs) if hasattr(docs, '__len__') else None
        # Counts encoded documents (not documents read), so the bar moves with the real work.
        progress = pt.tqdm(total=total, desc='indexing', unit='doc', disable=not self.verbose)
        with open(folder / _VEC_FILES[self.dtype], 'wb') as fvec, Lookup.builder(folder / 'docnos.npids') as builder, \
                progress:
            try:
                count = self._encode_into(docs, model, fvec, builder, progress)
            except BaseException:
                builder.fout.close()  # npids' builder closes its file only when the block succeeds
                raise
        _check_unique_docnos(folder / 'docnos.npids', count)
        vectors = np.memmap(folder / _VEC_FILES[self.dtype], mode='r', dtype=self.dtype, shape=(count, model.dim))
        graph_meta = self._build_graph(vectors, folder) if self.graph else None
        with torch.inference_mode():
            probe = model.encode_docs([_PROBE_TEXT]).float().cpu().numpy()[0]
        return {
            'type': HypencoderIndexFiles.ARTIFACT_TYPE,
            'format': HypencoderIndexFiles.ARTIFACT_FORMAT,
            'package_hint': HypencoderIndexFiles.ARTIFACT_PACKAGE_HINT,
            'model': getattr(model, 'name_or_path', None),
            'vec_size': model.dim,
            'dtype': self.dtype,
            'doc_count': count,
            'pooling': model.pooling,
            'doc_max_length': model.doc_max_length,
            'text_field': self.text_fields,
            'graph': graph_meta,
            'probe': [round(float(x), 6) for x in probe],
        }

    def _build_graph(self, vectors: np.ndarray, folder: Path) -> Optional[Dict[str, Any]]:
        return write_graph(vectors, folder, self.neighbours, self.graph, self.verbose)


def write_graph(vectors: np.ndarray, folder: Path, neighbours: int, method: str = 'auto',
                verbose: bool = False) -> Optional[Dict[str, Any]]:
    """Builds the L2 ``neighbours``-NN graph of ``vectors`` into ``folder`` (which holds their ``docnos.npids``).

    Returns:
        The index metadata's ``graph`` entry, or None when there are too few documents for a graph.
    """
    from .graph import build_knn_graph
    n = vectors.shape[0]
    k = min(neighbours, n - 1)
    if k < 1:
        warnings.warn('a single document has no neighbours: the index is built without a graph', stacklevel=3)
        return None
    if k < neighbours:
        warnings.warn(f'only {n} documents: the graph keeps {k} neighbours per document, not {neighbours}',
                      stacklevel=3)
    gdir = folder / _graph_dirname(k)
    gdir.mkdir()
    # Raw row-major files, as pyterrier-adaptive's np_topk graphs are; weights (L2 distances) in float16.
    edges = np.memmap(gdir / 'edges.u32.np', mode='w+', dtype=np.uint32, shape=(n, k))
    dists = np.memmap(gdir / 'weights.f16.np', mode='w+', dtype=np.float16, shape=(n, k))
    build_knn_graph(vectors, k, method=method, verbose=verbose, edges_out=edges, dists_out=dists)
    edges.flush()
    dists.flush()
    del edges, dists
    shutil.copy(folder / 'docnos.npids', gdir / 'docnos.npids')
    with open(gdir / 'pt_meta.json', 'w') as f:
        json.dump({'type': 'corpus_graph', 'format': 'np_topk', 'package_hint': 'pyterrier-adaptive',
                   'doc_count': n, 'k': k, 'metric': 'l2'}, f)
    return {'k': k, 'metric': 'l2', 'method': method}


def _file_stamp(path: Path) -> tuple:
    # A rebuilt index is a new folder moved into place, so its pt_meta.json is a new file (inode and mtime).
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns, st.st_size


def _lookup_one(lookup: Lookup, docno: str) -> int:
    try:
        return int(lookup.inv[[docno]][0])
    except ValueError:
        return -1


def _is_missing(value) -> bool:
    """None, NaN or pd.NA: what a DataFrame holds where a field is missing."""
    return value is None or (pd.api.types.is_scalar(value) and bool(pd.isna(value)))


class _FrameRows:
    """A DataFrame's rows as dicts, as PyTerrier indexers take them (``len`` kept for the progress bar)."""

    def __init__(self, frame: pd.DataFrame, block: int = 4096):
        self.frame, self.block = frame, block

    def __len__(self) -> int:
        return len(self.frame)

    def __iter__(self):
        for start in range(0, len(self.frame), self.block):  # dicts of one block at a time, not of the whole frame
            yield from self.frame.iloc[start:start + self.block].to_dict('records')


def _chunks(it: Iterable, size: int) -> Iterable[list]:
    chunk = []
    for item in it:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _check_unique_docnos(path: Path, count: int, block: int = 1 << 16) -> None:
    """Duplicate docnos make docno lookups ambiguous; each row must map back to itself."""
    lookup = Lookup(path)
    try:
        for start in range(0, count, block):
            rows = np.arange(start, min(start + block, count))
            docnos = lookup.fwd[rows]
            back = np.asarray(lookup.inv[list(docnos)])
            bad = np.nonzero(back != rows)[0]
            if len(bad):
                dup = str(docnos[bad[0]])
                raise ValueError(f'duplicate docno {dup!r} (rows {back[bad[0]]} and {rows[bad[0]]}); docnos must be '
                                 'unique in a corpus')
    finally:
        lookup.close()

"""HypencoderIndexer: encodes documents into a :class:`~pyterrier_hypencoder.HypencoderIndex` folder.

Vectors and docnos are streamed to a temporary sibling folder, the neighbour graph is built over the vectors, and
the folder is moved into place with its ``pt_meta.json`` written last, so an interrupted build leaves nothing that
loads.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
import pandas as pd
import pyterrier as pt
import torch
from npids import Lookup

from ..devices import default_device
from ..index.files import AUTO_IP_INDEX_DOCS, HypencoderIndexFiles, build_ip_index, write_docnos
from ..index.graph import METHODS, write_graph
from ..index.layout import DOCNOS_FILE, PROBE_TEXT, VEC_FILES, index_meta, write_meta
from ..model.hypencoder import load_model

__all__ = ['HypencoderIndexer', 'write_graph']

# Files of a build in progress: docnos as JSON lines (npids is built at the end) and what a resume starts from.
_DOCNOS_PARTIAL = 'docnos.partial.jsonl'
_PROGRESS = 'progress.json'


class HypencoderIndexer(pt.Indexer):
    """Encodes documents with a Hypencoder, streams their vectors to disk, and builds the L2 neighbour graph.

    Example::

        indexer = HypencoderIndexer(model, 'vaswani.hypencoder')
        index = indexer.index(pt.get_dataset('irds:vaswani').get_corpus_iter())
    """

    def __init__(self, model, path: Union[str, os.PathLike], *, neighbours: Optional[int] = 100,
                 graph: Optional[str] = 'auto', text_field: Union[str, Sequence[str]] = 'text',
                 batch_size: int = 32, chunk_size: int = 1024, fp16: bool = False, overwrite: bool = False,
                 resume: bool = False, ip_index: Optional[str] = 'auto', device=None, verbose: bool = True):
        """
        Args:
            model: the :class:`~pyterrier_hypencoder.Hypencoder` that encodes documents, or its folder or hub
                name (loaded now, on ``device``).
            path: the index folder to create (a relative path is resolved against the working directory now).
            neighbours: neighbours per document in the graph (the paper: 100); 0 or None for no graph.
            graph: graph builder (see :func:`~pyterrier_hypencoder.index.graph.build_knn_graph`): ``auto`` (exact up to a
                size threshold, then approximate), ``exact``, ``hnsw`` or ``ivf``; None for no graph.
            text_field: the field to encode, or several fields joined by a space (e.g. ``['title', 'text']``).
            batch_size: documents per encoder forward pass.
            chunk_size: documents read and written per step (length-sorted within a chunk); bounds memory.
            fp16: store vectors in float16, halving disk and memory.
            overwrite: replace an existing index at ``path`` (and partial folders that killed runs left beside it).
            resume: keep the partial build when :meth:`index` is interrupted (``.<name>.building-resume`` beside
                ``path``), and continue one found there: the documents already encoded are read again (their docnos
                checked against the saved ones) but not encoded. Pass the same documents and settings.
            ip_index: the inner-product ANN index that adaptive search draws its candidates from on large
                corpora. ``'auto'`` (default): ``'hnsw32'`` from
                :data:`~pyterrier_hypencoder.index.files.AUTO_IP_INDEX_DOCS` documents on, where it makes adaptive
                search faster (measured: ``docs/ip-index-default.md``), else none. ``'hnsw32'``: FAISS HNSW of
                degree 32 (any ``'hnsw<M>'``) whatever the size. None: none (adaptive search then ranks the whole
                corpus by inner product every round). ``index.add_ip_index()`` adds one later.
            device: where documents are encoded (default: the model's device). A model on another device is not
                moved: a copy on ``device`` encodes, for the duration of :meth:`index`.
            verbose: show progress bars: one over the documents (it replaces the bar of a corpus iterator that shows
                its own, such as ``dataset.get_corpus_iter()``, so each document is counted once), then one per
                structure built (graph, ANN index).

        Raises:
            ValueError: on a bad parameter or an unavailable device.
            TypeError: when ``model`` is neither a document encoder nor the name of a Hypencoder.
        """
        if neighbours is not None and neighbours < 0:
            raise ValueError(f'neighbours must be >= 0 (0 or None: no graph); got {neighbours}')
        if batch_size < 1 or chunk_size < 1:
            raise ValueError('batch_size and chunk_size must be >= 1')
        if neighbours and graph is not None and graph not in METHODS:
            # checked here, not after hours of encoding
            raise ValueError(f'graph={graph!r} is not supported: use one of {METHODS}, or None for no graph')
        self.ip_m = _parse_ip_index(ip_index)
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
        self.resume = resume
        self.verbose = verbose
        self._built_for: Optional[HypencoderIndexFiles] = None  # set by HypencoderIndex.indexer()

    def index_inputs(self) -> List[List[str]]:
        """The columns :meth:`index` reads (for ``pt.inspect.indexer_inputs``)."""
        return [['docno'] + self.text_fields]

    def __repr__(self) -> str:
        ip = {0: None, _AUTO: 'auto'}.get(self.ip_m, f'hnsw{self.ip_m}')
        return (f'HypencoderIndexer({str(self.path)!r}, neighbours={self.neighbours}, text_field={self.text_fields}, '
                f'dtype={self.dtype}, ip_index={ip!r})')

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
        if self.verbose:
            _hide_input_bar(docs)  # this indexer's bar counts the documents; two bars would interleave
        if self.path.exists() and not self.overwrite:
            raise FileExistsError(f'{self.path} already exists; pass overwrite=True to replace it, or choose another path')
        # Everything is written to a hidden sibling and moved into place at the end, so an interrupted run never
        # leaves a folder that loads.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        resumable = self.path.parent / f'.{self.path.name}.building-resume'
        if self.overwrite:
            # Partial folders of earlier, killed runs at this path (a resumable one too: overwrite starts over).
            for stale in self.path.parent.glob(f'.{self.path.name}.building-*'):
                shutil.rmtree(stale, ignore_errors=True)
        elif resumable.exists() and not self.resume:
            raise FileExistsError(f'{resumable} holds an interrupted build of this index: pass resume=True to continue '
                                  'it, or overwrite=True to start over')
        tmp = resumable if self.resume else self.path.parent / f'.{self.path.name}.building-{uuid.uuid4().hex[:8]}'
        tmp.mkdir(exist_ok=self.resume)
        try:
            meta = self._build(docs, tmp)
            write_meta(tmp, meta)
            self._move_into_place(tmp)
        except BaseException:
            if not self.resume:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
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

    def _settings(self, model) -> Dict[str, Any]:
        """What a resumed build must share with the interrupted one (the probe vector identifies the model)."""
        return {'model': getattr(model, 'name_or_path', None), 'vec_size': model.dim, 'dtype': self.dtype,
                'pooling': model.pooling, 'doc_max_length': model.doc_max_length, 'text_field': self.text_fields}

    @staticmethod
    def _probe(model) -> List[float]:
        with torch.inference_mode():
            probe = model.encode_docs([PROBE_TEXT]).float().cpu().numpy()[0]
        return [round(float(x), 6) for x in probe]

    def _resume_point(self, folder: Path, settings: Dict[str, Any]) -> List[str]:
        """The docnos a resumable build in ``folder`` has encoded (none for a new one); files are cut back to them."""
        progress = folder / _PROGRESS
        if not progress.exists():
            for name in (VEC_FILES[self.dtype], _DOCNOS_PARTIAL):
                (folder / name).unlink(missing_ok=True)
            return []
        state = json.loads(progress.read_text())
        differs = [key for key in settings if key != 'probe' and state['settings'].get(key) != settings[key]]
        if not differs and np.linalg.norm(np.subtract(state['settings']['probe'], settings['probe'])) > \
                1e-3 * max(np.linalg.norm(settings['probe']), 1e-6):
            differs = ['the model\'s weights']
        if differs:
            raise ValueError(f'the interrupted build in {folder} used other settings ({", ".join(differs)}): resume it '
                             'with the same model and options, or pass overwrite=True to start over')
        count = int(state['count'])
        # A run killed mid-chunk may have written past the last recorded chunk: cut both files back to it.
        with open(folder / VEC_FILES[self.dtype], 'r+b') as f:
            f.truncate(count * settings['vec_size'] * np.dtype(self.dtype).itemsize)
        with open(folder / _DOCNOS_PARTIAL, 'rb') as f:
            lines = f.read().splitlines()[:count]
        with open(folder / _DOCNOS_PARTIAL, 'wb') as f:
            f.write(b''.join(line + b'\n' for line in lines))
        return [json.loads(line) for line in lines]

    def _check_doc(self, doc, i: int) -> str:
        if not isinstance(doc, dict):
            raise TypeError(f'document {i} is a {type(doc).__name__}, not a dict: index() takes dicts with a "docno" and '
                            f'{self.text_fields} (e.g. dataset.get_corpus_iter()) or a DataFrame with those columns')
        docno = doc.get('docno')
        if _is_missing(docno):
            raise ValueError(f'document {i} has no docno: each document must be a dict with a "docno" and '
                             f'{self.text_fields}; it has {sorted(doc)}')
        return str(docno)

    def _encode_into(self, docs, model, folder: Path, settings: Dict[str, Any], done: List[str], progress) -> int:
        """Checks, encodes and writes the documents chunk by chunk (after the ``done`` ones of an interrupted
        build, which are checked, not encoded); returns how many there were."""
        count = 0
        # Every docno seen so far, so a duplicate fails before the chunks after it are encoded (an exact set: about
        # 100 bytes per document, far less than the vectors; the final check below also catches npids aliasing).
        seen: Dict[str, int] = {}
        with open(folder / VEC_FILES[self.dtype], 'ab') as fvec, open(folder / _DOCNOS_PARTIAL, 'a') as fdoc:
            for chunk in _chunks(docs, self.chunk_size):
                docnos = [self._check_doc(doc, count + i) for i, doc in enumerate(chunk)]
                for i, docno in enumerate(docnos):
                    if seen.setdefault(docno, count + i) != count + i:
                        raise ValueError(f'duplicate docno {docno!r} (documents {seen[docno]} and {count + i}); docnos '
                                         'must be unique in a corpus')
                    if count + i < len(done) and done[count + i] != docno:
                        raise ValueError(f'document {count + i} has docno {docno!r}, but the interrupted build encoded '
                                         f'{done[count + i]!r} there: resume with the same documents in the same order, '
                                         'or pass overwrite=True to start over')
                skip = max(0, min(len(chunk), len(done) - count))  # encoded by the interrupted build
                if skip < len(chunk):
                    texts = self._texts(chunk[skip:], count + skip)
                    with torch.inference_mode():
                        vecs = model.encode_docs(texts, batch_size=self.batch_size)
                    fvec.write(vecs.float().cpu().numpy().astype(self.dtype).tobytes())
                    fdoc.write(''.join(json.dumps(d) + '\n' for d in docnos[skip:]))
                    fvec.flush()
                    fdoc.flush()
                    if self.resume:  # the chunk is on disk before the progress file says so
                        os.fsync(fvec.fileno())
                        os.fsync(fdoc.fileno())
                        _write_json(folder / _PROGRESS, {'count': count + len(chunk), 'settings': settings})
                count += len(chunk)
                progress.update(len(chunk))
        if count < len(done):
            raise ValueError(f'{count} documents were given, but the interrupted build had already encoded {len(done)}: '
                             'resume with the same documents, or pass overwrite=True to start over')
        if count == 0:
            raise ValueError('the corpus is empty: no documents were given to index')
        if count == 1:
            raise ValueError('a Hypencoder index needs at least 2 documents; score a single document with '
                             'HypencoderReranker(model) instead')
        return count

    def _build(self, docs: Iterable[Dict[str, Any]], folder: Path) -> Dict[str, Any]:
        model = self._encoder()
        settings = self._settings(model)
        if self.resume:  # a resumable build records the probe first, to recognise the model when it resumes
            settings['probe'] = self._probe(model)
        done = self._resume_point(folder, settings) if self.resume else []
        total = len(docs) if hasattr(docs, '__len__') else None
        # Counts documents (encoded, or checked against an interrupted build), so the bar moves with the work.
        progress = pt.tqdm(total=total, initial=0, desc='indexing', unit='doc', disable=not self.verbose)
        if done:
            progress.set_postfix_str(f'resuming after {len(done)} encoded')
        with progress:
            count = self._encode_into(docs, model, folder, settings, done, progress)
        # npids builds its lookup in one pass over the docnos, once they are all known.
        (folder / DOCNOS_FILE).unlink(missing_ok=True)
        with open(folder / _DOCNOS_PARTIAL) as f:
            write_docnos(folder / DOCNOS_FILE, (json.loads(line) for line in f))
        _check_unique_docnos(folder / DOCNOS_FILE, count)
        vectors = np.memmap(folder / VEC_FILES[self.dtype], mode='r', dtype=self.dtype, shape=(count, model.dim))
        for stale in folder.glob('graph_l2_k*'):  # a graph an interrupted build left half-written
            shutil.rmtree(stale)
        graph_meta = self._build_graph(vectors, folder) if self.graph else None
        ip_m = (_AUTO_M if count >= AUTO_IP_INDEX_DOCS else 0) if self.ip_m == _AUTO else self.ip_m
        ip_meta = build_ip_index(vectors, folder, ip_m, verbose=self.verbose) if ip_m else None
        (folder / _DOCNOS_PARTIAL).unlink()
        (folder / _PROGRESS).unlink(missing_ok=True)
        # The probe is encoded last in a one-off build, so bad documents fail before anything but their chunk is encoded.
        return index_meta(**{key: settings[key] for key in ('model', 'vec_size', 'dtype', 'pooling', 'doc_max_length',
                                                            'text_field')},
                          doc_count=count, graph=graph_meta, ip_index=ip_meta,
                          probe=settings['probe'] if 'probe' in settings else self._probe(model))

    def _build_graph(self, vectors: np.ndarray, folder: Path) -> Optional[Dict[str, Any]]:
        return write_graph(vectors, folder, self.neighbours, self.graph, self.verbose)


def _parse_ip_index(spec: Optional[str]) -> int:
    """The HNSW degree of an ``ip_index`` spec (``'hnsw32'``), 0 for None, ``_AUTO`` for ``'auto'``."""
    if spec is None:
        return 0
    if spec == 'auto':
        return _AUTO
    m = re.fullmatch(r'hnsw(\d+)', str(spec))
    if not m or not 2 <= int(m.group(1)) <= 256:
        raise ValueError(f'ip_index={spec!r} is not supported: use "auto" (by corpus size), "hnsw<M>" with M from 2 '
                         'to 256 (e.g. "hnsw32"), or None for no inner-product index')
    return int(m.group(1))


def _hide_input_bar(docs) -> None:
    """Silences the progress bar a corpus iterator keeps of itself (``dataset.get_corpus_iter()`` has one), before
    iteration starts; the indexer's own bar then counts the documents, once. Anything else is left alone."""
    from tqdm.std import tqdm
    candidates = [docs]
    # PyTerrier's corpus iterators wrap a generator that reads a tqdm-wrapped iterator (pt.utils.GeneratorLen)
    frame = getattr(getattr(docs, 'gen', None), 'gi_frame', None)
    if frame is not None:
        candidates += list(frame.f_locals.values())
    for bar in candidates:
        if isinstance(bar, tqdm) and not bar.disable and bar.n == 0:
            bar.leave = False
            bar.close()  # takes its line back
            bar.disable = True  # iterating it now passes the documents through without drawing


# ip_index='auto': the HNSW degree built from AUTO_IP_INDEX_DOCS documents on (the one benchmarks measured).
_AUTO, _AUTO_M = -1, 32


def _write_json(path: Path, value) -> None:
    """Writes ``value`` to ``path`` atomically (a killed run leaves the old file or the new one, not half of one)."""
    tmp = path.with_name(path.name + '.tmp')
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


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

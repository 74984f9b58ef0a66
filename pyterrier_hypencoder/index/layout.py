"""The index format, in one place: file names, the metadata schema, its writer and its reader.

A single index folder holds::

    pt_meta.json          the metadata (below), written last: a folder without it never loads
    vecs.f4 | vecs.f2     the document vectors, row-major float32 or float16 (FlexIndex's layout for float32)
    docnos.npids          docno <-> row lookups
    graph_l2_k{k}/        the L2 k-NN graph, pyterrier-adaptive's np_topk layout (edges.u32.np, weights.f16.np,
                          docnos.npids, pt_meta.json), so GAR can walk it
    ip_hnsw{m}.faiss      optional: the FAISS HNSW inner-product index that adaptive search draws candidates from

A sharded index folder holds ``shard-000/``, ``shard-001/``, ... (each a single index over contiguous rows) and a
``pt_meta.json`` manifest naming each shard's folder, ``offset`` and ``count``.

The metadata of a single index (:func:`index_meta`): ``type`` ``dense_index``, ``format`` ``hypencoder``,
``package_hint``, ``model`` (name or folder), ``vec_size``, ``dtype``, ``doc_count``, ``pooling``,
``doc_max_length``, ``text_field``, ``graph`` (``{k, metric, method}`` or null), ``ip_index`` (``{kind, m,
ef_construction, metric, file, seconds}`` or null) and ``probe`` (the vector of :data:`PROBE_TEXT`, which tells
whether a model encodes documents as the one that built the index did).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np

from ..errors import HypencoderIndexError

__all__ = ['DOCNOS_FILE', 'GRAPH_EDGES_FILE', 'GRAPH_WEIGHTS_FILE', 'INDEX_TYPE', 'FORMAT', 'META_FILE', 'PACKAGE_HINT',
           'PROBE_TEXT', 'SHARDED_TYPE', 'VEC_FILES', 'artifact_type', 'file_stamp', 'graph_dirname', 'graph_meta',
           'index_meta', 'ip_index_file', 'read_index_meta', 'read_meta', 'shard_dirname', 'sharded_meta', 'write_meta']

META_FILE = 'pt_meta.json'
DOCNOS_FILE = 'docnos.npids'
VEC_FILES = {'float32': 'vecs.f4', 'float16': 'vecs.f2'}
GRAPH_EDGES_FILE = 'edges.u32.np'
GRAPH_WEIGHTS_FILE = 'weights.f16.np'
INDEX_TYPE = 'dense_index'
SHARDED_TYPE = 'sharded_index'
FORMAT = 'hypencoder'
PACKAGE_HINT = 'pyterrier-hypencoder'
PROBE_TEXT = 'pyterrier-hypencoder probe: does this model encode documents like the one that built the index?'
# Encoder settings a sharded manifest copies from its shards.
_ENCODER_KEYS = ('model', 'vec_size', 'dtype', 'pooling', 'doc_max_length', 'text_field')


def graph_dirname(k: int) -> str:
    """The folder of an index's L2 ``k``-NN graph (a pyterrier-adaptive corpus graph) inside the index folder."""
    # "l2" in the name keeps it apart from pyterrier-dr's cosine graphs (corpusgraph_k*).
    return f'graph_l2_k{k}'


def shard_dirname(i: int) -> str:
    """The folder of shard ``i`` inside a sharded index (``shard-000``, ...)."""
    return f'shard-{i:03d}'


def ip_index_file(m: int) -> str:
    """The file of an HNSW inner-product index of degree ``m``."""
    return f'ip_hnsw{m}.faiss'


def index_meta(*, model: str, vec_size: int, dtype: str, doc_count: int, pooling: str, doc_max_length: int,
               text_field, graph: Optional[Dict[str, Any]], ip_index: Optional[Dict[str, Any]], probe) -> Dict[str, Any]:
    """The metadata of a single index folder (see the module docstring)."""
    if dtype not in VEC_FILES:
        raise ValueError(f'dtype must be one of {sorted(VEC_FILES)}; got {dtype!r}')
    return {'type': INDEX_TYPE, 'format': FORMAT, 'package_hint': PACKAGE_HINT, 'model': model,
            'vec_size': int(vec_size), 'dtype': dtype, 'doc_count': int(doc_count), 'pooling': pooling,
            'doc_max_length': doc_max_length, 'text_field': text_field, 'graph': graph, 'ip_index': ip_index,
            'probe': probe}


def sharded_meta(shard_meta: Dict[str, Any], sizes: Sequence[int]) -> Dict[str, Any]:
    """The manifest of a sharded index, from one shard's metadata and every shard's size."""
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int).tolist()
    return {'type': SHARDED_TYPE, 'format': FORMAT, 'package_hint': PACKAGE_HINT,
            **{key: shard_meta.get(key) for key in _ENCODER_KEYS},
            'doc_count': int(sum(sizes)),
            'shards': [{'path': shard_dirname(i), 'offset': offsets[i], 'count': int(c)} for i, c in enumerate(sizes)]}


def graph_meta(doc_count: int, k: int) -> Dict[str, Any]:
    """The ``pt_meta.json`` of a graph folder: a pyterrier-adaptive ``np_topk`` corpus graph."""
    return {'type': 'corpus_graph', 'format': 'np_topk', 'package_hint': 'pyterrier-adaptive', 'doc_count': int(doc_count),
            'k': int(k), 'metric': 'l2'}


def write_meta(folder: Path, meta: Dict[str, Any]) -> None:
    """Writes ``folder/pt_meta.json`` atomically (a reader sees the old file or the new one, never half of one).

    Call it last, once everything the metadata describes is on disk.
    """
    path = Path(folder) / META_FILE
    tmp = path.with_name(META_FILE + '.tmp')
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, path)


def read_meta(folder: Path) -> Dict[str, Any]:
    """``folder/pt_meta.json`` as a dict.

    Raises:
        FileNotFoundError: when there is none.
        ValueError: when it is not a JSON object (the message names the file).
    """
    path = Path(folder) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f'{path} is corrupt ({e})') from None
    if not isinstance(meta, dict):
        raise ValueError(f'{path} is corrupt (not a JSON object)')
    return meta


def artifact_type(folder: Path) -> Optional[str]:
    """The ``type`` a folder's metadata declares (``dense_index``, ``sharded_index``, ...), or None if unreadable."""
    try:
        return read_meta(folder).get('type')
    except (OSError, ValueError):
        return None


def read_index_meta(artifact, what: str, *, missing: str, rebuild: str) -> tuple:
    """An index artifact's ``pt_meta.json`` and its :func:`file_stamp`, checked to declare the artifact's own type.

    Args:
        artifact: the index (its ``path``, ``ARTIFACT_TYPE`` and ``ARTIFACT_FORMAT``).
        what: what the index is called in messages.
        missing: the message when there is no metadata.
        rebuild: the fix named when the metadata is corrupt.

    Raises:
        HypencoderIndexError: no metadata, unreadable metadata, or metadata of another kind of artifact.
    """
    meta_path = artifact.path / META_FILE
    if not meta_path.exists():
        raise HypencoderIndexError(missing)
    try:
        stamp = file_stamp(meta_path)
        meta = read_meta(artifact.path)
    except ValueError as e:
        raise HypencoderIndexError(f'{e}; {rebuild}') from None
    if meta.get('type') != artifact.ARTIFACT_TYPE or meta.get('format') != artifact.ARTIFACT_FORMAT:
        raise HypencoderIndexError(f'{artifact.path} holds a {meta.get("type")}/{meta.get("format")} artifact, not a '
                                   f'{what}')
    return meta, stamp


def file_stamp(path: Path) -> tuple:
    # A rebuilt index is a new folder moved into place, so its pt_meta.json is a new file (inode and mtime).
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns, st.st_size

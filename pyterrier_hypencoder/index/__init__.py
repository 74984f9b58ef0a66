"""The index folder: document vectors, docnos, the L2 neighbour graph and the inner-product ANN index, on disk.

Layer 3. It may import the search and model layers and the leaves; never Ray or a PyTerrier transformer.

- :mod:`.layout`: the one owner of the format: file names, the metadata schema, its writer and its reader.
- :mod:`.files`: :class:`HypencoderIndexFiles`, one index folder opened for reading.
- :mod:`.graph`: building the L2 k-nearest-neighbour graph (exact, HNSW or IVF).
- :mod:`.corpus_graph`: the graph as a pyterrier-adaptive ``CorpusGraph`` (for GAR).
- :mod:`.sharded`: :class:`ShardedIndexFiles`, an index split into contiguous shards, and :func:`split_index`.
"""
from ..errors import HypencoderIndexError
from .files import HypencoderIndexFiles
from .layout import PROBE_TEXT
from .sharded import ShardedIndexFiles, split_index

__all__ = ['PROBE_TEXT', 'HypencoderIndexError', 'HypencoderIndexFiles', 'ShardedIndexFiles', 'split_index']

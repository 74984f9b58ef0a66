"""PyTerrier plugin for Hypencoder retrieval (Killingback, Zeng and Zamani, SIGIR 2025)."""
from .artifacts import HypencoderIndex, ShardedHypencoderIndex
from .checkpoint import CheckpointError
from .index import HypencoderIndexError
from .indexer import HypencoderIndexer
from .model import Hypencoder
from .qnet import QNets, QNetSpec
from .reranker import HypencoderReranker
from .retriever import HypencoderRetriever
from .sharded import split_index
from .sharded_indexer import ShardedHypencoderIndexer

__version__ = '0.1.0'

__all__ = [
    'CheckpointError', 'Hypencoder', 'HypencoderIndex', 'HypencoderIndexer', 'HypencoderIndexError', 'HypencoderReranker',
    'HypencoderRetriever', 'QNets', 'QNetSpec', 'ShardedHypencoderIndex', 'ShardedHypencoderIndexer', 'split_index',
]

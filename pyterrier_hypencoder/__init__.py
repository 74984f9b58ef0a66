"""PyTerrier plugin for Hypencoder retrieval (Killingback, Zeng and Zamani, SIGIR 2025)."""
from .index.files import HypencoderIndexError
from .index.sharded import split_index
from .model.checkpoint import CheckpointError
from .model.hypencoder import Hypencoder
from .model.qnet import QNets, QNetSpec
from .pt.artifacts import HypencoderIndex, ShardedHypencoderIndex
from .pt.indexer import HypencoderIndexer
from .pt.reranker import HypencoderReranker
from .pt.retriever import HypencoderRetriever
from .pt.sharded_indexer import ShardedHypencoderIndexer

__version__ = '0.1.0'

__all__ = [
    'CheckpointError', 'Hypencoder', 'HypencoderIndex', 'HypencoderIndexer', 'HypencoderIndexError', 'HypencoderReranker',
    'HypencoderRetriever', 'QNets', 'QNetSpec', 'ShardedHypencoderIndex', 'ShardedHypencoderIndexer', 'split_index',
]

"""PyTerrier plugin for Hypencoder retrieval (Killingback, Zeng and Zamani, SIGIR 2025)."""
from .checkpoint import CheckpointError
from .index import HypencoderIndex, HypencoderIndexer, HypencoderIndexError
from .model import Hypencoder
from .qnet import QNets, QNetSpec
from .reranker import HypencoderReranker
from .retriever import HypencoderRetriever

__version__ = '0.1.0'

__all__ = [
    'CheckpointError', 'Hypencoder', 'HypencoderIndex', 'HypencoderIndexer', 'HypencoderIndexError', 'HypencoderReranker',
    'HypencoderRetriever', 'QNets', 'QNetSpec',
]

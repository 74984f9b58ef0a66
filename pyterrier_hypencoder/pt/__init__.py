"""The PyTerrier layer: thin transformers and artifacts over the layers below.

Layer 5. It may import every layer below (distributed, index, search, model, leaves); only ``train`` and the
package root sit above it. Transformers validate their input with ``pt.validate``, call the search dispatch
(:mod:`pyterrier_hypencoder.search.modes`) and build frames.

- :mod:`.retriever`: :class:`HypencoderRetriever` (first-stage retrieval in four modes).
- :mod:`.reranker`: :class:`HypencoderReranker` (scores the documents of a result frame).
- :mod:`.support`: what those two share (progress bar, width check, warnings and errors that explain mistakes).
- :mod:`.indexer`: :class:`HypencoderIndexer`; :mod:`.sharded_indexer`: :class:`ShardedHypencoderIndexer`.
- :mod:`.artifacts`: :class:`HypencoderIndex` and :class:`ShardedHypencoderIndex`, the artifacts that hand out
  retrievers, rerankers and indexers.
"""

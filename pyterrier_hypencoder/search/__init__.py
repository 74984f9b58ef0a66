"""Search with q-nets over document vectors: pure tensor and NumPy functions, and one dispatch per search mode.

Layer 2. It may import the model layer and the leaves; never pandas frames, indexes, Ray or a transformer.

- :mod:`.rows`: reading, gathering and scoring rows of vectors; the total order that merges top-k lists.
- :mod:`.exhaustive`: exact top-k (every document scored).
- :mod:`.graph_walk`: the paper's greedy walk over an L2 neighbour graph (Algorithm 1).
- :mod:`.ip_index`: inner-product search (exact, or FAISS HNSW) where linear surrogates find candidates.
- :mod:`.surrogate`: the per-query ridge fits.
- :mod:`.adaptive`: surrogate rounds over the whole corpus (and an optional best-first graph walk).
- :mod:`.pooled`: surrogate rounds inside candidate pools drawn from an HNSW index (the path for large corpora).
- :mod:`.modes`: each search mode's parameters, checked once, and the one place that calls the functions above.
"""
from .adaptive import WalkResult, adaptive_search, surrogate_search
from .exhaustive import exhaustive_search, score_block
from .graph_walk import graph_search
from .ip_index import InnerProductIndex
from .pooled import pooled_search
from .rows import merge_topk, place_vectors
from .surrogate import fit_surrogates

__all__ = ['InnerProductIndex', 'WalkResult', 'adaptive_search', 'exhaustive_search', 'fit_surrogates', 'graph_search',
           'merge_topk', 'place_vectors', 'pooled_search', 'score_block', 'surrogate_search']

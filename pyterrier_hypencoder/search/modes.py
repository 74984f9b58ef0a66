"""Search modes: each mode's parameters, defined and checked once, and the one place that calls the search functions.

A mode is a small frozen dataclass (:class:`Exhaustive`, :class:`GraphWalk`, :class:`Adaptive`, :class:`Surrogate`)
whose ``search(qnets, corpus, k)`` runs it over a :class:`Corpus` (the vectors and what the mode reads besides
them). The retriever, the shard searchers (in this process and on Ray actors) and the benchmarks all call
``mode.search``, so a benchmark times exactly the path a user runs. :func:`make_mode` builds a mode from the
retriever's keyword arguments.

Which mode to use:

- ``exhaustive``: exact; cost grows with the corpus (every document through every q-net).
- ``graph``: the paper's greedy walk over the index's L2 neighbour graph; needs the graph, and its initial sample
  (``n_initial``, 10,000 by default) is scored in full, so it pays only on corpora well above that.
- ``adaptive``: linear surrogates of each q-net pick the documents to score. On an index with an inner-product ANN
  index (``ip_index='hnsw32'`` / ``add_ip_index()``) it draws candidate pools from it, so no round touches the
  whole corpus: the mode for large corpora. Without one, every round ranks the corpus by inner product.
- ``surrogate``: the two-stage baseline (sample, fit, score the surrogate's top ``n_entry``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Dict, NamedTuple, Optional, Union

import numpy as np
import torch

from ..checks import check_int
from ..model.qnet import QNets
from .adaptive import adaptive_search, surrogate_search
from .cascade import rescore
from .exhaustive import exhaustive_search
from .graph_walk import graph_search
from .ip_index import InnerProductIndex
from .pooled import pooled_search
from .rows import VectorsLike

__all__ = ['MODES', 'RESCORE_PER_RESULT', 'Adaptive', 'Corpus', 'Exhaustive', 'GraphWalk', 'SearchMode',
           'SearchResult', 'Surrogate', 'make_mode']


class SearchResult(NamedTuple):
    """A batch's results on the CPU: float32 ``scores`` and int64 row ``ids`` ``[Q, k]`` best first (id -1 and score
    -inf where fewer were found), int64 ``n_scored`` ``[Q]``, the q-net evaluations per query at the q-nets' own
    width; for a cascade, int64 ``n_narrow`` ``[Q]``, the evaluations at the narrow width; for the surrogate modes,
    int64 ``n_inner`` (inner products) and ``n_iter`` (rounds plus walk steps) ``[Q]``. Costs a mode does not
    count are None."""
    scores: torch.Tensor
    ids: torch.Tensor
    n_scored: torch.Tensor
    n_narrow: Optional[torch.Tensor] = None
    n_inner: Optional[torch.Tensor] = None
    n_iter: Optional[torch.Tensor] = None

    @property
    def n_evaluations(self) -> torch.Tensor:
        """q-net evaluations per query at any width."""
        return self.n_scored if self.n_narrow is None else self.n_scored + self.n_narrow


class Corpus:
    """What a search mode searches: document vectors, and the structures some modes read, opened when first needed.

    Args:
        vectors: ``[n, dim]`` vectors placed for search (a NumPy array or memory map, or a tensor on the device).
        edges: the L2 neighbour graph ``[n, K]`` (graph walks), or a function that opens it; None if there is none.
        ann: the inner-product ANN index (adaptive search's candidate pools), or a function that opens it; None if
            there is none.
    """

    def __init__(self, vectors: VectorsLike, *, edges: Union[None, np.ndarray, Callable[[], np.ndarray]] = None,
                 ann: Union[None, InnerProductIndex, Callable[[], InnerProductIndex]] = None):
        self.vectors = vectors
        self._edges, self._ann, self._exact = edges, ann, None

    def __len__(self) -> int:
        return self.vectors.shape[0]

    @property
    def has_ann(self) -> bool:
        return self._ann is not None

    def edges(self) -> np.ndarray:
        if self._edges is None:
            raise ValueError('this search needs the neighbour graph, and the corpus has none: build the index with '
                             'neighbours > 0')
        if callable(self._edges):
            self._edges = self._edges()
        return self._edges

    def ann(self) -> InnerProductIndex:
        if callable(self._ann) and not isinstance(self._ann, InnerProductIndex):
            self._ann = self._ann()
        return self._ann

    def exact_ip(self) -> InnerProductIndex:
        """An exact inner-product index (a float32 copy of the vectors), built at the first call."""
        if self._exact is None:
            self._exact = InnerProductIndex(self.vectors)
        return self._exact


def _check_seed(seed) -> None:
    check_int('seed', seed, 0)


def _check_optional(name: str, value, low: int = 1) -> None:
    if value is not None:
        check_int(name, value, low)


@dataclass(frozen=True)
class Exhaustive:
    """Exact search: every document scored.

    Attributes:
        block: documents per q-net scoring call (default: 1,024 on CPU, 4,096 on GPU); a document's score depends
            only on its block, so shards aligned to it score bit for bit as one index.
    """
    block: Optional[int] = None
    name = 'exhaustive'
    needs_graph = False

    def __post_init__(self):
        _check_optional('score_block', self.block)

    def for_shard(self, shard_no: int, n: int, total: int) -> Exhaustive:
        return self

    def search(self, qnets: QNets, corpus: Corpus, k: int) -> SearchResult:
        scores, ids = exhaustive_search(qnets, corpus.vectors, k, block=self.block)
        return SearchResult(scores, ids, torch.full((len(qnets),), len(corpus)))


@dataclass(frozen=True)
class GraphWalk:
    """The paper's greedy walk over the L2 neighbour graph (Algorithm 1; defaults: its "Efficient 1" setting).

    Attributes:
        n_initial: documents sampled at random to start the walk (clamped to the corpus).
        n_candidates: best documents of each step whose neighbours are scored next.
        max_iter: most steps.
        early_stopping: stop a query's walk when a step adds nothing to its results.
        seed: seed of the random sample (shared by every query).
    """
    n_initial: int = 10000
    n_candidates: int = 64
    max_iter: int = 16
    early_stopping: bool = True
    seed: int = 0
    name = 'graph'
    needs_graph = True

    def __post_init__(self):
        check_int('n_initial', self.n_initial)
        check_int('n_candidates', self.n_candidates)
        check_int('max_iter', self.max_iter, 0)
        _check_seed(self.seed)
        if not isinstance(self.early_stopping, (bool, np.bool_)):
            raise ValueError(f'early_stopping must be True or False; got {self.early_stopping!r}')

    def for_shard(self, shard_no: int, n: int, total: int) -> GraphWalk:
        """Each shard walks its own graph from its share of the sample, with its own seed."""
        return dataclasses.replace(self, n_initial=max(1, -(-self.n_initial * n // total)), seed=self.seed + shard_no)

    def search(self, qnets: QNets, corpus: Corpus, k: int) -> SearchResult:
        return SearchResult(*graph_search(qnets, corpus.vectors, corpus.edges(), k, n_initial=self.n_initial,
                                          n_candidates=self.n_candidates, max_iter=self.max_iter,
                                          early_stopping=self.early_stopping, seed=self.seed))


# A cascade re-scores this many narrow candidates per result at full width. At 2 per result, recall@10 against
# full-width exhaustive search was 0.95-0.97 on the quick million benchmark; at 5, 0.990-0.996 (docs/matryoshka.md).
RESCORE_PER_RESULT = 5


@dataclass(frozen=True)
class Adaptive:
    """Rounds of refitted linear surrogates pick the documents each q-net scores.

    On a corpus with an inner-product ANN index (and ``expand == 0``) the rounds run inside candidate pools drawn
    from it (:func:`~pyterrier_hypencoder.search.pooled.pooled_search`); otherwise each round ranks the whole corpus
    by inner product (:func:`~pyterrier_hypencoder.search.adaptive.adaptive_search`), optionally followed by a
    best-first walk over the neighbour graph.

    Attributes:
        n_sample: random documents scored to fit the first surrogates (shared by every query).
        n_entry: documents scored per round (default: 64 over the whole corpus; the whole pool with an ANN index).
        max_rounds: most rounds.
        expand: documents expanded per graph-walk step (0: no walk and no graph needed).
        ef: the walk's pool of best documents (default ``k``).
        max_scored: budget of q-net evaluations per query (default: none).
        pool: with an ANN index: candidates drawn per draw.
        refreshes: with an ANN index: fresh draws per query once its rounds stop improving.
        stop_k: rounds stop once one adds nothing to the top ``stop_k`` (default ``k``).
        seed: seed of the random sample.
        cascade_width: a narrower Matryoshka width (one of the model's ``matryoshka_widths``) at which the whole
            search runs, its best ``rescore`` documents then scored at full width and ranked by those scores
            (:mod:`~pyterrier_hypencoder.search.cascade`); None (default): no cascade.
        rescore: with ``cascade_width``: narrow candidates per query re-scored at full width (default ``5 * k``,
            :data:`RESCORE_PER_RESULT`).
    """
    n_sample: int = 128
    n_entry: Optional[int] = None
    max_rounds: int = 32
    expand: int = 0
    ef: Optional[int] = None
    max_scored: Optional[int] = None
    pool: int = 1024
    refreshes: int = 1
    stop_k: Optional[int] = None
    seed: int = 0
    cascade_width: Optional[int] = None
    rescore: Optional[int] = None
    name = 'adaptive'

    def __post_init__(self):
        check_int('n_sample', self.n_sample, 2)
        _check_optional('n_entry', self.n_entry, 0)
        check_int('max_rounds', self.max_rounds, 0)
        check_int('expand', self.expand, 0)
        _check_optional('ef', self.ef)
        _check_optional('max_scored', self.max_scored)
        check_int('pool', self.pool)
        check_int('refreshes', self.refreshes, 0)
        _check_optional('stop_k', self.stop_k)
        _check_seed(self.seed)
        _check_optional('cascade_width', self.cascade_width)
        _check_optional('rescore', self.rescore)
        if self.rescore is not None and self.cascade_width is None:
            raise ValueError('rescore sets how many narrow candidates a cascade re-scores: give cascade_width too')

    @property
    def needs_graph(self) -> bool:
        return self.expand > 0

    def uses_ann(self, has_ann: bool) -> bool:
        """Whether this search draws candidate pools from an ANN index, on a corpus that has one or not."""
        return has_ann and not self.expand

    def for_shard(self, shard_no: int, n: int, total: int) -> Adaptive:
        return dataclasses.replace(self, seed=self.seed + shard_no)

    def search(self, qnets: QNets, corpus: Corpus, k: int) -> SearchResult:
        if self.cascade_width is None:
            return self._rounds(qnets, corpus, k, self.stop_k)
        # The rounds run narrow and stop on the narrow top k; their best `rescore` are the full-width candidates.
        narrow = qnets.truncate(self.cascade_width)
        found = self._rounds(narrow, corpus, self.rescored(k), self.stop_k or k)
        scores, ids, n_full = rescore(qnets, corpus.vectors, found.ids, k)
        return SearchResult(scores, ids, n_full, found.n_scored, found.n_inner, found.n_iter)

    def rescored(self, k: int) -> int:
        """How many narrow candidates per query a cascade re-scores at full width for ``k`` results."""
        return max(k, self.rescore or RESCORE_PER_RESULT * k)

    def _rounds(self, qnets: QNets, corpus: Corpus, k: int, stop_k: Optional[int]) -> SearchResult:
        if self.uses_ann(corpus.has_ann):
            result = pooled_search(qnets, corpus.vectors, corpus.ann(), k, n_sample=self.n_sample, pool=self.pool,
                                   n_entry=self.n_entry, max_rounds=self.max_rounds, refreshes=self.refreshes,
                                   stop_k=stop_k, max_scored=self.max_scored, seed=self.seed)
        else:
            result = adaptive_search(qnets, corpus.vectors, corpus.edges() if self.expand else None, k,
                                     n_sample=self.n_sample, n_entry=self.n_entry, max_rounds=self.max_rounds,
                                     expand=self.expand, ef=self.ef, max_scored=self.max_scored, stop_k=stop_k,
                                     seed=self.seed, ip_index=corpus.exact_ip())
        return SearchResult(result.scores, result.ids, result.n_scored, None, result.n_inner, result.n_iter)


@dataclass(frozen=True)
class Surrogate:
    """The two-stage baseline: score a random sample, fit linear surrogates, score each one's top ``n_entry``.

    Attributes:
        n_sample: random documents scored to fit the surrogates.
        n_entry: documents each surrogate ranks best that are then scored (default 64).
        seed: seed of the random sample.
    """
    n_sample: int = 128
    n_entry: Optional[int] = None
    seed: int = 0
    name = 'surrogate'
    needs_graph = False

    def __post_init__(self):
        check_int('n_sample', self.n_sample, 2)
        _check_optional('n_entry', self.n_entry, 0)
        _check_seed(self.seed)

    def for_shard(self, shard_no: int, n: int, total: int) -> Surrogate:
        return dataclasses.replace(self, seed=self.seed + shard_no)

    def search(self, qnets: QNets, corpus: Corpus, k: int) -> SearchResult:
        result = surrogate_search(qnets, corpus.vectors, k, n_sample=self.n_sample, n_entry=self.n_entry,
                                  seed=self.seed, ip_index=corpus.exact_ip())
        return SearchResult(result.scores, result.ids, result.n_scored, None, result.n_inner, result.n_iter)


SearchMode = Union[Exhaustive, GraphWalk, Adaptive, Surrogate]
MODES = {cls.name: cls for cls in (Exhaustive, GraphWalk, Adaptive, Surrogate)}
# The retriever's keyword for a mode field where the two differ.
_KEYWORDS = {(Exhaustive, 'block'): 'score_block'}


def options_of(cls) -> Dict[str, str]:
    """A mode class's fields, keyed by the retriever keyword that sets each."""
    return {_KEYWORDS.get((cls, f.name), f.name): f.name for f in dataclasses.fields(cls)}


def make_mode(mode: str, **options: Any) -> SearchMode:
    """The mode named ``mode`` with those of ``options`` (the retriever's keyword arguments) that it takes.

    Every option given is checked, whichever mode takes it, so a bad value fails now even when another mode is
    chosen.

    Raises:
        ValueError: on an unknown mode or a bad value.
        TypeError: on an option no mode takes.
    """
    if mode not in MODES:
        raise ValueError(f'mode must be one of {tuple(MODES)}; got {mode!r}')
    known = {key for cls in MODES.values() for key in options_of(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f'unknown search options {unknown}; the modes take {sorted(known)}')
    built = {}
    for name, cls in MODES.items():
        built[name] = cls(**{field: options[key] for key, field in options_of(cls).items() if key in options})
    return built[mode]

"""HypencoderRetriever: first-stage retrieval over a Hypencoder index: exhaustive, the paper's graph walk, or adaptive."""
from __future__ import annotations

import copy
import warnings
from typing import Any, Dict, Optional, Union

import numpy as np
import pandas as pd
import pyterrier as pt
import torch

from ..checks import check_int, check_queries
from ..devices import check_device
from ..distributed.backends import check_backend, open_shards
from ..index.files import AUTO_IP_INDEX_DOCS
from ..index.open import open_index
from ..index.sharded import ShardedIndexFiles
from ..model.hypencoder import load_model
from ..search.modes import Adaptive, Corpus, GraphWalk, make_mode
from ..search.rows import place_vectors
from .support import check_widths, explain_missing_query, progress, warn_untrained

__all__ = ['HypencoderRetriever']

# A graph walk whose random start samples this share of the corpus or more costs about an exhaustive search.
_GRAPH_SAMPLE_SHARE = 0.5


class HypencoderRetriever(pt.Transformer):
    """Retrieves documents from a :class:`~pyterrier_hypencoder.HypencoderIndex` with a Hypencoder's q-nets.

    Input: a query frame (``qid``, ``query``, any other columns). Output: one row per retrieved document, with the
    input's columns plus ``docno``, ``score`` and ``rank`` (0-based), queries in input order, best first.

    Four modes, each a class of :mod:`pyterrier_hypencoder.search.modes` that documents its options and says when
    to use it:

    - ``exhaustive``: every document is scored (exact top-k); on a GPU the vectors stay resident when they fit.
    - ``graph``: the paper's greedy walk over the index's L2 neighbour graph (needs an index built with one).
    - ``adaptive``: rounds of per-query linear surrogates pick the documents to score; on an index with an
      inner-product ANN index (built by default for large corpora, ``ip_index='auto'``; ``index.add_ip_index()``
      adds one) they draw candidate pools from it, so no round touches the whole corpus: the mode for large
      corpora. Where it pays: ``docs/ip-index-default.md``.
    - ``surrogate``: the two-stage baseline: sample ``n_sample``, fit, score the surrogate's top ``n_entry``.

    Measured costs and recall of each mode: ``docs/approximate-search.md``.

    With ``num_results`` larger than the corpus, exhaustive search returns every document. A graph walk returns
    at most the documents it scored, so fewer than ``num_results`` when it stops early on a small corpus.

    Input checks: queries must be non-empty strings; an empty or whitespace-only query raises a ``ValueError``
    naming its qids, and a non-string one (NaN, None) a ``TypeError``. The ``qid`` column and the input's other
    columns are passed through as given (integer qids stay integers); docnos come out as strings. Parameters,
    the device, and the index files are checked when the retriever is built, not at the first query.

    One retriever may serve several threads at once; a graph walk is deterministic given ``seed``.

    Ties are broken by row (score descending, then row ascending), so results are deterministic.

    A :class:`~pyterrier_hypencoder.ShardedHypencoderIndex` is searched shard by shard, in this process
    (``backend='local'``, the default) or by one Ray actor per shard (``backend='ray'`` or a Ray address), and
    the shards' top-k merged under the same order: exhaustive results equal the unsharded index's (see
    :mod:`~pyterrier_hypencoder.index.sharded` for when scores are bit-identical). In graph mode each shard walks its
    own graph, starting from its share of ``n_initial`` (proportional to its size) with seed ``seed + shard``,
    and the walks' results are merged. That differs from one walk over one graph: no walk can cross into
    another shard (the shard graphs have no edges between shards), each shard expands up to ``n_candidates``
    documents per step and stops early on its own, so S shards score up to S times as many documents per step,
    and the results, while usually at least as good, are not those of the unsharded walk. In adaptive and
    surrogate modes each shard runs its own rounds with the full parameters (from its own inner-product ANN index
    where it has one), so S shards score up to S times as many documents, and the merged lists hold each shard's
    best; ``scored_column`` counts the documents scored in all shards.

    Example::

        from ir_measures import nDCG
        retriever = HypencoderRetriever(model, 'vaswani.hypencoder', num_results=100)
        pt.Experiment([retriever, retriever % 10], topics, qrels, [nDCG@10])
    """
    schematic = {'label': 'HypencoderRetriever', 'help_url': None}

    def __init__(self, model, index, *, num_results: int = 1000, mode: str = 'exhaustive', n_initial: int = 10000,
                 n_candidates: int = 64, max_iter: int = 16, early_stopping: bool = True, seed: int = 0,
                 n_sample: int = 128, n_entry: Optional[int] = None, max_rounds: int = 32, expand: int = 0,
                 ef: Optional[int] = None, max_scored: Optional[int] = None, pool: int = 1024, refreshes: int = 1,
                 stop_k: Optional[int] = None, cascade_width: Optional[int] = None, rescore: Optional[int] = None,
                 width: Optional[int] = None, scored_column: Optional[str] = None, batch_size: int = 32,
                 device: Union[None, str, torch.device] = None, backend: Optional[str] = None,
                 ray_options: Optional[Dict[str, Any]] = None, score_block: Optional[int] = None,
                 verbose: Optional[bool] = None):
        """
        Args:
            model: the :class:`~pyterrier_hypencoder.Hypencoder` that built the index, or its folder or hub name
                (loaded now, on ``device``).
            index: a :class:`~pyterrier_hypencoder.HypencoderIndex` or its path (relative paths are resolved
                against the working directory now), or a :class:`~pyterrier_hypencoder.ShardedHypencoderIndex`.
            num_results: documents per query.
            mode: ``exhaustive`` (exact), ``graph`` (the paper's walk), ``adaptive`` (refitted surrogate rounds) or
                ``surrogate`` (the two-stage baseline).
            n_initial, n_candidates, max_iter, early_stopping: graph mode's options
                (:class:`~pyterrier_hypencoder.search.modes.GraphWalk`).
            n_sample, n_entry, max_rounds, expand, ef, max_scored, pool, refreshes, stop_k: adaptive mode's options
                (:class:`~pyterrier_hypencoder.search.modes.Adaptive`); ``n_sample`` and ``n_entry`` also the
                surrogate mode's (:class:`~pyterrier_hypencoder.search.modes.Surrogate`).
            cascade_width, rescore: adaptive mode on a Matryoshka model: search at this narrower width and re-score
                the best ``rescore`` candidates at full width (:class:`~pyterrier_hypencoder.search.modes.Adaptive`).
            width: a Matryoshka model's q-nets cut to this width (one of ``model.matryoshka_widths``) in every
                mode; None (default): the full q-nets.
            seed: graph, adaptive and surrogate modes: seed of the random sample (shared by every query); >= 0.
            score_block: exhaustive mode: documents per q-net scoring call (default: 1,024 on CPU, 4,096 on GPU).
            scored_column: name of an extra output column holding, per query, how many documents were scored
                (q-net evaluations); None (default) adds none.
            batch_size: queries encoded and searched together.
            device: where q-nets score documents (default: the model's device). The model is not moved.
            verbose: a progress bar over the queries: True always, False never, None (default) once a call has run
                for :data:`~pyterrier_hypencoder.pt.support.PROGRESS_DELAY_S` seconds.
            backend: for a sharded index: ``'local'`` (default), ``'ray'``, or a Ray address (``'ray://head:10001'``).
            ray_options: Ray actor options: ``num_cpus`` (default 1), ``num_gpus`` (default 0), ``max_restarts``
                and ``max_task_retries`` (default 3 each).

        Every search option is checked, whichever mode uses it; each is documented once, on its mode's class in
        :mod:`pyterrier_hypencoder.search.modes`.

        Raises:
            ValueError: on a bad parameter or an unavailable device.
            TypeError: when ``model`` is neither a Hypencoder nor the name of one.
            HypencoderIndexError: (a ValueError) when the index (or one of its shards) is incomplete or corrupt, or
                does not match the model.

        An index rebuilt in place while the retriever exists (``overwrite=True``) is noticed at the next query:
        the retriever checks it against the model again and searches the new documents.

        Warns (once, here) when the options cost more than they should: ``mode='adaptive'`` on an index of
        :data:`~pyterrier_hypencoder.index.files.AUTO_IP_INDEX_DOCS` documents or more without an inner-product
        ANN index (``index.add_ip_index()`` builds one), and ``mode='graph'`` whose random start (``n_initial``)
        covers half the corpus or more (as costly as exhaustive search). Retrieving with a model whose q-nets were
        never trained warns at the first query.
        """
        self.search_mode = make_mode(mode, n_initial=n_initial, n_candidates=n_candidates, max_iter=max_iter,
                                     early_stopping=early_stopping, seed=seed, n_sample=n_sample, n_entry=n_entry,
                                     max_rounds=max_rounds, expand=expand, ef=ef, max_scored=max_scored, pool=pool,
                                     refreshes=refreshes, stop_k=stop_k, score_block=score_block,
                                     cascade_width=cascade_width, rescore=rescore)
        check_int('num_results', num_results)
        check_int('batch_size', batch_size)
        if scored_column is not None and (not isinstance(scored_column, str) or not scored_column):
            raise ValueError(f'scored_column must be a non-empty column name or None; got {scored_column!r}')
        self.device = check_device(device)
        self.model = load_model(model, device=device, user='HypencoderRetriever')
        self.width = check_widths(self.model, width, cascade_width)
        self.index = open_index(index)
        check_backend(self.index, backend)
        self._backend = (backend, ray_options)
        self._shards = None
        self._load_index_files()
        self.num_results = int(num_results)
        self.scored_column = scored_column
        self.batch_size = batch_size
        self.verbose = verbose
        self._warn_costly_options()

    def _warn_costly_options(self) -> None:
        mode, n = self.search_mode, len(self.index)
        if isinstance(mode, Adaptive) and not mode.expand and not self._has_ann and n >= AUTO_IP_INDEX_DOCS:
            warnings.warn(f"mode='adaptive' on {self.index!r} ranks all {n:,} documents by inner product in every "
                          'round: it has no inner-product ANN index to draw candidates from. Build one once with '
                          'index.add_ip_index() (or HypencoderIndexer(..., ip_index=\'hnsw32\')); see '
                          'docs/ip-index-default.md', UserWarning, stacklevel=3)
        if isinstance(mode, GraphWalk) and mode.n_initial >= _GRAPH_SAMPLE_SHARE * n:
            warnings.warn(f"mode='graph' starts each walk by scoring n_initial={mode.n_initial:,} random documents, "
                          f'{min(1.0, mode.n_initial / n):.0%} of the {n:,} in {self.index!r}: that costs about an '
                          "exhaustive search, which is exact (mode='exhaustive'). For a walk, give n_initial well "
                          f'below the corpus size, e.g. n_initial={max(1, n // 20):,}', UserWarning, stacklevel=3)

    @property
    def mode(self) -> str:
        """The search mode's name: ``exhaustive``, ``graph``, ``adaptive`` or ``surrogate``."""
        return self.search_mode.name

    def _load_index_files(self) -> None:
        """Checks the index against the model and opens what searches read; again after a rebuild of the index."""
        self._generation = self.index.generation()
        self._corpus = None
        walks = self.search_mode.needs_graph
        if isinstance(self.index, ShardedIndexFiles):
            # every shard opened now: a missing or damaged one fails here, not in the middle of an experiment
            self.index.validate(graph=walks)
            self.index.check_model(self.model)
            if self._shards is not None:
                self._shards.close()  # a rebuilt sharded index: new shards, new actors
            backend, ray_options = self._backend
            if backend not in (None, 'local'):
                ray_options = dict(ray_options or {}, graph=walks)
            self._shards = open_shards(self.index, backend, self.search_device, self.model.dtype, ray_options)
            # (for the repr: each shard decides for itself, and draws from its own ANN index when it has one)
            self._has_ann = all(self.index.shard(i).has_ip_index() for i in range(self.index.n_shards))
            return
        self.index.check_model(self.model)
        self.index.docnos  # noqa: B018 -- a damaged docno file fails now, not after the first search
        # a memory map, read as the walk needs it; raises, explaining how to build a graph, if there is none
        self._edges = self.index.graph_edges() if walks else None
        self._has_ann = self.index.has_ip_index()

    def __repr__(self) -> str:
        mode = self.search_mode
        args = [repr(str(self.index.path)), f'num_results={self.num_results}', f'mode={self.mode!r}']
        if self.width is not None:
            args.append(f'width={self.width}')
        if self._shards is not None:
            args.append(f'backend={self._shards!r}, shards={self.index.n_shards}')
        if isinstance(mode, GraphWalk):
            # The walk samples at most the whole corpus; say so rather than show a sample it never takes.
            n_docs = len(self.index)
            n_initial = (f'n_initial={mode.n_initial}' if mode.n_initial <= n_docs else
                         f'n_initial={n_docs} (clamped to the corpus from {mode.n_initial})')
            args += [n_initial, f'n_candidates={mode.n_candidates}', f'max_iter={mode.max_iter}',
                     f'early_stopping={mode.early_stopping}', f'seed={mode.seed}']
        elif self.mode in ('adaptive', 'surrogate'):
            args += [f'n_sample={mode.n_sample}', f'n_entry={mode.n_entry}']
            if self.mode == 'adaptive':
                args += [f'max_rounds={mode.max_rounds}', f'max_scored={mode.max_scored}', f'stop_k={mode.stop_k}']
                if mode.cascade_width is not None:
                    args += [f'cascade_width={mode.cascade_width}', f'rescore={mode.rescore}']
                if mode.uses_ann(self._has_ann):
                    args += [f'pool={mode.pool}', f'refreshes={mode.refreshes}']
                else:
                    args += [f'expand={mode.expand}', f'ef={mode.ef}']
            args.append(f'seed={mode.seed}')
        return f'HypencoderRetriever({", ".join(args)})'

    def close(self) -> None:
        """Releases a sharded index's backend: ends its Ray actors (they also end with the last reference to the
        transformer). Does nothing for a single index. A closed transformer over a sharded index cannot search."""
        if self._shards is not None:
            self._shards.close()

    def fuse_rank_cutoff(self, k: int) -> Optional[HypencoderRetriever]:
        """``retriever % k`` as a retriever of ``k`` results, where that gives the same ranking.

        Exhaustive search is exact, so its top-k is a prefix of any larger top-k. A graph walk without early
        stopping scores the same documents whatever ``num_results`` is; with early stopping a smaller
        ``num_results`` can stop the walk sooner, so the cutoff is left to a separate transformer.
        """
        mode = self.search_mode
        if not 1 <= k < self.num_results or (isinstance(mode, GraphWalk) and mode.early_stopping):
            return None
        # Adaptive rounds stop on the top num_results (and the walk's pool is at least that), so a smaller k can
        # score less; the surrogate baseline scores the same documents whatever k is.
        if self.mode == 'adaptive':
            return None
        fused = copy.copy(self)  # shares the resident vectors
        fused.num_results = k
        return fused

    @property
    def search_device(self) -> torch.device:
        """The device where documents are scored."""
        return self.device if self.device is not None else self.model.device

    def corpus(self) -> Corpus:
        """What a single index's searches read: its vectors placed on the search device (a GPU copy when they fit),
        its graph and its ANN index (opened at the first search that needs it)."""
        key = (self.search_device, self.model.dtype)
        if self._corpus is None or self._corpus[0] != key:
            vectors = place_vectors(self.index.vectors(), self.search_device, self.model.dtype)
            self._corpus = (key, Corpus(vectors, edges=self._edges,
                                        ann=self.index.ip_index if self._has_ann else None))
        return self._corpus[1]

    def _search(self, qnets):
        """The :class:`~pyterrier_hypencoder.search.modes.SearchResult` of a batch of q-nets."""
        if self._shards is not None:
            return self._shards.search(qnets, self.num_results, self.search_mode)
        return self.search_mode.search(qnets, self.corpus(), self.num_results)

    def transform(self, inp: pd.DataFrame) -> pd.DataFrame:
        """Retrieves ``num_results`` documents for each query of ``inp``."""
        try:
            pt.validate.query_frame(inp, extra_columns=['query'], context=self)
        except pt.validate.InputValidationError as e:
            explain_missing_query(inp, self, e)
        if len(inp) == 0:
            return inp.assign(docno=pd.Series(dtype=str), score=pd.Series(dtype='float64'),
                              rank=pd.Series(dtype='int64'))
        queries = check_queries(inp)
        warn_untrained(self.model, 'HypencoderRetriever')
        if self.index.generation() != self._generation:
            self._load_index_files()  # the index was rebuilt: never serve the replaced documents
        all_scores, all_ids, all_scored = [], [], []
        bar = progress(len(queries), 'HypencoderRetriever', self.verbose)
        with bar, torch.inference_mode():
            for start in range(0, len(queries), self.batch_size):
                batch = queries[start:start + self.batch_size]
                qnets = self.model.encode_queries(batch, batch_size=self.batch_size)
                if self.width is not None:
                    qnets = qnets.truncate(self.width)
                result = self._search(qnets.to(self.search_device))
                scores, ids = result.scores, result.ids
                all_scored.append(result.n_evaluations.numpy())
                all_scores.append(scores.double().numpy())
                all_ids.append(ids.numpy())
                bar.update(len(batch))
        scores = np.concatenate(all_scores)
        ids = np.concatenate(all_ids)
        # Graph walks that found fewer documents than asked for are padded with id -1.
        found = ids >= 0
        counts = found.sum(axis=1)
        out = inp.iloc[np.repeat(np.arange(len(inp)), counts)].reset_index(drop=True)
        out = out.assign(docno=self.index.docnos.fwd[ids[found]], score=scores[found],
                         rank=np.concatenate([np.arange(c) for c in counts]).astype('int64'))
        if self.scored_column is not None:
            out[self.scored_column] = np.repeat(np.concatenate(all_scored), counts).astype('int64')
        return out

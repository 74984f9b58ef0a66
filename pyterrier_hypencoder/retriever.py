"""HypencoderRetriever: first-stage retrieval over a Hypencoder index: exhaustive, the paper's graph walk, or adaptive."""
from __future__ import annotations

import copy
from typing import Any, Dict, Optional, Union

import numpy as np
import pandas as pd
import pyterrier as pt
import torch

from .common import check_backend, check_device, check_queries, load_index, open_shards
from .model import load_model
from .pooled import pooled_search
from .search import check_int, exhaustive_search, graph_search, place_vectors
from .sharded import ShardedIndexFiles
from .walk import InnerProductIndex, adaptive_search, surrogate_search

__all__ = ['HypencoderRetriever']

_MODES = ('exhaustive', 'graph', 'adaptive', 'surrogate')


class HypencoderRetriever(pt.Transformer):
    """Retrieves documents from a :class:`~pyterrier_hypencoder.index.HypencoderIndex` with a Hypencoder's q-nets.

    Input: a query frame (``qid``, ``query``, any other columns). Output: one row per retrieved document, with the
    input's columns plus ``docno``, ``score`` and ``rank`` (0-based), queries in input order, best first.

    Four modes:

    - ``exhaustive``: every document is scored (exact top-k); vectors are streamed in chunks through a batch of
      q-nets, and on a GPU kept resident when they fit.
    - ``graph``: the paper's approximate greedy walk over the index's neighbour graph
      (:func:`~pyterrier_hypencoder.search.graph_search`); needs an index built with a graph. The defaults are
      the paper's "Efficient 1" setting (10,000 initial candidates, 64 candidates per step, at most 16 steps,
      early stopping), clamped to the corpus size.
    - ``adaptive``: rounds of per-query linear surrogates of the q-nets
      (:func:`~pyterrier_hypencoder.walk.adaptive_search`): score ``n_sample`` random documents, fit each query a
      ridge regression of its scores, score the surrogate's best ``n_entry`` unscored documents (found by a FAISS
      inner-product search), refit, repeat until a round adds nothing to the top ``num_results`` (or
      ``max_rounds``, or the ``max_scored`` budget). ``expand > 0`` adds a best-first walk over the index's graph
      (pool ``ef``). The defaults need no graph and no tuning to the corpus size: with ``num_results=100`` on
      31,744 debian-packages documents they scored 634-1,188 documents per query (three q-nets) at recall@10
      0.96-1.0 against exhaustive search (``benchmarks/README.md``); at most ``n_sample + max_rounds * n_entry``.
      On an index built with an inner-product ANN index (``HypencoderIndexer(ip_index='hnsw32')`` or
      ``index.add_ip_index()``) the rounds run inside candidate pools drawn from it
      (:func:`~pyterrier_hypencoder.pooled.pooled_search`, ``pool`` documents per draw, ``refreshes`` fresh draws),
      so no round touches the whole corpus: the path for large corpora (``benchmarks/million.py``).
    - ``surrogate``: the two-stage baseline: sample ``n_sample``, fit, score the surrogate's top ``n_entry``.

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
    :mod:`~pyterrier_hypencoder.sharded` for when scores are bit-identical). In graph mode each shard walks its
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
                 stop_k: Optional[int] = None, scored_column: Optional[str] = None,
                 batch_size: int = 32, device: Union[None, str, torch.device] = None, backend: Optional[str] = None,
                 ray_options: Optional[Dict[str, Any]] = None, score_block: Optional[int] = None, verbose: bool = False):
        """
        Args:
            model: the :class:`~pyterrier_hypencoder.Hypencoder` that built the index, or its folder or hub name
                (loaded now, on ``device``).
            index: a :class:`~pyterrier_hypencoder.index.HypencoderIndex` or its path (relative paths are resolved
                against the working directory now).
            num_results: documents per query.
            mode: ``exhaustive`` (exact), ``graph`` (the paper's walk), ``adaptive`` (refitted surrogate rounds) or
                ``surrogate`` (the two-stage baseline).
            n_initial: graph mode: documents sampled at random to start the walk.
            n_candidates: graph mode: best documents of each step whose neighbours are scored next.
            max_iter: graph mode: maximum number of steps.
            early_stopping: graph mode: stop a query's walk when a step adds nothing to its results.
            seed: graph, adaptive and surrogate modes: seed of the random sample (shared by every query); >= 0.
            n_sample: adaptive/surrogate: random documents scored to fit the first surrogates.
            n_entry: adaptive/surrogate: documents scored per surrogate round (surrogate: the top-M). Default 64;
                with an inner-product ANN index, the whole ``pool``.
            max_rounds: adaptive: most surrogate rounds.
            expand: adaptive: documents expanded per graph-walk step (0: no walk, no graph needed).
            ef: adaptive walk: pool of best documents whose neighbours are scored (default num_results).
            max_scored: adaptive: budget of q-net evaluations per query (default: none).
            pool: adaptive, on an index with an inner-product ANN index (``HypencoderIndexer(...,
                ip_index='hnsw32')`` or ``index.add_ip_index()``): candidates drawn from it per draw (see
                :func:`~pyterrier_hypencoder.pooled.pooled_search`). Such an index is searched that way unless
                ``expand > 0`` (the graph walk, which ranks the whole corpus per round).
            refreshes: adaptive, with an ANN index: fresh draws per query once its rounds stop improving.
            stop_k: adaptive: rounds stop once one adds nothing to the top ``stop_k`` (default ``num_results``).
            scored_column: name of an extra output column holding, per query, how many documents were scored
                (q-net evaluations); None (default) adds none.
            batch_size: queries encoded and searched together.
            device: where q-nets score documents (default: the model's device). The model is not moved.
            backend: for a sharded index: ``'local'`` (default), ``'ray'``, or a Ray address (``'ray://head:10001'``).
            ray_options: Ray actor options: ``num_cpus`` (default 1), ``num_gpus`` (default 0), ``max_restarts``
                and ``max_task_retries`` (default 3 each).
            score_block: exhaustive mode: documents per q-net scoring call (default: 1,024 on CPU, 4,096 on GPU).
            verbose: show a progress bar over the queries.

        Raises:
            ValueError: on a bad parameter or an unavailable device.
            TypeError: when ``model`` is neither a Hypencoder nor the name of one.
            HypencoderIndexError: (a ValueError) when the index (or one of its shards) is incomplete or corrupt, or
                does not match the model.

        An index rebuilt in place while the retriever exists (``overwrite=True``) is noticed at the next query:
        the retriever checks it against the model again and searches the new documents.
        """
        if mode not in _MODES:
            raise ValueError(f'mode must be one of {_MODES}; got {mode!r}')
        check_int('num_results', num_results)
        check_int('n_initial', n_initial)
        check_int('n_candidates', n_candidates)
        check_int('max_iter', max_iter, 0)
        check_int('seed', seed, 0)
        check_int('batch_size', batch_size)
        check_int('n_sample', n_sample, 2)
        if n_entry is not None:
            check_int('n_entry', n_entry, 0)
        check_int('max_rounds', max_rounds, 0)
        check_int('expand', expand, 0)
        check_int('pool', pool)
        check_int('refreshes', refreshes, 0)
        if stop_k is not None:
            check_int('stop_k', stop_k)
        for name, value in (('ef', ef), ('max_scored', max_scored)):
            if value is not None:
                check_int(name, value)
        if scored_column is not None and (not isinstance(scored_column, str) or not scored_column):
            raise ValueError(f'scored_column must be a non-empty column name or None; got {scored_column!r}')
        if not isinstance(early_stopping, (bool, np.bool_)):
            raise ValueError(f'early_stopping must be True or False; got {early_stopping!r}')
        if score_block is not None:
            check_int('score_block', score_block)
        self.device = check_device(device)
        self.model = load_model(model, device=device, user='HypencoderRetriever')
        self.index = load_index(index)
        check_backend(self.index, backend)
        self.score_block = score_block
        self._backend = (backend, ray_options)
        self._shards = None
        self.mode = mode
        self.expand = expand  # the walk of adaptive mode needs the graph: read by _load_index_files
        self.pool, self.refreshes, self.stop_k = int(pool), int(refreshes), stop_k
        self._load_index_files()
        self.num_results = int(num_results)
        self.n_initial = n_initial
        self.n_candidates = n_candidates
        self.max_iter = max_iter
        self.early_stopping = early_stopping
        self.seed = seed
        self.n_sample, self.n_entry, self.max_rounds = n_sample, n_entry, max_rounds
        self.ef, self.max_scored, self.scored_column = ef, max_scored, scored_column
        self.batch_size = batch_size
        self.verbose = verbose

    def _load_index_files(self) -> None:
        """Checks the index against the model and opens what searches read; again after a rebuild of the index."""
        self._generation = self.index.generation()
        self._vectors = None
        self._pooled = False
        if isinstance(self.index, ShardedIndexFiles):
            # every shard opened now: a missing or damaged one fails here, not in the middle of an experiment
            walks = self.mode == 'graph' or (self.mode == 'adaptive' and self.expand)
            self.index.validate(graph=walks)
            self.index.check_model(self.model)
            self._edges = None
            if self._shards is not None:
                self._shards.close()  # a rebuilt sharded index: new shards, new actors
            backend, ray_options = self._backend
            if backend not in (None, 'local'):
                ray_options = dict(ray_options or {}, graph=walks)
            self._shards = open_shards(self.index, backend, self.search_device, self.model.dtype, ray_options)
            # (for the repr: each shard decides for itself, and draws from its own ANN index when it has one)
            self._pooled = self.mode == 'adaptive' and not self.expand and all(
                self.index.shard(i).has_ip_index() for i in range(self.index.n_shards))
            return
        self.index.check_model(self.model)
        self.index.docnos  # noqa: B018 -- a damaged docno file fails now, not after the first search
        # a memory map, read as the walk needs it; raises, explaining how to build a graph, if there is none
        walks = self.mode == 'graph' or (self.mode == 'adaptive' and self.expand)
        self._edges = self.index.graph_edges() if walks else None
        # The surrogates' inner-product index: the index's HNSW one (loaded at the first adaptive search), else a
        # float32 copy of the vectors, built then.
        self._ip_index = None
        self._pooled = self.mode == 'adaptive' and not self.expand and self.index.has_ip_index()

    def __repr__(self) -> str:
        args = [repr(str(self.index.path)), f'num_results={self.num_results}', f'mode={self.mode!r}']
        if self._shards is not None:
            args.append(f'backend={self._shards!r}, shards={self.index.n_shards}')
        if self.mode == 'graph':
            # The walk samples at most the whole corpus; say so rather than show a sample it never takes.
            n_docs = len(self.index)
            n_initial = (f'n_initial={self.n_initial}' if self.n_initial <= n_docs else
                         f'n_initial={n_docs} (clamped to the corpus from {self.n_initial})')
            args += [n_initial, f'n_candidates={self.n_candidates}', f'max_iter={self.max_iter}',
                     f'early_stopping={self.early_stopping}', f'seed={self.seed}']
        elif self.mode in ('adaptive', 'surrogate'):
            args += [f'n_sample={self.n_sample}', f'n_entry={self.n_entry}']
            if self.mode == 'adaptive':
                args += [f'max_rounds={self.max_rounds}', f'max_scored={self.max_scored}', f'stop_k={self.stop_k}']
                if self._pooled:
                    args += [f'pool={self.pool}', f'refreshes={self.refreshes}']
                else:
                    args += [f'expand={self.expand}', f'ef={self.ef}']
            args.append(f'seed={self.seed}')
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
        if not 1 <= k < self.num_results or (self.mode == 'graph' and self.early_stopping):
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

    def _search_vectors(self):
        device = self.search_device
        if self._vectors is None or self._vectors[0] != (device, self.model.dtype):
            self._vectors = ((device, self.model.dtype), place_vectors(self.index.vectors(), device, self.model.dtype))
        return self._vectors[1]

    def _search(self, qnets):
        """``(scores, ids, documents scored per query)`` for a batch of q-nets."""
        if self._shards is not None:
            params = {'seed': self.seed, 'n_initial': self.n_initial, 'n_candidates': self.n_candidates,
                      'max_iter': self.max_iter, 'early_stopping': self.early_stopping, 'n_sample': self.n_sample,
                      'n_entry': self.n_entry, 'max_rounds': self.max_rounds, 'pool': self.pool,
                      'refreshes': self.refreshes, 'stop_k': self.stop_k, 'max_scored': self.max_scored,
                      'expand': self.expand, 'ef': self.ef}
            return self._shards.search(qnets, self.num_results, self.mode, params, self.score_block)
        vectors = self._search_vectors()
        if self.mode == 'exhaustive':
            scores, ids = exhaustive_search(qnets, vectors, self.num_results, block=self.score_block)
            return scores, ids, torch.full((len(qnets),), vectors.shape[0])
        if self.mode == 'graph':
            return graph_search(qnets, vectors, self._edges, self.num_results, n_initial=self.n_initial,
                                n_candidates=self.n_candidates, max_iter=self.max_iter,
                                early_stopping=self.early_stopping, seed=self.seed)
        if self._pooled:
            if self._ip_index is None:
                self._ip_index = self.index.ip_index()
            result = pooled_search(qnets, vectors, self._ip_index, self.num_results, n_sample=self.n_sample,
                                   pool=self.pool, n_entry=self.n_entry, max_rounds=self.max_rounds,
                                   refreshes=self.refreshes, stop_k=self.stop_k, max_scored=self.max_scored,
                                   seed=self.seed)
            return result.scores, result.ids, result.n_scored
        if self._ip_index is None:  # a float32 copy of the vectors, built once per retriever
            self._ip_index = InnerProductIndex(vectors)
        if self.mode == 'surrogate':
            result = surrogate_search(qnets, vectors, self.num_results, n_sample=self.n_sample, n_entry=self.n_entry,
                                      seed=self.seed, ip_index=self._ip_index)
        else:
            result = adaptive_search(qnets, vectors, self._edges, self.num_results, n_sample=self.n_sample,
                                     n_entry=self.n_entry, max_rounds=self.max_rounds, expand=self.expand, ef=self.ef,
                                     max_scored=self.max_scored, stop_k=self.stop_k, seed=self.seed,
                                     ip_index=self._ip_index)
        return result.scores, result.ids, result.n_scored

    def transform(self, inp: pd.DataFrame) -> pd.DataFrame:
        """Retrieves ``num_results`` documents for each query of ``inp``."""
        pt.validate.query_frame(inp, extra_columns=['query'], context=self)
        if len(inp) == 0:
            return inp.assign(docno=pd.Series(dtype=str), score=pd.Series(dtype='float64'),
                              rank=pd.Series(dtype='int64'))
        queries = check_queries(inp)
        if self.index.generation() != self._generation:
            self._load_index_files()  # the index was rebuilt: never serve the replaced documents
        all_scores, all_ids, all_scored = [], [], []
        bar = pt.tqdm(total=len(queries), desc='HypencoderRetriever', unit='query', disable=not self.verbose)
        with bar, torch.inference_mode():
            for start in range(0, len(queries), self.batch_size):
                batch = queries[start:start + self.batch_size]
                qnets = self.model.encode_queries(batch, batch_size=self.batch_size)
                scores, ids, scored = self._search(qnets.to(self.search_device))
                all_scored.append(scored.numpy())
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

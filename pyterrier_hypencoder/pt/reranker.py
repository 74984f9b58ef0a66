"""HypencoderReranker: scores given (query, document) pairs with a Hypencoder's q-nets."""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import pandas as pd
import pyterrier as pt
import torch

from ..checks import check_int, check_queries
from ..devices import check_device
from ..distributed.backends import check_backend, open_shards
from ..index.open import open_index
from ..index.sharded import ShardedIndexFiles
from ..model.hypencoder import load_model
from ..model.qnet import QNets
from .support import check_widths, explain_missing_query, progress, warn_untrained

__all__ = ['HypencoderReranker']

# Q-nets of the most recent queries are kept: pyterrier_adaptive.GAR scores one query in many small batches,
# and encoding its query again for each batch would cost more than scoring the batch. Few are kept, as a
# BERT-base q-net takes 14 MB.
_QNET_CACHE = 4
# Without an index, texts are encoded this many at a time, so the progress bar moves while a batch's documents
# (often thousands, minutes on a CPU) are encoded.
_TEXT_CHUNK = 256


class HypencoderReranker(pt.Transformer):
    """Re-scores a result frame with a Hypencoder: each query's q-net scores its documents' vectors.

    The document vectors come from a :class:`~pyterrier_hypencoder.HypencoderIndex` (looked up by
    ``docno``) or, without an index, from encoding the ``text`` column on the fly. Scores equal those of
    :class:`~pyterrier_hypencoder.HypencoderRetriever` for the same pairs.

    Input: ``qid``, ``query``, ``docno`` (and the text column when there is no index). Output: the input with
    ``score`` and ``rank`` (0-based) replaced, best first within each query, queries in input order.

    Input checks: an empty or whitespace-only query raises a ``ValueError`` naming its qids, a non-string query or
    text (NaN, None) a ``TypeError``, and, with an index, a docno that is not in it a ``KeyError`` naming it.
    Without an index and without the text column, the error says how to add the text or an index. Empty
    document texts are scored like any other text. ``qid``, ``docno`` and the other columns are passed through
    as given (integer qids and docnos stay integers; docnos are looked up in the index as strings).

    One reranker may serve several threads at once (its small cache of recent q-nets is locked).

    Example::

        pipeline = bm25 >> pt.text.get_text(dataset, 'text') >> HypencoderReranker(model)
        gar = pyterrier_adaptive.GAR(index.reranker(model), index.corpus_graph())
    """
    schematic = {'label': 'HypencoderReranker', 'help_url': None}

    def __init__(self, model, index=None, *, text_field: str = 'text', batch_size: int = 32,
                 device: Union[None, str, torch.device] = None, backend: Optional[str] = None,
                 ray_options: Optional[Dict[str, Any]] = None, width: Optional[int] = None,
                 verbose: Optional[bool] = None):
        """
        Args:
            model: the :class:`~pyterrier_hypencoder.Hypencoder`, or its folder or hub name (loaded now, on
                ``device``).
            index: a :class:`~pyterrier_hypencoder.HypencoderIndex` (or its path) holding the documents'
                vectors; None to encode the ``text_field`` column instead. An index rebuilt in place while the
                reranker exists is checked against the model again at the next call, and its new vectors used.
            text_field: the column with document texts (used without an index).
            batch_size: queries encoded together, and documents per encoder forward pass.
            device: where q-nets score documents (default: the model's device). The model is not moved.
            backend: for a :class:`~pyterrier_hypencoder.ShardedHypencoderIndex`: where its shards are read,
                ``'local'`` (default) or ``'ray'`` / a Ray address (each docno is routed to its shard's actor,
                which returns the stored vector; the q-nets score on this side, so scores are the same).
            ray_options: Ray actor options (see :class:`~pyterrier_hypencoder.HypencoderRetriever`).
            width: a Matryoshka model's q-nets cut to this width (one of ``model.matryoshka_widths``); None
                (default): the full q-nets.
            verbose: a progress bar over the documents re-ranked (without an index it moves as their texts are
                encoded): True always, False never, None (default) from its first update after
                :data:`~pyterrier_hypencoder.pt.support.PROGRESS_DELAY_S` seconds (re-ranking a topic set's
                candidates from their text takes minutes on a CPU).

        Raises:
            ValueError: on a bad parameter or an unavailable device.
            TypeError: when ``model`` is neither a Hypencoder nor the name of one.
            HypencoderIndexError: (a ValueError) when the index (or one of its shards) is incomplete or corrupt, or
                does not match the model.
        """
        check_int('batch_size', batch_size)
        self.device = check_device(device)
        self.model = load_model(model, device=device, user='HypencoderReranker')
        self.width = check_widths(self.model, width)
        self.index = open_index(index) if index is not None else None
        if self.index is None and (backend is not None or ray_options):
            raise ValueError('backend and ray_options choose where a sharded index is read; this reranker has no index')
        self._backend = (backend, ray_options)
        self._shards = None
        if self.index is not None:
            check_backend(self.index, backend)
            self._check_index()
        self.text_field = text_field
        self.batch_size = batch_size
        self.verbose = verbose
        self._cache: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def _check_index(self) -> None:
        self._generation = self.index.generation()
        if isinstance(self.index, ShardedIndexFiles):
            self.index.validate()  # every shard opened now: a missing or damaged one fails here
        self.index.check_model(self.model)
        self.index.docnos  # noqa: B018 -- a damaged docno file fails now, not at the first batch
        if isinstance(self.index, ShardedIndexFiles):
            if self._shards is not None:
                self._shards.close()  # a rebuilt sharded index: new shards, new actors
            backend, ray_options = self._backend
            self._shards = open_shards(self.index, backend, self.search_device, self.model.dtype, ray_options)

    def __getstate__(self) -> dict:
        # Locks cannot be pickled or shared with a copy; cached q-nets are cheap to recompute.
        state = self.__dict__.copy()
        del state['_lock'], state['_cache']
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._cache = OrderedDict()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        source = repr(str(self.index.path)) if self.index is not None else f'text_field={self.text_field!r}'
        if self._shards is not None:
            source += f', backend={self._shards!r}, shards={self.index.n_shards}'
        width = f', width={self.width}' if self.width is not None else ''
        return f'HypencoderReranker({source}{width})'

    @property
    def search_device(self) -> torch.device:
        """The device where documents are scored."""
        return self.device if self.device is not None else self.model.device

    def close(self) -> None:
        """Releases a sharded index's backend: ends its Ray actors (they also end with the last reference to the
        transformer). Does nothing for a single index. A closed transformer over a sharded index cannot search."""
        if self._shards is not None:
            self._shards.close()

    def clear_cache(self) -> None:
        """Forgets the cached q-nets of recent queries (call it after changing the model's weights)."""
        with self._lock:
            self._cache.clear()

    def _validate(self, inp: pd.DataFrame) -> None:
        try:
            with pt.validate.any(inp, context=self) as v:
                if self.index is not None:
                    v.result_frame(extra_columns=['query'], mode='stored vectors')
                else:
                    v.result_frame(extra_columns=['query', self.text_field], mode='text')
        except pt.validate.InputValidationError as e:
            if 'query' not in inp.columns:
                explain_missing_query(inp, self, e)
            if self.index is None and e.modes[0].missing_columns == [self.text_field]:
                raise pt.validate.InputValidationError(
                    f'{self!r} has no index, so it needs the documents\' text in a {self.text_field!r} column, which '
                    f'the input (columns {list(inp.columns)}) lacks. Add it, e.g. pt.text.get_text(dataset, '
                    f'{self.text_field!r}) >> reranker, or give the reranker an index: HypencoderReranker(model, '
                    'index).', e.modes) from None
            raise

    def _qnets(self, queries: Sequence[str]) -> List[QNets]:
        """The q-net of each of ``queries`` (one-query :class:`QNets`), from the cache where it has them."""
        # The cache is only touched under the lock, and the q-nets used come from a local dict, so threads that
        # evict each other's entries meanwhile change nothing here. Encoding runs outside the lock.
        with self._lock:
            found = {q: self._cache[q] for q in queries if q in self._cache}
            for q in found:
                self._cache.move_to_end(q)
        missing = [q for q in dict.fromkeys(queries) if q not in found]
        if missing:
            qnets = self.model.encode_queries(missing, batch_size=self.batch_size).to(self.search_device)
            if self.width is not None:
                qnets = qnets.truncate(self.width)
            # copies, so that a cached query does not keep its whole encoding batch in memory
            found.update((q, qnets[i].clone()) for i, q in enumerate(missing))
            with self._lock:
                self._cache.update((q, found[q]) for q in missing)
                while len(self._cache) > _QNET_CACHE:
                    self._cache.popitem(last=False)
        return [found[q] for q in queries]

    def _rows(self, frame: pd.DataFrame) -> np.ndarray:
        """Index rows of the documents of ``frame``'s rows."""
        try:
            return self.index.rows(frame['docno'].tolist())
        except KeyError as e:
            raise KeyError(f'{e.args[0]}. The reranker scores the vectors stored in its index, so every docno must '
                           'come from the indexed corpus (was the first stage run on another corpus?)') from None

    def _doc_vectors(self, frame: pd.DataFrame, bar=None) -> torch.Tensor:
        """Vectors of the documents of ``frame``'s rows, on the scoring device (a single index, or texts)."""
        if self.index is not None:
            vectors = torch.from_numpy(np.asarray(self.index.vectors()[self._rows(frame)]))
        else:
            texts = frame[self.text_field]
            bad = texts.map(lambda t: not isinstance(t, str))
            if bad.any():
                docno = frame['docno'][bad].iloc[0]
                raise TypeError(f'the {self.text_field!r} column has {int(bad.sum())} values that are not strings, e.g. '
                                f'for docno {docno!r}; fill them before re-ranking')
            # The same document often appears for several queries: encode each text once.
            codes, unique = pd.factorize(texts)
            uses = np.bincount(codes, minlength=len(unique))  # rows of the frame per text, for the progress bar
            parts = []
            for start in range(0, len(unique), _TEXT_CHUNK):
                parts.append(self.model.encode_docs(list(unique[start:start + _TEXT_CHUNK]), batch_size=self.batch_size))
                if bar is not None:
                    bar.update(int(uses[start:start + _TEXT_CHUNK].sum()))
            vectors = torch.cat(parts)[torch.from_numpy(codes)]
        return vectors.to(device=self.search_device)

    def transform(self, inp: pd.DataFrame) -> pd.DataFrame:
        """Scores each (query, document) row of ``inp`` and ranks the documents of each query."""
        self._validate(inp)
        if len(inp) == 0:
            return inp.assign(score=pd.Series(dtype='float64'), rank=pd.Series(dtype='int64'))
        if self.index is not None and self.index.generation() != self._generation:
            self._check_index()  # the index was rebuilt: its vectors (read per batch) may come from another model
        inp = inp.reset_index(drop=True)
        query_codes, queries = pd.factorize(pd.Series(check_queries(inp)))
        warn_untrained(self.model, 'HypencoderReranker')
        order = np.argsort(query_codes, kind='stable')  # rows grouped by query, queries in input order
        bounds = np.searchsorted(query_codes[order], np.arange(len(queries) + 1))
        scores = np.empty(len(inp), dtype=np.float64)
        bar = progress(len(inp), 'HypencoderReranker', self.verbose, unit='doc')  # documents: the work of re-ranking
        with bar, torch.inference_mode():
            for first in range(0, len(queries), self.batch_size):
                last = min(first + self.batch_size, len(queries))
                qnets = self._qnets(list(queries[first:last]))
                rows = order[bounds[first]:bounds[last]]
                if self._shards is not None:
                    # Each shard's backend scores its own documents (on Ray: on the actors that hold them).
                    pair_query = query_codes[rows] - first
                    scores[rows] = self._shards.score_rows(qnets, pair_query, self._rows(inp.iloc[rows]))
                    bar.update(len(rows))
                    continue
                vectors = self._doc_vectors(inp.iloc[rows], bar if self.index is None else None)
                for j in range(last - first):
                    lo, hi = bounds[first + j] - bounds[first], bounds[first + j + 1] - bounds[first]
                    scores[rows[lo:hi]] = qnets[j].score(vectors[lo:hi])[0].double().cpu().numpy()
                if self.index is not None:  # (text encoding moved the bar as it went)
                    bar.update(len(rows))
        out = pt.model.add_ranks(inp.assign(score=scores))
        qid_order, _ = pd.factorize(out['qid'])
        return out.iloc[np.lexsort((out['rank'].to_numpy(), qid_order))].reset_index(drop=True)

"""The Ray backend: every line of Ray code in the package, imported only when ``backend='ray'`` is asked for.

Search: one long-lived actor per shard (:class:`ShardActor`) opens its shard in ``__init__`` (the memory map, or
a copy on its GPU) and keeps it resident, so a restarted actor re-creates itself from the shard folder alone.
Per batch the driver encodes the q-nets once, ``ray.put`` s them once, every actor returns its top-k with global
row ids, and the driver merges them under the total order (:func:`~pyterrier_hypencoder.search.merge_topk`).
Actors are created with ``max_restarts`` and ``max_task_retries``: an actor that dies in the middle of a batch is
restarted and its part of the batch retried, giving the same results. When the retries run out the error names
the shard; no batch is ever answered from the shards that did respond.

Building shards on Ray is :mod:`~pyterrier_hypencoder.distributed.ray_indexing`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import numpy as np
import ray
import torch

from ..index.files import HypencoderIndexFiles
from ..index.sharded import ShardedIndexFiles
from ..search.modes import SearchResult
from .shards import ShardSearcher, merge_shards

__all__ = ['RayShards', 'ShardActor', 'ShardSearchError', 'init_ray']

# Fault injection for tests and drills: with this variable naming a folder, an actor whose file ``shard-<i>``
# exists there exits hard at its next search (the file says ``once``: it is deleted first, so the retry works;
# ``always``: every attempt dies, until the retries run out).
CRASH_ENV = 'PYTERRIER_HYPENCODER_RAY_CRASH'


class ShardSearchError(RuntimeError):
    """A shard that could not answer, after Ray's restarts and retries; the batch has no results."""


def init_ray(address: Optional[str]) -> None:
    """Joins (or starts) the Ray cluster at ``address`` unless this process is connected already."""
    if not ray.is_initialized():
        # address=None joins the cluster of RAY_ADDRESS or of a local `ray start --head`, else starts one here.
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)


def _maybe_crash(shard_no: int) -> None:
    folder = os.environ.get(CRASH_ENV)
    marker = Path(folder) / f'shard-{shard_no}' if folder else None
    if marker is not None and marker.exists():
        if marker.read_text().strip() == 'once':
            marker.unlink()
        os._exit(1)


class ShardActor:
    """Holds one shard for its lifetime and searches it (wrapped by ``ray.remote`` in :class:`RayShards`)."""

    def __init__(self, path: str, shard_no: int, offset: int, total: int, dtype: str, num_threads: int, graph: bool):
        torch.set_num_threads(num_threads)  # the actor's CPUs, so shards on one host do not oversubscribe it
        self.shard = HypencoderIndexFiles(path)
        self.shard.meta  # noqa: B018 -- validates the folder; an error here names it
        if graph:
            self.shard.graph_edges()
        self.shard_no = shard_no
        self.device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
        self.dtype = getattr(torch, dtype)
        self.searcher = ShardSearcher(self.shard, shard_no, offset, total, self.device, self.dtype)

    def ready(self) -> int:
        return len(self.shard)

    def search(self, qnets, k: int, mode):
        _maybe_crash(self.shard_no)
        with torch.inference_mode():
            result = self.searcher.search(qnets.to(self.device, self.dtype), k, mode)
        return tuple(None if part is None else part.numpy() for part in result)

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(self.shard.vectors()[rows])

    def score_rows(self, qnets, pair_query: np.ndarray, rows: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.searcher.score_rows([q.to(self.device, self.dtype) for q in qnets], pair_query, rows)


class RayShards:
    """The Ray backend of a sharded index's search: one :class:`ShardActor` per shard."""

    def __init__(self, index: ShardedIndexFiles, address: Optional[str], device: torch.device, dtype: torch.dtype, *,
                 num_cpus: float = 1, num_gpus: float = 0, max_restarts: int = 3, max_task_retries: int = 3,
                 start_timeout: float = 600, graph: bool = False):
        """
        Args:
            index: the sharded index (validated by the caller).
            address: the cluster (None: ``RAY_ADDRESS``, a local ``ray start --head``, or a new local one).
            device, dtype: the q-nets' dtype is kept; actors score on their GPU when ``num_gpus`` > 0.
            num_cpus, num_gpus: resources reserved per actor (its torch threads: ``max(1, int(num_cpus))``).
            max_restarts, max_task_retries: Ray's fault tolerance per actor (restarts of a dead actor, and retries
                of the calls it was running).
            start_timeout: seconds to wait for every actor to start (they wait for free resources meanwhile).
            graph: the actors also open their graphs (graph-mode search).
        """
        init_ray(address)
        self.index = index
        self.max_restarts, self.max_task_retries = max_restarts, max_task_retries
        self.resources = {'num_cpus': num_cpus, 'num_gpus': num_gpus}
        remote = ray.remote(ShardActor).options(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=max_restarts,
                                                max_task_retries=max_task_retries)
        offsets = index.offsets
        dtype_name = str(dtype).replace('torch.', '')
        self.actors = [remote.remote(str(index.shard_path(i)), i, int(offsets[i]), len(index), dtype_name,
                                     max(1, int(num_cpus)), graph) for i in range(index.n_shards)]
        try:
            self._get([a.ready.remote() for a in self.actors], 'open', timeout=start_timeout)
        except ShardSearchError:
            self.close()
            raise

    def __repr__(self) -> str:
        return 'ray'

    def _check_open(self) -> None:
        if not self.actors:
            raise ShardSearchError(f'the Ray backend of {self.index.path} was closed; build a new retriever or reranker')

    def _get(self, futures: List, what: str, timeout: Optional[float] = None) -> list:
        out = []
        for i, future in enumerate(futures):
            try:
                out.append(ray.get(future, timeout=timeout))
            except ray.exceptions.GetTimeoutError:
                free = ray.available_resources()
                raise ShardSearchError(f'shard {i} ({self.index.shard_path(i)}): its actor did not start within '
                                       f'{timeout:.0f} s; the cluster has {free.get("CPU", 0):g} CPUs and '
                                       f'{free.get("GPU", 0):g} GPUs free for actors asking for '
                                       f'{self.resources}: lower ray_options num_cpus / num_gpus or add nodes') from None
            except ray.exceptions.RayError as e:
                cause = str(e).strip().splitlines()[-1][:300] if str(e).strip() else type(e).__name__
                raise ShardSearchError(f'shard {i} ({self.index.shard_path(i)}) could not {what} on Ray after '
                                       f'{self.max_restarts} actor restarts and {self.max_task_retries} retries: '
                                       f'{type(e).__name__}: {cause}') from e
        return out

    def search(self, qnets, k: int, mode) -> SearchResult:
        """The merged top-``k`` of every shard's actor (``mode``: a :mod:`~pyterrier_hypencoder.search.modes` mode)."""
        self._check_open()
        ref = ray.put(qnets.to('cpu'))  # once per batch, shared by every actor
        parts = self._get([a.search.remote(ref, k, mode) for a in self.actors], 'search')
        # copies: arrays from the object store are read-only, and they are only k wide
        return merge_shards([SearchResult(*(None if part is None else torch.from_numpy(np.array(part)) for part in p))
                             for p in parts], k)

    def score_rows(self, qnets, pair_query: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Scores of (query, global row) pairs, computed on the actors that hold the rows: the q-nets travel to the
        documents, not the documents to the driver."""
        self._check_open()
        ref = ray.put([q.to('cpu') for q in qnets])  # once per batch, shared by every actor
        shard, local = self.index.locate(rows)
        # Every actor is asked (most with few pairs, some with none), so an error names the right shard.
        parts = self._get([a.score_rows.remote(ref, pair_query[shard == i], local[shard == i])
                           for i, a in enumerate(self.actors)], 'score')
        out = np.empty(len(rows), dtype=np.float64)
        for i, part in enumerate(parts):
            out[shard == i] = part
        return out

    def vectors(self, rows: np.ndarray) -> torch.Tensor:
        """The stored vectors of global ``rows``, fetched from the actors that hold them."""
        self._check_open()
        shard, local = self.index.locate(rows)
        wanted = [int(i) for i in np.unique(shard)]
        parts = self._get([self.actors[i].vectors.remote(local[shard == i]) for i in wanted], 'fetch vectors')
        out = np.empty((len(rows), self.index.dim), dtype=self.index.meta['dtype'])
        for i, part in zip(wanted, parts):
            out[shard == i] = part
        return torch.from_numpy(out)

    def close(self) -> None:
        """Ends the actors now (they also end when the last handle goes)."""
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

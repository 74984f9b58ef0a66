"""Building a sharded index on Ray: each shard of :class:`~pyterrier_hypencoder.ShardedHypencoderIndexer` is a
Ray task, retried when its worker dies (imported only when the indexer is given a Ray backend)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

import ray
import torch

from ..errors import HypencoderIndexError
from ..index.layout import shard_dirname
from .ray_backend import init_ray

__all__ = ['build_shards']


def _build_shard(index_shard: Callable, model, docs: list, path: str, kwargs: Dict[str, Any]) -> int:
    if torch.cuda.is_available():
        model = model.to('cuda')
    index_shard(model, docs, path, kwargs)
    return len(docs)


def build_shards(index_shard: Callable, model, shards: Iterable[list], folder: Path, address: Optional[str],
                 indexer_kwargs: Dict[str, Any], *, num_cpus: float = 1, num_gpus: float = 0, max_retries: int = 2,
                 max_pending: int = 4) -> List[int]:
    """Builds each list of documents in ``shards`` into ``folder/shard-NNN`` as a Ray task; returns their sizes.

    Each task calls ``index_shard(model, docs, path, indexer_kwargs)``: the PyTerrier layer passes the function
    that runs its indexer (one that replaces what a dead attempt left), so this layer never imports it.

    Raises:
        HypencoderIndexError: naming the first shard whose task failed (after ``max_retries`` retries of a dead
            worker; errors raised by the indexer itself, such as a document without text, are not retried).
    """
    init_ray(address)
    task = ray.remote(_build_shard).options(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=max_retries,
                                            retry_exceptions=False)
    model_ref = ray.put(model)
    pending: Dict[Any, int] = {}
    sizes: List[int] = []

    def collect(futures) -> None:
        for future in futures:
            i = pending.pop(future)
            try:
                ray.get(future)
            except ray.exceptions.RayError as e:
                cause = getattr(e, 'cause', None) or e
                raise HypencoderIndexError(f'shard {i} ({folder / shard_dirname(i)}) could not be built on Ray '
                                           f'(after up to {max_retries} retries): {type(cause).__name__}: {cause}') from e

    try:
        for i, docs in enumerate(shards):
            sizes.append(len(docs))
            pending[task.remote(index_shard, model_ref, docs, str(folder / shard_dirname(i)), indexer_kwargs)] = i
            if len(pending) >= max_pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                collect(done)
        collect(sorted(pending, key=pending.get))
    except BaseException:
        # The caller deletes the build folder: tasks still running must not write into it again afterwards.
        for future in pending:
            ray.cancel(future, force=True)
        if pending:
            ray.wait(list(pending), num_returns=len(pending), timeout=60)
        raise
    return sizes

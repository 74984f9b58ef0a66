"""Reading and scoring rows of document vectors: the shapes every search function shares, and the total order.

Document vectors are rows of an ``[n, dim]`` array: a NumPy array or memory map (float16 or float32), or a
``torch.Tensor`` (e.g. already resident on the GPU). :func:`merge_topk` ranks (score, row) pairs the same way
wherever they were scored (score descending, then row ascending), so exhaustive, approximate and sharded searches
agree on ties.
"""
from __future__ import annotations

from typing import Sequence, Tuple, Union

import numpy as np
import torch

from ..model.qnet import QNets

__all__ = ['VectorsLike', 'check_vectors', 'default_chunk_size', 'gather_rows', 'merge_topk', 'place_vectors',
           'progress', 'read_rows', 'score_padded']

VectorsLike = Union[np.ndarray, torch.Tensor]

# Bytes of one exhaustive-search step's inputs and outputs (the chunk of vectors in the q-nets' dtype and its
# [n_queries, chunk] scores). QNets.score splits each chunk further so its activations stay bounded; this chunk
# only amortises the reads and the top-k merge, which is why it can be much larger than one GEMM's worth.
CHUNK_BYTES = 1 << 27


def check_vectors(qnets: QNets, vectors: VectorsLike) -> int:
    if vectors.ndim != 2 or vectors.shape[1] != qnets.dim:
        raise ValueError(f'document vectors must have shape [n_docs, {qnets.dim}] to match the q-nets; got '
                         f'{tuple(vectors.shape)} (were they encoded by another model?)')
    if vectors.shape[0] == 0:
        raise ValueError('there are no document vectors to search')
    return vectors.shape[0]


def read_rows(qnets: QNets, vectors: VectorsLike, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of ``vectors`` as a tensor on the q-nets' device and dtype."""
    if isinstance(vectors, torch.Tensor):
        block = vectors[start:stop]
    else:
        # np.array copies: memory-mapped rows are read-only, which torch.from_numpy warns about.
        block = torch.from_numpy(np.array(vectors[start:stop]))
    return block.to(device=qnets.device, dtype=qnets.dtype)


def gather_rows(qnets: QNets, vectors: VectorsLike, ids: np.ndarray) -> torch.Tensor:
    """Rows ``ids`` (any shape) of ``vectors``: a tensor of shape ``ids.shape + (dim,)`` on the q-nets' device."""
    if isinstance(vectors, torch.Tensor):
        block = vectors[torch.from_numpy(ids.reshape(-1)).to(vectors.device)]
    else:
        block = torch.from_numpy(np.asarray(vectors[ids.reshape(-1)]))
    return block.to(device=qnets.device, dtype=qnets.dtype).reshape(*ids.shape, -1)


def progress(it, verbose: bool, total: int, desc: str, unit: str):
    if not verbose:
        return it
    import pyterrier as pt
    return pt.tqdm(it, total=total, desc=desc, unit=unit)


def place_vectors(vectors: np.ndarray, device: Union[str, torch.device], dtype: torch.dtype,
                  memory_fraction: float = 0.5) -> VectorsLike:
    """The vectors to search on ``device``: a resident tensor on a GPU when they fit, else ``vectors`` unchanged.

    On a GPU, copying the vectors once beats streaming them from host memory for every batch of queries. On
    the CPU, a memory map is already as fast as a copy (the OS caches its pages) and costs no extra memory.

    Args:
        vectors: ``[n, dim]`` NumPy array or memory map.
        device: the device that scores.
        dtype: the q-nets' dtype (the resident copy is stored in it, so chunks need no conversion).
        memory_fraction: largest share of the GPU's free memory the copy may take.
    """
    device = torch.device(device)
    if device.type != 'cuda':
        return vectors
    need = vectors.shape[0] * vectors.shape[1] * (torch.finfo(dtype).bits // 8)
    free, _ = torch.cuda.mem_get_info(device)
    if need > memory_fraction * free:
        return vectors
    out = torch.empty(vectors.shape, device=device, dtype=dtype)
    step = max(1, CHUNK_BYTES // (vectors.shape[1] * vectors.itemsize))
    for start in range(0, vectors.shape[0], step):
        out[start:start + step] = torch.from_numpy(np.array(vectors[start:start + step])).to(device=device, dtype=dtype)
    return out


def _order_keys(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """int64 keys whose descending order is the total order: score descending, then row ascending.

    The float32 score's bits, made monotone as a signed integer, fill the high 32 bits, and ``2**32 - 1 - row``
    the low ones, so ``topk`` over the keys never has to break a tie (torch.topk's tie order is unspecified).
    Padding (id -1, score -inf) sorts after every real result.
    """
    bits = scores.float().contiguous().view(torch.int32).long()
    bits = torch.where(bits < 0, bits ^ 0x7fffffff, bits)  # negative floats: larger magnitude -> smaller key
    low = torch.where(ids >= 0, 0xffffffff - ids, torch.zeros_like(ids))
    return (bits << 32) | low


def merge_topk(scores: Sequence[torch.Tensor], ids: Sequence[torch.Tensor], k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The top ``k`` of several result lists per query, under the total order (score descending, then id ascending).

    Exhaustive search merges its chunks with it and a sharded search its shards' results, so both rank a set of
    (score, row) pairs the same way whatever the split: ties never depend on where a row was scored.

    Args:
        scores: ``[Q, k_i]`` float scores per part (any float dtype; compared as float32).
        ids: ``[Q, k_i]`` int64 global row ids per part (below 2**32 - 1); -1 marks padding (score -inf).
        k: results per query; at most the total width is returned.

    Returns:
        ``(scores, ids)``: float32 ``[Q, min(k, sum k_i)]`` and int64, best first, on the parts' device.
    """
    all_scores = torch.cat([s.float() for s in scores], dim=1)
    all_ids = torch.cat(list(ids), dim=1)
    width = min(int(k), all_scores.shape[1])
    _, pos = torch.topk(_order_keys(all_scores, all_ids), width, dim=1)
    return torch.gather(all_scores, 1, pos), torch.gather(all_ids, 1, pos)


def default_chunk_size(n_queries: int, dim: int, itemsize: int = 4) -> int:
    """Documents per exhaustive-search step: about 128 MB of vectors and scores, at least 1024 documents."""
    return max(1024, CHUNK_BYTES // (itemsize * (dim + n_queries)))


def score_padded(qnets: QNets, vectors: VectorsLike, ids: np.ndarray, valid: np.ndarray) -> torch.Tensor:
    """Scores row ``i`` of ``ids`` ([Q, m], a different set per query) with q-net ``i``; ``-inf`` where not valid."""
    n_queries, m = ids.shape
    out = torch.full((n_queries, m), float('-inf'))
    if m == 0:
        return out
    width = max(qnets.spec.vector_dimensions)
    budget = qnets.step_elements()  # the same bound on activations as QNets.score keeps
    cols = max(1, min(m, budget // width))
    rows = max(1, budget // (cols * width))
    for r in range(0, n_queries, rows):
        for c in range(0, m, cols):
            block = ids[r:r + rows, c:c + cols]
            out[r:r + rows, c:c + cols] = qnets[r:r + rows].score_pairs(gather_rows(qnets, vectors, block)).float().cpu()
    out[~torch.from_numpy(valid)] = float('-inf')
    return out

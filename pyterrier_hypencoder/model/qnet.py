"""Q-nets: the small per-query neural networks that a Hypencoder emits, and how to run them.

A q-net maps a document vector to a relevance score. Its weights are generated per query by the hyperhead
(see :mod:`pyterrier_hypencoder.model`); this module only needs the generated tensors.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .qnet_spec import QNetSpec

__all__ = ['QNetSpec', 'QNets']

_ACTIVATIONS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    'relu': F.relu,
    'tanh': torch.tanh,
    'sigmoid': torch.sigmoid,
    'gelu': F.gelu,
    'leaky_relu': F.leaky_relu,
}

# F.layer_norm's default, which the reference q-net uses (not the backbone's 1e-12).
LAYER_NORM_EPS = 1e-5

# In-place forms of the activations, for scoring without autograd (no copy of each activation tensor).
_ACTIVATIONS_INPLACE: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    'relu': torch.relu_,
    'tanh': torch.tanh_,
    'sigmoid': torch.sigmoid_,
    'gelu': torch._C._nn.gelu_,
    'leaky_relu': F.leaky_relu_,
}

# One fused pass for bias + ReLU (the released q-nets) instead of a bias copy, a GEMM that reads it back and a ReLU
# pass. It is the kernel TorchScript's add-relu fusion uses; CPU only, float32 and float64 only.
_ADD_RELU_ = getattr(torch.ops.aten, '_add_relu_', None)

# QNets.score works in steps: a group of queries against a chunk of documents, whose activation tensors
# ([queries, docs, width]) take at most this many bytes. On CPU each step allocates a few such tensors; below 32 MiB
# glibc's malloc reuses the memory that the previous step freed, while from 32 MiB on every allocation is a fresh
# mapping whose pages fault in one by one (measured: up to 1 GB of page faults per scoring call, 17% of the time in
# the kernel on a busy machine). Smaller steps fit the caches better but ran 10-25% slower on 2 cores (smaller GEMMs,
# more per-operation synchronisation). GPUs want bigger steps to fill the device.
_SCORE_BUDGET_BYTES = {'cpu': 30 * 2 ** 20, 'cuda': 2 ** 28}
# Documents per query in a step: the rows of each q-net's GEMMs. Below ~1000 rows the batched GEMMs fall well short
# of the machine's peak (measured on CPU), so more queries make more, smaller query groups, not smaller chunks.
SCORE_MIN_DOCS = {'cpu': 1024, 'cuda': 4096}


class QNets:
    """A batch of q-nets, one per query.

    Holds the generated tensors: ``weights[k]`` of shape ``[n_queries, in_dim, out_dim]`` (applied as
    ``x @ W``) and ``biases[k]`` of shape ``[n_queries, out_dim]`` for each hidden block. Indexing and slicing
    select queries, so ``qnets[3]`` or ``qnets[2:5]`` are q-nets too.
    """

    def __init__(self, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor], spec: QNetSpec,
                 training: bool = False):
        self.weights = list(weights)
        self.biases = list(biases)
        self.spec = spec
        self.training = training
        if len(self.weights) != len(spec.weight_shapes) or len(self.biases) != spec.num_blocks:
            raise ValueError(f'expected {len(spec.weight_shapes)} matrices and {spec.num_blocks} biases for '
                             f'{spec}; got {len(self.weights)} and {len(self.biases)}')

    def __len__(self) -> int:
        return self.weights[0].shape[0]

    def __getitem__(self, idx: Union[int, slice, torch.Tensor, Sequence[int]]) -> QNets:
        if isinstance(idx, int):
            idx = slice(idx, idx + 1) if idx != -1 else slice(-1, None)
        return QNets([w[idx] for w in self.weights], [b[idx] for b in self.biases], self.spec, self.training)

    def __repr__(self) -> str:
        return f'QNets(n={len(self)}, dims={list(self.spec.vector_dimensions)}, dtype={self.dtype}, device={self.device})'

    @property
    def dim(self) -> int:
        """Size of the document vectors the q-nets take."""
        return self.spec.vector_dimensions[0]

    @property
    def device(self) -> torch.device:
        return self.weights[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.weights[0].dtype

    def to(self, device=None, dtype=None) -> QNets:
        """Moves (and optionally casts) the generated tensors."""
        return QNets([w.to(device=device, dtype=dtype) for w in self.weights],
                     [b.to(device=device, dtype=dtype) for b in self.biases], self.spec, self.training)

    def detach(self) -> QNets:
        return QNets([w.detach() for w in self.weights], [b.detach() for b in self.biases], self.spec, False)

    def clone(self) -> QNets:
        """A copy with its own memory (a slice such as ``qnets[3]`` shares, and so keeps alive, the whole batch's)."""
        return QNets([w.clone() for w in self.weights], [b.clone() for b in self.biases], self.spec, self.training)

    def truncate(self, width: int) -> QNets:
        """These q-nets cut to a narrower nested (Matryoshka) hidden width (see :mod:`.qnet_spec`).

        The first matrix keeps its first ``width`` columns, hidden matrices their top-left ``width x width`` block,
        biases and the final matrix their first ``width`` entries; the input stays the whole document vector. The
        result holds views of these tensors (no copy, and differentiable), and its ``spec`` records the width.

        Args:
            width: one of ``spec.widths`` (the model's ``matryoshka_widths``); the current width returns ``self``.

        Raises:
            ValueError: if these q-nets were not trained nested, or ``width`` is not one of their widths; the
                message names the widths they can take.
        """
        spec = self.spec.truncated(width)
        if spec == self.spec:
            return self
        w = spec.width
        weights = [self.weights[0][..., :w]] + [m[:, :w, :w] for m in self.weights[1:-1]] + [self.weights[-1][:, :w]]
        return QNets(weights, [b[:, :w] for b in self.biases], spec, self.training)

    @staticmethod
    def cat(parts: Sequence[QNets]) -> QNets:
        """Concatenates batches of q-nets (of the same spec) along the query axis."""
        if not parts:
            raise ValueError('QNets.cat needs at least one batch')
        n_w, n_b = len(parts[0].weights), len(parts[0].biases)
        return QNets([torch.cat([p.weights[k] for p in parts]) for k in range(n_w)],
                     [torch.cat([p.biases[k] for p in parts]) for k in range(n_b)],
                     parts[0].spec, parts[0].training)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """Runs every q-net on ``x`` of shape ``[m, d]`` (shared) or ``[n_queries, m, d]``; returns ``[n_queries, m]``."""
        spec = self.spec
        act = _ACTIVATIONS[spec.activation]
        # In-place steps save memory traffic at inference; autograd needs the out-of-place ones.
        inplace = not (torch.is_grad_enabled() and (x.requires_grad or self.weights[0].requires_grad))
        for j in range(spec.num_blocks):
            if x.ndim == 2:
                # One GEMM for all queries: [m, d] @ [d, Q*h] -> a [Q, m, h] view.
                w = self.weights[j].transpose(0, 1).reshape(x.shape[1], -1)
                y = torch.addmm(self.biases[j].reshape(-1), x, w).view(x.shape[0], len(self), -1).transpose(0, 1)
            else:
                y = torch.baddbmm(self.biases[j].unsqueeze(1), x, self.weights[j])
            y = act(y)
            if spec.layer_norm and spec.layer_norm_before_residual:
                y = F.layer_norm(y, (y.shape[-1],), eps=LAYER_NORM_EPS)
            if spec._block_has_residual(j):
                # a nested q-net cut below its input's width adds the input's first coordinates (see .qnet_spec)
                res = x if x.shape[-1] == y.shape[-1] else x[..., :y.shape[-1]]
                y = y.add_(res) if inplace and y.is_contiguous() else y + res
            if spec.layer_norm and not spec.layer_norm_before_residual:
                y = F.layer_norm(y, (y.shape[-1],), eps=LAYER_NORM_EPS)
            if self.training and spec.dropout > 0:
                y = F.dropout(y, spec.dropout)
            x = y
        if x.ndim == 2:
            return torch.matmul(x, self.weights[-1].squeeze(-1).T).T
        return torch.bmm(x, self.weights[-1]).squeeze(-1)

    def _check_vectors(self, doc_vectors: torch.Tensor, ndim: int) -> torch.Tensor:
        if not isinstance(doc_vectors, torch.Tensor):
            doc_vectors = torch.as_tensor(doc_vectors)
        if doc_vectors.ndim != ndim or doc_vectors.shape[-1] != self.dim:
            want = '[n_docs, dim]' if ndim == 2 else '[n_queries, n_docs, dim]'
            raise ValueError(f'document vectors must have shape {want} with dim={self.dim}; got {tuple(doc_vectors.shape)}'
                             ' (were they encoded by a model with another hidden size?)')
        return doc_vectors.to(device=self.device, dtype=self.dtype)

    def score(self, doc_vectors: torch.Tensor, chunk_size: Optional[int] = None) -> torch.Tensor:
        """Scores every document for every query.

        Args:
            doc_vectors: ``[n_docs, dim]`` document vectors (moved to the q-nets' device and dtype).
            chunk_size: documents per step; by default sized so one step's activations stay under 30 MiB on CPU
                (256 MiB on GPU), so memory is bounded whatever ``n_docs`` is. Without autograd, queries are
                also split into groups, so a step holds at most that much whatever the number of queries.

        Returns:
            ``[n_queries, n_docs]`` scores.
        """
        doc_vectors = self._check_vectors(doc_vectors, 2)
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f'chunk_size must be >= 1; got {chunk_size}')
        if self._needs_autograd(doc_vectors):
            return self._score_autograd(doc_vectors, chunk_size)
        return self._score_inference(doc_vectors, chunk_size)

    def _needs_autograd(self, x: torch.Tensor) -> bool:
        """True when the scores must be differentiable or dropout applies (the training path)."""
        if self.training and self.spec.dropout > 0:
            return True
        return torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in self.weights + self.biases))

    def step_elements(self) -> int:
        """Elements of one activation tensor in a scoring step (device- and dtype-dependent); callers that batch
        their own scoring calls (the graph walk) size them with it too."""
        budget = _SCORE_BUDGET_BYTES.get(self.device.type, _SCORE_BUDGET_BYTES['cpu'])
        return budget // self.weights[0].element_size()

    def _score_autograd(self, doc_vectors: torch.Tensor, chunk_size: Optional[int]) -> torch.Tensor:
        n = doc_vectors.shape[0]
        if chunk_size is None:
            chunk_size = max(1, self.step_elements() // (len(self) * max(self.spec.vector_dimensions)))
        if n <= chunk_size:
            return self._forward(doc_vectors)
        out = torch.empty(len(self), n, device=self.device, dtype=self.dtype)
        for start in range(0, n, chunk_size):
            out[:, start:start + chunk_size] = self._forward(doc_vectors[start:start + chunk_size])
        return out

    def _score_plan(self, n: int, chunk_size: Optional[int]) -> tuple:
        """``(queries per group, documents per chunk)`` for inference steps within the activation budget."""
        width = max(self.spec.vector_dimensions)
        budget = self.step_elements()
        n_queries = len(self)
        if chunk_size is None:
            min_docs = max(1, min(n, SCORE_MIN_DOCS.get(self.device.type, SCORE_MIN_DOCS['cpu'])))
            group = max(1, budget // (min_docs * width))
        else:
            group = max(1, budget // (chunk_size * width))
        # Equal groups: 32 queries in groups of at most 10 run as 4 x 8, not 10 + 10 + 10 + 2.
        n_groups = -(-n_queries // group)
        group = -(-n_queries // n_groups)
        if chunk_size is None:
            chunk_size = max(1, budget // (group * width))
            # Equal chunks too: 2,048 documents as 2 x 1,024, not one full chunk and a small remainder.
            n_chunks = -(-n // chunk_size)
            chunk_size = -(-n // n_chunks)
        return group, chunk_size

    def _score_inference(self, doc_vectors: torch.Tensor, chunk_size: Optional[int]) -> torch.Tensor:
        n, n_queries = doc_vectors.shape[0], len(self)
        out = torch.empty(n_queries, n, device=self.device, dtype=self.dtype)
        if n_queries == 0 or n == 0:
            return out
        group, chunk_size = self._score_plan(n, chunk_size)
        groups = [self if group >= n_queries else self[g:g + group] for g in range(0, n_queries, group)]
        # Block 0's matrices of a group side by side, [d, group * h]: one GEMM serves all its queries.
        w0 = [g.weights[0].transpose(0, 1).reshape(self.dim, -1) for g in groups] if self.spec.num_blocks else None
        with torch.no_grad():
            for start in range(0, n, chunk_size):
                x = doc_vectors[start:start + chunk_size]
                for k, g in enumerate(groups):
                    rows = out[k * group:k * group + len(g), start:start + x.shape[0]]
                    g._forward_inference(x, w0[k] if w0 else None, rows)
        return out

    def _forward_inference(self, x: torch.Tensor, w0: Optional[torch.Tensor], out: torch.Tensor) -> None:
        """Inference forward of ``x`` (``[m, d]`` shared, or ``[n_queries, m, d]``) into ``out`` (``[n_queries, m]``).

        The same computation as :meth:`_forward`, arranged for speed without autograd: every step in place but the
        GEMMs and layer norm; for shared documents, block 0 as one GEMM (``w0``: block 0's matrices side by side,
        ``[d, n_queries * h]``) in a ``[m, Q, h]`` layout whose rows stay contiguous for layer norm (later blocks read
        it through a transposed view, which the batched GEMM takes at no extra cost); the final ``h -> 1`` products
        as matrix-vector products, which on CPU run ~10x faster than a batched GEMM with one column.
        """
        spec = self.spec
        n_queries = len(self)
        shared = x.ndim == 2
        m = x.shape[-2]
        fused_relu = (spec.activation == 'relu' and _ADD_RELU_ is not None and x.device.type == 'cpu'
                      and x.dtype in (torch.float32, torch.float64))
        act_ = _ACTIVATIONS_INPLACE[spec.activation]
        # Shared documents as [m, 1, d] broadcast over the queries of block 0's [m, Q, h] layout.
        prev = x.unsqueeze(1) if shared else x
        h = x
        for j in range(spec.num_blocks):
            width = spec.vector_dimensions[j + 1]
            # Without the fused kernel the bias goes into the GEMM, as in _forward: one rounding, which bf16 notices.
            if j == 0 and shared:
                if w0 is None:
                    w0 = self.weights[0].transpose(0, 1).reshape(x.shape[1], -1)
                if fused_relu:
                    y = _ADD_RELU_(torch.mm(x, w0).view(m, n_queries, width), self.biases[0])
                else:
                    y = act_(torch.addmm(self.biases[0].reshape(-1), x, w0).view(m, n_queries, width))
            elif fused_relu:
                y = _ADD_RELU_(torch.bmm(h, self.weights[j]), self.biases[j].unsqueeze(1))
            else:
                y = act_(torch.baddbmm(self.biases[j].unsqueeze(1), h, self.weights[j]))
            if spec.layer_norm and spec.layer_norm_before_residual:
                y = F.layer_norm(y, (y.shape[-1],), eps=LAYER_NORM_EPS)
            if spec._block_has_residual(j):
                y.add_(prev if prev.shape[-1] == width else prev[..., :width])
            if spec.layer_norm and not spec.layer_norm_before_residual:
                y = F.layer_norm(y, (y.shape[-1],), eps=LAYER_NORM_EPS)
            h = prev = y.transpose(0, 1) if j == 0 and shared else y
        last = self.weights[-1].squeeze(-1)  # [Q, h]
        if spec.num_blocks == 0 and shared:
            out.copy_(torch.mm(last, x.T))
        elif x.device.type == 'cpu':
            for i in range(n_queries):
                torch.mv(h[i], last[i], out=out[i])
        else:
            out.copy_(torch.bmm(h, self.weights[-1]).squeeze(-1))

    def score_pairs(self, doc_vectors: torch.Tensor) -> torch.Tensor:
        """Scores a separate set of documents per query.

        Args:
            doc_vectors: ``[n_queries, m, dim]``: row ``i`` holds the documents for query ``i``.

        Returns:
            ``[n_queries, m]`` scores.
        """
        doc_vectors = self._check_vectors(doc_vectors, 3)
        if doc_vectors.shape[0] != len(self):
            raise ValueError(f'score_pairs needs one row of documents per q-net: got {doc_vectors.shape[0]} rows for '
                             f'{len(self)} q-nets')
        if self._needs_autograd(doc_vectors):
            return self._forward(doc_vectors)
        out = torch.empty(len(self), doc_vectors.shape[1], device=self.device, dtype=self.dtype)
        with torch.no_grad():
            self._forward_inference(doc_vectors, None, out)
        return out

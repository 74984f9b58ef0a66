"""The hyperhead: turns a query's token states into the weights and biases of its q-net."""
from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .qnet import QNets, QNetSpec

__all__ = ['HyperHead']


class HyperHead(nn.Module):
    """Generates one q-net per query from the query's contextual token states.

    For every generated tensor (each q-net matrix, then each bias) there is a set of learned query embeddings,
    one per output row. They attend over the query's token states (keys and values are per-tensor linear maps of
    those states, padding masked, logits scaled by ``1/sqrt(out_dim)`` of the generated tensor); the result goes
    through ReLU, a parameter-free layer norm and a per-tensor linear map, and a learned base tensor is added.

    Parameter names follow the reference implementation, so released checkpoints map onto this module directly.
    """

    def __init__(self, spec: QNetSpec, model_dim: int):
        """
        Args:
            spec: the q-net architecture.
            model_dim: hidden size of the backbone whose token states are attended over.
        """
        super().__init__()
        self.spec = spec
        self.model_dim = model_dim
        shapes = spec.weight_shapes
        bias_dims = spec.bias_dims
        # Stored as [1, out_dim, in_dim], the reference layout; transposed to [in, out] on output.
        self.hyper_base_matrices = nn.ParameterList([nn.Parameter(torch.zeros(1, o, i)) for i, o in shapes])
        self.hyper_base_vectors = nn.ParameterList([nn.Parameter(torch.zeros(1, d)) for d in bias_dims])
        self.weight_query_embeddings = nn.ParameterList([nn.Parameter(torch.zeros(1, o, i)) for i, o in shapes])
        self.bias_query_embeddings = nn.ParameterList([nn.Parameter(torch.zeros(1, 1, d)) for d in bias_dims])
        self.weight_hyper_projection = nn.ModuleList([nn.Linear(i, i) for i, _ in shapes])
        self.bias_hyper_projection = nn.ModuleList([nn.Linear(d, d) for d in bias_dims])
        in_dims = [i for i, _ in shapes] + bias_dims
        self.key_projections = nn.ModuleList([nn.Linear(model_dim, i) for i in in_dims])
        self.value_projections = nn.ModuleList([nn.Linear(model_dim, i) for i in in_dims])

    @torch.no_grad()
    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """Initialises the head as the paper's code does (large random query embeddings, tiny projections).

        Args:
            generator: source of randomness, for reproducible initialisation.
        """
        def normal_(t, std):
            t.copy_(torch.randn(t.shape, generator=generator, dtype=t.dtype) * std)

        def uniform_linear_(lin):
            bound = 1 / math.sqrt(lin.in_features)
            lin.weight.copy_((torch.rand(lin.weight.shape, generator=generator) * 2 - 1) * bound)
            lin.bias.copy_((torch.rand(lin.bias.shape, generator=generator) * 2 - 1) * bound)

        for lin in list(self.key_projections) + list(self.value_projections) + list(self.bias_hyper_projection):
            uniform_linear_(lin)
        n_w = len(self.hyper_base_matrices)
        for k in range(n_w):
            normal_(self.hyper_base_matrices[k], (2 / self.model_dim) ** 0.5)
            normal_(self.weight_query_embeddings[k], 10.0)
            normal_(self.weight_hyper_projection[k].weight, 1 / self.model_dim ** 2)
            self.weight_hyper_projection[k].bias.zero_()
            self.key_projections[k].bias.zero_()
            self.value_projections[k].bias.zero_()
        for k in range(len(self.hyper_base_vectors)):
            self.hyper_base_vectors[k].zero_()
            normal_(self.bias_query_embeddings[k], 10.0)

    def final_parameters(self) -> List[nn.Parameter]:
        """The parameters that generate only the q-net's final matrix (its query-dependent output vector)."""
        last = len(self.spec.weight_shapes) - 1
        return [self.hyper_base_matrices[last], self.weight_query_embeddings[last],
                *self.weight_hyper_projection[last].parameters(), *self.key_projections[last].parameters(),
                *self.value_projections[last].parameters()]

    def hidden_parameters(self) -> List[nn.Parameter]:
        """The parameters that generate the q-net's hidden blocks (matrices and biases): all but the final ones."""
        final = {id(p) for p in self.final_parameters()}
        return [p for p in self.parameters() if id(p) not in final]

    @staticmethod
    def _attend(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                out_dim: int) -> torch.Tensor:
        # queries [1, r, i]; keys/values [B, T, i]; mask [B, T] -> [B, r, i]
        logits = torch.matmul(queries, keys.transpose(1, 2)) / math.sqrt(out_dim)
        logits = logits.masked_fill(mask.unsqueeze(1) == 0, float('-inf'))
        return torch.matmul(torch.softmax(logits, dim=-1), values)

    def _generate(self, k: int, query_emb: torch.Tensor, projection: nn.Linear, base: torch.Tensor,
                  hidden: torch.Tensor, mask: torch.Tensor, out_dim: int) -> torch.Tensor:
        h = self._attend(query_emb, self.key_projections[k](hidden), self.value_projections[k](hidden), mask, out_dim)
        h = F.layer_norm(F.relu(h), (h.shape[-1],))
        return projection(h) + base

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> QNets:
        """Generates q-nets.

        Args:
            hidden: ``[batch, tokens, model_dim]`` token states of the queries.
            attention_mask: ``[batch, tokens]``, 0 at padding.

        Returns:
            The batch's :class:`QNets`.
        """
        weights: List[torch.Tensor] = []
        for k, (_, out_dim) in enumerate(self.spec.weight_shapes):
            w = self._generate(k, self.weight_query_embeddings[k], self.weight_hyper_projection[k],
                               self.hyper_base_matrices[k], hidden, attention_mask, out_dim)
            weights.append(w.transpose(1, 2))  # [B, out, in] -> [B, in, out]
        biases: List[torch.Tensor] = []
        offset = len(weights)
        for k in range(len(self.bias_query_embeddings)):
            # A bias is generated as a 1-row "matrix", so its attention scale is 1/sqrt(1).
            b = self._generate(offset + k, self.bias_query_embeddings[k], self.bias_hyper_projection[k],
                               self.hyper_base_vectors[k], hidden, attention_mask, 1)
            biases.append(b.squeeze(1))
        return QNets(weights, biases, self.spec, training=self.training)

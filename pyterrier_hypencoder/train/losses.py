"""Training losses of the Hypencoder paper (section 4.2.1), as pure functions over score tensors.

Conventions used throughout:

- ``group`` scores are ``[n_queries, 1 + n_negatives]``: row ``i`` holds query ``i``'s scores for its own
  documents, the positive in column 0, then its sampled negatives.
- ``in_batch`` scores are ``[n_queries, n_queries]``: entry ``(i, j)`` is query ``i``'s score for query ``j``'s
  positive, so the diagonal holds the positives and every other entry is an in-batch negative.
- ``ignore`` masks are boolean ``[n_queries, n_queries]``: True where query ``j``'s positive must not count as a
  negative for query ``i`` (it is also relevant to ``i``, e.g. two queries sharing a positive). The diagonal is
  never ignored.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ['margin_mse', 'in_batch_cross_entropy', 'hard_negative_cross_entropy', 'distillation_loss']


def _check_group(scores: torch.Tensor, name: str) -> None:
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f'{name} must be [n_queries, 1 + n_negatives] with at least one negative; '
                         f'got shape {tuple(scores.shape)}')


def _check_square(scores: torch.Tensor, ignore: Optional[torch.Tensor]) -> None:
    if scores.ndim != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f'in-batch scores must be square [n_queries, n_queries] (query i x positive of query j); '
                         f'got shape {tuple(scores.shape)}')
    if ignore is not None and ignore.shape != scores.shape:
        raise ValueError(f'the ignore mask must have the in-batch scores\' shape {tuple(scores.shape)}; '
                         f'got {tuple(ignore.shape)}')


def _masked_off_diagonal(scores: torch.Tensor, ignore: Optional[torch.Tensor]) -> torch.Tensor:
    """``scores`` with ignored entries set to -inf; the diagonal is always kept."""
    if ignore is None:
        return scores
    ignore = ignore.to(torch.bool) & ~torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)
    return scores.masked_fill(ignore, float('-inf'))


def margin_mse(group: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Margin-MSE (Hofstätter et al.): the student's positive-minus-negative margins regress the teacher's.

    ``mean over queries i and negatives j of ((s[i,0] - s[i,j]) - (t[i,0] - t[i,j]))**2``.

    Args:
        group: student scores ``[n_queries, 1 + n_negatives]``, positive first.
        teacher: teacher scores of the same documents, same shape.

    Returns:
        A scalar tensor.
    """
    _check_group(group, 'student scores')
    if teacher.shape != group.shape:
        raise ValueError(f'teacher scores {tuple(teacher.shape)} must match the student scores {tuple(group.shape)}')
    teacher = teacher.to(group.dtype)
    student_margin = group[:, :1] - group[:, 1:]
    teacher_margin = teacher[:, :1] - teacher[:, 1:]
    return F.mse_loss(student_margin, teacher_margin)


def in_batch_cross_entropy(in_batch: torch.Tensor, ignore: Optional[torch.Tensor] = None,
                           temperature: float = 1.0) -> torch.Tensor:
    """Cross-entropy of each query's positive against the other queries' positives.

    Args:
        in_batch: ``[n_queries, n_queries]`` scores, query ``i`` against the positive of query ``j``.
        ignore: optional mask of entries that are not negatives (see the module notes).
        temperature: logits are ``scores / temperature``.

    Returns:
        A scalar tensor: the mean over queries of ``-log softmax(row i)[i]``.
    """
    _check_square(in_batch, ignore)
    logits = _masked_off_diagonal(in_batch / temperature, ignore)
    target = torch.arange(in_batch.shape[0], device=in_batch.device)
    return F.cross_entropy(logits.float(), target)


def hard_negative_cross_entropy(group: torch.Tensor, in_batch: Optional[torch.Tensor] = None,
                                ignore: Optional[torch.Tensor] = None, temperature: float = 1.0) -> torch.Tensor:
    """Cross-entropy of each query's positive against its hard negatives (and, optionally, in-batch negatives).

    For labelled data without teacher scores; the paper fine-tunes on hard tasks this way.

    Args:
        group: ``[n_queries, 1 + n_negatives]`` scores, positive first.
        in_batch: optional ``[n_queries, n_queries]`` scores against the other queries' positives; its
            off-diagonal entries join each row's softmax as extra negatives.
        ignore: optional mask of in-batch entries that are not negatives.
        temperature: logits are ``scores / temperature``.

    Returns:
        A scalar tensor: the mean over queries of ``-log p(positive)``.
    """
    _check_group(group, 'scores')
    logits = group / temperature
    if in_batch is not None:
        _check_square(in_batch, ignore)
        if in_batch.shape[0] != group.shape[0]:
            raise ValueError(f'in-batch scores cover {in_batch.shape[0]} queries but the group scores {group.shape[0]}')
        n = in_batch.shape[0]
        others = _masked_off_diagonal(in_batch / temperature, ignore)
        off_diagonal = ~torch.eye(n, dtype=torch.bool, device=in_batch.device)
        logits = torch.cat([logits, others[off_diagonal].view(n, n - 1)], dim=1)
    target = torch.zeros(group.shape[0], dtype=torch.long, device=group.device)
    return F.cross_entropy(logits.float(), target)


def distillation_loss(group: torch.Tensor, teacher: torch.Tensor, in_batch: torch.Tensor,
                      ignore: Optional[torch.Tensor] = None, temperature: float = 1.0) -> torch.Tensor:
    """The paper's training loss: Margin-MSE against the teacher plus in-batch cross-entropy, summed.

    Args:
        group: student scores ``[n_queries, 1 + n_negatives]``, positive first.
        teacher: teacher scores, same shape.
        in_batch: ``[n_queries, n_queries]`` student scores against every query's positive.
        ignore: optional mask of in-batch entries that are not negatives.
        temperature: student scores are divided by it in both terms, so a model with bounded scores (cosine)
            can match the teacher's margins.

    Returns:
        A scalar tensor.
    """
    return margin_mse(group / temperature, teacher) + in_batch_cross_entropy(in_batch, ignore, temperature)

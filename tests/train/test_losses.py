"""The training losses on hand-computed cases."""
import math

import pytest
import torch

from pyterrier_hypencoder.train import (
    distillation_loss,
    hard_negative_cross_entropy,
    in_batch_cross_entropy,
    margin_mse,
)


def test_margin_mse_hand_computed():
    student = torch.tensor([[3.0, 1.0, 0.0], [1.0, 1.0, 2.0]])
    teacher = torch.tensor([[2.0, 2.0, -1.0], [0.0, -1.0, 0.0]])
    # margins: student [2, 3], [0, -1]; teacher [0, 3], [1, 0] -> squared errors 4, 0, 1, 1
    assert margin_mse(student, teacher).item() == pytest.approx(6 / 4)


def test_margin_mse_ignores_score_offsets():
    student = torch.tensor([[5.0, 4.0, 2.0]])
    assert margin_mse(student, student - 100).item() == pytest.approx(0.0)


def test_in_batch_cross_entropy_hand_computed():
    scores = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    expected = (-math.log(math.exp(2) / (math.exp(2) + 1)) + math.log(2)) / 2
    assert in_batch_cross_entropy(scores).item() == pytest.approx(expected, rel=1e-6)
    assert in_batch_cross_entropy(scores * 2, temperature=2.0).item() == pytest.approx(expected, rel=1e-6)


def test_in_batch_cross_entropy_ignore_mask():
    scores = torch.tensor([[2.0, 5.0], [0.0, 1.0]])
    ignore = torch.tensor([[True, True], [False, False]])  # the diagonal is never ignored
    expected = (0.0 - math.log(math.e / (1 + math.e))) / 2
    assert in_batch_cross_entropy(scores, ignore).item() == pytest.approx(expected, rel=1e-6)


def test_hard_negative_cross_entropy_hand_computed():
    group = torch.tensor([[1.0, 0.0, 0.0]])
    assert hard_negative_cross_entropy(group).item() == pytest.approx(-math.log(math.e / (math.e + 2)), rel=1e-6)
    group = torch.tensor([[1.0, 0.0], [2.0, 2.0]])
    in_batch = torch.tensor([[1.0, 3.0], [0.5, 2.0]])
    # row 0 logits [1, 0, 3]; row 1 logits [2, 2, 0.5] (the diagonal of in_batch duplicates the positive: dropped)
    row0 = -math.log(math.e / (math.e + 1 + math.exp(3)))
    row1 = -math.log(math.exp(2) / (2 * math.exp(2) + math.exp(0.5)))
    assert hard_negative_cross_entropy(group, in_batch).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    ignore = torch.tensor([[False, True], [False, False]])
    row0 = -math.log(math.e / (math.e + 1))
    assert hard_negative_cross_entropy(group, in_batch, ignore).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_distillation_loss_is_the_sum():
    group = torch.tensor([[3.0, 1.0, 0.0], [1.0, 1.0, 2.0]])
    teacher = torch.tensor([[2.0, 2.0, -1.0], [0.0, -1.0, 0.0]])
    in_batch = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    expected = margin_mse(group, teacher) + in_batch_cross_entropy(in_batch)
    assert distillation_loss(group, teacher, in_batch).item() == pytest.approx(expected.item())


def test_losses_reject_bad_shapes():
    with pytest.raises(ValueError, match='at least one negative'):
        margin_mse(torch.zeros(2, 1), torch.zeros(2, 1))
    with pytest.raises(ValueError, match='must match'):
        margin_mse(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match='square'):
        in_batch_cross_entropy(torch.zeros(2, 3))

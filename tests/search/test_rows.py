"""Row helpers: placing vectors on a device, merging per-shard top-k lists in a total order."""
import numpy as np
import torch

from pyterrier_hypencoder.search import merge_topk, place_vectors


def test_place_vectors():
    x = np.zeros((10, 4), dtype=np.float16)
    assert place_vectors(x, 'cpu', torch.float32) is x  # a memory map is already as fast as a copy on the CPU
    if torch.cuda.is_available():
        placed = place_vectors(x, 'cuda', torch.float32)
        assert placed.device.type == 'cuda' and placed.dtype == torch.float32 and placed.shape == (10, 4)


def test_merge_topk_total_order():
    scores = [torch.tensor([[3.0, 1.0, 1.0]]), torch.tensor([[1.0, 1.0, float('-inf')]])]
    ids = [torch.tensor([[5, 2, 9]]), torch.tensor([[0, 7, -1]])]
    s, i = merge_topk(scores, ids, 5)
    assert i.tolist() == [[5, 0, 2, 7, 9]] and s.tolist() == [[3.0, 1.0, 1.0, 1.0, 1.0]]
    s, i = merge_topk(scores, ids, 10)  # padding last
    assert i.tolist() == [[5, 0, 2, 7, 9, -1]]
    neg = merge_topk([torch.tensor([[-0.5, -2.0, 0.25, -0.5]])], [torch.tensor([[3, 1, 4, 0]])], 4)
    assert neg[1].tolist() == [[4, 0, 3, 1]]

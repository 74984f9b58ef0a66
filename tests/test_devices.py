"""Device checks (``pyterrier_hypencoder.devices``): a device this machine lacks fails at construction."""
import pytest
import torch
from helpers import GRAPH

from pyterrier_hypencoder import Hypencoder, HypencoderReranker, HypencoderRetriever

pytestmark = pytest.mark.usefixtures('one_thread')


def test_unavailable_device_fails_at_construction(tiny_model, tiny_bert, words_index, monkeypatch):
    # None picks what there is; 'cpu' always works.
    assert HypencoderRetriever(tiny_model, words_index, device='cpu').search_device == torch.device('cpu')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    for make in (lambda: Hypencoder.from_backbone(str(tiny_bert), qnet_layers=2, device='cuda'),
                 lambda: HypencoderRetriever(tiny_model, words_index, device='cuda'),
                 lambda: HypencoderRetriever(tiny_model, words_index, device=torch.device('cuda:0'), **GRAPH),
                 lambda: HypencoderReranker(tiny_model, device='cuda')):
        with pytest.raises(ValueError, match="device 'cuda(:0)?' was requested but CUDA is not available.*device=\"cpu\""):
            make()
    with pytest.raises(ValueError, match="'gpu' is not a device"):
        HypencoderRetriever(tiny_model, words_index, device='gpu')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    with pytest.raises(ValueError, match="'cuda:3' was requested but this machine has 1 CUDA device"):
        HypencoderReranker(tiny_model, words_index, device='cuda:3')

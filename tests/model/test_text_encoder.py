"""The text encoder's token limits: none beyond the backbone's positions, none below one token."""
import pytest

from pyterrier_hypencoder import Hypencoder

pytestmark = pytest.mark.usefixtures('one_thread')


def test_max_length_beyond_the_backbone(tiny_bert, tiny_model):
    # The tiny BERT has 512 positions: more would fail deep inside the backbone with a shape error.
    with pytest.raises(ValueError, match='doc_max_length=1024 is more tokens than the backbone has positions'):
        Hypencoder.from_backbone(str(tiny_bert), qnet_layers=2, doc_max_length=1024, device='cpu')
    model = Hypencoder.from_backbone(str(tiny_bert), qnet_layers=2, device='cpu')
    model.query_max_length = 600
    with pytest.raises(ValueError, match='query_max_length=600.*at most 512'):
        model.encode_queries(['neural search'])
    model.doc_max_length = 0
    with pytest.raises(ValueError, match='doc_max_length must be >= 1'):
        model.encode_docs(['neural search'])

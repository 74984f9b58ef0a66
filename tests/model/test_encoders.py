"""The model's PyTerrier query and document encoders."""
import numpy as np
import pandas as pd
import pytest
import torch
from helpers import SHORT_TOPICS, short_docs

pytestmark = pytest.mark.usefixtures('one_thread')


def test_query_and_doc_encoders(tiny_model, short_index):
    frame = tiny_model.query_encoder()(SHORT_TOPICS)
    assert list(frame.columns) == ['qid', 'query', 'query_qnet'] and len(frame['query_qnet'][0]) == 1
    docs = pd.DataFrame(short_docs(60))
    encoded = tiny_model.doc_encoder()(docs)
    vectors = np.stack(encoded['doc_vec'])
    np.testing.assert_allclose(vectors, short_index.vectors(), atol=1e-5)
    scores = frame['query_qnet'][0].score(torch.from_numpy(vectors))[0]
    expected = tiny_model.encode_queries(['neural retrieval']).score(torch.from_numpy(vectors))[0]
    assert torch.allclose(scores, expected, atol=1e-5)
    assert len(tiny_model.doc_encoder()(docs.iloc[:0])) == 0

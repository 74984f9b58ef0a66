"""Ranking for evaluation and teachers: exhaustive retrieval with a trained model, a model as a scorer."""
import numpy as np
import pandas as pd
import pytest
from helpers import FRUITS, fruit_frame, fruit_hypencoder

from pyterrier_hypencoder.train import DotEncoder, exhaustive_retrieve

pytestmark = pytest.mark.usefixtures('one_thread')


def test_exhaustive_retrieve_hypencoder(tiny_bert):
    model = fruit_hypencoder(tiny_bert)
    texts = [f'a text about the {d} tree' for d in FRUITS]
    topics = pd.DataFrame({'qid': ['1', '2'], 'query': ['apple fruit', 'plum tree']})
    res = exhaustive_retrieve(model, topics, model.encode_docs(texts), FRUITS, num_results=3)
    assert list(res.columns) == ['qid', 'query', 'docno', 'score', 'rank'] and len(res) == 6
    expected = model.encode_queries(topics['query'].tolist()).score(model.encode_docs(texts))
    assert res['docno'].tolist()[:3] == [FRUITS[i] for i in expected[0].topk(3).indices.tolist()]
    assert res['rank'].tolist() == [0, 1, 2, 0, 1, 2]


def test_model_scorer_as_teacher(tiny_bert):
    from pyterrier_hypencoder.train import ModelScorer
    model = DotEncoder.from_backbone(str(tiny_bert), pooling='mean', device='cpu')
    frame = fruit_frame().head(12)
    scored = ModelScorer(model)(frame[['qid', 'query', 'docno', 'text']])
    q = model.encode_queries(scored['query'].tolist())
    d = model.encode_docs(scored['text'].tolist())
    assert np.allclose(scored['score'].to_numpy(), (q * d).sum(1).numpy(), atol=1e-5)
    assert set(scored.groupby('qid')['rank'].min()) == {0}
    hyp = ModelScorer(fruit_hypencoder(tiny_bert))(frame[['qid', 'query', 'docno', 'text']])
    qn = hyp.iloc[:3]
    expected = fruit_hypencoder(tiny_bert).encode_queries([qn['query'].iloc[0]]).score(
        fruit_hypencoder(tiny_bert).encode_docs(qn['text'].tolist()))[0]
    assert np.allclose(qn['score'].to_numpy(), expected.numpy(), atol=1e-4)

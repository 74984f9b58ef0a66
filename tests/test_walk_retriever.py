"""HypencoderRetriever's adaptive and surrogate modes on the small vaswani index of test_transformers."""
import numpy as np
import pytest
from test_transformers import N_QUERIES, brute, index, plain_index, vaswani  # noqa: F401 -- fixtures

from pyterrier_hypencoder import HypencoderRetriever


def test_adaptive_mode(tiny_model, index, vaswani, brute):  # noqa: F811
    _, topics, _ = vaswani
    retriever = HypencoderRetriever(tiny_model, index, num_results=10, mode='adaptive', n_sample=20, n_entry=10,
                                    scored_column='n_scored')
    res = retriever(topics)
    assert len(res) == 10 * N_QUERIES and res['rank'].tolist() == list(range(10)) * N_QUERIES
    assert list(res.columns) == ['qid', 'query', 'docno', 'score', 'rank', 'n_scored']
    for i, (_, group) in enumerate(res.groupby('qid', sort=False)):
        np.testing.assert_allclose(group.score.to_numpy(), brute[i][index.rows(group.docno.tolist())], rtol=1e-5,
                                   atol=1e-6)
        scored = group.n_scored.unique()
        assert len(scored) == 1 and 30 <= scored[0] < len(index)  # sample + at least one round, not the corpus
    assert res.docno.tolist() == retriever(topics).docno.tolist()  # deterministic
    assert 'adaptive' in repr(retriever) and retriever.fuse_rank_cutoff(5) is None
    # The walk on the index's graph; a sample covering the corpus is exhaustive.
    walk = HypencoderRetriever(tiny_model, index, num_results=10, mode='adaptive', expand=4, ef=20)(topics)
    assert len(walk) == 10 * N_QUERIES
    exact = HypencoderRetriever(tiny_model, index, num_results=10)(topics)
    full = HypencoderRetriever(tiny_model, index, num_results=10, mode='adaptive', n_sample=10 ** 6)(topics)
    assert full.docno.tolist() == exact.docno.tolist()


def test_surrogate_mode_and_scored_column(tiny_model, index, vaswani):  # noqa: F811
    _, topics, _ = vaswani
    res = HypencoderRetriever(tiny_model, index, num_results=10, mode='surrogate', n_sample=20, n_entry=15,
                              scored_column='cost')(topics)
    assert (res.cost == 35).all() and len(res) == 10 * N_QUERIES
    exh = HypencoderRetriever(tiny_model, index, num_results=5, scored_column='cost')(topics)
    assert (exh.cost == len(index)).all()
    fused = HypencoderRetriever(tiny_model, index, num_results=10, mode='surrogate').fuse_rank_cutoff(5)
    assert fused is not None and fused.num_results == 5


def test_adaptive_mode_needs_no_graph_unless_it_walks(tiny_model, plain_index, vaswani):  # noqa: F811
    _, topics, _ = vaswani
    assert len(HypencoderRetriever(tiny_model, plain_index, num_results=5, mode='adaptive')(topics)) == 5 * N_QUERIES
    with pytest.raises(ValueError, match='no neighbour graph'):
        HypencoderRetriever(tiny_model, plain_index, mode='adaptive', expand=4)


@pytest.mark.parametrize('kwargs, match', [
    (dict(n_sample=1), 'n_sample'), (dict(n_entry=-1), 'n_entry'), (dict(max_rounds=-1), 'max_rounds'),
    (dict(expand=-2), 'expand'), (dict(ef=0), 'ef'), (dict(max_scored=0), 'max_scored'),
    (dict(scored_column=''), 'scored_column'), (dict(scored_column=3), 'scored_column'), (dict(mode='walk'), 'mode'),
])
def test_adaptive_parameter_errors(tiny_model, index, kwargs, match):  # noqa: F811
    with pytest.raises(ValueError, match=match):
        HypencoderRetriever(tiny_model, index, **(dict(mode='adaptive') | kwargs))

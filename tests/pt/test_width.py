"""Width as a search option: a Matryoshka model's q-nets cut to a narrower width in every mode, on single and
sharded indexes, and the cascade (search narrow, re-score the best at full width)."""
import numpy as np
import pandas as pd
import pytest
import torch
from helpers import make_docs, make_topics

from pyterrier_hypencoder import HypencoderIndexer, HypencoderReranker, HypencoderRetriever, split_index

K = 10


@pytest.fixture(scope='module')
def nested_index(tiny_nested_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp('width')
    index = HypencoderIndexer(tiny_nested_model, folder / 'single', neighbours=6, ip_index='hnsw8',
                              verbose=False).index(make_docs(300))
    return index, split_index(index, folder / 'sharded', sizes=[100, 200])


def narrow_scores(model, index, width, topics):
    """Every document's score under the q-nets cut to ``width`` ([queries, docs], float64)."""
    qnets = model.encode_queries(topics['query'].tolist()).truncate(width).to(dtype=torch.float64)
    return qnets.score(torch.from_numpy(np.asarray(index.vectors(), dtype=np.float64))).numpy()


def test_width_cuts_the_q_nets_in_exhaustive_search(tiny_nested_model, nested_index):
    index, _ = nested_index
    topics = make_topics()
    got = HypencoderRetriever(tiny_nested_model, index, num_results=K, width=8)(topics)
    assert 'width=8' in repr(HypencoderRetriever(tiny_nested_model, index, width=8))
    want = narrow_scores(tiny_nested_model, index, 8, topics)
    rows = index.find_rows(got['docno'].tolist())
    for i, qid in enumerate(topics['qid']):
        mine = got['qid'] == qid
        assert np.allclose(got.loc[mine, 'score'], want[i, rows[mine.to_numpy()]], rtol=1e-4, atol=1e-4)
        assert got.loc[mine, 'score'].min() >= np.sort(want[i])[-K] - 1e-4  # the narrow top k
    full = HypencoderRetriever(tiny_nested_model, index, num_results=K)(topics)
    assert not np.allclose(full['score'], got['score'])  # the width changed the scores


@pytest.mark.parametrize('mode', ['graph', 'adaptive', 'surrogate'])
def test_width_in_approximate_modes_and_local_shards(tiny_nested_model, nested_index, mode):
    index, sharded = nested_index
    topics = make_topics()
    options = {'mode': mode, 'num_results': K, 'width': 16, 'n_initial': 300} if mode == 'graph' else \
        {'mode': mode, 'num_results': K, 'width': 16, 'n_sample': 300}
    exact = HypencoderRetriever(tiny_nested_model, index, num_results=K, width=16)(topics)
    # samples as large as the corpus: each approximate mode then finds the narrow exhaustive top k
    for where in (index, sharded):
        got = HypencoderRetriever(tiny_nested_model, where, **options)(topics)
        assert got['docno'].tolist() == exact['docno'].tolist(), (mode, where)


def test_reranker_width(tiny_nested_model, nested_index):
    index, sharded = nested_index
    topics = make_topics(2)
    run = HypencoderRetriever(tiny_nested_model, index, num_results=K, width=8)(topics)
    for where in (index, sharded):
        again = HypencoderReranker(tiny_nested_model, where, width=8)(run)
        assert np.allclose(again['score'], run['score'], rtol=1e-4, atol=1e-4)
    assert 'width=8' in repr(HypencoderReranker(tiny_nested_model, index, width=8))


def test_cascade_retriever_ranks_by_full_width_scores(tiny_nested_model, nested_index):
    index, sharded = nested_index
    topics = make_topics()
    full = HypencoderRetriever(tiny_nested_model, index, num_results=K)(topics)
    for where in (index, sharded):
        # everything a candidate: the full-width exhaustive top k exactly
        everything = HypencoderRetriever(tiny_nested_model, where, num_results=K, mode='adaptive', n_sample=300,
                                         cascade_width=8, rescore=300, scored_column='n')(topics)
        assert everything['docno'].tolist() == full['docno'].tolist()
        assert np.allclose(everything['score'], full['score'], rtol=1e-4, atol=1e-4)
    cheap = HypencoderRetriever(tiny_nested_model, index, num_results=K, mode='adaptive', cascade_width=8, rescore=20,
                                scored_column='n')
    assert 'cascade_width=8, rescore=20' in repr(cheap)
    got = cheap(topics)
    pd.testing.assert_series_equal(got.groupby('qid')['score'].apply(lambda s: s.is_monotonic_decreasing),
                                   pd.Series(True, index=got.groupby('qid')['score'].first().index, name='score'))


def test_widths_the_model_cannot_take_are_named(tiny_model, tiny_nested_model, nested_index):
    index, _ = nested_index
    with pytest.raises(ValueError, match=r'\[8, 16, 32\]'):
        HypencoderRetriever(tiny_nested_model, index, width=12)
    with pytest.raises(ValueError, match='not trained nested'):
        HypencoderReranker(tiny_model, index, width=16)
    with pytest.raises(ValueError, match='narrower than the q-nets searched'):
        HypencoderRetriever(tiny_nested_model, index, mode='adaptive', width=16, cascade_width=16)
    with pytest.raises(ValueError, match=r'\[8, 16\]'):
        HypencoderRetriever(tiny_nested_model, index, mode='adaptive', width=16, cascade_width=32)
    with pytest.raises(ValueError, match='give cascade_width too'):
        HypencoderRetriever(tiny_nested_model, index, mode='adaptive', rescore=50)


def test_the_index_hands_out_narrow_transformers(tiny_nested_model, nested_index):
    index, sharded = nested_index
    assert index.retriever(tiny_nested_model, width=8).width == 8
    assert sharded.reranker(tiny_nested_model, width=16).width == 16


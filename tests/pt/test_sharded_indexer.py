"""ShardedHypencoderIndexer in-process: the same shards as splitting one index, and bad input."""
import numpy as np
import pytest
from helpers import N_SHARDED_DOCS, make_docs

from pyterrier_hypencoder import ShardedHypencoderIndex, ShardedHypencoderIndexer


def test_sharded_indexer_local_equals_split(tiny_model, untied_index, tmp_path):
    docs = make_docs(N_SHARDED_DOCS, seed=2)
    index = ShardedHypencoderIndexer(tiny_model, tmp_path / 'built', shard_size=24, neighbours=6,
                                     verbose=False).index(iter(docs))
    assert isinstance(index, ShardedHypencoderIndex) and [s['count'] for s in index.meta['shards']] == [24, 24]
    assert list(index.docnos.fwd[[0, 23, 24, 47]]) == ['d0', 'd23', 'd24', 'd47']
    assert index.shard(1).graph_k == 6
    # the same encoder (batched differently, so padded differently): the single index's vectors, to fp32 rounding
    np.testing.assert_allclose(np.asarray(index.shard(1).vectors()), np.asarray(untied_index.vectors()[24:]), rtol=0,
                               atol=1e-5)
    small = ShardedHypencoderIndexer(tiny_model, tmp_path / 'small', shard_size=4, neighbours=0,
                                     verbose=False).index(docs[:9])
    assert [s['count'] for s in small.meta['shards']] == [4, 5]  # a last shard of one document joins the one before
    with pytest.raises(ValueError, match='duplicate docno .*shards 0 and 1'):
        ShardedHypencoderIndexer(tiny_model, tmp_path / 'dup', shard_size=4, neighbours=0,
                                 verbose=False).index(docs[:6] + docs[:2])
    with pytest.raises(ValueError, match='empty'):
        ShardedHypencoderIndexer(tiny_model, tmp_path / 'empty', shard_size=4, verbose=False).index([])
    with pytest.raises(TypeError, match='unknown argument'):
        ShardedHypencoderIndexer(tiny_model, tmp_path / 'e', shard_size=4, neighbors=3)
    assert not (tmp_path / 'dup').exists() and not (tmp_path / 'empty').exists()
    assert not list(tmp_path.glob('.*building*'))

"""Sharded index files: split_index's layout and manifest, shard sizes, bad input, damaged shards named."""
import json
import shutil

import numpy as np
import pyterrier as pt
import pytest
from helpers import CLUSTERED_SIZES, N_SHARDED_DOCS

from pyterrier_hypencoder import HypencoderReranker, HypencoderRetriever, ShardedHypencoderIndex, split_index
from pyterrier_hypencoder.index import HypencoderIndexError
from pyterrier_hypencoder.index.sharded import shard_sizes


def test_layout_manifest_and_artifact_loading(shard_splits, tied_index):
    index = shard_splits[('aligned', 3)]
    assert isinstance(index, ShardedHypencoderIndex) and len(index) == N_SHARDED_DOCS and index.n_shards == 3
    meta = json.loads((index.path / 'pt_meta.json').read_text())
    assert (meta['type'], meta['format'], meta['dtype'], meta['vec_size']) == ('sharded_index', 'hypencoder', 'float32',
                                                                               tied_index.dim)
    assert [(s['offset'], s['count']) for s in meta['shards']] == [(0, 16), (16, 24), (40, 8)]
    assert meta['model'] == tied_index.meta['model']
    loaded = pt.Artifact.load(str(index.path))
    assert isinstance(loaded, ShardedHypencoderIndex) and '3 shards [16, 24, 8]' in repr(loaded)
    # shards are ordinary indexes over their rows, with the source's vectors and docnos, and their own graph
    shard = pt.Artifact.load(str(index.shard_path(1)))
    np.testing.assert_array_equal(np.asarray(shard.vectors()), np.asarray(tied_index.vectors()[16:40]))
    assert list(shard.docnos.fwd[[0, 23]]) == ['d16', 'd39']
    edges = shard.graph_edges()
    assert edges.shape == (24, 6) and edges.max() < 24
    assert not list(index.path.parent.glob('.*building*'))


def test_split_index_builds_each_shard_its_ann_index(clustered_shards):
    single, sharded, exact_shards = clustered_shards
    for i, size in enumerate(CLUSTERED_SIZES):
        entry = sharded.shard(i).meta['ip_index']
        assert entry['m'] == single.meta['ip_index']['m'] and sharded.shard(i).ip_index().n == size
        assert exact_shards.shard(i).meta['ip_index'] is None


def test_shard_sizes_align_and_bad_input():
    assert shard_sizes(45741, n_shards=2) == [24576, 21165]
    assert shard_sizes(10, shard_size=3, align=1) == [3, 3, 4]  # a last shard of 1 joins the one before
    with pytest.raises(ValueError, match='exactly one of'):
        shard_sizes(10)
    with pytest.raises(ValueError, match='smaller align'):
        shard_sizes(20, n_shards=3)


def test_split_bad_input(tied_index, shard_splits, tmp_path):
    with pytest.raises(ValueError, match='add up to the index size'):
        split_index(tied_index, tmp_path / 'x', sizes=[10, 10])
    with pytest.raises(TypeError, match='already sharded'):
        split_index(shard_splits[('aligned', 2)], tmp_path / 'y', n_shards=2)
    with pytest.raises(FileExistsError, match='overwrite=True'):
        split_index(tied_index, shard_splits[('aligned', 2)].path, sizes=[24, 24])
    assert not (tmp_path / 'x').exists()


def damaged_copy(index, tmp_path, how):
    copy = tmp_path / 'copy'
    shutil.copytree(index.path, copy)
    if how == 'missing':
        shutil.rmtree(copy / 'shard-001')
    elif how == 'truncated':
        with open(copy / 'shard-002' / 'vecs.f4', 'r+b') as f:
            f.truncate(100)
    elif how == 'replaced':
        shutil.rmtree(copy / 'shard-001')
        shutil.copytree(index.path / 'shard-002', copy / 'shard-001')
    elif how == 'manifest':
        (copy / 'pt_meta.json').write_text('{"type": "sharded_index", "format": "hypencoder", "shards": [')
    return copy


@pytest.mark.parametrize('how,match', [('missing', 'shard 1 .*shard-001: the folder does not exist'),
                                       ('truncated', 'shard 2 .*truncated'),
                                       ('replaced', 'shard 1 .*manifest says 24'), ('manifest', 'corrupt')])
def test_damaged_shard_fails_when_the_transformer_is_built(tiny_model, shard_splits, tmp_path, how, match):
    copy = damaged_copy(shard_splits[('aligned', 3)], tmp_path, how)
    with pytest.raises(HypencoderIndexError, match=match):
        HypencoderRetriever(tiny_model, copy)
    with pytest.raises(HypencoderIndexError, match=match):
        HypencoderReranker(tiny_model, str(copy))

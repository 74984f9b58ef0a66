"""Sharded index, in-process backend: layout, identical results to one index, the reranker's routing, bad input.

Scores of a document are bit-identical between the sharded and the unsharded index when every shard offset is a
multiple of the scoring block (both sides then score it in the same GEMM; see pyterrier_hypencoder.sharded);
otherwise they agree within fp32 rounding of the q-net, ``BOUND_ULPS`` relative to the query's largest |score|
(checked against float64, not tuned on a machine: a worst-case dot product of width w in fp32 is off by at most
w * 2**-24 of its terms' magnitude, summed over the q-net's layers).
"""
import json
import shutil

import numpy as np
import pandas as pd
import pyterrier as pt
import pytest
import torch

from pyterrier_hypencoder import (
    HypencoderIndexer,
    HypencoderReranker,
    HypencoderRetriever,
    ShardedHypencoderIndex,
    ShardedHypencoderIndexer,
    split_index,
)
from pyterrier_hypencoder.index import HypencoderIndexError
from pyterrier_hypencoder.index.sharded import shard_sizes
from pyterrier_hypencoder.search import exhaustive_search, merge_topk

WORDS = ('retrieval neural network query document vector graph search index model training score rank '
         'hyper head layer attention token embedding dense sparse corpus').split()
N_DOCS = 48
BLOCK = 8  # scoring block of the aligned cases: shard offsets below are multiples of it
ALIGNED = {1: [48], 2: [40, 8], 3: [16, 24, 8]}  # uneven; the 8-document shards are smaller than K
UNALIGNED = {2: [7, 41], 3: [7, 2, 39]}
K = 10


def make_docs(n, seed=0):
    rng = np.random.default_rng(seed)
    return [{'docno': f'd{i}', 'text': ' '.join(rng.choice(WORDS, size=rng.integers(3, 12)))} for i in range(n)]


def topics(n=5):
    rng = np.random.default_rng(1)
    return pd.DataFrame({'qid': [f'q{i}' for i in range(n)],
                         'query': [' '.join(rng.choice(WORDS, size=3)) for _ in range(n)]})


def bound(tiny_model, scores):
    """The fp32 bound on a q-net score's rounding error, per query: sum of layer widths * 2**-24 * max |score|."""
    dims = tiny_model.spec.vector_dimensions
    return sum(dims[:-1]) * 2.0 ** -24 * np.abs(scores).max(axis=1, keepdims=True)


@pytest.fixture(scope='module')
def base(tiny_model, tmp_path_factory):
    """A single index of 48 documents in which rows 0, 4, 8, ... share one vector and 2, 10, 18, ... another."""
    path = tmp_path_factory.mktemp('sharded') / 'single'
    index = HypencoderIndexer(tiny_model, path, neighbours=6, verbose=False).index(make_docs(N_DOCS))
    vecs = np.memmap(path / 'vecs.f4', mode='r+', dtype=np.float32, shape=(N_DOCS, tiny_model.dim))
    vecs[0::4] = vecs[1]
    vecs[2::8] = vecs[3]
    vecs.flush()
    del vecs
    return index


@pytest.fixture(scope='module')
def plain(tiny_model, tmp_path_factory):
    """A single index without duplicate vectors (for the unaligned cases, whose order is checked for near-ties)."""
    path = tmp_path_factory.mktemp('sharded') / 'plain'
    return HypencoderIndexer(tiny_model, path, neighbours=6, verbose=False).index(make_docs(N_DOCS, seed=2))


@pytest.fixture(scope='module')
def splits(base, plain, tmp_path_factory):
    folder = tmp_path_factory.mktemp('splits')
    out = {('aligned', n): split_index(base, folder / f'a{n}', sizes=sizes) for n, sizes in ALIGNED.items()}
    with pytest.warns(UserWarning, match='only 2 documents: the graph keeps 1'):  # the 2-document shard
        out.update({('unaligned', n): split_index(plain, folder / f'u{n}', sizes=sizes)
                    for n, sizes in UNALIGNED.items()})
    return out


def float64_scores(tiny_model, index, queries):
    qnets = tiny_model.encode_queries(queries).to(dtype=torch.float64)
    return qnets.score(torch.from_numpy(np.array(index.vectors())).double()).numpy()


def test_layout_manifest_and_artifact_loading(splits, base):
    index = splits[('aligned', 3)]
    assert isinstance(index, ShardedHypencoderIndex) and len(index) == N_DOCS and index.n_shards == 3
    meta = json.loads((index.path / 'pt_meta.json').read_text())
    assert (meta['type'], meta['format'], meta['dtype'], meta['vec_size']) == ('sharded_index', 'hypencoder', 'float32',
                                                                               base.dim)
    assert [(s['offset'], s['count']) for s in meta['shards']] == [(0, 16), (16, 24), (40, 8)]
    assert meta['model'] == base.meta['model']
    loaded = pt.Artifact.load(str(index.path))
    assert isinstance(loaded, ShardedHypencoderIndex) and '3 shards [16, 24, 8]' in repr(loaded)
    # shards are ordinary indexes over their rows, with the source's vectors and docnos, and their own graph
    shard = pt.Artifact.load(str(index.shard_path(1)))
    np.testing.assert_array_equal(np.asarray(shard.vectors()), np.asarray(base.vectors()[16:40]))
    assert list(shard.docnos.fwd[[0, 23]]) == ['d16', 'd39']
    edges = shard.graph_edges()
    assert edges.shape == (24, 6) and edges.max() < 24
    assert not list(index.path.parent.glob('.*building*'))


@pytest.mark.parametrize('n_shards', [1, 2, 3])
def test_aligned_shards_are_bit_identical_with_ties_in_row_order(tiny_model, base, splits, n_shards):
    queries = topics()
    for k in (K, N_DOCS):  # K: shards smaller than k; N_DOCS: every tie group in full
        one = HypencoderRetriever(tiny_model, base, num_results=k, score_block=BLOCK)(queries)
        many = HypencoderRetriever(tiny_model, splits[('aligned', n_shards)], num_results=k, score_block=BLOCK)(queries)
        pd.testing.assert_frame_equal(one, many)  # docnos, order, ranks and scores, bit for bit
    # ties (rows sharing a vector) come out by row, ascending, under both
    for _, group in many.groupby('qid'):
        rows = group['docno'].str[1:].astype(int).to_numpy()
        scores = group['score'].to_numpy()
        same = scores[1:] == scores[:-1]
        assert same.sum() >= 10 and (rows[1:][same] > rows[:-1][same]).all()


@pytest.mark.parametrize('n_shards', [2, 3])
def test_unaligned_shards_same_ranking_scores_within_fp32_bound(tiny_model, plain, splits, n_shards):
    queries = topics()
    one = HypencoderRetriever(tiny_model, plain, num_results=K)(queries)
    many = HypencoderRetriever(tiny_model, splits[('unaligned', n_shards)], num_results=K)(queries)
    exact = float64_scores(tiny_model, plain, queries['query'].tolist())
    tol = bound(tiny_model, exact)
    assert many['qid'].tolist() == one['qid'].tolist()
    rows = {name: frame['docno'].str[1:].astype(int).to_numpy().reshape(len(queries), K)
            for name, frame in (('one', one), ('many', many))}
    for name, frame in (('one', one), ('many', many)):
        ref = np.take_along_axis(exact, rows[name], axis=1)
        assert (np.abs(frame['score'].to_numpy().reshape(len(queries), K) - ref) <= tol).all(), name
    # Same docnos in the same order, except where two documents' exact scores are within the rounding bound of
    # each other (either order is then correct): there the exact scores at that rank must agree within it.
    differ = rows['one'] != rows['many']
    near = np.abs(np.take_along_axis(exact, rows['one'], axis=1) - np.take_along_axis(exact, rows['many'], axis=1))
    assert (near[differ] <= 2 * np.broadcast_to(tol, near.shape)[differ]).all()


def test_graph_mode_per_shard_walks(tiny_model, splits):
    index = splits[('aligned', 3)]
    queries = topics()
    walk = dict(mode='graph', n_initial=12, n_candidates=4, max_iter=4, num_results=K)
    res = HypencoderRetriever(tiny_model, index, **walk)(queries)
    again = HypencoderRetriever(tiny_model, index, **walk)(queries)
    pd.testing.assert_frame_equal(res, again)  # deterministic given the seed
    exact = HypencoderRetriever(tiny_model, index, num_results=N_DOCS)(queries)
    pairs = dict(zip(zip(exact.qid, exact.docno), exact.score))
    # every returned document carries its true score, and the walk's ranking is a ranking
    assert all(abs(pairs[(q, d)] - s) <= 1e-5 * (1 + abs(s)) for q, d, s in zip(res.qid, res.docno, res.score))
    assert (res.groupby('qid')['score'].apply(lambda s: (np.diff(s.to_numpy()) <= 0).all())).all()


def test_reranker_routes_docnos_to_shards(tiny_model, base, splits):
    queries = topics(3)
    res = HypencoderRetriever(tiny_model, base, num_results=20, score_block=BLOCK)(queries)
    res = res.sample(frac=1.0, random_state=0).reset_index(drop=True)  # docnos of every shard, in any order
    one = HypencoderReranker(tiny_model, base)(res)
    many = HypencoderReranker(tiny_model, splits[('aligned', 3)])(res)
    pd.testing.assert_frame_equal(one, many)
    assert 'shards=3' in repr(HypencoderReranker(tiny_model, splits[('aligned', 3)]))
    with pytest.raises(KeyError, match='nope'):
        HypencoderReranker(tiny_model, splits[('aligned', 3)])(res.head(1).assign(docno='nope'))


def test_merge_topk_total_order():
    scores = [torch.tensor([[3.0, 1.0, 1.0]]), torch.tensor([[1.0, 1.0, float('-inf')]])]
    ids = [torch.tensor([[5, 2, 9]]), torch.tensor([[0, 7, -1]])]
    s, i = merge_topk(scores, ids, 5)
    assert i.tolist() == [[5, 0, 2, 7, 9]] and s.tolist() == [[3.0, 1.0, 1.0, 1.0, 1.0]]
    s, i = merge_topk(scores, ids, 10)  # padding last
    assert i.tolist() == [[5, 0, 2, 7, 9, -1]]
    neg = merge_topk([torch.tensor([[-0.5, -2.0, 0.25, -0.5]])], [torch.tensor([[3, 1, 4, 0]])], 4)
    assert neg[1].tolist() == [[4, 0, 3, 1]]


def test_exhaustive_ties_deterministic_on_one_machine(tiny_model, base):
    qnets = tiny_model.encode_queries(['dense vector'])
    vecs = np.asarray(base.vectors())
    _, ids = exhaustive_search(qnets, vecs, N_DOCS, chunk_size=8, block=4)
    _, ids2 = exhaustive_search(qnets, vecs, N_DOCS, block=4)
    assert ids.tolist() == ids2.tolist()
    tied = [r for r in ids[0].tolist() if r % 4 == 0]
    assert tied == sorted(tied)


def test_shard_sizes_align_and_bad_input():
    assert shard_sizes(45741, n_shards=2) == [24576, 21165]
    assert shard_sizes(10, shard_size=3, align=1) == [3, 3, 4]  # a last shard of 1 joins the one before
    with pytest.raises(ValueError, match='exactly one of'):
        shard_sizes(10)
    with pytest.raises(ValueError, match='smaller align'):
        shard_sizes(20, n_shards=3)


def test_split_bad_input(base, splits, tmp_path):
    with pytest.raises(ValueError, match='add up to the index size'):
        split_index(base, tmp_path / 'x', sizes=[10, 10])
    with pytest.raises(TypeError, match='already sharded'):
        split_index(splits[('aligned', 2)], tmp_path / 'y', n_shards=2)
    with pytest.raises(FileExistsError, match='overwrite=True'):
        split_index(base, splits[('aligned', 2)].path, sizes=[24, 24])
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
def test_damaged_shard_fails_when_the_transformer_is_built(tiny_model, splits, tmp_path, how, match):
    copy = damaged_copy(splits[('aligned', 3)], tmp_path, how)
    with pytest.raises(HypencoderIndexError, match=match):
        HypencoderRetriever(tiny_model, copy)
    with pytest.raises(HypencoderIndexError, match=match):
        HypencoderReranker(tiny_model, str(copy))


def test_backend_bad_input(tiny_model, base, splits):
    with pytest.raises(HypencoderIndexError, match='single index; split it'):
        HypencoderRetriever(tiny_model, base, backend='ray')
    with pytest.raises(ValueError, match="backend must be 'local', 'ray'"):
        HypencoderRetriever(tiny_model, splits[('aligned', 2)], backend=3)
    with pytest.raises(ValueError, match='need backend="ray"'):
        HypencoderRetriever(tiny_model, splits[('aligned', 2)], ray_options={'num_cpus': 1})
    with pytest.raises(ValueError, match='score_block must be an integer'):
        HypencoderRetriever(tiny_model, splits[('aligned', 2)], score_block=0)
    with pytest.raises(ValueError, match='no index'):
        HypencoderReranker(tiny_model, backend='ray')
    empty = HypencoderRetriever(tiny_model, splits[('aligned', 2)])(pd.DataFrame({'qid': [], 'query': []}))
    assert list(empty.columns[-3:]) == ['docno', 'score', 'rank'] and empty['rank'].dtype == 'int64'


def test_sharded_indexer_local_equals_split(tiny_model, plain, tmp_path):
    docs = make_docs(N_DOCS, seed=2)
    index = ShardedHypencoderIndexer(tiny_model, tmp_path / 'built', shard_size=24, neighbours=6,
                                     verbose=False).index(iter(docs))
    assert isinstance(index, ShardedHypencoderIndex) and [s['count'] for s in index.meta['shards']] == [24, 24]
    assert list(index.docnos.fwd[[0, 23, 24, 47]]) == ['d0', 'd23', 'd24', 'd47']
    assert index.shard(1).graph_k == 6
    # the same encoder (batched differently, so padded differently): the single index's vectors, to fp32 rounding
    np.testing.assert_allclose(np.asarray(index.shard(1).vectors()), np.asarray(plain.vectors()[24:]), rtol=0,
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


def test_package_imports_without_ray():
    import subprocess
    import sys
    code = ('import sys; import pyterrier_hypencoder; from pyterrier_hypencoder import distributed, index, pt, search; '
            'from pyterrier_hypencoder.distributed import backends, shards; '
            'from pyterrier_hypencoder.pt import artifacts, reranker, retriever, sharded_indexer; '
            'assert "ray" not in sys.modules, "ray was imported"')
    subprocess.run([sys.executable, '-c', code], check=True)


def test_sharded_index_rebuilt_in_place_is_reloaded(tiny_model, base, tmp_path):
    path = tmp_path / 'resplit'
    split_index(base, path, sizes=[24, 24])
    retriever = HypencoderRetriever(tiny_model, path, num_results=K, score_block=BLOCK)
    before = retriever(topics(2))
    split_index(base, path, sizes=[8, 40], overwrite=True)  # new shard folders under the same path
    after = retriever(topics(2))
    pd.testing.assert_frame_equal(before, after)
    assert retriever.index.n_shards == 2 and [s['count'] for s in retriever.index.meta['shards']] == [8, 40]

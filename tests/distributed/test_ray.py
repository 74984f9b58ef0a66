"""Sharded index on Ray: the same results as in-process, actor faults, building on Ray.

One local cluster (``ray.init(num_cpus=2)``) serves the whole module and is shut down after it. Actors reserve
half a CPU each, so the three actors of a 3-shard retriever fit, and each test closes its actors. Faults are
injected through ``ray_backend.CRASH_ENV``: an actor exits hard at the start of a search while a marker file
names its shard, i.e. in the middle of a batch that the other shards are answering.
"""
import numpy as np
import pytest

ray = pytest.importorskip('ray', reason="Ray is not installed (pip install 'pyterrier-hypencoder[ray]')")

from helpers import BLOCK, make_docs, make_topics  # noqa: E402

from pyterrier_hypencoder import (  # noqa: E402
    HypencoderIndex,
    HypencoderIndexer,
    HypencoderReranker,
    HypencoderRetriever,
    ShardedHypencoderIndexer,
    split_index,
)
from pyterrier_hypencoder.distributed.ray_backend import CRASH_ENV, ShardSearchError  # noqa: E402
from pyterrier_hypencoder.index import HypencoderIndexError  # noqa: E402

OPTIONS = {'num_cpus': 0.5, 'start_timeout': 120}


@pytest.fixture(scope='session')
def cluster(tmp_path_factory):
    crash_dir = tmp_path_factory.mktemp('ray_crash')
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={'env_vars': {CRASH_ENV: str(crash_dir)}})
    yield crash_dir
    ray.shutdown()


@pytest.fixture(scope='module')
def indexes(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp('ray_sharded')
    single = HypencoderIndexer(tiny_model, folder / 'single', neighbours=6, verbose=False).index(make_docs(48))
    vecs = np.memmap(single.path / 'vecs.f4', mode='r+', dtype=np.float32, shape=(48, tiny_model.dim))
    vecs[0::4] = vecs[1]  # ties across shards
    vecs.flush()
    del vecs
    return single, split_index(single, folder / 'sharded', sizes=[16, 24, 8])


@pytest.fixture(scope='module')
def reference(tiny_model, indexes):
    return HypencoderRetriever(tiny_model, indexes[0], num_results=10, score_block=BLOCK)(make_topics())


@pytest.fixture
def on_ray(tiny_model, indexes, cluster):
    made = []

    def make(cls=HypencoderRetriever, options=None, **kwargs):
        transformer = cls(tiny_model, indexes[1], backend='ray', ray_options=dict(OPTIONS, **(options or {})), **kwargs)
        made.append(transformer)
        return transformer
    yield make
    for transformer in made:
        transformer.close()


def same_results(res, ref):
    """Same docnos in the same order; scores within the fp32 bound (actors may run BLAS on fewer threads)."""
    assert res['docno'].tolist() == ref['docno'].tolist() and res['qid'].tolist() == ref['qid'].tolist()
    scale = np.abs(ref['score'].to_numpy()).max()
    assert np.abs(res['score'].to_numpy() - ref['score'].to_numpy()).max() <= 96 * 2.0 ** -24 * scale


def test_ray_equals_one_machine_survives_a_killed_actor_and_names_a_shard_that_cannot(on_ray, reference, cluster):
    # One retriever for all three cases: each actor start costs seconds on a busy machine.
    retriever = on_ray(options={'max_restarts': 1, 'max_task_retries': 1}, num_results=10, score_block=BLOCK)
    assert 'backend=ray, shards=3' in repr(retriever)
    same_results(retriever(make_topics()), reference)
    # shard 1's actor dies in the middle of the next batch: Ray restarts it and retries its part of the batch
    marker = cluster / 'shard-1'
    marker.write_text('once')
    same_results(retriever(make_topics()), reference)
    assert not marker.exists()  # it did die (the marker is removed just before the exit)
    # shard 2's actor dies at every attempt: once its restart and retry are spent, the batch fails, naming it
    marker = cluster / 'shard-2'
    marker.write_text('always')
    try:
        with pytest.raises(ShardSearchError, match=r'shard 2 \(.*shard-002\) could not search on Ray after 1 actor'):
            retriever(make_topics())
    finally:
        marker.unlink()
    with pytest.raises(ShardSearchError, match='shard 2'):  # its actor stays dead: no partial results later either
        retriever(make_topics())
    retriever.close()
    with pytest.raises(ShardSearchError, match='closed'):
        retriever(make_topics())


def test_graph_mode_and_reranker_on_ray(tiny_model, indexes, on_ray, monkeypatch):
    import torch
    walk = dict(mode='graph', n_initial=12, n_candidates=4, max_iter=4, num_results=10)
    # On the actors' one thread: the tied documents' scores are then rounded alike on both sides, so the walks break
    # the ties alike (on two threads a last-bit difference can send a walk down another path).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = HypencoderRetriever(tiny_model, indexes[1], **walk)(make_topics(3))
    finally:
        torch.set_num_threads(threads)
    retriever = on_ray(**walk)
    same_results(retriever(make_topics(3)), local)
    retriever.close()  # frees its CPUs for the reranker's actors
    res = HypencoderRetriever(tiny_model, indexes[0], num_results=20)(make_topics(3)).sample(frac=1.0, random_state=0)
    ref = HypencoderReranker(tiny_model, indexes[0])(res)
    # The reranker scores on the actors that hold the documents: no vector comes to the driver.
    from pyterrier_hypencoder.distributed.ray_backend import RayShards

    def no_vectors(self, rows):
        raise AssertionError('the Ray reranker fetched document vectors to the driver')
    monkeypatch.setattr(RayShards, 'vectors', no_vectors)
    got = on_ray(cls=HypencoderReranker)(res)
    # Scored in other GEMM shapes on the actors' one thread: scores within the fp32 bound (so ties may rank apart).
    both = got.merge(ref, on=['qid', 'docno'], suffixes=('', '_ref'))
    assert len(both) == len(ref) == len(got)
    scale = np.abs(ref['score'].to_numpy()).max()
    assert np.abs(both['score'] - both['score_ref']).max() <= 96 * 2.0 ** -24 * scale


@pytest.fixture(scope='module')
def with_ann(indexes, tmp_path_factory):
    """The sharded index again, each shard with its own HNSW inner-product index (adaptive search's pools)."""
    import shutil
    folder = tmp_path_factory.mktemp('ray_ann')
    shutil.copytree(indexes[0].path, folder / 'single')
    single = HypencoderIndex(folder / 'single')
    single.add_ip_index(m=8, verbose=False)
    return split_index(single, folder / 'sharded', sizes=[16, 24, 8], graph=False)


@pytest.mark.parametrize('ann', [False, True], ids=['exact rounds', 'pools from the shards\' HNSW'])
def test_adaptive_mode_on_ray_equals_local(tiny_model, indexes, with_ann, cluster, ann):
    import torch
    index = with_ann if ann else indexes[1]
    params = dict(mode='adaptive', n_sample=16, n_entry=8, pool=16, num_results=10, scored_column='scored')
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the actors' thread count: ties rounded alike (see the graph-mode test)
    try:
        local = HypencoderRetriever(tiny_model, index, **params)(make_topics(3))
    finally:
        torch.set_num_threads(threads)
    retriever = HypencoderRetriever(tiny_model, index, backend='ray', ray_options=OPTIONS, **params)
    try:
        res = retriever(make_topics(3))
    finally:
        retriever.close()
    same_results(res, local)
    assert res['scored'].tolist() == local['scored'].tolist()


def test_damaged_shard_fails_before_any_actor_starts(tiny_model, indexes, cluster, tmp_path):
    import shutil
    copy = tmp_path / 'copy'
    shutil.copytree(indexes[1].path, copy)
    (copy / 'shard-002' / 'docnos.npids').unlink()
    with pytest.raises(HypencoderIndexError, match='shard 2 .*docnos.npids is missing'):
        HypencoderRetriever(tiny_model, copy, backend='ray', ray_options=OPTIONS)


def test_build_on_ray(tiny_model, indexes, cluster, tmp_path):
    docs = make_docs(48)
    built = ShardedHypencoderIndexer(tiny_model, tmp_path / 'built', shard_size=16, neighbours=6, backend='ray',
                                     ray_options={'num_cpus': 0.5}).index(docs)
    assert [s['count'] for s in built.meta['shards']] == [16, 16, 16]
    assert list(built.docnos.fwd[[0, 16, 47]]) == ['d0', 'd16', 'd47']
    assert built.shard(2).graph_k == 6
    # encoded by Ray workers on one thread: the driver's vectors to fp32 rounding (unit-scale, layer-normed)
    local = ShardedHypencoderIndexer(tiny_model, tmp_path / 'local', shard_size=16, neighbours=0,
                                     verbose=False).index(docs)
    np.testing.assert_allclose(np.asarray(built.shard(1).vectors()), np.asarray(local.shard(1).vectors()), rtol=0,
                               atol=1e-5)
    bad = docs[:20] + [{'docno': 'x'}] + docs[20:30]  # document 20 is in shard 1 and has no text
    with pytest.raises(HypencoderIndexError, match=r"shard 1 .*could not be built on Ray.*has no 'text' field"):
        ShardedHypencoderIndexer(tiny_model, tmp_path / 'bad', shard_size=16, neighbours=0, backend='ray',
                                 ray_options={'num_cpus': 0.5}).index(bad)
    assert not (tmp_path / 'bad').exists() and not list(tmp_path.glob('.bad.building-*'))


def test_width_and_cascade_on_ray(tiny_nested_model, indexes, cluster):
    # A Matryoshka model's narrow q-nets and its cascade run on the actors as in this process.
    _, sharded = indexes
    for options in ({'width': 8}, {'mode': 'adaptive', 'cascade_width': 8, 'rescore': 30, 'n_sample': 16}):
        local = HypencoderRetriever(tiny_nested_model, sharded, num_results=10, score_block=BLOCK, **options)
        remote = HypencoderRetriever(tiny_nested_model, sharded, num_results=10, score_block=BLOCK, backend='ray',
                                     ray_options=OPTIONS, **options)
        try:
            same_results(remote(make_topics()), local(make_topics()))
        finally:
            remote.close()

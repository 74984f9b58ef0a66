"""Building and searching at scale, on tiny data: resumable builds, the stored HNSW inner-product index, and the
pooled adaptive search that draws its candidates from it."""
import numpy as np
import pytest
import torch
from test_index import make_docs
from test_search import clustered, random_qnets

from pyterrier_hypencoder import HypencoderIndex, HypencoderIndexer
from pyterrier_hypencoder.search import InnerProductIndex, adaptive_search, pooled_search


class Interrupt(Exception):
    """Stands in for a KeyboardInterrupt or a killed reader."""


def interrupted(docs, after):
    for i, doc in enumerate(docs):
        if i == after:
            raise Interrupt()
        yield doc


class CountingModel:
    """Wraps a model and counts the documents it encodes (to see what a resumed build encodes again)."""

    def __init__(self, model):
        self.model, self.encoded = model, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def encode_docs(self, texts, **kw):
        self.encoded += len(texts)
        return self.model.encode_docs(texts, **kw)


def test_resumed_build_encodes_only_the_rest(tiny_model, tmp_path):
    docs = make_docs(90)
    path = tmp_path / 'idx'
    counting = CountingModel(tiny_model)
    indexer = HypencoderIndexer(tiny_model, path, neighbours=4, chunk_size=20, resume=True, verbose=False)
    indexer.model = counting
    with pytest.raises(Interrupt):
        indexer.index(interrupted(docs, 50))
    assert not path.exists() and (tmp_path / '.idx.building-resume' / 'progress.json').exists()
    # Not resuming: refused, naming both ways on.
    with pytest.raises(FileExistsError, match='resume=True.*overwrite=True'):
        HypencoderIndexer(tiny_model, path, verbose=False).index(docs)
    before = counting.encoded  # 40 documents (two chunks) and the probe text
    index = indexer.index(docs)
    assert counting.encoded - before == 90 - 40 + 1
    assert not list(tmp_path.glob('.idx.building*'))
    fresh = HypencoderIndexer(tiny_model, tmp_path / 'fresh', neighbours=4, chunk_size=20, verbose=False).index(docs)
    np.testing.assert_array_equal(np.asarray(index.vectors()), np.asarray(fresh.vectors()))
    np.testing.assert_array_equal(index.graph_edges(), fresh.graph_edges())
    assert list(index.docnos.fwd[list(range(90))]) == [d['docno'] for d in docs]


def test_resume_refuses_other_documents_or_settings(tiny_model, tmp_path):
    docs = make_docs(60)
    path = tmp_path / 'idx'
    with pytest.raises(Interrupt):
        HypencoderIndexer(tiny_model, path, neighbours=0, chunk_size=20, resume=True, verbose=False).index(
            interrupted(docs, 45))
    with pytest.raises(ValueError, match='same documents in the same order'):
        HypencoderIndexer(tiny_model, path, neighbours=0, chunk_size=20, resume=True, verbose=False).index(
            make_docs(60, seed=1)[::-1])
    with pytest.raises(ValueError, match='other settings.*dtype'):
        HypencoderIndexer(tiny_model, path, neighbours=0, chunk_size=20, fp16=True, resume=True,
                          verbose=False).index(docs)
    with pytest.raises(ValueError, match='had already encoded 40'):
        HypencoderIndexer(tiny_model, path, neighbours=0, chunk_size=20, resume=True, verbose=False).index(docs[:30])
    # overwrite starts over.
    index = HypencoderIndexer(tiny_model, path, neighbours=0, overwrite=True, verbose=False).index(docs)
    assert len(index) == 60 and not list(tmp_path.glob('.idx.building*'))


def test_ip_index_built_stored_and_loaded(tiny_model, tmp_path):
    docs = make_docs(120)
    index = HypencoderIndexer(tiny_model, tmp_path / 'idx', neighbours=0, ip_index='hnsw8', verbose=False).index(docs)
    assert index.has_ip_index() and index.meta['ip_index']['m'] == 8
    ip = index.ip_index(ef_search=64)
    assert ip.hnsw and ip.n == 120 and ip.dim == index.dim
    assert index.ip_index(ef_search=64) is ip  # loaded once
    # An HNSW index over 120 vectors with a beam of 64 is exact: the cosine graph (the default) ranks by cosine.
    queries = np.random.default_rng(0).standard_normal((3, index.dim)).astype(np.float32)
    x = np.asarray(index.vectors(), dtype=np.float64)
    ids, _ = ip.search(queries, 5)
    assert index.meta['ip_index']['metric'] == 'cosine' and ip.metric == 'cosine'
    np.testing.assert_array_equal(ids, np.argsort(-(queries @ (x / np.linalg.norm(x, axis=1, keepdims=True)).T),
                                                  axis=1)[:, :5])
    # The lifted graph ranks by inner product, and its metric survives a reload.
    index.add_ip_index(m=8, metric='lifted', overwrite=True, verbose=False)
    lifted = HypencoderIndex(tmp_path / 'idx').ip_index(ef_search=64)
    assert lifted.metric == 'lifted' and lifted.dim == index.dim and 'lifted' in repr(lifted)
    np.testing.assert_array_equal(lifted.search(queries, 5)[0], np.argsort(-(queries @ x.T), axis=1)[:, :5])
    with pytest.raises(ValueError, match='metric must be one of'):
        InnerProductIndex(x, hnsw_m=8, metric='l2')
    # Reloaded from disk by a new index object; an index without one gets an exact index over its vectors.
    assert HypencoderIndex(tmp_path / 'idx').ip_index().hnsw
    plain = HypencoderIndexer(tiny_model, tmp_path / 'plain', neighbours=0, verbose=False).index(docs)
    assert not plain.has_ip_index() and not plain.ip_index().hnsw
    plain.add_ip_index(m=8, verbose=False)
    assert plain.has_ip_index() and HypencoderIndex(tmp_path / 'plain').ip_index().hnsw
    with pytest.raises(FileExistsError, match='overwrite=True'):
        plain.add_ip_index(m=8)


def test_ip_index_spec_and_damage(tiny_model, tmp_path):
    with pytest.raises(ValueError, match='hnsw<M>'):
        HypencoderIndexer(tiny_model, tmp_path / 'x', ip_index='ivf')
    index = HypencoderIndexer(tiny_model, tmp_path / 'idx', neighbours=0, ip_index='hnsw8', verbose=False).index(
        make_docs(30))
    (index.path / 'ip_hnsw8.faiss').unlink()
    with pytest.raises(ValueError, match='inner-product index .* missing'):
        HypencoderIndex(index.path).meta  # noqa: B018


@pytest.fixture(scope='module')
def corpus():
    x = clustered(n=3000)
    return x, random_qnets(8, (16, 16, 1)), InnerProductIndex(x), InnerProductIndex(x, hnsw_m=16, ef_search=64)


def exact_top(qnets, x, k):
    return torch.topk(qnets.score(torch.from_numpy(x)), k, dim=1)


def test_pooled_search_returns_true_scores_best_first(corpus):
    x, qnets, exact, _ = corpus
    result = pooled_search(qnets, x, exact, 20, pool=200, n_entry=16)
    full = qnets.score(torch.from_numpy(x))
    for q in range(len(qnets)):
        ids = result.ids[q].numpy()
        assert len(set(ids.tolist())) == 20 and (ids >= 0).all()
        np.testing.assert_allclose(result.scores[q].numpy(), full[q, ids].numpy(), rtol=1e-4, atol=1e-5)
        assert np.all(np.diff(result.scores[q].numpy()) <= 1e-6)


def test_pool_covering_the_corpus_is_exhaustive(corpus):
    x, qnets, exact, _ = corpus
    # One draw holds every document, and rounds go on until the pool is used up.
    result = pooled_search(qnets, x, exact, 10, n_sample=10, pool=len(x), n_entry=500, max_rounds=100, stop_k=10)
    want = exact_top(qnets, x, 10)
    np.testing.assert_array_equal(result.ids.numpy(), want.indices.numpy())
    assert (result.n_scored == len(x)).all() or (result.ids.numpy() == want.indices.numpy()).all()


def test_pooled_search_with_hnsw_finds_what_the_exact_draws_find(corpus):
    x, qnets, exact, hnsw = corpus
    want = exact_top(qnets, x, 10).indices.numpy()
    kw = dict(pool=300, n_entry=32, refreshes=2)
    recall = {}
    for name, ip in (('exact', exact), ('hnsw', hnsw)):
        ids = pooled_search(qnets, x, ip, 10, **kw).ids.numpy()
        recall[name] = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, want)])
    reference = adaptive_search(qnets, x, None, 10, n_entry=32, ip_index=exact).ids.numpy()
    recall['reference'] = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(reference, want)])
    assert recall['hnsw'] >= recall['exact'] - 0.1 and recall['exact'] >= recall['reference'] - 0.15, recall


def test_pooled_search_batch_equals_single_queries_and_is_deterministic(corpus):
    x, qnets, _, hnsw = corpus
    kw = dict(pool=150, n_entry=16, refreshes=1, seed=3)
    batch = pooled_search(qnets, x, hnsw, 10, **kw)
    again = pooled_search(qnets, x, hnsw, 10, **kw)
    np.testing.assert_array_equal(batch.ids.numpy(), again.ids.numpy())
    for q in range(3):
        alone = pooled_search(qnets[q], x, hnsw, 10, **kw)
        np.testing.assert_array_equal(alone.ids[0].numpy(), batch.ids[q].numpy())
        assert alone.n_scored[0] == batch.n_scored[q] and alone.n_iter[0] == batch.n_iter[q]


def test_pooled_search_scores_each_draw_whole_by_default(corpus):
    x, qnets, _, hnsw = corpus
    default = pooled_search(qnets, x, hnsw, 10, pool=150, refreshes=1)
    whole = pooled_search(qnets, x, hnsw, 10, pool=150, n_entry=150, refreshes=1)
    np.testing.assert_array_equal(default.ids.numpy(), whole.ids.numpy())
    # one round per draw (the first pool, one refresh) and a final round that finds the pool used up
    assert default.n_iter.max().item() <= 3
    # every drawn document is scored: the sample plus at most two draws of 150
    assert (default.n_scored > 64 + 150).all() and (default.n_scored <= 128 + 2 * 150).all()


def test_pooled_search_budget_and_errors(corpus):
    x, qnets, exact, hnsw = corpus
    capped = pooled_search(qnets, x, hnsw, 10, n_sample=64, pool=300, n_entry=32, max_scored=100)
    assert capped.n_scored.max().item() <= 100
    assert (pooled_search(qnets, x, hnsw, 10, n_sample=64, max_rounds=0).n_scored == 64).all()
    with pytest.raises(ValueError, match='pool'):
        pooled_search(qnets, x, hnsw, 10, pool=0)
    with pytest.raises(ValueError, match='another index'):
        pooled_search(qnets, x[:100], hnsw, 10)
    with pytest.raises(TypeError, match='InnerProductIndex'):
        pooled_search(qnets, x, None, 10)


def test_retriever_draws_from_the_stored_ip_index(tiny_model, tmp_path):
    import pandas as pd

    from pyterrier_hypencoder import HypencoderRetriever
    docs = make_docs(400)
    index = HypencoderIndexer(tiny_model, tmp_path / 'idx', neighbours=0, ip_index='hnsw16', verbose=False).index(docs)
    topics = pd.DataFrame({'qid': ['1', '2', '3'], 'query': [docs[5]['text'], docs[77]['text'], 'unrelated words']})
    exact = HypencoderRetriever(tiny_model, index, num_results=10).transform(topics)
    pooled = HypencoderRetriever(tiny_model, index, num_results=10, mode='adaptive', n_sample=32, pool=400,
                                 n_entry=400, scored_column='scored')
    assert 'pool=400' in repr(pooled) and pooled.corpus().has_ann
    got = pooled.transform(topics)
    # A pool as large as the corpus, scored in one round: the exact top 10.
    pd.testing.assert_frame_equal(got[['qid', 'docno', 'rank']], exact[['qid', 'docno', 'rank']])
    assert (got['scored'] == 400).all()
    # With a graph walk asked for, the exact reference search runs (and needs the graph).
    with pytest.raises(ValueError, match='graph'):
        HypencoderRetriever(tiny_model, index, mode='adaptive', expand=4)


def test_a_last_docno_no_block_format_fits_is_stored(tiny_model, tmp_path):
    # npids alone writes a one-docno block of width 0 here, which it cannot read back (seen at 906,627 documents:
    # the corpus ends with one docno longer than all before it).
    names = [f'pypi:{chr(97 + i % 26)}{chr(97 + i // 26)}' + 'x' * (i % 5) for i in range(300)]
    names.append('pypi:' + 'z' * 60)  # longer than the fixed width of the block before it
    docs = [{'docno': name, 'text': f'document {i}'} for i, name in enumerate(names)]
    index = HypencoderIndexer(tiny_model, tmp_path / 'i', neighbours=0, verbose=False).index(docs)
    assert list(index.docnos.fwd[[0, 299, 300]]) == [names[0], names[299], names[300]]
    assert index.docnos.inv[names[300]] == 300


def test_pooled_search_when_the_sample_covers_the_corpus():
    x = clustered(40, 8, clusters=4)
    qnets = random_qnets(3, (8, 8, 1))
    res = pooled_search(qnets, x, InnerProductIndex(x), 5, n_sample=64, pool=16, n_entry=4)
    ref = torch.topk(qnets.score(torch.from_numpy(x)), 5, dim=1)
    np.testing.assert_array_equal(np.sort(res.ids.numpy(), 1), np.sort(ref.indices.numpy(), 1))
    assert (res.n_scored == 40).all()

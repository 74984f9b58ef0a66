"""A Hypencoder index's files: reading them, docno lookups, the model check, the inner-product index, and every
kind of damage named when a retriever, reranker or artifact is built on it."""
import json
import re
import shutil

import numpy as np
import pandas as pd
import pyterrier as pt
import pytest
from helpers import GRAPH, make_docs, make_tiny_bert

from pyterrier_hypencoder import Hypencoder, HypencoderIndex, HypencoderIndexer, HypencoderReranker, HypencoderRetriever
from pyterrier_hypencoder.index import HypencoderIndexError
from pyterrier_hypencoder.search import InnerProductIndex

# Many small tiny-model calls: one torch thread is faster (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures('one_thread')

# ---- docnos -------------------------------------------------------------------------------------------------------------

def test_unknown_docnos_are_named(built_index):
    index, _ = built_index
    with pytest.raises(KeyError, match='nope'):
        index.rows(['d1', 'nope'])


@pytest.mark.parametrize('bad', ['3', '', 'd', 'd007', 'd0300', 'D7', 'd7 ', 'nope'])
def test_unknown_docnos_never_crash_nor_alias(tiny_model, words_index, bad):
    # npids' integer-sequence lookup crashed on '3', '' and 'd', and returned the row of 'd7' for 'd007'.
    for docnos in ([bad], ['d7', bad], [bad, 'd12', bad]):
        with pytest.raises(KeyError, match=f'{docnos.count(bad)} docno.*' + re.escape(repr(bad))):
            words_index.rows(docnos)
    frame = pd.DataFrame({'qid': ['1', '1'], 'query': ['neural search'] * 2, 'docno': [bad, bad]})
    with pytest.raises(KeyError, match=re.escape(repr(bad)) + '.*from the indexed corpus'):
        HypencoderReranker(tiny_model, words_index)(frame)
    assert words_index.rows(['d7', 'd299', 'd0']).tolist() == [7, 299, 0]


def test_a_last_docno_no_block_format_fits_is_stored(tiny_model, tmp_path):
    # npids alone writes a one-docno block of width 0 here, which it cannot read back (seen at 906,627 documents:
    # the corpus ends with one docno longer than all before it).
    names = [f'pypi:{chr(97 + i % 26)}{chr(97 + i // 26)}' + 'x' * (i % 5) for i in range(300)]
    names.append('pypi:' + 'z' * 60)  # longer than the fixed width of the block before it
    docs = [{'docno': name, 'text': f'document {i}'} for i, name in enumerate(names)]
    index = HypencoderIndexer(tiny_model, tmp_path / 'i', neighbours=0, verbose=False).index(docs)
    assert list(index.docnos.fwd[[0, 299, 300]]) == [names[0], names[299], names[300]]
    assert index.docnos.inv[names[300]] == 300


# ---- the model that built the index -------------------------------------------------------------------------------------

def test_check_model_catches_other_models(built_index, tiny_model, tiny_bert):
    index, _ = built_index
    index.check_model(tiny_model)
    other = Hypencoder.from_backbone(str(tiny_bert), qnet_layers=3, pooling='mean', device='cpu')
    with pytest.raises(HypencoderIndexError, match='encodes documents differently'):
        index.check_model(other)
    wide = Hypencoder.from_backbone(str(make_tiny_bert(index.path.parent / 'wide', hidden=48)), qnet_layers=2,
                                    device='cpu')
    with pytest.raises(HypencoderIndexError, match='48-d'):
        index.check_model(wide)


# ---- other views of the vectors: FlexIndex, the inner-product index -----------------------------------------------------

def test_flex_index_reads_the_same_vectors(built_index):
    import pandas as pd
    index, _ = built_index
    flex = index.flex_index(sim_fn='cos', verbose=False)
    assert len(flex) == len(index)
    query = pd.DataFrame({'qid': ['q'], 'query_vec': [np.array(index.vectors()[7])]})
    assert flex.retriever(num_results=1)(query)['docno'].tolist() == ['d7']
    assert index.flex_index(verbose=False).index_path == flex.index_path  # made once, then reused


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


# ---- missing, truncated or corrupt files --------------------------------------------------------------------------------

def test_unbuilt_and_corrupt_indexes(built_index, tmp_path):
    with pytest.raises(HypencoderIndexError, match='folder does not exist'):
        len(HypencoderIndex(tmp_path / 'missing'))
    (tmp_path / 'empty').mkdir()
    with pytest.raises(HypencoderIndexError, match='folder exists but pt_meta.json is missing, so it was never built'):
        len(HypencoderIndex(tmp_path / 'empty'))
    index, _ = built_index
    copy = tmp_path / 'copy'
    import shutil
    shutil.copytree(index.path, copy)
    vec = copy / 'vecs.f4'
    vec.write_bytes(vec.read_bytes()[:-4])
    with pytest.raises(HypencoderIndexError, match='truncated'):
        HypencoderIndex(copy).vectors()
    (copy / 'pt_meta.json').write_text('{"type": "dense_')
    with pytest.raises(HypencoderIndexError, match='corrupt'):
        len(HypencoderIndex(copy))


def _truncate(path, keep=None):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2 if keep is None else keep])


def _edit_meta(folder, **changes):
    meta = json.loads((folder / 'pt_meta.json').read_text())
    meta.update(changes)
    (folder / 'pt_meta.json').write_text(json.dumps(meta))


DAMAGE = {
    'docnos missing': (lambda f: (f / 'docnos.npids').unlink(), r'docnos.npids is missing'),
    'docnos truncated': (lambda f: _truncate(f / 'docnos.npids', 10), r'docnos.npids is unreadable'),
    'docnos garbage': (lambda f: (f / 'docnos.npids').write_bytes(b'\x00garbage' * 40), r'docnos.npids is unreadable'),
    'docnos of another corpus': (lambda f: _rebuild_docnos(f / 'docnos.npids', 10), r'has 10 docnos for 300 vectors'),
    'vectors missing': (lambda f: (f / 'vecs.f4').unlink(), r'vecs.f4 should hold 38400 bytes .* but is missing'),
    'vectors too long': (lambda f: (f / 'vecs.f4').write_bytes(b'\x00' * 40000), r'vecs.f4 should hold 38400 bytes'),
    'edges truncated': (lambda f: _truncate(f / 'graph_l2_k8' / 'edges.u32.np'), r'edges.u32.np is missing or truncated'),
    'edges missing': (lambda f: (f / 'graph_l2_k8' / 'edges.u32.np').unlink(), r'edges.u32.np is missing or truncated'),
    'graph weights truncated': (lambda f: _truncate(f / 'graph_l2_k8' / 'weights.f16.np'), r'weights.f16.np is missing'),
    'graph folder missing': (lambda f: shutil.rmtree(f / 'graph_l2_k8'), r'graph_l2_k8/edges.u32.np is missing'),
    'graph meta missing': (lambda f: (f / 'graph_l2_k8' / 'pt_meta.json').unlink(), r'graph_l2_k8/pt_meta.json is missing'),
    'graph docnos missing': (lambda f: (f / 'graph_l2_k8' / 'docnos.npids').unlink(), r'graph_l2_k8/docnos.npids is missing'),
    'meta truncated': (lambda f: _truncate(f / 'pt_meta.json'), r'pt_meta.json is corrupt'),
    'meta not an object': (lambda f: (f / 'pt_meta.json').write_text('[]'), r'pt_meta.json is corrupt \(not a JSON object'),
    'meta without doc_count': (lambda f: (f / 'pt_meta.json').write_text('{"type": "dense_index", "format": "hypencoder"}'),
                               r"pt_meta.json is corrupt \(missing \['doc_count', 'vec_size', 'dtype'\]"),
    'meta unknown dtype': (lambda f: _edit_meta(f, dtype='float64'), r'pt_meta.json is corrupt'),
    'meta graph without k': (lambda f: _edit_meta(f, graph={'metric': 'l2'}), r'pt_meta.json is corrupt'),
    'meta missing': (lambda f: (f / 'pt_meta.json').unlink(), r'pt_meta.json is missing, so it was never built'),
}


def _rebuild_docnos(path, n):
    from npids import Lookup
    path.unlink()
    with Lookup.builder(path) as builder:
        for i in range(n):
            builder.add(f'x{i}')


@pytest.mark.parametrize('damage', sorted(DAMAGE))
def test_damaged_index_fails_at_construction(tiny_model, words_index, tmp_path, damage):
    folder = tmp_path / 'copy'
    shutil.copytree(words_index.path, folder)
    fn, match = DAMAGE[damage]
    fn(folder)
    for kwargs in ({}, GRAPH):
        with pytest.raises(HypencoderIndexError, match=match):
            HypencoderRetriever(tiny_model, folder, **kwargs)
    with pytest.raises(HypencoderIndexError, match=match):
        HypencoderReranker(tiny_model, str(folder))
    if not damage.startswith('meta'):  # without readable metadata, pt.Artifact.load cannot tell what it is
        with pytest.raises(HypencoderIndexError, match=match):
            pt.Artifact.load(str(folder)).retriever(tiny_model)
    # The message says what to do.
    with pytest.raises(HypencoderIndexError, match='rebuild|Build it'):
        HypencoderRetriever(tiny_model, folder)

"""Shared test fixtures: the parity checkpoint, a tiny random BERT, offline datasets, and the indexes that several
test modules search (each built once per session, on one torch thread, so its vectors do not depend on which
module asks for it first).

Plain helper functions live in ``tests/helpers.py``; the names imported from it below are also re-exported here for
the modules that import them from ``conftest``.
"""
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    ALIGNED,
    CLUSTERED_SIZES,
    DATASETS,
    FP32_EPS,
    N_CLUSTERED_DOCS,
    N_QUERIES,
    N_SHARDED_DOCS,
    PARITY,
    ROOT,
    SHARED,
    TOKENIZER_FILES,
    UNALIGNED,
    WORDS,
    WORDS_INDEX_SIZE,
    assert_fp32_topk,
    clustered,
    make_docs,
    make_tiny_bert,
    qnet_fp32_bound,
    short_docs,
    torch_threads,
)

# Re-exported: some test modules import these from conftest.
__all__ = ['DATASETS', 'FP32_EPS', 'PARITY', 'ROOT', 'SHARED', 'TOKENIZER_FILES', 'assert_fp32_topk', 'make_tiny_bert',
           'qnet_fp32_bound']

# ir_datasets reads its home when first imported, so it is fixed here, before any test imports it.
IRDS_HOME = Path(os.environ.setdefault('IR_DATASETS_HOME', str(ROOT / '.cache' / 'ir_datasets')))


@pytest.fixture(scope='module')
def one_thread():
    """Torch on one thread for a module: tiny models gain nothing from threads, and on a busy machine thread
    hand-offs make each small op ~20x slower."""
    with torch_threads(1):
        yield


@pytest.fixture(scope='session')
def parity_dir() -> Path:
    if not (PARITY / 'expected.json').exists():
        pytest.skip(f'parity fixture not found at {PARITY} (set HYPENCODER_SHARED to the shared folder)')
    return PARITY


@pytest.fixture(scope='session')
def tiny_bert(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp('tiny_bert'))


@pytest.fixture(scope='session')
def tiny_model(tiny_bert):
    from pyterrier_hypencoder import Hypencoder
    return Hypencoder.from_backbone(str(tiny_bert), qnet_layers=3, seed=0, device='cpu')


@pytest.fixture(scope='session')
def irds_home() -> Path:
    """An ir_datasets cache filled from the shared datasets, so pt.get_dataset('irds:...') works offline."""
    script = DATASETS / 'offline-cache.sh'
    if not script.exists():
        pytest.skip(f'shared datasets not found at {DATASETS}')
    subprocess.run(['bash', str(script), str(IRDS_HOME)], check=True, capture_output=True)
    return IRDS_HOME


# ---- the parity fixture's released-format checkpoint (model tests) -------------------------------------------

@pytest.fixture(scope='session')
def parity_expected(parity_dir):
    """The reference code's inputs and outputs for the parity checkpoint (``expected.json``)."""
    return json.loads((parity_dir / 'expected.json').read_text())


@pytest.fixture(scope='session')
def parity_model(parity_dir):
    """The parity fixture's checkpoint in the released format, loaded on the CPU."""
    from pyterrier_hypencoder import Hypencoder
    return Hypencoder.from_pretrained(parity_dir / 'tiny_official', device='cpu')


# ---- indexes of random words built with the tiny model -----------------------------------------------------------

@pytest.fixture(scope='session')
def built_index(tiny_model, tmp_path_factory):
    """A 150-document index with a 10-NN graph, and its documents."""
    from pyterrier_hypencoder import HypencoderIndexer
    docs = make_docs(150)
    path = tmp_path_factory.mktemp('idx') / 'index'
    with torch_threads(1):
        index = HypencoderIndexer(tiny_model, path, neighbours=10, verbose=False).index(iter(docs))
    return index, docs


@pytest.fixture(scope='session')
def words_docs():
    return make_docs(WORDS_INDEX_SIZE)


@pytest.fixture(scope='session')
def words_index(tiny_model, words_docs, tmp_path_factory):
    """``words_docs`` (300 documents) with an 8-NN graph."""
    from pyterrier_hypencoder import HypencoderIndexer
    path = tmp_path_factory.mktemp('reliability') / 'index'
    with torch_threads(1):
        return HypencoderIndexer(tiny_model, path, neighbours=8, verbose=False).index(words_docs)


@pytest.fixture(scope='session')
def words_topics():
    """12 queries of 2 to 6 of the ``words_index`` documents' words."""
    import pandas as pd
    rng = np.random.default_rng(7)
    return pd.DataFrame({'qid': [f'q{i}' for i in range(12)],
                         'query': [' '.join(rng.choice(WORDS, size=2 + i % 5)) for i in range(12)]})


@pytest.fixture(scope='session')
def short_index(tiny_model, tmp_path_factory):
    """60 five-word documents (``helpers.short_docs``) with an 8-NN graph."""
    from pyterrier_hypencoder import HypencoderIndexer
    path = tmp_path_factory.mktemp('newcomer') / 'index'
    with torch_threads(1):
        return HypencoderIndexer(tiny_model, path, neighbours=8, verbose=False).index(short_docs(60))


# ---- a small index of real documents (vaswani) and every document's score -----------------------------------

@pytest.fixture(scope='session')
def vaswani(irds_home):
    """The first 250 vaswani documents plus those judged for the first queries, with those queries and qrels."""
    import pyterrier as pt
    dataset = pt.get_dataset('irds:vaswani')
    topics = dataset.get_topics().iloc[:N_QUERIES].reset_index(drop=True)
    qrels = dataset.get_qrels()
    qrels = qrels[qrels.qid.isin(topics.qid)]
    wanted = set(qrels.docno)
    docs = [d for i, d in enumerate(dataset.get_corpus_iter(verbose=False)) if i < 250 or d['docno'] in wanted]
    return docs, topics, qrels.reset_index(drop=True)


@pytest.fixture(scope='session')
def vaswani_index(tiny_model, vaswani, tmp_path_factory):
    """The ``vaswani`` documents with a 16-NN graph."""
    from pyterrier_hypencoder import HypencoderIndexer
    docs, _, _ = vaswani
    path = tmp_path_factory.mktemp('transformers') / 'vaswani.hypencoder'
    with torch_threads(1):
        return HypencoderIndexer(tiny_model, path, neighbours=16, verbose=False).index(docs)


@pytest.fixture(scope='session')
def vaswani_plain_index(tiny_model, vaswani, tmp_path_factory):
    """The first 50 ``vaswani`` documents, without a graph."""
    from pyterrier_hypencoder import HypencoderIndexer
    docs, _, _ = vaswani
    path = tmp_path_factory.mktemp('transformers') / 'nograph.hypencoder'
    with torch_threads(1):
        return HypencoderIndexer(tiny_model, path, neighbours=0, verbose=False).index(docs[:50])


@pytest.fixture(scope='session')
def vaswani_brute(tiny_model, vaswani_index, vaswani):
    """Every document's score for every query, [queries, docs], in float64 from the stored vectors."""
    import torch
    _, topics, _ = vaswani
    qnets = tiny_model.encode_queries(topics['query'].tolist()).to(dtype=torch.float64)
    return qnets.score(torch.from_numpy(np.array(vaswani_index.vectors(), dtype=np.float64))).numpy()


@pytest.fixture(scope='session')
def vaswani_bound(tiny_model, vaswani_brute):
    """How far the retrievers' fp32 scores may be from ``vaswani_brute`` (:func:`helpers.qnet_fp32_bound`)."""
    return qnet_fp32_bound(tiny_model.spec, vaswani_brute)


# ---- sharded indexes ------------------------------------------------------------------------------------------------

@pytest.fixture(scope='session')
def tied_index(tiny_model, tmp_path_factory):
    """A single index of 48 documents in which rows 0, 4, 8, ... share one vector and 2, 10, 18, ... another."""
    from pyterrier_hypencoder import HypencoderIndexer
    path = tmp_path_factory.mktemp('sharded') / 'single'
    with torch_threads(1):
        index = HypencoderIndexer(tiny_model, path, neighbours=6, verbose=False).index(make_docs(N_SHARDED_DOCS))
    vecs = np.memmap(path / 'vecs.f4', mode='r+', dtype=np.float32, shape=(N_SHARDED_DOCS, tiny_model.dim))
    vecs[0::4] = vecs[1]
    vecs[2::8] = vecs[3]
    vecs.flush()
    del vecs
    return index


@pytest.fixture(scope='session')
def untied_index(tiny_model, tmp_path_factory):
    """A single index without duplicate vectors (for the unaligned cases, whose order is checked for near-ties)."""
    from pyterrier_hypencoder import HypencoderIndexer
    path = tmp_path_factory.mktemp('sharded') / 'plain'
    with torch_threads(1):
        return HypencoderIndexer(tiny_model, path, neighbours=6, verbose=False).index(make_docs(N_SHARDED_DOCS, seed=2))


@pytest.fixture(scope='session')
def shard_splits(tied_index, untied_index, tmp_path_factory):
    """``tied_index`` split at shard offsets that are multiples of ``helpers.BLOCK`` (``('aligned', n)``), and
    ``untied_index`` split at others (``('unaligned', n)``)."""
    from pyterrier_hypencoder import split_index
    folder = tmp_path_factory.mktemp('splits')
    out = {('aligned', n): split_index(tied_index, folder / f'a{n}', sizes=sizes) for n, sizes in ALIGNED.items()}
    with pytest.warns(UserWarning, match='only 2 documents: the graph keeps 1'):  # the 2-document shard
        out.update({('unaligned', n): split_index(untied_index, folder / f'u{n}', sizes=sizes)
                    for n, sizes in UNALIGNED.items()})
    return out


@pytest.fixture(scope='session')
def clustered_shards(tiny_model, tmp_path_factory):
    """An index of 1,600 clustered vectors with an HNSW inner-product index, split into 3 shards with and without one.

    The documents' vectors are replaced by clustered ones: the tiny random BERT's vectors of random words are nearly
    alike, which leaves nothing to find.
    """
    from pyterrier_hypencoder import HypencoderIndexer, split_index
    folder = tmp_path_factory.mktemp('sharded_adaptive')
    with torch_threads(1):
        single = HypencoderIndexer(tiny_model, folder / 'single', neighbours=0, verbose=False).index(
            make_docs(N_CLUSTERED_DOCS))
    vecs = np.memmap(single.path / 'vecs.f4', mode='r+', dtype=np.float32, shape=(N_CLUSTERED_DOCS, tiny_model.dim))
    vecs[:] = clustered(N_CLUSTERED_DOCS, tiny_model.dim, clusters=40, seed=3)
    vecs.flush()
    del vecs
    single.add_ip_index(m=16, verbose=False)
    sharded = split_index(single, folder / 'sharded', sizes=CLUSTERED_SIZES)
    exact_shards = split_index(single, folder / 'exact', sizes=CLUSTERED_SIZES, ip_index=False)
    return single, sharded, exact_shards


@pytest.fixture(scope='session')
def tiny_nested_model(tiny_bert):
    """A tiny Matryoshka Hypencoder (random head, nested at widths 8, 16 and 32) on the same backbone as
    ``tiny_model``, so it searches the same indexes."""
    from pyterrier_hypencoder import Hypencoder
    return Hypencoder.from_backbone(str(tiny_bert), qnet_layers=3, matryoshka_widths=(8, 16), seed=0, device='cpu')

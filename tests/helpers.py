"""Plain helpers shared by the test modules: paths, fp32 tolerances, synthetic corpora and q-nets, small datasets.

Import them as ``from helpers import ...`` (``tests/`` is on ``sys.path`` because ``tests/conftest.py`` lives there).
Fixtures that several modules share are in ``tests/conftest.py``. Nothing here imports PyTerrier or ir_datasets at
module level: ``conftest.py`` sets ``IR_DATASETS_HOME`` before anything reads it.
"""
import contextlib
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

# ---- paths --------------------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get('HYPENCODER_SHARED', ROOT.parent / 'shared'))
PARITY = SHARED / 'fixtures' / 'hypencoder-parity'
DATASETS = SHARED / 'datasets'
TOKENIZER_FILES = ('vocab.txt', 'tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json')

# Scores of the parity fixture's checkpoint against the reference code's, in fp32.
PARITY_ATOL = 2e-4


def make_tiny_bert(folder: Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A randomly initialised BERT saved with the fixture's bert-base-uncased tokenizer."""
    from transformers import BertConfig, BertModel
    if not (PARITY / 'tiny_official' / 'vocab.txt').exists():
        pytest.skip(f'the fixture tokenizer is not at {PARITY}')
    torch.manual_seed(seed)
    config = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=512)
    BertModel(config).save_pretrained(str(folder))
    for f in TOKENIZER_FILES:
        shutil.copy(PARITY / 'tiny_official' / f, folder / f)
    return folder


@contextlib.contextmanager
def torch_threads(n: int):
    """Torch on ``n`` intra-op threads inside the block (shared indexes are built on one, wherever first used)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---- what float32 can promise -------------------------------------------------------------------------------

FP32_EPS = 2.0 ** -23


def qnet_fp32_bound(spec, reference) -> float:
    """Largest difference a float32 q-net score may show against the same q-net evaluated in float64.

    Rounding in a dot product of ``w`` terms grows like ``sqrt(w) * eps`` times the size of the terms, each q-net
    block adds its own, and the parameter-free layer norms rescale activations (and their errors) to unit
    variance, so the error is relative to the largest score, not to each score. The factor 64 is headroom over
    that first-order estimate: on the parity fixture's q-nets ([32, 32, 32, 1], scores up to 28) fp32 scores are
    within 5.2e-4 of float64 on an Intel Xeon with AVX-512 (1 and 2 threads) and 7.2e-4 on an AMD EPYC with
    AVX-512, against a bound of 3.7e-3 (5x to 7x margin). Different chunkings or batchings of the same q-nets may
    each differ from float64 by up to this much, so they are compared with float64, not with each other.

    Args:
        spec: the q-nets' :class:`~pyterrier_hypencoder.QNetSpec`.
        reference: the float64 scores (a tensor or array).
    """
    depth = spec.num_blocks + 1
    width = max(spec.vector_dimensions)
    scale = max(1.0, float(np.abs(np.asarray(reference, dtype=np.float64)).max()))
    return 64 * FP32_EPS * depth * width ** 0.5 * scale


def assert_fp32_topk(scores, ids, reference, bound: float) -> None:
    """``(scores, ids)`` is a correct top-k of ``reference`` (float64, ``[queries, docs]``) up to fp32 rounding.

    Each returned score is within ``bound`` of its document's float64 score; scores are non-increasing; and no
    document left out beats the last one kept by more than ``2 * bound`` (ties within rounding may fall either way,
    which is all that an fp32 ranking can promise on every CPU).
    """
    scores, ids, reference = (np.asarray(a) for a in (scores, ids, reference))
    for q in range(len(ids)):
        true = reference[q][ids[q]]
        assert np.abs(scores[q] - true).max() <= bound, f'query {q}: a score is off by more than {bound:.2e}'
        assert (np.diff(scores[q]) <= 0).all(), f'query {q}: scores are not sorted'
        assert len(set(ids[q].tolist())) == len(ids[q]), f'query {q}: a document is returned twice'
        rest = np.delete(reference[q], ids[q])
        if len(rest):
            assert rest.max() <= true.min() + 2 * bound, f'query {q}: a better document was left out'


# ---- synthetic vectors, graphs and q-nets (search tests) ----------------------------------------------------

def random_qnets(n_queries, dims, seed=0):
    from pyterrier_hypencoder.model.qnet import QNets, QNetSpec
    g = torch.Generator().manual_seed(seed)
    spec = QNetSpec(tuple(dims))
    weights = [torch.randn(n_queries, a, b, generator=g) / a ** 0.5 for a, b in spec.weight_shapes]
    biases = [0.1 * torch.randn(n_queries, b, generator=g) for b in spec.bias_dims]
    return QNets(weights, biases, spec)


def clustered(n=3000, d=16, clusters=20, spread=3.0, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d)) * spread
    return (centres[rng.integers(0, clusters, n)] + rng.normal(size=(n, d))).astype(np.float32)


def knn_graph(x, k):
    sq = (x ** 2).sum(1)
    dist = sq[:, None] + sq[None, :] - 2 * x @ x.T
    np.fill_diagonal(dist, np.inf)
    return np.argsort(dist, axis=1)[:, :k].astype(np.uint32)


def recall(ids, ref):
    return np.mean([len(set(a.tolist()) & set(b.tolist())) / len(b) for a, b in zip(ids, ref)])


# ---- documents and topics of random words (index, pt and distributed tests) --------------------------------

WORDS = ('retrieval neural network query document vector graph search index model training score rank '
         'hyper head layer attention token embedding dense sparse corpus').split()


def make_docs(n, seed=0):
    rng = np.random.default_rng(seed)
    return [{'docno': f'd{i}', 'text': ' '.join(rng.choice(WORDS, size=rng.integers(3, 12)))} for i in range(n)]


def make_topics(n=5):
    rng = np.random.default_rng(1)
    return pd.DataFrame({'qid': [f'q{i}' for i in range(n)],
                         'query': [' '.join(rng.choice(WORDS, size=3)) for _ in range(n)]})


# The ``words_index`` fixture's size, and a small graph walk over it.
WORDS_INDEX_SIZE = 300
GRAPH = dict(mode='graph', n_initial=30, n_candidates=8)


def one_token_words(model):
    words = [w for w in WORDS if len(model.tokenizer.tokenize(w)) == 1]
    assert len(words) > 10
    return words


# Five-word documents from a smaller vocabulary (the ``short_index`` fixture), and two topics about them.
SHORT_WORDS = 'neural graph retrieval query document index search vector model score'.split()
SHORT_TOPICS = pd.DataFrame({'qid': ['1', '2'], 'query': ['neural retrieval', 'graph index']})


def short_docs(n, seed=0, prefix='d'):
    rng = np.random.default_rng(seed)
    return [{'docno': f'{prefix}{i}', 'text': ' '.join(rng.choice(SHORT_WORDS, 5))} for i in range(n)]


# ---- sharded indexes (the ``tied_index``, ``untied_index``, ``shard_splits`` and ``clustered_shards`` fixtures) -----

N_SHARDED_DOCS = 48
BLOCK = 8  # scoring block of the aligned cases: shard offsets below are multiples of it
ALIGNED = {1: [48], 2: [40, 8], 3: [16, 24, 8]}  # uneven; the 8-document shards are smaller than k = 10
UNALIGNED = {2: [7, 41], 3: [7, 2, 39]}
N_CLUSTERED_DOCS = 1600
CLUSTERED_SIZES = [600, 600, 400]


N_QUERIES = 6  # queries in the ``vaswani`` fixture


# ---- training data about fruit (train tests) -------------------------------------------------------------------

FRUITS = 'apple banana cherry grape lemon mango olive peach pear plum'.split()


def fruit_frame(teacher: bool = False) -> pd.DataFrame:
    rows = []
    for i, w in enumerate(FRUITS):
        for j, d in enumerate(FRUITS):
            row = {'qid': f'q{i}', 'query': f'{w} fruit', 'docno': d, 'text': f'a text about the {d} tree',
                   'label': int(i == j)}
            if teacher:
                row['score'] = 3.0 * (i == j) + 0.1 * j
            rows.append(row)
    return pd.DataFrame(rows)


def fruit_dev():
    from pyterrier_hypencoder.train import DevSet
    frame = fruit_frame()
    return DevSet(frame[['qid', 'query']].drop_duplicates(), frame[['qid', 'docno', 'label']],
                  frame[['docno', 'text']].drop_duplicates())


def fruit_hypencoder(tiny_bert):
    from pyterrier_hypencoder import Hypencoder
    # Mean pooling: the random tiny BERT's CLS vectors barely differ between texts.
    return Hypencoder.from_backbone(str(tiny_bert), qnet_layers=3, pooling='mean', seed=0, device='cpu')


def losses_of(trainer):
    return [h['loss'] for h in trainer.state.history if 'loss' in h]


def fruit_config(**kw):
    from pyterrier_hypencoder.train import TrainConfig
    base = dict(steps=20, batch_size=10, num_negatives=9, lr=1e-2, warmup_steps=2, log_every=1, loss='ce')
    base.update(kw)
    return TrainConfig(**base)


# ---- scripts of benchmarks/, examples/ and experiments/ (their tests) ----------------------------------------------

def load_script(folder: str, name: str):
    """``<folder>/<name>.py`` of the checkout imported as module ``name`` (those folders are not packages), with
    ``benchmarks/`` on the path while it loads, for the benchmark scripts' ``common`` module."""
    import importlib
    import sys
    added = [str(ROOT / f) for f in dict.fromkeys((folder, 'benchmarks')) if str(ROOT / f) not in sys.path]
    sys.path[:0] = added
    try:
        return importlib.import_module(name)
    finally:
        for path in added:
            sys.path.remove(path)

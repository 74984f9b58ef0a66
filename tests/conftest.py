"""Shared test fixtures: the parity checkpoint, a tiny random BERT, and offline datasets."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get('HYPENCODER_SHARED', ROOT.parent / 'shared'))
PARITY = SHARED / 'fixtures' / 'hypencoder-parity'
DATASETS = SHARED / 'datasets'
TOKENIZER_FILES = ('vocab.txt', 'tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json')
# ir_datasets reads its home when first imported, so it is fixed here, before any test imports it.
IRDS_HOME = Path(os.environ.setdefault('IR_DATASETS_HOME', str(ROOT / '.cache' / 'ir_datasets')))


@pytest.fixture(scope='module')
def one_thread():
    """Torch on one thread for a module: tiny models gain nothing from threads, and on a busy machine thread
    hand-offs make each small op ~20x slower."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='session')
def parity_dir() -> Path:
    if not (PARITY / 'expected.json').exists():
        pytest.skip(f'parity fixture not found at {PARITY} (set HYPENCODER_SHARED to the shared folder)')
    return PARITY


def make_tiny_bert(folder: Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A randomly initialised BERT saved with the fixture's bert-base-uncased tokenizer."""
    import torch
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
    import numpy as np
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
    import numpy as np
    scores, ids, reference = (np.asarray(a) for a in (scores, ids, reference))
    for q in range(len(ids)):
        true = reference[q][ids[q]]
        assert np.abs(scores[q] - true).max() <= bound, f'query {q}: a score is off by more than {bound:.2e}'
        assert (np.diff(scores[q]) <= 0).all(), f'query {q}: scores are not sorted'
        assert len(set(ids[q].tolist())) == len(ids[q]), f'query {q}: a document is returned twice'
        rest = np.delete(reference[q], ids[q])
        if len(rest):
            assert rest.max() <= true.min() + 2 * bound, f'query {q}: a better document was left out'

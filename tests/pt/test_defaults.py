"""What a newcomer meets with the defaults (issue #29, items 2, 3, 4 and 6): an untrained hyperhead says so, the
inner-product ANN index is built by corpus size and shown, costly search options warn, one progress bar per long
operation (and one where work takes long), and input mistakes explained."""
import warnings

import pandas as pd
import pyterrier as pt
import pytest
from helpers import short_docs

import pyterrier_hypencoder.pt.indexer as indexer_module
import pyterrier_hypencoder.pt.reranker as reranker_module
import pyterrier_hypencoder.pt.retriever as retriever_module
import pyterrier_hypencoder.pt.support as support_module
from pyterrier_hypencoder import Hypencoder, HypencoderIndexer, HypencoderReranker, HypencoderRetriever
from pyterrier_hypencoder.train import TrainConfig, Trainer, warm_start_hypencoder

pytestmark = pytest.mark.usefixtures('one_thread')

TOPICS = pd.DataFrame({'qid': ['1', '2'], 'query': ['neural retrieval', 'graph index']})


@pytest.fixture(scope='module')
def small_index(tiny_model, tmp_path_factory):
    """40 short documents, a 4-NN graph, no ANN index (below the automatic size)."""
    path = tmp_path_factory.mktemp('defaults') / 'index'
    return HypencoderIndexer(tiny_model, path, neighbours=4, verbose=False).index(short_docs(40))


def _untrained(tiny_bert):
    return Hypencoder.from_backbone(str(tiny_bert), qnet_layers=3, seed=0, device='cpu')


def _caught(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        result = fn()
    return result, [str(w.message) for w in caught]


# ---- item 2: an untrained hyperhead says so ------------------------------------------------------------------------

def test_an_untrained_head_warns_once_per_model(tiny_bert, small_index):
    model = _untrained(tiny_bert)
    assert model.head_trained is False
    retriever = HypencoderRetriever(model, small_index, num_results=5)
    _, first = _caught(lambda: retriever(TOPICS))
    untrained = [m for m in first if 'never trained' in m]
    assert len(untrained) == 1
    assert 'warm_start_hypencoder' in untrained[0] and 'pyterrier_hypencoder.train' in untrained[0]
    # once per model: neither the next query nor the reranker with the same model says it again
    reranker = HypencoderReranker(model, small_index)
    _, again = _caught(lambda: (retriever(TOPICS), reranker(retriever(TOPICS))))
    assert not [m for m in again if 'never trained' in m]
    # another untrained model warns for itself, from the reranker too
    _, other = _caught(lambda: HypencoderReranker(_untrained(tiny_bert))(TOPICS.assign(docno='d1', text='neural graph')))
    assert len([m for m in other if 'HypencoderReranker' in m and 'never trained' in m]) == 1


def test_warm_starts_training_and_saved_models_know_they_are_trained(tiny_bert, tmp_path, small_index):
    assert warm_start_hypencoder(str(tiny_bert), qnet_layers=2, device='cpu').head_trained
    model = _untrained(tiny_bert)
    model.save_pretrained(tmp_path / 'untrained')
    assert Hypencoder.from_pretrained(tmp_path / 'untrained', device='cpu').head_trained is False
    frame = pd.DataFrame([{'qid': f'q{i}', 'query': f'{a} fruit', 'docno': b, 'text': f'the {b} tree', 'label': int(a == b)}
                          for i, a in enumerate(['apple', 'pear', 'plum', 'lime']) for b in ['apple', 'pear', 'plum', 'lime']])
    Trainer(model, frame, TrainConfig(steps=1, batch_size=2, num_negatives=2, warmup_steps=0, loss='ce'),
            verbose=False).train()
    assert model.head_trained
    model.save_pretrained(tmp_path / 'trained')
    loaded = Hypencoder.from_pretrained(tmp_path / 'trained', device='cpu')
    assert loaded.head_trained
    _, caught = _caught(lambda: HypencoderRetriever(loaded, small_index, num_results=3)(TOPICS))
    assert not [m for m in caught if 'never trained' in m]


def test_released_checkpoints_are_trained(parity_model):
    assert parity_model.head_trained


# ---- item 3: the ANN index by size, shown, and costly options warned --------------------------------------------------

def test_ip_index_auto_builds_from_the_measured_size(tiny_model, tmp_path, monkeypatch):
    small = HypencoderIndexer(tiny_model, tmp_path / 'small', neighbours=0, verbose=False).index(short_docs(30))
    assert not small.has_ip_index()
    assert repr(small).endswith('no graph, no ip_index)')
    monkeypatch.setattr(indexer_module, 'AUTO_IP_INDEX_DOCS', 30)  # as if these 30 documents were a large corpus
    large = HypencoderIndexer(tiny_model, tmp_path / 'large', neighbours=0, verbose=False).index(short_docs(30))
    assert large.has_ip_index() and large.meta['ip_index']['m'] == 32
    assert repr(large).endswith('no graph, ip_index=hnsw32)')
    assert 'ip_index=None' in repr(HypencoderIndexer(tiny_model, tmp_path / 'x', ip_index=None))
    assert "ip_index='auto'" in repr(HypencoderIndexer(tiny_model, tmp_path / 'x'))
    with pytest.raises(ValueError, match='"auto"'):
        HypencoderIndexer(tiny_model, tmp_path / 'x', ip_index='hnsw')


def test_adaptive_search_on_a_large_index_without_ann_warns(tiny_model, small_index, tmp_path, monkeypatch):
    _, quiet = _caught(lambda: HypencoderRetriever(tiny_model, small_index, mode='adaptive'))
    assert not quiet  # below the size where an ANN index pays
    monkeypatch.setattr(retriever_module, 'AUTO_IP_INDEX_DOCS', 40)
    _, loud = _caught(lambda: HypencoderRetriever(tiny_model, small_index, mode='adaptive'))
    assert len(loud) == 1 and 'index.add_ip_index()' in loud[0] and 'all 40 documents' in loud[0]
    _, other_mode = _caught(lambda: HypencoderRetriever(tiny_model, small_index, mode='exhaustive'))
    assert not other_mode
    with_ann = HypencoderIndexer(tiny_model, tmp_path / 'ann', neighbours=0, ip_index='hnsw8', verbose=False).index(
        short_docs(40))
    _, drawn = _caught(lambda: HypencoderRetriever(tiny_model, with_ann, mode='adaptive'))
    assert not drawn


def test_a_graph_walk_sampling_most_of_the_corpus_warns(tiny_model, small_index):
    _, default = _caught(lambda: HypencoderRetriever(tiny_model, small_index, mode='graph'))  # n_initial=10000
    assert len(default) == 1 and 'exhaustive search' in default[0] and '100% of the 40' in default[0]
    assert 'n_initial=2' in default[0]  # what to give instead
    _, half = _caught(lambda: HypencoderRetriever(tiny_model, small_index, mode='graph', n_initial=20))
    assert len(half) == 1
    _, walk = _caught(lambda: HypencoderRetriever(tiny_model, small_index, mode='graph', n_initial=8))
    assert not walk


# ---- item 4: one progress bar per long operation -------------------------------------------------------------------------

def test_indexing_counts_documents_once(tiny_model, tmp_path, capsys):
    docs = pt.tqdm(short_docs(25), desc='corpus documents')  # a corpus iterator with a bar of its own
    capsys.readouterr()
    HypencoderIndexer(tiny_model, tmp_path / 'i', neighbours=0, verbose=True).index(docs)
    err = capsys.readouterr().err
    assert 'indexing' in err and '25/25' in err
    assert 'corpus documents' not in err  # its bar was put away before the first document


def test_indexing_a_pyterrier_corpus_iter_shows_one_bar(tiny_model, tmp_path, capsys, irds_home):
    docs = pt.get_dataset('irds:vaswani').get_corpus_iter(count=20)
    capsys.readouterr()
    HypencoderIndexer(tiny_model, tmp_path / 'v', neighbours=0, verbose=True).index(docs)
    err = capsys.readouterr().err
    assert '20/20' in err and 'vaswani documents' not in err


def test_indexing_without_bars_leaves_the_inputs_bar(tiny_model, tmp_path, capsys):
    docs = pt.tqdm(short_docs(12), desc='corpus documents')
    HypencoderIndexer(tiny_model, tmp_path / 'i', neighbours=0, verbose=False).index(docs)
    assert '12/12' in capsys.readouterr().err  # verbose=False silences the indexer, not the caller's own bar


def test_progress_appears_when_a_call_takes_long(tiny_model, small_index, capsys, monkeypatch):
    retriever = HypencoderRetriever(tiny_model, small_index, num_results=3)
    reranker = HypencoderReranker(tiny_model, small_index)
    assert retriever.verbose is None and reranker.verbose is None
    capsys.readouterr()
    reranker(retriever(TOPICS))
    assert capsys.readouterr().err == ''  # quick calls print nothing
    monkeypatch.setattr(support_module, 'PROGRESS_DELAY_S', 0.0)  # as if each call took long
    reranker(retriever(TOPICS))
    err = capsys.readouterr().err
    assert 'HypencoderRetriever' in err and '2/2 [' in err  # queries
    assert 'HypencoderReranker' in err and '6/6 [' in err  # the documents re-ranked
    # Without an index, the bar moves while the texts are encoded, a chunk at a time.
    monkeypatch.setattr(reranker_module, '_TEXT_CHUNK', 2)
    updates, real = [], reranker_module.progress

    def spy(*args, **kwargs):
        bar = real(*args, **kwargs)
        update = bar.update
        bar.update = lambda n=1: (updates.append(n), update(n))[1]
        return bar

    monkeypatch.setattr(reranker_module, 'progress', spy)
    frame = pd.DataFrame({'qid': ['1'] * 5, 'query': ['neural'] * 5, 'docno': list('abcde'),
                          'text': ['neural graph', 'index', 'query model', 'score', 'vector search']})
    HypencoderReranker(tiny_model)(frame)
    assert updates == [2, 2, 1] and '5/5 [' in capsys.readouterr().err
    monkeypatch.undo()
    HypencoderRetriever(tiny_model, small_index, num_results=3, verbose=True)(TOPICS)
    assert 'HypencoderRetriever' in capsys.readouterr().err
    HypencoderRetriever(tiny_model, small_index, num_results=3, verbose=False)(TOPICS)
    assert capsys.readouterr().err == ''


# ---- item 6: input mistakes explained --------------------------------------------------------------------------------------

def test_topics_with_text_instead_of_query_are_explained(tiny_model, small_index):
    topics = TOPICS.rename(columns={'query': 'text'})
    for transformer in (HypencoderRetriever(tiny_model, small_index), HypencoderReranker(tiny_model, small_index)):
        frame = topics if isinstance(transformer, HypencoderRetriever) else topics.assign(docno='d1')
        with pytest.raises(pt.validate.InputValidationError, match=r"'query' column.*get_topics\('text'\)"):
            transformer(frame)
    with pytest.raises(pt.validate.InputValidationError, match=r"needs the query text in a 'query' column; the input has "
                                                              r"\['qid'\]. Load topics with dataset.get_topics\(\)"):
        HypencoderRetriever(tiny_model, small_index)(TOPICS[['qid']])


def test_counts_agree_with_their_nouns(tiny_model, small_index):
    retriever = HypencoderRetriever(tiny_model, small_index)
    with pytest.raises(ValueError, match=r'^1 query is empty or whitespace only'):
        retriever(TOPICS.assign(query=['neural', ' ']))
    with pytest.raises(ValueError, match=r'^2 queries are empty'):
        retriever(TOPICS.assign(query=['', ' ']))
    with pytest.raises(TypeError, match=r'^1 query is not a string'):
        retriever(TOPICS.assign(query=['neural', None]))

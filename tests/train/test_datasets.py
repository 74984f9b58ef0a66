"""Datasets as training data: SciFact with BM25 candidates, and BM25 indexes that are not reused for other
documents."""
import pandas as pd
import pytest

pytestmark = pytest.mark.usefixtures('one_thread')


def test_training_data_from_scifact(irds_home, tmp_path):
    pytest.importorskip('pyterrier_pisa')
    from pyterrier_hypencoder.train import dataset_docs, dataset_topics, pisa_bm25, training_data_from_dataset
    docs = dataset_docs('irds:beir/scifact/train')
    assert len(docs) == 5183 and docs['text'].str.len().min() > 0
    bm25 = pisa_bm25(docs, tmp_path / 'pisa', num_results=20)
    topics = dataset_topics('irds:beir/scifact/train').head(8)
    frame = training_data_from_dataset('irds:beir/scifact/train', bm25, topics=topics, num_candidates=20)
    assert set(frame['qid']) == set(topics['qid'])
    assert (frame.groupby('qid')['label'].max() > 0).all()
    assert frame.groupby('qid').size().min() >= 20
    row = frame[frame.docno == frame.docno.iloc[0]].iloc[0]
    assert row['text'] == docs.set_index('docno').loc[row['docno'], 'text']


def test_pisa_bm25_is_not_reused_for_other_documents(tmp_path):
    pytest.importorskip('pyterrier_pisa')
    from pyterrier_hypencoder.train import pisa_bm25
    docs = pd.DataFrame({'docno': ['a', 'b', 'c'], 'text': ['apple tree', 'banana tree', 'cherry tree']})
    pisa_bm25(docs, tmp_path / 'bm25.pisa')
    assert len(pisa_bm25(docs, tmp_path / 'bm25.pisa')(pd.DataFrame({'qid': ['1'], 'query': ['apple']}))) == 1
    with pytest.raises(FileExistsError, match='holds a BM25 index of other documents'):
        pisa_bm25(docs.assign(text=['plum', 'pear', 'peach']), tmp_path / 'bm25.pisa')

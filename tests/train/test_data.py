"""Training data: groups and batch sampling, building candidates with a teacher, dev sets, frames on disk."""
import pandas as pd
import pyterrier as pt
import pytest
import torch
from helpers import FRUITS, fruit_config, fruit_frame, fruit_hypencoder

from pyterrier_hypencoder.train import (
    DevSet,
    Trainer,
    TrainingGroups,
    build_training_data,
    exhaustive_retrieve,
    load_frame,
    save_frame,
)

pytestmark = pytest.mark.usefixtures('one_thread')


def test_training_groups_sampling():
    frame = fruit_frame(teacher=True)
    extra = pd.DataFrame([{'qid': 'q1', 'query': 'banana fruit', 'docno': 'apple', 'text': 'a text about the apple tree',
                           'label': 1, 'score': 0.}])
    frame = pd.concat([frame[~((frame.qid == 'q1') & (frame.docno == 'apple'))], extra])  # q1 also likes apple
    groups = TrainingGroups(frame)
    assert len(groups) == 10 and groups.use_teacher
    gen = torch.Generator().manual_seed(0)
    batch = groups.batch([0, 1, 2], num_negatives=4, generator=gen)
    assert batch.doc_index.shape == (3, 5) and batch.teacher.shape == (3, 5)
    for b, i in enumerate([0, 1, 2]):
        docnos = [groups.docnos[k] for k in batch.doc_index[b].tolist()]
        assert docnos[0] in {groups.docnos[k] for k in groups.positive_docs(i)}
        assert not set(docnos[1:]) & {groups.docnos[k] for k in groups.positive_docs(i)}
        assert len(set(docnos[1:])) == 4  # enough negatives: sampled without replacement
    assert groups.docnos[int(batch.doc_index[0, 0])] == 'apple'
    assert batch.ignore[1, 0]  # q0's positive (apple) is also relevant to q1
    for b, i in enumerate([0, 1, 2]):
        for j in range(3):
            assert bool(batch.ignore[b, j]) == (b != j and int(batch.doc_index[j, 0]) in groups.positive_docs(i))


def test_training_groups_errors_and_warnings():
    with pytest.raises(ValueError, match='missing'):
        TrainingGroups(pd.DataFrame({'qid': ['1'], 'query': ['x']}))
    with pytest.raises(ValueError, match='label column'):
        TrainingGroups(fruit_frame().drop(columns='label'))
    with pytest.raises(ValueError, match='no score column'):
        TrainingGroups(fruit_frame(), use_teacher=True)
    frame = fruit_frame()
    frame.loc[frame.qid == 'q3', 'label'] = 0
    with pytest.warns(UserWarning, match='1 queries'):
        assert len(TrainingGroups(frame)) == 9


def test_training_groups_score_only_uses_best_teacher_score_as_positive():
    groups = TrainingGroups(fruit_frame(teacher=True).drop(columns='label'))
    batch = groups.batch([0], 2, torch.Generator().manual_seed(0))
    assert groups.docnos[int(batch.doc_index[0, 0])] == 'apple'


class _FixedRetriever(pt.Transformer):
    def transform(self, topics):
        rows = [{'qid': q, 'query': t, 'docno': d, 'score': float(-r), 'rank': r}
                for q, t in zip(topics['qid'], topics['query']) for r, d in enumerate(FRUITS[:4])]
        return pd.DataFrame(rows)


def test_build_training_data_with_teacher():
    topics = pd.DataFrame({'qid': ['1', '2', '3'], 'query': ['apple?', 'plum?', 'nothing']})
    qrels = pd.DataFrame({'qid': ['1', '2', '2'], 'docno': ['apple', 'plum', 'banana'], 'label': [1, 2, 0]})
    texts = {d: f'all about {d}' for d in FRUITS}
    teacher = pt.apply.doc_score(lambda row: float(len(row['text']) + (row['docno'] in row['query'])))
    frame = build_training_data(topics, qrels, _FixedRetriever(), texts, num_candidates=3, teacher=teacher)
    assert list(frame.columns) == ['qid', 'query', 'docno', 'text', 'label', 'score']
    assert set(frame['qid']) == {'1', '2'}  # query 3 has no positive
    q2 = frame[frame.qid == '2'].set_index('docno')
    assert set(q2.index) == {'apple', 'banana', 'cherry', 'plum'}  # top 3 candidates + the missed positive
    assert q2.loc['plum', 'label'] == 2 and q2.loc['banana', 'label'] == 0 and q2.loc['cherry', 'label'] == 0
    assert q2.loc['plum', 'score'] == len('all about plum') + 1
    assert frame.loc[frame.qid == '1', 'text'].tolist()[0] == 'all about apple'  # positives first
    with pytest.raises(KeyError, match='no text'):
        build_training_data(topics, qrels, _FixedRetriever(), {'apple': 'x'}, num_candidates=3)


def test_dev_set_keeps_only_judged_dev_queries(tiny_bert):
    frame = fruit_frame()
    topics = frame[['qid', 'query']].drop_duplicates().head(4)
    dev = DevSet(topics.assign(qid=topics['qid'].replace({'q3': 'unjudged'})), frame[['qid', 'docno', 'label']],
                 frame[['docno', 'text']].drop_duplicates())
    assert dev.topics['qid'].tolist() == ['q0', 'q1', 'q2']
    # the other queries' judgements are dropped: measures average over the qrels' queries
    assert set(dev.qrels['qid']) == {'q0', 'q1', 'q2'}
    trainer = Trainer(fruit_hypencoder(tiny_bert), frame, fruit_config(), dev=dev, verbose=False)
    run = exhaustive_retrieve(trainer.model, dev.topics, trainer.model.encode_docs(dev.docs['text'].tolist()),
                              dev.docs['docno'].tolist())
    import ir_measures
    expected = ir_measures.calc_aggregate([ir_measures.Rprec], dev.qrels.rename(columns={
        'qid': 'query_id', 'docno': 'doc_id', 'label': 'relevance'}), run.rename(columns={'qid': 'query_id',
                                                                                         'docno': 'doc_id'}))
    assert trainer.evaluate() == pytest.approx(expected[ir_measures.Rprec], abs=1e-6)


def test_save_and_load_frame(tmp_path):
    frame = fruit_frame(teacher=True)
    for ext in ('jsonl', 'tsv'):
        save_frame(frame, tmp_path / f'train.{ext}')
        back = load_frame(tmp_path / f'train.{ext}')
        pd.testing.assert_frame_equal(back[frame.columns], frame, check_dtype=False)

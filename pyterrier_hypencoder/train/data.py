"""Training data in PyTerrier form, and helpers that build it from a PyTerrier dataset.

Training data is a DataFrame with one row per (query, document) pair: ``qid, query, docno, text`` and ``label``
(relevance, > 0 marks a positive) and/or ``score`` (a teacher's score, for distillation). Build one from a dataset
with :func:`training_data_from_dataset` (or :func:`build_training_data` from topics, qrels and a retriever): the
first-stage retriever supplies the candidates that become hard negatives, the qrels the positives, and an
optional PyTerrier reranker the teacher scores. :class:`TrainingGroups` turns such a frame into per-query groups
and samples training batches from them.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd
import pyterrier as pt
import torch

from .datasets import as_dataset, dataset_docs, dataset_topics

__all__ = ['TrainingGroups', 'Batch', 'QuerySampler', 'DevSet', 'build_training_data', 'training_data_from_dataset',
           'save_frame', 'load_frame']

TextSource = Union[pt.Transformer, Mapping[str, str], pd.DataFrame, Callable[[Sequence[str]], Sequence[str]]]


# ---- building training data ---------------------------------------------------------------------------------

def _attach_text(frame: pd.DataFrame, text: TextSource) -> pd.DataFrame:
    if isinstance(text, pt.Transformer):
        out = text(frame.drop(columns=['text'], errors='ignore'))
        if 'text' not in out.columns:
            raise ValueError(f'the text loader {text!r} added no "text" column (columns: {list(out.columns)})')
        return out
    if isinstance(text, pd.DataFrame):
        if not {'docno', 'text'} <= set(text.columns):
            raise ValueError(f'a text frame needs docno and text columns; got {list(text.columns)}')
        text = dict(zip(text['docno'], text['text']))
    if isinstance(text, Mapping):
        missing = [d for d in frame['docno'].unique() if d not in text]
        if missing:
            raise KeyError(f'{len(missing)} docnos have no text, e.g. {missing[:5]}')
        return frame.assign(text=frame['docno'].map(text))
    if callable(text):
        return frame.assign(text=list(text(frame['docno'].tolist())))
    raise TypeError(f'text must be a text-loading transformer, a docno->text mapping, a docno/text frame or a '
                    f'function of docnos; got {type(text).__name__}')


def build_training_data(topics: pd.DataFrame, qrels: pd.DataFrame, retriever: pt.Transformer, text: TextSource, *,
                        num_candidates: int = 100, teacher: Optional[pt.Transformer] = None, add_positives: bool = True,
                        min_label: int = 1, verbose: bool = False) -> pd.DataFrame:
    """Builds training data: first-stage candidates as negatives, qrels positives, optional teacher scores.

    Args:
        topics: ``qid, query`` of the training queries.
        qrels: ``qid, docno, label``.
        retriever: a first-stage PyTerrier retriever (e.g. BM25); its top ``num_candidates`` per query are the
            candidates. Unjudged candidates become negatives (label 0).
        text: where document text comes from: a text-loading transformer (e.g. ``dataset.text_loader()``), a
            docno -> text mapping or frame, or a function of a list of docnos.
        num_candidates: candidates kept per query.
        teacher: an optional PyTerrier reranker (``qid, query, docno, text`` -> ``score``) whose scores become the
            ``score`` column, for distillation.
        add_positives: add judged positives that the retriever missed (so every query keeps a positive).
        min_label: qrels labels >= this are positives.
        verbose: progress bars.

    Returns:
        A frame ``qid, query, docno, text, label`` (and ``score`` with a teacher), grouped by query. Queries
        without any positive are dropped.
    """
    for name, frame, cols in (('topics', topics, {'qid', 'query'}), ('qrels', qrels, {'qid', 'docno', 'label'})):
        if not cols <= set(frame.columns):
            raise ValueError(f'{name} needs columns {sorted(cols)}; got {list(frame.columns)}')
    qrels = qrels[['qid', 'docno', 'label']].astype({'qid': str, 'docno': str})
    positives = qrels[qrels['label'] >= min_label]
    topics = topics[['qid', 'query']].astype({'qid': str})
    topics = topics[topics['qid'].isin(set(positives['qid']))].reset_index(drop=True)
    if not len(topics):
        raise ValueError(f'no topic has a positive in the qrels (labels >= {min_label})')

    res = retriever(topics)
    if 'rank' not in res.columns:
        res = pt.model.add_ranks(res)
    res = res[res['rank'] < num_candidates][['qid', 'docno']].astype({'qid': str, 'docno': str})
    pairs = res
    if add_positives:
        pairs = pd.concat([res, positives[['qid', 'docno']]]).drop_duplicates(['qid', 'docno'])
    pairs = pairs.merge(topics, on='qid')
    labels = qrels.drop_duplicates(['qid', 'docno'])
    pairs = pairs.merge(labels, on=['qid', 'docno'], how='left')
    pairs['label'] = pairs['label'].fillna(0).astype(int)
    pairs = _attach_text(pairs.reset_index(drop=True), text)
    if teacher is not None:
        scored = teacher(pairs[['qid', 'query', 'docno', 'text']])
        if 'score' not in scored.columns:
            raise ValueError(f'the teacher {teacher!r} returned no score column')
        scored = scored[['qid', 'docno', 'score']].astype({'qid': str, 'docno': str})
        pairs = pairs.merge(scored.drop_duplicates(['qid', 'docno']), on=['qid', 'docno'], how='left')
        if pairs['score'].isna().any():
            raise ValueError(f'the teacher {teacher!r} left {int(pairs["score"].isna().sum())} pairs unscored')
    columns = ['qid', 'query', 'docno', 'text', 'label'] + (['score'] if teacher is not None else [])
    return pairs[columns].sort_values(['qid', 'label'], ascending=[True, False], kind='stable').reset_index(drop=True)


def training_data_from_dataset(dataset, retriever: pt.Transformer, *, fields: Union[str, Sequence[str]] = ('title', 'text'),
                               topics_variant: Optional[str] = None, num_candidates: int = 100,
                               teacher: Optional[pt.Transformer] = None, topics: Optional[pd.DataFrame] = None,
                               min_label: int = 1, verbose: bool = False) -> pd.DataFrame:
    """:func:`build_training_data` for a PyTerrier dataset's (train) split.

    Args:
        dataset: a dataset or its name, e.g. ``'irds:beir/scifact/train'``.
        retriever: the first-stage retriever over the dataset's corpus (see :func:`.datasets.pisa_bm25`).
        fields: document fields joined into ``text``.
        topics_variant: the query field (see :func:`.datasets.dataset_topics`).
        num_candidates: candidates kept per query.
        teacher: optional reranker adding teacher scores.
        topics: use these topics instead of the dataset's (e.g. a subset after :func:`.datasets.split_topics`).
        min_label: qrels labels >= this are positives.
        verbose: progress bars.
    """
    dataset = as_dataset(dataset)
    if topics is None:
        topics = dataset_topics(dataset, topics_variant)
    field_list = [fields] if isinstance(fields, str) else list(fields)
    loader = dataset.text_loader(field_list)
    joined = loader >> pt.apply.text(lambda row: ' '.join(str(row[f]) for f in field_list if row[f]).strip())
    return build_training_data(topics, dataset.get_qrels(), retriever, joined, num_candidates=num_candidates,
                               teacher=teacher, min_label=min_label, verbose=verbose)


# ---- sampling -----------------------------------------------------------------------------------------------

@dataclass
class Batch:
    """One training batch: ``B`` queries, each with one positive and ``n`` negatives.

    Attributes:
        qids: the queries' ids (length B).
        queries: the query texts.
        query_index: row of each query in :attr:`TrainingGroups.qids` (``[B]``).
        doc_index: ``[B, 1 + n]`` rows in :attr:`TrainingGroups.docnos`, the positive first.
        teacher: ``[B, 1 + n]`` teacher scores, or None.
        ignore: ``[B, B]`` True where query ``j``'s positive is also relevant to query ``i`` (``i != j``), so the
            in-batch losses do not treat it as a negative.
    """
    qids: List[str]
    queries: List[str]
    query_index: torch.Tensor
    doc_index: torch.Tensor
    teacher: Optional[torch.Tensor]
    ignore: torch.Tensor


class TrainingGroups:
    """Training data grouped by query, with seeded batch sampling.

    Positives are rows with ``label > 0``; with only a ``score`` column, each query's best-scored document is its
    positive. Negatives are the other rows of the query. Each batch takes ``batch_size`` queries (a seeded shuffle,
    reshuffled every epoch), one random positive each and ``num_negatives`` random negatives (drawn with
    replacement when a query has fewer).
    """

    def __init__(self, frame: pd.DataFrame, *, use_teacher: Optional[bool] = None):
        """
        Args:
            frame: ``qid, query, docno, text`` and ``label`` and/or ``score`` (see the module notes).
            use_teacher: carry teacher scores (the ``score`` column) into batches; default: when present.
        """
        missing = {'qid', 'query', 'docno', 'text'} - set(frame.columns)
        if missing:
            raise ValueError(f'training data needs columns qid, query, docno, text; missing {sorted(missing)} '
                             f'(have {list(frame.columns)})')
        if 'label' not in frame.columns and 'score' not in frame.columns:
            raise ValueError('training data needs a label column (relevance, > 0 for positives) or a score column '
                             '(teacher scores); it has neither')
        if use_teacher is None:
            use_teacher = 'score' in frame.columns
        if use_teacher and 'score' not in frame.columns:
            raise ValueError('use_teacher=True but the training data has no score column; add teacher scores '
                             '(build_training_data(..., teacher=...)) or train with the cross-entropy loss')
        frame = frame.drop_duplicates(['qid', 'docno']).reset_index(drop=True)
        frame = frame.astype({'qid': str, 'docno': str})
        if frame['text'].isna().any():
            raise ValueError(f'{int(frame["text"].isna().sum())} rows have no text')

        doc_codes, docnos = pd.factorize(frame['docno'])
        self.docnos: List[str] = list(docnos)
        first_text = frame.groupby(doc_codes, sort=True)['text'].first()
        self.doc_texts: List[str] = first_text.tolist()
        self.use_teacher = bool(use_teacher)

        self.qids: List[str] = []
        self.queries: List[str] = []
        self._pos: List[np.ndarray] = []
        self._neg: List[np.ndarray] = []
        self._pos_sets: List[frozenset] = []
        teacher = frame['score'].to_numpy(np.float32) if 'score' in frame.columns else None
        if teacher is not None and not np.isfinite(teacher).all():
            bad = frame.loc[~np.isfinite(teacher), ['qid', 'docno']].head(3).to_dict('records')
            raise ValueError(f'the score column has {int((~np.isfinite(teacher)).sum())} missing or infinite teacher '
                             f'scores, e.g. {bad}; drop or fill those rows')
        labels = frame['label'].to_numpy() if 'label' in frame.columns else None
        self._teacher = teacher if self.use_teacher else None
        dropped = 0
        for qid, rows in frame.groupby('qid', sort=True).indices.items():
            if labels is not None:
                is_pos = labels[rows] > 0
            else:
                is_pos = np.zeros(len(rows), dtype=bool)
                is_pos[np.argmax(teacher[rows])] = True
            pos, neg = rows[is_pos], rows[~is_pos]
            if not len(pos) or not len(neg):
                dropped += 1
                continue
            self.qids.append(qid)
            self.queries.append(str(frame['query'].iat[rows[0]]))
            self._pos.append(pos)
            self._neg.append(neg)
            self._pos_sets.append(frozenset(doc_codes[pos].tolist()))
        self._doc_codes = doc_codes
        if not self.qids:
            raise ValueError('no query in the training data has both a positive and a negative')
        if dropped:
            warnings.warn(f'{dropped} queries without a positive or without a negative were left out of training',
                          stacklevel=2)

    def __len__(self) -> int:
        return len(self.qids)

    def __repr__(self) -> str:
        return (f'TrainingGroups({len(self)} queries, {len(self.docnos)} docs, '
                f'teacher={"yes" if self.use_teacher else "no"})')

    def positive_docs(self, i: int) -> frozenset:
        """Rows (in :attr:`docnos`) of query ``i``'s positives."""
        return self._pos_sets[i]

    def batch(self, query_index: Sequence[int], num_negatives: int, generator: torch.Generator) -> Batch:
        """Samples one positive and ``num_negatives`` negatives for each of the given queries."""
        doc_rows = np.empty((len(query_index), 1 + num_negatives), dtype=np.int64)
        for b, i in enumerate(query_index):
            pos, neg = self._pos[i], self._neg[i]
            doc_rows[b, 0] = pos[int(torch.randint(len(pos), (1,), generator=generator))]
            if len(neg) >= num_negatives:
                pick = torch.randperm(len(neg), generator=generator)[:num_negatives].numpy()
            else:
                pick = torch.randint(len(neg), (num_negatives,), generator=generator).numpy()
            doc_rows[b, 1:] = neg[pick]
        doc_index = torch.as_tensor(self._doc_codes[doc_rows])
        ignore = torch.tensor([[j != b and int(doc_index[j, 0]) in self._pos_sets[i] for j in range(len(query_index))]
                               for b, i in enumerate(query_index)], dtype=torch.bool)
        teacher = torch.as_tensor(self._teacher[doc_rows]) if self._teacher is not None else None
        return Batch(qids=[self.qids[i] for i in query_index], queries=[self.queries[i] for i in query_index],
                     query_index=torch.as_tensor(list(query_index)), doc_index=doc_index, teacher=teacher,
                     ignore=ignore)


class QuerySampler:
    """Seeded epoch-wise shuffling of query indices; its whole state is tensors, so it checkpoints safely."""

    def __init__(self, n: int, seed: int):
        self.n = n
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(n, generator=self.generator)
        self.position = 0

    def next(self, batch_size: int) -> List[int]:
        if batch_size > self.n:
            raise ValueError(f'batch size {batch_size} exceeds the {self.n} training queries; use a smaller batch')
        if self.position + batch_size > self.n:
            self.order = torch.randperm(self.n, generator=self.generator)
            self.position = 0
        out = self.order[self.position:self.position + batch_size].tolist()
        self.position += batch_size
        return out

    def state_dict(self) -> dict:
        return {'generator': self.generator.get_state(), 'order': self.order.clone(),
                'position': torch.tensor(self.position)}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state['generator'])
        self.order = state['order'].clone()
        self.position = int(state['position'])


# ---- evaluation data ----------------------------------------------------------------------------------------

@dataclass
class DevSet:
    """Queries, judgements and the documents to rank, for choosing the best checkpoint during training.

    Attributes:
        topics: ``qid, query``.
        qrels: ``qid, docno, label``.
        docs: ``docno, text`` of the documents ranked exhaustively for each query (the corpus, or a pool of
            candidates when the corpus is large).
    """
    topics: pd.DataFrame
    qrels: pd.DataFrame
    docs: pd.DataFrame

    def __post_init__(self):
        for name, cols in (('topics', {'qid', 'query'}), ('qrels', {'qid', 'docno', 'label'}), ('docs', {'docno', 'text'})):
            frame = getattr(self, name)
            if not cols <= set(frame.columns):
                raise ValueError(f'DevSet {name} needs columns {sorted(cols)}; got {list(frame.columns)}')
        self.topics = self.topics[['qid', 'query']].astype({'qid': str}).reset_index(drop=True)
        self.qrels = self.qrels[['qid', 'docno', 'label']].astype({'qid': str, 'docno': str})
        self.docs = self.docs[['docno', 'text']].astype({'docno': str}).reset_index(drop=True)
        judged = set(self.qrels.loc[self.qrels['label'] > 0, 'qid'])
        self.topics = self.topics[self.topics['qid'].isin(judged)].reset_index(drop=True)
        if not len(self.topics):
            raise ValueError('no dev query has a relevant document in the dev qrels')
        # measures average over the queries of the qrels: keep only the dev queries' judgements
        self.qrels = self.qrels[self.qrels['qid'].isin(set(self.topics['qid']))].reset_index(drop=True)

    @classmethod
    def from_dataset(cls, dataset, *, fields: Union[str, Sequence[str]] = ('title', 'text'),
                     topics_variant: Optional[str] = None, topics: Optional[pd.DataFrame] = None,
                     docs: Optional[pd.DataFrame] = None) -> DevSet:
        """A dev set from a dataset split: its topics (or ``topics``), qrels and whole corpus (or ``docs``)."""
        dataset = as_dataset(dataset)
        if topics is None:
            topics = dataset_topics(dataset, topics_variant)
        if docs is None:
            docs = dataset_docs(dataset, fields)
        return cls(topics, dataset.get_qrels(), docs)

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> DevSet:
        """A dev set from a frame in the training-data format (``qid, query, docno, text, label``, e.g. a file
        from ``--save-train-data`` of held-out queries): each query ranks every document of the frame."""
        missing = [c for c in ('qid', 'query', 'docno', 'text', 'label') if c not in frame.columns]
        if missing:
            raise ValueError(f'dev data needs columns qid, query, docno, text and label; it lacks {missing}')
        return cls(frame[['qid', 'query']].drop_duplicates('qid'), frame[['qid', 'docno', 'label']],
                   frame[['docno', 'text']].drop_duplicates('docno'))


def save_frame(frame: pd.DataFrame, path: Union[str, os.PathLike]) -> None:
    """Writes training data as ``.jsonl`` / ``.tsv`` / ``.parquet`` (by extension)."""
    path = Path(path)
    tmp = path.with_name(f'.{path.name}.tmp')  # renamed at the end: an interrupted write leaves no short file
    if path.suffix == '.parquet':
        frame.to_parquet(tmp, index=False)
    elif path.suffix in ('.tsv', '.txt'):
        frame.to_csv(tmp, sep='\t', index=False)
    else:
        frame.to_json(tmp, orient='records', lines=True)
    os.replace(tmp, path)


def load_frame(path: Union[str, os.PathLike]) -> pd.DataFrame:
    """Reads training data written by :func:`save_frame` (``.jsonl``, ``.tsv`` or ``.parquet``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f'data file {path.absolute()} does not exist')
    if path.suffix == '.parquet':
        frame = pd.read_parquet(path)
    elif path.suffix in ('.tsv', '.txt'):
        frame = pd.read_csv(path, sep='\t', dtype={'qid': str, 'docno': str}, keep_default_na=False)
    elif path.suffix in ('.jsonl', '.json'):
        frame = pd.read_json(path, lines=True, dtype={'qid': str, 'docno': str})
    else:
        raise ValueError(f'unknown training data format {path.suffix!r}; use .jsonl, .tsv or .parquet')
    return frame.astype({c: str for c in ('qid', 'docno') if c in frame.columns})

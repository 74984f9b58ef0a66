"""Where training and evaluation data come from: PyTerrier datasets, BEIR-layout folders, and BM25 over them.

Wherever a dataset is taken (:func:`as_dataset`, and so the training command line's ``--train``, ``--dev`` and
``--test``), a BEIR-layout folder serves as well as a PyTerrier dataset name: :class:`BeirSplit` reads one split
of it (its ``qrels/<split>.tsv``) as a PyTerrier dataset, e.g. ``../shared/datasets/debian-packages``, which
ir_datasets does not know.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from functools import cached_property
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Union

import numpy as np
import pandas as pd
import pyterrier as pt

from ..optional import require

__all__ = ['BeirFolder', 'BeirSplit', 'as_dataset', 'dataset_docs', 'dataset_topics', 'is_beir_folder', 'pisa_bm25',
           'read_beir_folder', 'split_topics']

_BEIR_FILES = ('corpus.jsonl', 'queries.jsonl', 'qrels')


def is_beir_folder(name) -> bool:
    """Whether ``name`` is a folder in the BEIR layout (``corpus.jsonl``, ``queries.jsonl``, ``qrels/``)."""
    if not isinstance(name, (str, os.PathLike)):
        return False
    folder = Path(name).expanduser()
    return folder.is_dir() and all((folder / f).exists() for f in _BEIR_FILES)


def as_dataset(dataset, split: str = 'test'):
    """``dataset`` itself, the PyTerrier dataset of that name (e.g. ``'irds:beir/scifact/test'``), or ``split`` of a
    BEIR-layout folder (:class:`BeirSplit`).

    Raises:
        KeyError: for a name that is neither a dataset PyTerrier knows nor a BEIR-layout folder (PyTerrier's message).
        FileNotFoundError: for a folder that is not in the BEIR layout.
    """
    if isinstance(dataset, os.PathLike) or (isinstance(dataset, str) and Path(dataset).expanduser().is_dir()):
        return BeirSplit(dataset, split)
    return pt.get_dataset(dataset) if isinstance(dataset, str) else dataset


class BeirSplit(pt.datasets.Dataset):
    """One split of a BEIR-layout folder as a PyTerrier dataset: topics and qrels of ``qrels/<split>.tsv``, the
    folder's whole corpus.

    Layout: ``corpus.jsonl`` (rows ``_id, title, text``), ``queries.jsonl`` (``_id, text``) and
    ``qrels/<split>.tsv`` (``query-id, corpus-id, score`` with a header), as BEIR distributes its collections and
    as ``../shared/datasets/debian-packages`` is laid out.

    Example::

        train = BeirSplit('../shared/datasets/debian-packages', 'train')
        train.get_topics()       # qid, query: the queries judged in qrels/train.tsv
        train.get_corpus_iter()  # {'docno', 'title', 'text'} dicts
    """

    def __init__(self, folder: Union[str, os.PathLike], split: str = 'test'):
        """
        Args:
            folder: the BEIR-layout folder.
            split: the qrels file to use, ``qrels/<split>.tsv``.

        Raises:
            FileNotFoundError: naming the layout file that is missing. A missing split is reported when its topics
                or qrels are asked for (or by :meth:`check_split`).
        """
        self.folder = Path(folder).expanduser().absolute()
        self.split = split
        for name in _BEIR_FILES:
            if not (self.folder / name).exists():
                raise FileNotFoundError(f'{self.folder / name} is missing: {self.folder} is not a BEIR-layout folder '
                                        '(corpus.jsonl, queries.jsonl, qrels/<split>.tsv)')

    def check_split(self) -> None:
        """Raises a FileNotFoundError, naming the splits the folder has, unless it has this one (the corpus alone
        needs none)."""
        if not (self.folder / 'qrels' / f'{self.split}.tsv').exists():
            have = sorted(p.stem for p in (self.folder / 'qrels').glob('*.tsv'))
            raise FileNotFoundError(f'{self.folder} has no {self.split} split (no qrels/{self.split}.tsv); it has {have}')

    def __repr__(self) -> str:
        return f'BeirSplit({str(self.folder)!r}, {self.split!r})'

    def __str__(self) -> str:
        return f'{self.folder} ({self.split})'

    @cached_property
    def _qrels(self) -> pd.DataFrame:
        self.check_split()
        q = pd.read_csv(self.folder / 'qrels' / f'{self.split}.tsv', sep='\t', dtype={'query-id': str, 'corpus-id': str})
        return pd.DataFrame({'qid': q['query-id'], 'docno': q['corpus-id'], 'label': q['score'].astype(int)})

    def get_topics(self, variant: Optional[str] = None) -> pd.DataFrame:
        """The queries judged in this split, as ``qid, query`` (``variant`` may only be ``text``, the one field)."""
        if variant not in (None, 'text', 'query'):
            raise ValueError(f'{self!r} has one query field, text; got the topics variant {variant!r}')
        queries = pd.read_json(self.folder / 'queries.jsonl', lines=True, dtype={'_id': str})
        queries = pd.DataFrame({'qid': queries['_id'], 'query': queries['text']})
        return queries[queries['qid'].isin(set(self._qrels['qid']))].reset_index(drop=True)

    def get_qrels(self, variant: Optional[str] = None) -> pd.DataFrame:
        """This split's judgements, ``qid, docno, label``."""
        return self._qrels.copy()

    def _documents(self):
        with open(self.folder / 'corpus.jsonl', encoding='utf-8') as f:
            for line in f:
                if line.strip():
                    d = json.loads(line)
                    yield {'docno': str(d['_id']), 'title': d.get('title') or '', 'text': d.get('text') or ''}

    def get_corpus_iter(self, *, verbose: bool = True):
        """The corpus as ``{'docno', 'title', 'text'}`` dicts, in file order (with a progress bar when ``verbose``)."""
        if not verbose:
            return self._documents()
        with open(self.folder / 'corpus.jsonl', 'rb') as f:
            total = sum(1 for line in f if line.strip())
        return pt.tqdm(self._documents(), total=total, desc=f'{self.folder.name} documents', unit='doc')

    def text_loader(self, fields: Union[str, Sequence[str]] = 'text', **kwargs) -> pt.Transformer:
        """A transformer adding the documents' ``fields`` (``title``, ``text``) by ``docno``, as ir_datasets' does."""
        fields: List[str] = [fields] if isinstance(fields, str) else list(fields)
        unknown = sorted(set(fields) - {'title', 'text'})
        if unknown:
            raise ValueError(f'{self!r} documents have the fields title and text; got {unknown}')
        table = pd.DataFrame(self._documents()).set_index('docno')[fields]

        def add(frame: pd.DataFrame) -> pd.DataFrame:
            missing = set(frame['docno'].astype(str)) - set(table.index)
            if missing:
                raise KeyError(f'{len(missing)} docnos are not in {self.folder / "corpus.jsonl"}, e.g. {sorted(missing)[:5]}')
            docnos = frame['docno'].astype(str)
            return frame.assign(**{f: docnos.map(table[f]) for f in fields})

        return pt.apply.generic(add)


def dataset_topics(dataset, variant: Optional[str] = None) -> pd.DataFrame:
    """A dataset's topics as ``qid, query``; ``variant`` picks the query field (NFCorpus needs ``'text'``).

    When ``variant`` is None the dataset's default is used, falling back to ``'text'`` for datasets (such as BEIR's
    NFCorpus) whose default topics carry several fields but no ``query`` column.
    """
    dataset = as_dataset(dataset)
    topics = dataset.get_topics(variant) if variant else dataset.get_topics()
    if 'query' not in topics.columns and variant is None:
        topics = dataset.get_topics('text')
    if 'query' not in topics.columns:
        raise ValueError(f'the topics of {dataset} have no query column (columns: {list(topics.columns)}); '
                         'pass the query field as the topics variant, e.g. variant="text"')
    return topics[['qid', 'query']].reset_index(drop=True)


def dataset_docs(dataset, fields: Union[str, Sequence[str]] = ('title', 'text'), verbose: bool = False) -> pd.DataFrame:
    """A dataset's corpus as a ``docno, text`` frame, the ``fields`` joined with a space (missing fields skipped)."""
    fields = [fields] if isinstance(fields, str) else list(fields)
    rows = []
    for doc in as_dataset(dataset).get_corpus_iter(verbose=verbose):
        present = [str(doc[f]) for f in fields if doc.get(f)]
        if not any(f in doc for f in fields):
            raise KeyError(f'documents have none of the fields {fields}; they have {sorted(doc)}')
        rows.append((doc['docno'], ' '.join(present).strip()))
    return pd.DataFrame(rows, columns=['docno', 'text'])


def pisa_bm25(docs: Union[pd.DataFrame, Sequence[dict]], path: Union[str, os.PathLike], *, num_results: int = 1000,
              threads: int = 1, strip_punctuation: bool = False):
    """BM25 from pyterrier-pisa over ``docs`` (``docno, text``), indexing into ``path`` unless already built there.

    An index already at ``path`` is reused only when it was built over the same documents (a fingerprint of the
    docnos and texts is kept beside it, in ``<path>.corpus``): a reused output folder must not give BM25 over
    another corpus.

    Args:
        docs: the documents, ``docno`` and ``text``.
        path: the PISA index folder.
        num_results: documents retrieved per query.
        threads: PISA's threads.
        strip_punctuation: replace punctuation in queries by spaces before BM25 (PISA's query parser rejects some,
            e.g. debian-packages' ``c++`` and ``x.org``), and give the original queries back after.

    Raises:
        ImportError: pyterrier-pisa is not installed.
        FileExistsError: when ``path`` holds a BM25 index of other documents.
    """
    require('pyterrier_pisa', purpose='pisa_bm25')
    from pyterrier_pisa import PisaIndex
    path = Path(path).absolute()
    records = docs.to_dict('records') if isinstance(docs, pd.DataFrame) else list(docs)
    digest = hashlib.sha256()
    for d in records:
        digest.update(f'{d["docno"]}\t{d["text"]}\n'.encode('utf-8', 'surrogatepass'))
    stamp = Path(f'{path}.corpus')
    index = PisaIndex(str(path), text_field='text', threads=threads)
    if index.built():
        known = stamp.read_text().strip() if stamp.exists() else None
        if (known is not None and known != digest.hexdigest()) or (known is None and len(index) != len(records)):
            raise FileExistsError(f'{path} holds a BM25 index of other documents ({len(index)} documents; these are '
                             f'{len(records)}); delete it, or give another path')
    else:
        index.index({'docno': d['docno'], 'text': d['text']} for d in records)
    stamp.write_text(digest.hexdigest() + '\n')
    bm25 = index.bm25(num_results=num_results, threads=threads)
    if not strip_punctuation:
        return bm25
    return pt.apply.query(lambda row: re.sub(r'[^\w\s]', ' ', row['query'])) >> bm25 >> pt.rewrite.reset()


def split_topics(topics: pd.DataFrame, fraction: float, seed: int = 0):
    """Splits topics into ``(train, held_out)`` with ``fraction`` of the queries held out (seeded, by qid)."""
    if not 0 < fraction < 1:
        raise ValueError(f'fraction must be between 0 and 1; got {fraction}')
    qids = np.array(sorted(topics['qid'].unique()))
    rng = np.random.default_rng(seed)
    held = set(rng.choice(qids, size=max(1, int(round(len(qids) * fraction))), replace=False))
    mask = topics['qid'].isin(held)
    return topics[~mask].reset_index(drop=True), topics[mask].reset_index(drop=True)


class BeirFolder(NamedTuple):
    """A BEIR-layout folder read into PyTerrier frames (see :func:`read_beir_folder`)."""
    corpus: pd.DataFrame  #: ``docno, text`` (title and text joined)
    queries: pd.DataFrame  #: ``qid, query``
    qrels: Dict[str, pd.DataFrame]  #: per split (``train``, ``dev``, ``test``, ...): ``qid, docno, label``

    def topics(self, split: str) -> pd.DataFrame:
        """The queries judged in ``split``'s qrels, as ``qid, query``.

        Raises:
            KeyError: naming the splits the folder has, when it has no ``split``.
        """
        if split not in self.qrels:
            raise KeyError(f'no qrels/{split}.tsv in this BEIR folder; it has {sorted(self.qrels)}')
        judged = set(self.qrels[split]['qid'])
        return self.queries[self.queries['qid'].isin(judged)].reset_index(drop=True)


def read_beir_folder(folder: Union[str, os.PathLike]) -> BeirFolder:
    """Reads a BEIR-layout folder: ``corpus.jsonl`` (``_id, title, text``), ``queries.jsonl`` (``_id, text``) and
    ``qrels/<split>.tsv`` (``query-id, corpus-id, score``, with a header), as in ``../shared/datasets/debian-packages``.

    Raises:
        FileNotFoundError: naming the file that is missing.
    """
    folder = Path(folder)
    for name in ('corpus.jsonl', 'queries.jsonl', 'qrels'):
        if not (folder / name).exists():
            raise FileNotFoundError(f'{folder / name} is missing: {folder} is not a BEIR-layout folder (corpus.jsonl, '
                                    'queries.jsonl, qrels/<split>.tsv)')
    corpus = pd.read_json(folder / 'corpus.jsonl', lines=True, dtype={'_id': str})
    title = corpus['title'].fillna('') if 'title' in corpus.columns else ''
    corpus = pd.DataFrame({'docno': corpus['_id'], 'text': (title + ' ' + corpus['text'].fillna('')).str.strip()})
    queries = pd.read_json(folder / 'queries.jsonl', lines=True, dtype={'_id': str})
    queries = pd.DataFrame({'qid': queries['_id'], 'query': queries['text']})
    qrels = {}
    for path in sorted((folder / 'qrels').glob('*.tsv')):
        q = pd.read_csv(path, sep='\t', dtype={'query-id': str, 'corpus-id': str})
        qrels[path.stem] = pd.DataFrame({'qid': q['query-id'], 'docno': q['corpus-id'], 'label': q['score']})
    return BeirFolder(corpus, queries, qrels)

"""Ranking for evaluation during training: exhaustive retrieval in memory, and a scorer transformer."""
from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import numpy as np
import pandas as pd
import pyterrier as pt
import torch

from ..model.hypencoder import Hypencoder
from .biencoder import DotEncoder
from .features import check_trainable

__all__ = ['ModelScorer', 'exhaustive_retrieve']

Model = Union[Hypencoder, DotEncoder]


@torch.no_grad()
def rank_rows(score_fn, n_queries: int, doc_vectors: torch.Tensor, num_results: int, query_batch: int = 64):
    """Top ``num_results`` rows of ``doc_vectors`` per query; ``score_fn(slice)`` scores a slice of queries."""
    k = min(num_results, doc_vectors.shape[0])
    scores, rows = [], []
    for start in range(0, n_queries, query_batch):
        s = score_fn(slice(start, min(n_queries, start + query_batch)), doc_vectors).float()
        top = torch.topk(s, k, dim=1)
        scores.append(top.values.cpu())
        rows.append(top.indices.cpu())
    return torch.cat(scores).numpy(), torch.cat(rows).numpy()


def results_frame(topics: pd.DataFrame, docnos: Sequence[str], scores: np.ndarray, rows: np.ndarray) -> pd.DataFrame:
    k = scores.shape[1]
    docnos = np.asarray(docnos, dtype=object)
    frame = pd.DataFrame({
        'qid': np.repeat(topics['qid'].to_numpy(), k),
        'query': np.repeat(topics['query'].to_numpy(), k),
        'docno': docnos[rows.reshape(-1)],
        'score': scores.reshape(-1).astype(np.float64),
        'rank': np.tile(np.arange(k), len(topics)),
    })
    return frame


@torch.no_grad()
def exhaustive_retrieve(model: Model, topics: pd.DataFrame, doc_vectors: torch.Tensor, docnos: Sequence[str], *,
                        num_results: int = 1000, batch_size: int = 64, width: Optional[int] = None) -> pd.DataFrame:
    """Ranks every document for every query in memory: a PyTerrier results frame.

    Args:
        model: a Hypencoder or DotEncoder.
        topics: ``qid, query``.
        doc_vectors: ``[n_docs, dim]`` from ``model.encode_docs``.
        docnos: the documents' docnos, in ``doc_vectors`` order.
        num_results: documents kept per query.
        batch_size: queries encoded and scored at once.
        width: a Matryoshka Hypencoder's q-nets cut to this width (one of ``model.matryoshka_widths``).

    Returns:
        ``qid, query, docno, score, rank``.
    """
    if len(docnos) != doc_vectors.shape[0]:
        raise ValueError(f'{len(docnos)} docnos for {doc_vectors.shape[0]} document vectors')
    topics = topics[['qid', 'query']].reset_index(drop=True)
    if not len(topics):
        return pd.DataFrame({'qid': [], 'query': [], 'docno': [], 'score': [], 'rank': []})
    reps = model.encode_queries(topics['query'].tolist(), batch_size=batch_size)
    if width is not None:
        reps = reps.truncate(width)
    scores, rows = rank_rows(lambda sl, d: model.score_all(reps[sl], d), len(topics), doc_vectors.to(model.device),
                         num_results, batch_size)
    return results_frame(topics, docnos, scores, rows)


class ModelScorer(pt.Transformer):
    """Scores ``qid, query, docno, text`` rows with a Hypencoder or DotEncoder (e.g. as a teacher for training data).

    Adds ``score`` and ``rank``. Each distinct query and text is encoded once.
    """

    def __init__(self, model: Model, batch_size: int = 32, verbose: bool = False):
        """
        Args:
            model: a Hypencoder or DotEncoder.
            batch_size: texts per encoding batch.
            verbose: progress bars.
        """
        check_trainable(model)
        self.model = model
        self.batch_size = batch_size
        self.verbose = verbose

    @classmethod
    def from_pretrained(cls, folder: Union[str, os.PathLike], device=None, **kwargs) -> ModelScorer:
        """A scorer over a model saved by this package (Hypencoder or DotEncoder, told apart by its config)."""
        from ..model.checkpoint import read_json, resolve_folder
        from .biencoder import FORMAT_NAME as DOT_FORMAT
        path = resolve_folder(folder)
        if DOT_FORMAT in read_json(path / 'config.json'):
            return cls(DotEncoder.from_pretrained(path, device=device), **kwargs)
        return cls(Hypencoder.from_pretrained(path, device=device), **kwargs)

    def __repr__(self) -> str:
        return f'ModelScorer({self.model!r})'

    @torch.no_grad()
    def transform(self, inp: pd.DataFrame) -> pd.DataFrame:
        with pt.validate.any(inp) as v:
            v.result_frame(extra_columns=['query', 'text'])
            v.columns(includes=['qid', 'query', 'docno', 'text'])
        if not len(inp):
            return inp.assign(score=pd.Series(dtype=float), rank=pd.Series(dtype=int))
        inp = inp.reset_index(drop=True)
        q_codes, queries = pd.factorize(inp['query'])
        d_codes, texts = pd.factorize(inp['text'])
        reps = self.model.encode_queries(list(queries), batch_size=self.batch_size, verbose=self.verbose)
        docs = self.model.encode_docs(list(texts), batch_size=self.batch_size, verbose=self.verbose)
        scores = np.empty(len(inp), dtype=np.float64)
        for qi in range(len(queries)):
            rows = np.flatnonzero(q_codes == qi)
            doc_rows = torch.as_tensor(d_codes[rows], device=docs.device)
            scores[rows] = self.model.score_all(reps[qi:qi + 1], docs[doc_rows]).float().cpu().numpy()[0]
        return pt.model.add_ranks(inp.drop(columns=['score', 'rank'], errors='ignore').assign(score=scores))


def evaluate_run(run: pd.DataFrame, qrels: pd.DataFrame, metric: str) -> float:
    import ir_measures
    measure = ir_measures.parse_measure(metric)
    return float(pt.Evaluate(run, qrels, [measure])[str(measure)])

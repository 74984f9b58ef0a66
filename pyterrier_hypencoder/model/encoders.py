"""PyTerrier-side encoders of a Hypencoder, as pyterrier-dr's ``BiEncoder.query_encoder()`` / ``doc_encoder()``."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyterrier as pt
import torch

__all__ = ['HypencoderDocEncoder', 'HypencoderQueryEncoder']


class HypencoderQueryEncoder(pt.Transformer):
    """Adds a ``query_qnet`` column: each query's q-net, a one-query :class:`~pyterrier_hypencoder.QNets` on the CPU.

    A q-net is a small network, not a vector, so there is no ``query_vec`` column; ``row.query_qnet.score(vectors)``
    scores document vectors (``[1, n_docs]``). Get one with ``model.query_encoder()``.
    """

    def __init__(self, model, batch_size: int = 32, verbose: bool = False):
        self.model = model
        self.batch_size = batch_size
        self.verbose = verbose

    def __repr__(self) -> str:
        return f'{self.model!r}.query_encoder()'

    def transform(self, inp: pd.DataFrame) -> pd.DataFrame:
        pt.validate.columns(inp, includes=['query'])
        if len(inp) == 0:
            return inp.assign(query_qnet=pd.Series(dtype=object))
        from ..checks import check_queries
        codes, unique = pd.factorize(pd.Series(check_queries(inp) if 'qid' in inp else inp['query'].tolist()))
        with torch.inference_mode():
            qnets = self.model.encode_queries(list(unique), batch_size=self.batch_size, verbose=self.verbose).to('cpu')
        # copies, so that one row does not keep the whole batch's weights alive
        per_query = [qnets[i].clone() for i in range(len(unique))]
        return inp.assign(query_qnet=[per_query[c] for c in codes])

    def subtransformers(self) -> dict:
        return {}  # the model is not a transformer


class HypencoderDocEncoder(pt.Transformer):
    """Adds a ``doc_vec`` column (float32 numpy vectors), as pyterrier-dr's document encoders do.

    The vectors are those a :class:`~pyterrier_hypencoder.HypencoderIndexer` stores, so
    ``model.doc_encoder() >> pyterrier_dr.FlexIndex(path).indexer()`` also works. Get one with ``model.doc_encoder()``.
    """

    def __init__(self, model, text_field: str = 'text', batch_size: int = 32, verbose: bool = False):
        self.model = model
        self.text_field = text_field
        self.batch_size = batch_size
        self.verbose = verbose

    def __repr__(self) -> str:
        return f'{self.model!r}.doc_encoder()'

    def transform(self, inp: pd.DataFrame) -> pd.DataFrame:
        pt.validate.columns(inp, includes=[self.text_field])
        if len(inp) == 0:
            return inp.assign(doc_vec=pd.Series(dtype=object))
        texts = inp[self.text_field]
        bad = texts.map(lambda t: not isinstance(t, str))
        if bad.any():
            raise TypeError(f'the {self.text_field!r} column has {int(bad.sum())} values that are not strings, e.g. '
                            f'{texts[bad].iloc[0]!r}; fill them before encoding')
        with torch.inference_mode():
            vecs = self.model.encode_docs(texts.tolist(), batch_size=self.batch_size, verbose=self.verbose)
        return inp.assign(doc_vec=list(vecs.float().cpu().numpy().astype(np.float32)))

    def subtransformers(self) -> dict:
        return {}

"""Input checks shared by every layer: parameters and query frames (a leaf: imports nothing of the package)."""
from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ['check_int', 'check_queries']


def check_int(name: str, value, low: int = 1) -> None:
    """Raises a ValueError naming ``name`` unless ``value`` is an integer (not a bool) of at least ``low``."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
        raise ValueError(f'{name} must be an integer >= {low}; got {value!r}')


def check_queries(inp: pd.DataFrame) -> list:
    """The ``query`` column as a list of strings.

    Raises:
        TypeError: naming the qids whose query is not a string (NaN, None, a number, a token list).
        ValueError: naming the qids whose query is empty or whitespace only: a Hypencoder would still make a
            q-net from the special tokens alone, and rank the corpus for no query at all.
    """
    queries = inp['query'].tolist()
    bad = [(qid, q) for qid, q in zip(inp['qid'], queries) if not isinstance(q, str)]
    if bad:
        raise TypeError(f'{_count(len(bad), "query is not a string", "queries are not strings")}, e.g. qid '
                        f'{bad[0][0]!r}: {bad[0][1]!r}; fill or drop them before retrieval')
    empty = [qid for qid, q in zip(inp['qid'], queries) if not q.strip()]
    if empty:
        raise ValueError(f'{_count(len(empty), "query is", "queries are")} empty or whitespace only (qids {empty[:5]}); '
                         'drop them (e.g. topics[topics["query"].str.strip() != ""]) or fill them before retrieval')
    return queries


def _count(n: int, one: str, many: str) -> str:
    """``'1 query is'`` / ``'3 queries are'``: a count with the words that agree with it (``one`` or ``many``)."""
    return f'{n} {one if n == 1 else many}'

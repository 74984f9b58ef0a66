"""Query checks (``pyterrier_hypencoder.checks``) as the retriever and the reranker apply them: empty and
non-string queries named, with what to do."""
import numpy as np
import pandas as pd
import pytest
from helpers import GRAPH

from pyterrier_hypencoder import HypencoderReranker, HypencoderRetriever

pytestmark = pytest.mark.usefixtures('one_thread')


def test_empty_and_whitespace_queries_are_named(tiny_model, words_index):
    topics = pd.DataFrame({'qid': ['ok', 'e1', 'e2', 'e3'], 'query': ['neural search', '', '   ', '\t\n']})
    for transformer in (HypencoderRetriever(tiny_model, words_index), HypencoderRetriever(tiny_model, words_index, **GRAPH),
                        HypencoderReranker(tiny_model, words_index)):
        frame = topics.assign(docno='d1') if isinstance(transformer, HypencoderReranker) else topics
        with pytest.raises(ValueError, match=r"3 queries are empty or whitespace only \(qids \['e1', 'e2', 'e3'\]\).*drop"):
            transformer(frame)
    text_mode = HypencoderReranker(tiny_model)
    with pytest.raises(ValueError, match=r"qids \['e1'"):
        text_mode(topics.assign(docno='d1', text='some text'))
    # The non-empty query alone works.
    assert len(HypencoderRetriever(tiny_model, words_index, num_results=3)(topics.iloc[:1])) == 3


@pytest.mark.parametrize('bad', [np.nan, None, pd.NA, 42, ['neural', 'search']])
def test_non_string_queries_are_named(tiny_model, words_index, bad):
    topics = pd.DataFrame({'qid': ['ok', 'bad'], 'query': pd.Series(['neural search', bad], dtype=object)})
    with pytest.raises(TypeError, match="qid 'bad'.*fill or drop"):
        HypencoderRetriever(tiny_model, words_index)(topics)
    with pytest.raises(TypeError, match="qid 'bad'.*fill or drop"):
        HypencoderReranker(tiny_model, words_index)(topics.assign(docno='d1'))

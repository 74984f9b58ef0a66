"""Choosing the backend that searches a sharded index, and importing the package without Ray."""
import pandas as pd
import pytest

from pyterrier_hypencoder import HypencoderReranker, HypencoderRetriever
from pyterrier_hypencoder.index import HypencoderIndexError


def test_backend_bad_input(tiny_model, tied_index, shard_splits):
    with pytest.raises(HypencoderIndexError, match='single index; split it'):
        HypencoderRetriever(tiny_model, tied_index, backend='ray')
    with pytest.raises(ValueError, match="backend must be 'local', 'ray'"):
        HypencoderRetriever(tiny_model, shard_splits[('aligned', 2)], backend=3)
    with pytest.raises(ValueError, match='need backend="ray"'):
        HypencoderRetriever(tiny_model, shard_splits[('aligned', 2)], ray_options={'num_cpus': 1})
    with pytest.raises(ValueError, match='score_block must be an integer'):
        HypencoderRetriever(tiny_model, shard_splits[('aligned', 2)], score_block=0)
    with pytest.raises(ValueError, match='no index'):
        HypencoderReranker(tiny_model, backend='ray')
    empty = HypencoderRetriever(tiny_model, shard_splits[('aligned', 2)])(pd.DataFrame({'qid': [], 'query': []}))
    assert list(empty.columns[-3:]) == ['docno', 'score', 'rank'] and empty['rank'].dtype == 'int64'


def test_package_imports_without_ray():
    import subprocess
    import sys
    code = ('import sys; import pyterrier_hypencoder; from pyterrier_hypencoder import distributed, index, pt, search; '
            'from pyterrier_hypencoder.distributed import backends, shards; '
            'from pyterrier_hypencoder.pt import artifacts, reranker, retriever, sharded_indexer; '
            'assert "ray" not in sys.modules, "ray was imported"')
    subprocess.run([sys.executable, '-c', code], check=True)

"""The README's Python snippets run (offline, on tiny models), so they cannot rot.

Each ```python block runs in order in one namespace. Names a user would have at hand (a BM25 retriever, topics,
qrels, the MiniLM path) are given tiny offline stand-ins, hub names are mapped to local folders, and training
budgets are cut to a few steps.
"""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / 'README.md'


def python_blocks():
    return re.findall(r'```python\n(.*?)```', README.read_text(), flags=re.S)


def test_readme_has_snippets():
    assert len(python_blocks()) >= 4


def test_readme_snippets_run(tmp_path, monkeypatch, parity_dir, tiny_bert, irds_home):
    import pyterrier as pt

    from pyterrier_hypencoder import Hypencoder
    from pyterrier_hypencoder.train import dataset_docs, pisa_bm25

    real_from_pretrained = Hypencoder.from_pretrained.__func__

    def offline_from_pretrained(cls, name, **kwargs):
        if str(name).startswith('jfkback/'):
            name = parity_dir / 'tiny_official'
        kwargs.setdefault('device', 'cpu')
        kwargs.setdefault('doc_max_length', 32)  # keeps encoding the corpus cheap
        return real_from_pretrained(cls, name, **kwargs)

    monkeypatch.setattr(Hypencoder, 'from_pretrained', classmethod(offline_from_pretrained))
    monkeypatch.chdir(tmp_path)
    dataset = pt.get_dataset('irds:beir/scifact/test')
    namespace = {
        'itertools': __import__('itertools'),
        'minilm_path': str(tiny_bert),
        'bm25': pisa_bm25(dataset_docs(dataset).head(400), tmp_path / 'bm25.pisa', num_results=20),
        'topics': dataset.get_topics().head(3),
        'qrels': dataset.get_qrels(),
    }
    for i, block in enumerate(python_blocks()):
        code = re.sub(r'steps=\d+', 'steps=2', block)
        code = code.replace("qnet_layers=2)", "qnet_layers=2, device='cpu', doc_max_length=32)")
        code = code.replace('.index(dataset.get_corpus_iter())', '.index(itertools.islice(dataset.get_corpus_iter(), 400))')
        try:
            exec(compile(code, f'README.md python block {i}', 'exec'), namespace)
        except Exception as e:  # name the failing block
            pytest.fail(f'README python block {i} failed: {type(e).__name__}: {e}\n{block}')

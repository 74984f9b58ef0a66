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



def _check_package_imports(source: str, where: str) -> None:
    """Parses ``source`` and checks that every name it imports from this package exists."""
    import ast
    import importlib

    for node in ast.walk(ast.parse(source, filename=where)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('pyterrier_hypencoder'):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f'{where}: {node.module} has no {alias.name}'


@pytest.mark.parametrize('script', sorted((README.parent / 'examples').glob('*.py')), ids=lambda p: p.name)
def test_examples_compile_and_import_real_names(script):
    # The examples are too slow for CI; this catches syntax errors and imports of renamed names.
    _check_package_imports(script.read_text(), script.name)


def test_notebook_cells_compile_and_import_real_names():
    import json

    notebook = json.loads((README.parent / 'examples' / 'quickstart.ipynb').read_text())
    cells = [''.join(c['source']) for c in notebook['cells'] if c['cell_type'] == 'code']
    assert len(cells) >= 4
    for i, source in enumerate(cells):
        _check_package_imports(source, f'quickstart.ipynb cell {i}')

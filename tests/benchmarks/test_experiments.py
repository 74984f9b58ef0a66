"""experiments/debian_scaling.py and debian_finetune.py end to end on a tiny model and a few hundred debian-packages
documents; every experiment answers --help."""
import json
import subprocess
import sys

import pandas as pd
import pytest
from helpers import DATASETS, ROOT, load_script


def _experiment(name: str):
    """An experiment script imported as a module."""
    return load_script('experiments', name)


def test_every_experiment_answers_help():
    scripts = sorted((ROOT / 'experiments').glob('*.py'))
    assert {p.stem for p in scripts} == {'debian_finetune', 'debian_scaling', 'train_beir'}
    runs = {p.name: subprocess.Popen([sys.executable, str(p), '--help'], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE) for p in scripts}
    for name, proc in runs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and out.startswith('usage:'), f'{name}: {err[-2000:]}'


@pytest.fixture(scope='module')
def tiny_beir(tmp_path_factory):
    """300 debian-packages documents and the queries that find them, split 120 / 40 / 40, in the BEIR layout."""
    source = DATASETS / 'debian-packages'
    if not (source / 'corpus.jsonl').exists():
        pytest.skip(f'debian-packages not found at {source}')
    pytest.importorskip('pyterrier_pisa')
    folder = tmp_path_factory.mktemp('debian300')
    corpus = pd.read_json(source / 'corpus.jsonl', lines=True, dtype={'_id': str}).iloc[:300]
    corpus.to_json(folder / 'corpus.jsonl', orient='records', lines=True)
    qrels = pd.concat([pd.read_csv(source / 'qrels' / f'{s}.tsv', sep='\t', dtype=str) for s in ('train', 'dev', 'test')])
    qrels = qrels[qrels['corpus-id'].isin(set(corpus['_id']))].iloc[:200].reset_index(drop=True)
    queries = pd.read_json(source / 'queries.jsonl', lines=True, dtype={'_id': str})
    queries[queries['_id'].isin(set(qrels['query-id']))].to_json(folder / 'queries.jsonl', orient='records', lines=True)
    (folder / 'qrels').mkdir()
    for split, part in (('train', qrels.iloc[:120]), ('dev', qrels.iloc[120:160]), ('test', qrels.iloc[160:])):
        part.to_csv(folder / 'qrels' / f'{split}.tsv', sep='\t', index=False)
    return folder


def test_scaling_script_runs_end_to_end(tiny_beir, tiny_bert, tmp_path):
    debian_scaling = _experiment('debian_scaling')
    work = tmp_path / 'work'
    results = debian_scaling.main([
        '--data', str(tiny_beir), '--work', str(work), '--backbone', str(tiny_bert), '--sizes', '30', '120',
        '--seeds', '0', '1', '--steps', '4', '--batch-size', '8', '--negatives', '3', '--candidates', '10',
        '--warmup', '0', '--evals', '2', '--dev-queries', '40', '--be-lrs', '1e-3', '3e-3', '--hyp-lrs', '3e-5',
        '1e-4', '--device', 'cpu', '--quiet'])
    rows = pd.DataFrame(results['rows'])
    # one seed at the smaller size, both at the largest; every model at every size
    # (the cosine start trains at the largest size only, by default)
    assert rows.groupby('queries').size().to_dict() == {30: 3, 120: 8}
    assert set(rows.model) == set(debian_scaling.MODELS)
    # the first seed tries both learning rates; the second reuses the one it chose
    assert all(len(r['trials']) == (2 if r['seed'] == 0 else 1) for r in results['rows'])
    for _, part in rows.groupby(['queries', 'model']):
        assert part['lr'].nunique() == 1
    # the Hypencoder begins exactly where its trained BE-Base ended: the same dev ranking at step 0
    for _, part in rows.groupby(['queries', 'seed']):
        be = part[part.model == 'BE-Base (LN)'].iloc[0]
        hyp = part[part.model == 'Hypencoder (BE-Base start)'].iloc[0]
        assert all(t['dev_curve'][0][1] == round(be['dev_RR@10'], 4) for t in hyp['trials'])
    for col in ('RR@10', 'nDCG@10', 'R@100'):
        assert rows[col].between(0, 1).all()
    assert set(results['references']) == {'BM25', 'MiniLM zero-shot'}
    assert (work / 'scaling.png').stat().st_size > 1000
    assert '| 120 | Hypencoder (BE-Base start) | 2 |' in (work / 'results.md').read_text()
    assert json.loads((work / 'results.json').read_text())['args']['steps'] == 4


def test_scaling_script_needs_equal_trials():
    debian_scaling = _experiment('debian_scaling')
    with pytest.raises(SystemExit):
        debian_scaling.parse_args(['--be-lrs', '1e-3', '--hyp-lrs', '1e-5', '3e-5'])


def test_finetune_script_runs_end_to_end(tiny_beir, tiny_bert, tmp_path):
    debian_finetune = _experiment('debian_finetune')
    work = tmp_path / 'ft'
    results = debian_finetune.main([
        '--data', str(tiny_beir), '--work', str(work), '--backbone', str(tiny_bert), '--steps', '4',
        '--batch-size', '4', '--negatives', '2', '--candidates', '10', '--warmup', '0', '--evals', '2',
        '--dev-queries', '20', '--dev-docs', '50', '--test-docs', '120', '--device', 'cpu', '--quiet'])
    assert [r['model'] for r in results['rows']] == list(debian_finetune.MODELS)
    assert results['test_docs'] == 120 and results['dev_docs'] == 70
    assert set(results['references']) == {'BM25', 'MiniLM zero-shot'}
    for r in results['rows']:
        assert [s for s, _ in r['dev_curve']] == [0, 2, 4]
        assert 0 <= r['RR@10'] <= 1
    # both start from the same ranking (a cosine and its standardised counterpart) on this small dev set
    assert abs(results['rows'][0]['dev_curve'][0][1] - results['rows'][1]['dev_curve'][0][1]) < 0.1
    assert '| Hypencoder (BE-Base start) | 4 x 4 |' in (work / 'results.md').read_text()


def test_sub_corpus_keeps_every_judged_document():
    debian_finetune = _experiment('debian_finetune')
    corpus = pd.DataFrame({'docno': [f'd{i}' for i in range(50)], 'text': ['t'] * 50})
    qrels = pd.DataFrame({'qid': ['1', '2'], 'docno': ['d3', 'd40'], 'label': [1, 1]})
    part = debian_finetune.sub_corpus(corpus, qrels, 10, seed=0)
    assert len(part) == 10 and {'d3', 'd40'} <= set(part['docno'])
    assert part['docno'].is_unique
    assert debian_finetune.sub_corpus(corpus, qrels, 0, seed=0) is corpus

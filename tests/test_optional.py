"""Optional dependencies are checked before any work, with the command that installs them."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pyterrier_hypencoder.optional import OPTIONAL, missing, require

ROOT = Path(__file__).resolve().parent.parent


def test_require_names_the_install_command(monkeypatch):
    require('numpy', purpose='nothing')  # present: no error
    # made-up packages: a real one may already be imported by another test, and then cannot be hidden
    monkeypatch.setitem(OPTIONAL, 'no_such_module_a', ('no-such-dist-a', 'baselines'))
    monkeypatch.setitem(OPTIONAL, 'no_such_module_b', ('no-such-dist-b', 'ray'))
    with pytest.raises(ImportError, match=r"the demo needs no-such-dist-a, no-such-dist-b, which are not installed\. "
                                          r"Install with: pip install 'pyterrier-hypencoder\[baselines,ray\]'"):
        require('numpy', 'no_such_module_a', 'no_such_module_b', purpose='the demo')
    assert missing('numpy', 'no_such_module_a') == ['no_such_module_a']


def test_require_does_not_import():
    # pyterrier-pisa imports ir_datasets, which reads IR_DATASETS_HOME once, on import: checking must not import it.
    out = subprocess.run([sys.executable, '-c', 'import sys; from pyterrier_hypencoder.optional import require; '
                          'require("pyterrier_pisa", "pyterrier_dr"); print("ir_datasets" in sys.modules, '
                          '"pyterrier_pisa" in sys.modules)'], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ['False', 'False']


def test_every_optional_module_has_an_extra():
    extras = (ROOT / 'setup.cfg').read_text()
    for module, (dist, extra) in OPTIONAL.items():
        section = extras.split(f'\n{extra} =\n', 1)[1].split('\n\n')[0].split('\n[')[0]
        assert dist in section, f'{dist} (for {module}) is not in the [{extra}] extra'


def test_quick_start_fails_at_once_without_pyterrier_dr(tmp_path):
    """A user without pyterrier-dr is told at the start, not after minutes of indexing and training."""
    (tmp_path / 'sitecustomize.py').write_text(textwrap.dedent('''
        import sys
        class _Hide:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] == 'pyterrier_dr':
                    raise ModuleNotFoundError(name)
        sys.meta_path.insert(0, _Hide())
    '''))
    out = subprocess.run([sys.executable, str(ROOT / 'examples' / 'quickstart.py'), '--workdir', str(tmp_path / 'w')],
                         capture_output=True, text=True, timeout=120, env={**os.environ,
                                                                          'PYTHONPATH': str(tmp_path)})
    assert out.returncode != 0
    assert "the quick start needs pyterrier-dr, which is not installed. Install with: pip install " in out.stderr
    assert not (tmp_path / 'w').exists()  # no work was done

"""The checkout's tracked files name no machine's paths, so a fresh clone elsewhere can run them."""
import re
import subprocess
from pathlib import Path

from helpers import ROOT


def tracked_files():
    """The checkout's tracked files (git), or, outside a git checkout, its files less the ignored kinds."""
    try:
        out = subprocess.run(['git', 'ls-files', '-z'], cwd=ROOT, capture_output=True, check=True).stdout
        return [ROOT / name for name in out.decode().split('\0') if name]
    except (OSError, subprocess.CalledProcessError):
        skip = {'.git', '.venv', '.ci-venv', '.ci-transformers4', '.cache', '__pycache__', 'runs'}
        return [f for f in ROOT.rglob('*') if f.is_file() and not skip & set(f.relative_to(ROOT).parts)]


def test_no_machine_paths_in_any_tracked_file():
    # Scripts, READMEs and results JSON name paths relative to the checkout (or ../shared), so a fresh clone on
    # another machine can run and check them. This file holds the pattern itself.
    pattern = re.compile('/wo' + 'rk/|/ho' + r'me/[a-z]+/')
    hits = []
    for path in tracked_files():
        if path.name == Path(__file__).name or not path.exists():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:  # images
            continue
        hits += [f'{path.relative_to(ROOT)}:{i + 1}' for i, line in enumerate(text.splitlines()) if pattern.search(line)]
    assert not hits, hits[:20]
    examples = sorted((ROOT / 'examples').glob('*.py'))
    assert examples
    for script in examples:
        if 'offline-cache.sh' in script.read_text():
            assert '../shared/datasets' in script.read_text(), script.name

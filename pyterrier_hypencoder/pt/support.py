"""What the retriever and the reranker share: the progress bar, the width check, and the warnings and errors that
explain a user's mistake (an untrained head, topics without a ``query`` column)."""
from __future__ import annotations

import warnings
import weakref
from typing import Optional

import pandas as pd
import pyterrier as pt

__all__ = ['PROGRESS_DELAY_S', 'check_widths', 'explain_missing_query', 'progress', 'warn_untrained']

# verbose=None (the default of the retriever and the reranker): a progress bar appears once a call has run this
# many seconds. Short calls (an experiment's small batches, GAR's many calls) print nothing; a call that takes
# minutes, like re-ranking a whole topic set's candidates, shows its progress, as PyTerrier's own components do.
PROGRESS_DELAY_S = 5.0
_WARNED_UNTRAINED: weakref.WeakSet = weakref.WeakSet()


def progress(total: int, desc: str, verbose: Optional[bool], unit: str = 'query'):
    """A progress bar over ``total`` items: always (``verbose=True``), never (False), or from
    :data:`PROGRESS_DELAY_S` seconds on (None: it shows at the first update after that)."""
    if verbose is None:
        return pt.tqdm(total=total, desc=desc, unit=unit, delay=PROGRESS_DELAY_S)
    return pt.tqdm(total=total, desc=desc, unit=unit, disable=not verbose)


def warn_untrained(model, user: str) -> None:
    """Warns, once per model, when its q-nets were never trained nor warm-started (they rank at about chance)."""
    if getattr(model, 'head_trained', True) or model in _WARNED_UNTRAINED:
        return
    _WARNED_UNTRAINED.add(model)
    warnings.warn(f'{user}: the q-nets of {model!r} were never trained: Hypencoder.from_backbone gives a random '
                  'hyperhead, which ranks at about chance. Train it (python -m pyterrier_hypencoder.train, or Trainer), '
                  'start from warm_start_hypencoder(backbone) (the backbone\'s own similarity), or load a trained model '
                  '(Hypencoder.from_pretrained)', UserWarning, stacklevel=4)


def check_widths(model, width: Optional[int], cascade_width: Optional[int] = None) -> Optional[int]:
    """``width`` checked against the model's Matryoshka widths (None: the full q-nets), and a cascade's narrower one.

    Raises:
        ValueError: for a width the model's q-nets cannot take (naming those they can), or a ``cascade_width`` not
            narrower than the q-nets searched.
    """
    spec = model.spec if width is None else model.spec.truncated(width)
    if cascade_width is not None:
        narrow = spec.truncated(cascade_width)
        if narrow.width >= spec.width:
            raise ValueError(f'cascade_width={cascade_width} must be narrower than the q-nets searched (width '
                             f'{spec.width}); the narrower widths are {[w for w in spec.widths if w < spec.width]}')
    return None if width is None or width == model.spec.width else int(width)


def explain_missing_query(inp: pd.DataFrame, transformer, error: pt.validate.InputValidationError) -> None:
    """Raises ``error`` again, saying what to do when the input lacks the ``query`` column."""
    if 'query' in inp.columns:
        raise error
    hint = (" Topics of BEIR-style datasets keep it in 'text': rename the column (topics.rename(columns={'text': "
            "'query'})) or load the topics as dataset.get_topics('text')." if 'text' in inp.columns else
            ' Load topics with dataset.get_topics(), which names it so.')
    raise pt.validate.InputValidationError(f'{transformer!r} needs the query text in a \'query\' column; the input '
                                           f'has {list(inp.columns)}.{hint}', error.modes) from None

"""The architecture of q-nets (:class:`QNetSpec`): widths, activation, layer norm, residuals, and nested widths.

Nested (Matryoshka) q-nets, as in "The Matryoshka Hypencoder" (Alkawaas and MacAvaney, SIGIR 2026), are trained so
that the generated q-net still ranks well when cut to a narrower hidden width ``w``: the first matrix keeps its
first ``w`` columns (its input stays the whole document vector), every hidden matrix its top-left ``w x w`` block,
every bias and the final matrix their first ``w`` entries, and each block's layer norm runs over those ``w``
values. ``QNetSpec.widths`` lists the widths a spec's q-nets can be cut to; :meth:`QNetSpec.truncated` is the spec
of the cut q-nets and :meth:`~pyterrier_hypencoder.model.qnet.QNets.truncate` cuts the generated tensors.

Residual connections under truncation: a residual adds the block's input to its output. Where the two have the
same width (every hidden block after the first, at any width) that is the usual residual. Where the input is
wider (the first block of a q-net cut below the document vector's size) the input is cut like every other tensor:
its first ``w`` coordinates are added. So the width-``w`` q-net is the full one with every vector that meets a
width-``w`` activation cut to its first ``w`` coordinates, at the full width it is exactly the uncut q-net, and
nested widths train with or without residuals. (The released Matryoshka checkpoint has none.)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import List, Optional

from ..checks import check_int

__all__ = ['ACTIVATIONS', 'QNetSpec']

ACTIVATIONS = ('relu', 'tanh', 'sigmoid', 'gelu', 'leaky_relu')
# The reference code's activation_factory spells one of them differently.
_ACTIVATION_ALIASES = {'leakyrelu': 'leaky_relu'}


@dataclass(frozen=True)
class QNetSpec:
    """The architecture of the q-nets (the reference code's ``converter_kwargs``).

    Attributes:
        vector_dimensions: input, hidden and output widths, e.g. ``(768, 768, 768, 1)`` is two hidden blocks
            and a final 768 -> 1 matrix. The first equals the document vector size; the last must be 1.
        activation: ``relu`` (the released models), ``tanh``, ``sigmoid``, ``gelu`` or ``leaky_relu``.
        layer_norm: parameter-free layer norm in each hidden block.
        residual: residual connection in each hidden block.
        residual_on_last: residual connection on the last hidden block too (False in the released models).
        layer_norm_before_residual: apply layer norm before adding the residual (True in the released models).
        dropout: dropout probability inside hidden blocks while training (0 disables it).
        widths: the nested (Matryoshka) hidden widths the q-nets can be truncated to, ascending; it always holds
            the spec's own hidden width, since the uncut q-net is always valid. Empty (the default, and every
            original Hypencoder): the q-nets were not trained nested and cannot be truncated. Nested q-nets have
            one hidden width in every block.
    """
    vector_dimensions: tuple
    activation: str = 'relu'
    layer_norm: bool = True
    residual: bool = True
    residual_on_last: bool = False
    layer_norm_before_residual: bool = True
    dropout: float = 0.0
    widths: tuple = ()

    def __post_init__(self):
        dims = tuple(int(d) for d in self.vector_dimensions)
        object.__setattr__(self, 'vector_dimensions', dims)
        if len(dims) < 2 or dims[-1] != 1 or any(d <= 0 for d in dims):
            raise ValueError(f'q-net vector_dimensions must be positive and end in 1 (e.g. [768, 768, 1]); got {list(dims)}')
        if self.activation not in ACTIVATIONS:
            raise ValueError(f'unknown q-net activation {self.activation!r}; choose one of {sorted(ACTIVATIONS)}')
        if self.residual_on_last and not self.residual:
            raise ValueError('residual_on_last=True needs residual=True')
        self._check_widths()
        if self.residual:
            for j in range(self.num_blocks):
                if not self._block_has_residual(j) or dims[j] == dims[j + 1]:
                    continue
                # Nested q-nets cut a wider input to the block's width (see the module notes).
                if dims[j] > dims[j + 1] and self.widths:
                    continue
                raise ValueError(f'q-net block {j} maps {dims[j]} -> {dims[j + 1]} dims and cannot have a residual '
                                 'connection; use equal hidden widths or residual=False')

    def _check_widths(self) -> None:
        if self.widths is None or not len(self.widths):
            object.__setattr__(self, 'widths', ())
            return
        hidden = self.vector_dimensions[1:-1]
        if not hidden:
            raise ValueError('nested widths need a q-net with a hidden block; these q-nets are a single matrix')
        if len(set(hidden)) > 1:
            raise ValueError(f'nested widths need one hidden width in every block; got hidden widths {list(hidden)}')
        for w in self.widths:
            check_int('a nested q-net width', w)
            if w > hidden[0]:
                raise ValueError(f'nested width {w} exceeds the q-net\'s hidden width {hidden[0]}; choose widths '
                                 f'from 1 to {hidden[0]}')
        object.__setattr__(self, 'widths', tuple(sorted({int(w) for w in self.widths} | {hidden[0]})))

    @property
    def num_blocks(self) -> int:
        """Number of hidden blocks (every matrix but the last)."""
        return len(self.vector_dimensions) - 2

    @property
    def width(self) -> Optional[int]:
        """The hidden width when every hidden block has the same one (as in nested q-nets), else None."""
        hidden = set(self.vector_dimensions[1:-1])
        return hidden.pop() if len(hidden) == 1 else None

    @property
    def weight_shapes(self) -> List[tuple]:
        """``(in_dim, out_dim)`` of each generated matrix, in order."""
        d = self.vector_dimensions
        return [(d[i], d[i + 1]) for i in range(len(d) - 1)]

    @property
    def bias_dims(self) -> List[int]:
        """Size of each generated bias vector (one per hidden block)."""
        return list(self.vector_dimensions[1:-1])

    def _block_has_residual(self, j: int) -> bool:
        if not self.residual:
            return False
        return j < self.num_blocks - 1 or self.residual_on_last

    def truncated(self, width: int) -> QNetSpec:
        """The spec of these q-nets cut to hidden width ``width`` (see the module notes).

        Its ``widths`` are those up to ``width``, so the cut q-nets can be cut further; the input size stays.

        Raises:
            ValueError: if the q-nets were not trained nested, or ``width`` is not one of ``widths``; the
                message names the widths they can take.
        """
        if not self.widths:
            raise ValueError(f'these q-nets (hidden widths {list(self.vector_dimensions[1:-1])}) were not trained '
                             'nested (they have no Matryoshka widths), so no narrower q-net of theirs is meaningful: '
                             'use them whole. Load a Matryoshka checkpoint, or train with TrainConfig(matryoshka_widths=...)')
        if isinstance(width, bool) or width not in self.widths:
            raise ValueError(f'these q-nets can be truncated to widths {list(self.widths)} (those they were trained '
                             f'at); got {width!r}')
        width = int(width)
        dims = (self.vector_dimensions[0],) + (width,) * self.num_blocks + (1,)
        return replace(self, vector_dimensions=dims, widths=tuple(w for w in self.widths if w <= width))

    @classmethod
    def from_converter_kwargs(cls, kwargs: dict) -> QNetSpec:
        """Reads the reference checkpoints' ``converter_kwargs`` (the original Hypencoder's semantics)."""
        names = {
            'vector_dimensions': 'vector_dimensions', 'activation_type': 'activation', 'do_layer_norm': 'layer_norm',
            'do_residual': 'residual', 'do_residual_on_last': 'residual_on_last',
            'layer_norm_before_residual': 'layer_norm_before_residual',
        }
        unknown = set(kwargs) - set(names) - {'do_dropout', 'dropout_prob'}
        if unknown:
            raise ValueError(f'unsupported q-net converter_kwargs {sorted(unknown)}; supported: {sorted(names)}')
        if 'vector_dimensions' not in kwargs:
            raise ValueError('converter_kwargs has no vector_dimensions: the q-net shape is unknown')
        args = {names[k]: v for k, v in kwargs.items() if k in names}
        if 'activation' in args:
            args['activation'] = _ACTIVATION_ALIASES.get(args['activation'], args['activation'])
        if args.get('residual_on_last') is None:
            # The reference treats None as "same as do_residual".
            args['residual_on_last'] = args.get('residual', True)
        if kwargs.get('do_dropout'):
            args['dropout'] = float(kwargs.get('dropout_prob', 0.1))
        return cls(**args)

    def to_dict(self) -> dict:
        """A JSON-serialisable form, inverted by ``QNetSpec(**d)``.

        ``widths`` appears only for nested q-nets, so the specs of original Hypencoders read as they always did.
        """
        d = asdict(self)
        d['vector_dimensions'] = list(self.vector_dimensions)
        if self.widths:
            d['widths'] = list(self.widths)
        else:
            del d['widths']
        return d

"""Training options (:class:`TrainConfig`) and the learning-rate schedule."""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional, Sequence

__all__ = ['TrainConfig', 'default_temperature', 'lr_factor']


@dataclass
class TrainConfig:
    """Training options.

    Attributes:
        steps: optimizer steps.
        batch_size: queries per step; each also brings 1 positive and ``num_negatives`` negatives.
        num_negatives: sampled negatives per query (the paper: 7).
        lr: peak learning rate; None means 2e-5 (the paper's) for full fine-tuning, and for head-only training
            3e-5 for a Hypencoder (its hyperhead turns small steps into large changes of the q-nets) and 1e-3 for
            a DotEncoder's query projection.
        head_lr: learning rate of the hyperhead (or query projection) in full fine-tuning, where a freshly
            initialised head often wants a larger one than the pretrained backbone; None means ``lr``.
        hidden_lr_scale: multiplies the head's learning rate for the hyperhead parameters that generate the q-net's
            hidden blocks (``HyperHead.hidden_parameters``); the final matrix's generator keeps the head's rate.
            Each generated hidden matrix has ``dim x dim`` entries that every projection weight moves at once, so
            the same step changes a hidden block far more than the final vector; a Hypencoder warm-started from
            BE-Base can then train its BE-Base part at BE-Base's rate and its hidden blocks slowly. 1 (default)
            treats all alike; ignored for a DotEncoder.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps (the paper: 6,000 of a much longer run).
        schedule: after warm-up, ``constant`` (the paper) or ``linear`` decay to zero at ``steps``.
        grad_clip: maximum global gradient norm (0 disables clipping).
        loss: ``distill`` (Margin-MSE on teacher scores + in-batch cross-entropy, the paper's), ``ce``
            (cross-entropy against hard negatives and, with ``in_batch``, the other queries' positives), or
            ``auto`` (``distill`` when the data has teacher scores, else ``ce``).
        in_batch: use the other queries' positives as negatives in the ``ce`` loss.
        temperature: cross-entropy logits are ``scores / temperature``; None means :func:`default_temperature`
            of the model trained.
        head_only: freeze the backbone and train only the hyperhead (or the DotEncoder's query projection).
        seed: seeds query order, negative sampling and dropout.
        eval_every: evaluate on the dev set every this many steps (0: only at the end).
        save_every: write a resumable checkpoint every this many steps (0: only at the end).
        keep_checkpoints: resumable checkpoints kept on disk (older ones are deleted; 0 keeps them all).
        metric: the dev measure used to keep the best checkpoint (an ir_measures name; the paper uses R-precision).
        num_results: documents ranked per dev query.
        log_every: steps between loss log entries.
        bf16: bf16 autocast on CUDA (ignored on CPU).
        encode_batch_size: texts per forward pass when encoding.
        matryoshka_widths: nested q-net widths to train (Hypencoders only), e.g. ``(48, 96, 192, 384)``: each step
            scores the batch with the q-nets cut to each width (:meth:`~pyterrier_hypencoder.QNets.truncate`) and
            sums the losses (the Matryoshka Hypencoder's code divides the sum by the number of widths: a constant
            factor, which AdamW all but ignores). The full width is trained only if listed. The model is declared
            nested at these widths (``model.set_matryoshka_widths``), so it saves as a Matryoshka checkpoint.
            None (default): the model's own ``matryoshka_widths``, which are empty (train the full q-net only) for
            an original Hypencoder and keep a Matryoshka checkpoint nested. Dev evaluation scores full q-nets.
    """
    steps: int = 1000
    batch_size: int = 32
    num_negatives: int = 7
    lr: Optional[float] = None
    head_lr: Optional[float] = None
    hidden_lr_scale: float = 1.0
    weight_decay: float = 0.0
    warmup_steps: int = 100
    schedule: str = 'constant'
    grad_clip: float = 1.0
    loss: str = 'auto'
    in_batch: bool = True
    temperature: Optional[float] = None
    head_only: bool = True
    seed: int = 0
    eval_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    metric: str = 'Rprec'
    num_results: int = 1000
    log_every: int = 10
    bf16: bool = True
    encode_batch_size: int = 32
    matryoshka_widths: Optional[Sequence[int]] = None

    def __post_init__(self):
        if self.schedule not in ('constant', 'linear'):
            raise ValueError(f'schedule must be "constant" or "linear"; got {self.schedule!r}')
        if self.loss not in ('auto', 'distill', 'ce'):
            raise ValueError(f'loss must be "auto", "distill" or "ce"; got {self.loss!r}')
        for name in ('steps', 'batch_size', 'num_negatives', 'num_results', 'log_every', 'encode_batch_size'):
            if getattr(self, name) < 1:
                raise ValueError(f'{name} must be >= 1; got {getattr(self, name)}')
        for name in ('warmup_steps', 'eval_every', 'save_every', 'keep_checkpoints', 'weight_decay', 'grad_clip'):
            if getattr(self, name) < 0:
                raise ValueError(f'{name} must be >= 0; got {getattr(self, name)}')
        for name in ('lr', 'head_lr', 'temperature'):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f'{name} must be > 0 (or None for the default); got {getattr(self, name)}')
        if not isinstance(self.hidden_lr_scale, (int, float)) or not self.hidden_lr_scale > 0:
            raise ValueError(f'hidden_lr_scale must be a number > 0 (1 trains all of the head alike); '
                             f'got {self.hidden_lr_scale!r}')
        if self.matryoshka_widths is not None:
            widths = self.matryoshka_widths
            if isinstance(widths, (str, bytes)) or not hasattr(widths, '__iter__') or not len(widths) or any(
                    isinstance(w, bool) or not isinstance(w, numbers.Integral) or w < 1 for w in widths):
                raise ValueError(f'matryoshka_widths must be a non-empty list of q-net widths >= 1, e.g. [48, 96, 192, '
                                 f'384] (or None for the model\'s own); got {widths!r}')
            self.matryoshka_widths = tuple(sorted(set(int(w) for w in widths)))
        import ir_measures
        try:
            ir_measures.parse_measure(self.metric)
        except Exception as e:  # ir_measures raises several kinds for a bad name
            raise ValueError(f'metric={self.metric!r} is not an ir_measures measure (e.g. "Rprec", "nDCG@10")') from e


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == 'linear':
        return max(0.0, (total - step) / max(1, total - warmup))
    return 1.0


def default_temperature(model) -> float:
    """The cross-entropy temperature for ``model``'s score scale: the model's own ``train_temperature`` when it
    carries one (a Hypencoder warm-started from a ``doc_norm`` BE-Base does), 0.05 for cosine models, ``0.05 * dim``
    for a ``doc_norm`` DotEncoder (standardised vectors' inner products are ``dim`` times a correlation: the same 0.05
    on a cosine's scale), else 1."""
    own = getattr(model, 'train_temperature', None)
    if own is not None:
        return float(own)
    if getattr(model, 'normalize', False):
        return 0.05
    return 0.05 * model.dim if getattr(model, 'doc_norm', False) else 1.0

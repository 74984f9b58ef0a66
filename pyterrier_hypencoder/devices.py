"""Where and in what precision models run: device names checked against this machine, dtype names."""
from __future__ import annotations

from typing import Optional, Union

import torch

__all__ = ['DTypeLike', 'as_dtype', 'default_device']

DTypeLike = Union[None, str, torch.dtype]


def default_device(device: Union[None, str, torch.device] = None) -> torch.device:
    """``device`` if given, else cuda when available, else cpu.

    Raises:
        ValueError: for a device that is not a device name, or a CUDA device this machine does not have.
    """
    if device is None:
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f'{device!r} is not a device ({e}); use "cpu", "cuda" or "cuda:N"') from None
    # Checked here, as torch would only fail at the first tensor moved, deep inside encoding or search.
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise ValueError(f'device {str(device)!r} was requested but CUDA is not available on this machine '
                             '(torch.cuda.is_available() is False); use device="cpu", or None to use CUDA only when '
                             'it is available')
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f'device {str(device)!r} was requested but this machine has {torch.cuda.device_count()} '
                             'CUDA device(s); use one of them')
    return device


def as_dtype(dtype: DTypeLike) -> Optional[torch.dtype]:
    """``dtype`` as a ``torch.dtype`` (None stays None), from a dtype or a name such as ``'bf16'``."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {'fp32': torch.float32, 'float32': torch.float32, 'fp16': torch.float16, 'float16': torch.float16,
             'bf16': torch.bfloat16, 'bfloat16': torch.bfloat16, 'fp64': torch.float64, 'float64': torch.float64}
    if dtype not in names:
        raise ValueError(f'unknown dtype {dtype!r}; use one of {sorted(names)}')
    return names[dtype]


def check_device(device) -> Optional[torch.device]:
    """``device`` as a ``torch.device`` (None stays None), failing now if this machine does not have it."""
    return default_device(device) if device is not None else None

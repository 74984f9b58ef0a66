"""Finding and safely reading checkpoint files, locally or on the Hugging Face hub.

Only tensors are ever read: ``.safetensors`` files, or ``.bin`` files through ``torch.load(weights_only=True)``,
which refuses any pickle that would construct arbitrary objects or run code.
"""
from __future__ import annotations

import json
import os
import pickle
from dataclasses import replace
from pathlib import Path
from typing import Dict, Optional

import torch

from .qnet_spec import QNetSpec

__all__ = ['CheckpointError', 'resolve_folder', 'read_json', 'load_state_dict', 'backbone_config', 'load_backbone', 'load_into',
           'reference_qnet_spec']

_WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin')
_INDEX_FILES = ('model.safetensors.index.json', 'pytorch_model.bin.index.json')

# google-bert/bert-base-uncased, the backbone of every released Hypencoder. Knowing it lets a downloaded
# checkpoint folder open offline; transformers' BertConfig defaults are exactly this model.
_KNOWN_BACKBONES = ('google-bert/bert-base-uncased', 'bert-base-uncased')


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked: missing, unsafe, or not matching its config."""


def resolve_folder(name_or_path: str | os.PathLike) -> Path:
    """Returns a local folder for a checkpoint: the path itself, or a hub snapshot (downloaded once, then cached).

    Args:
        name_or_path: a local folder, or a hub repository id such as ``jfkback/hypencoder.6_layer``.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path.absolute()  # so that messages name the file, wherever the working directory is
    if path.exists():
        raise CheckpointError(f'{path.absolute()} is a file; pass the folder that holds config.json and the weights')
    name = str(name_or_path)
    if name.startswith(('.', '/', '~')) or name.count('/') > 1:
        raise CheckpointError(f'checkpoint folder {path.absolute()} does not exist')
    from huggingface_hub import snapshot_download
    try:
        # Prefer safetensors; fetch a .bin only where a repository has no safetensors file.
        folder = Path(snapshot_download(name, allow_patterns=['*.json', '*.txt', '*.safetensors', '*.model']))
        if not any((folder / f).exists() for f in (_WEIGHT_FILES[0], _INDEX_FILES[0])):
            folder = Path(snapshot_download(name, allow_patterns=['*.json', '*.txt', '*.bin', '*.model']))
    except Exception as e:  # the hub client raises many types: offline, missing repo, auth
        raise CheckpointError(f'{name} is neither a local folder (there is no {path.absolute()}) nor a reachable Hugging '
                              f'Face repository ({type(e).__name__}: {e}). Pass a folder path, or go online once to cache '
                              'it.') from e
    return folder


def read_json(path: Path) -> dict:
    """Reads a JSON file, with an error that names the file when it is missing or corrupt."""
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f'{path} is missing') from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f'{path} is not valid JSON ({e}); the file is corrupt or truncated') from None


def _load_file(path: Path) -> Dict[str, torch.Tensor]:
    if path.suffix == '.safetensors':
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f'{path} is not a readable safetensors file ({e}); it may be truncated') from None
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f'refusing to load {path}: it is a pickle that holds more than tensors, and unpickling it could run '
            f'arbitrary code ({str(e).splitlines()[0]}). Only load checkpoints you trust; convert trusted ones to '
            'safetensors.') from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f'{path} is not a readable PyTorch checkpoint ({e}); it may be truncated') from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f'{path} does not hold a state dict of tensors')
    return state


def load_state_dict(folder: Path) -> Dict[str, torch.Tensor]:
    """Reads all weights of a checkpoint folder (single or sharded, safetensors preferred).

    Raises:
        CheckpointError: if no weight file is found, or a file is unsafe or unreadable.
    """
    for name in _WEIGHT_FILES:
        if (folder / name).exists():
            return _load_file(folder / name)
    for name in _INDEX_FILES:
        if (folder / name).exists():
            shards = sorted(set(read_json(folder / name)['weight_map'].values()))
            state: Dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(_load_file(folder / shard))
            return state
    raise CheckpointError(f'no weights in {folder}: expected one of {", ".join(_WEIGHT_FILES + _INDEX_FILES)}')


def backbone_config(model_name_or_path: str, checkpoint_folder: Optional[Path] = None):
    """The transformers config of a backbone named by a checkpoint.

    Looks for ``model_name_or_path`` relative to the checkpoint folder first, then as a path, then on the hub.
    The released checkpoints' backbone (bert-base-uncased) is known without the hub.
    """
    from transformers import AutoConfig, BertConfig
    candidates = []
    if checkpoint_folder is not None:
        candidates.append(Path(checkpoint_folder) / model_name_or_path)
    candidates.append(Path(model_name_or_path).expanduser())
    for c in candidates:
        if (c / 'config.json').exists():
            return AutoConfig.from_pretrained(str(c))
    try:
        return AutoConfig.from_pretrained(model_name_or_path)
    except Exception as e:
        if model_name_or_path in _KNOWN_BACKBONES:
            return BertConfig()
        raise CheckpointError(f'cannot find the backbone config {model_name_or_path!r} (looked in '
                              f'{", ".join(str(c) for c in candidates)} and on the hub: {e})') from None


_OWN_FORMATS = {'pyterrier-hypencoder': 'Hypencoder.from_pretrained', 'pyterrier-hypencoder-dot': 'DotEncoder.from_pretrained',
                'query_encoder_kwargs': 'Hypencoder.from_pretrained'}


def load_backbone(name_or_path: str | os.PathLike, pooling: Optional[str]):
    """A plain Hugging Face encoder to put a new head on: ``(backbone, tokenizer, pooling)``.

    Args:
        name_or_path: an encoder folder or hub name.
        pooling: ``cls`` or ``mean``; None takes the pooling of a sentence-transformers model (its
            ``modules.json`` / ``1_Pooling/config.json``), else ``cls`` (the paper's).

    Raises:
        CheckpointError: for a folder that does not exist, a Hypencoder or DotEncoder checkpoint (which would
            otherwise fail in transformers with "Unrecognized model"), or a pooling this package lacks.
    """
    from transformers import AutoModel, AutoTokenizer
    name = str(name_or_path)
    folder = Path(name).expanduser()
    if not folder.is_dir() and (name.startswith(('.', '/', '~')) or name.count('/') > 1):
        raise CheckpointError(f'encoder folder {folder.absolute()} does not exist')
    config = _local_file(name, 'config.json')
    found = [key for key in _OWN_FORMATS if config is not None and key in read_json(config)]
    if found:
        raise CheckpointError(f'{name} is a checkpoint of this package (or a released Hypencoder), not a plain encoder: '
                              f'load it with {_OWN_FORMATS[found[0]]}({name!r}), or start from its backbone')
    if pooling is None:
        pooling = _sentence_transformers_pooling(name) or 'cls'
    return AutoModel.from_pretrained(name), AutoTokenizer.from_pretrained(name), pooling


def _local_file(name: str, filename: str) -> Optional[Path]:
    """``filename`` of a local folder, or of a hub repository's cached (or downloadable) snapshot; None if absent."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        return folder / filename if (folder / filename).exists() else None
    try:
        from huggingface_hub import hf_hub_download
        return Path(hf_hub_download(name, filename))
    except Exception:  # missing file, offline, unknown repository: transformers reports the latter two itself
        return None


def _sentence_transformers_pooling(name: str) -> Optional[str]:
    modules = _local_file(name, 'modules.json')
    if modules is None:
        return None
    paths = [m.get('path') for m in read_json(modules) if str(m.get('type', '')).endswith('Pooling')]
    config = _local_file(name, f'{paths[0]}/config.json') if paths and paths[0] else None
    if config is None:
        return None
    cfg = read_json(config)
    modes = [key[len('pooling_mode_'):] for key, on in cfg.items() if key.startswith('pooling_mode_') and on is True]
    modes = [{'cls_token': 'cls', 'mean_tokens': 'mean'}.get(m, m) for m in modes]
    if modes in (['cls'], ['mean']):
        return modes[0]
    raise CheckpointError(f'{name} is a sentence-transformers model pooling by {" + ".join(modes) or "nothing"} ({config}), '
                          'which this package does not implement; pass pooling="cls" or pooling="mean" explicitly')


def load_into(module: torch.nn.Module, state: dict, what: str) -> None:
    """``module.load_state_dict(state)`` with errors that name the mismatching tensors (``what``: the part, for messages)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f'{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}'
             for k in own if k in state and state[k].shape != own[k].shape]
    # Non-persistent buffers like position_ids appear in some transformers versions' state dicts only.
    missing = [k for k in missing if not k.endswith(('position_ids', 'token_type_ids'))]
    unexpected = [k for k in unexpected if not k.endswith(('position_ids', 'token_type_ids'))]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append('wrong shapes: ' + '; '.join(wrong[:5]))
        if missing:
            parts.append(f'missing {len(missing)} tensors, e.g. {missing[:3]}')
        if unexpected:
            parts.append(f'unexpected {len(unexpected)} tensors, e.g. {unexpected[:3]}')
        raise CheckpointError(f'the checkpoint does not fit the {what} its config describes: ' + ', '.join(parts))
    module.load_state_dict(state, strict=False)


# ---- the q-nets of a released-format config -----------------------------------------------------------------

# Loss types of the Hypencoder paper's code (jfkback/hypencoder-paper) and of the Matryoshka Hypencoder's
# (MajdAlkawaas/hypencoder-paper), the only ones either can load; the latter raises on any other.
_PLAIN_LOSSES = ('margin_mse', 'cross_entropy')
MATRYOSHKA_LOSS = 'matryoshka_dim_margin_mse'


def reference_qnet_spec(config: dict, where: Path) -> QNetSpec:
    """The q-net architecture of a released-format config (``query_encoder_kwargs``), as its code scores it.

    Original Hypencoders: ``converter_kwargs`` as read by :meth:`QNetSpec.from_converter_kwargs`. A Matryoshka
    Hypencoder (``loss_type`` holds ``matryoshka_dim_margin_mse``): the same converter, but with no residual
    connection in any block, since that code computes the residual sum and discards it (it was trained so), and with
    the nested widths of its ``loss_kwargs[...]['matryoshka_dims']`` (plus the full width, see ``QNetSpec.widths``).

    Args:
        config: the parsed ``config.json``.
        where: its path, for messages.

    Raises:
        CheckpointError: for converter settings this package does not implement, a loss type neither code knows
            (it cannot be told whether it changes how the q-nets score), or Matryoshka settings whose scores this
            package cannot reproduce exactly (residual settings no released Matryoshka checkpoint has, bad widths).
    """
    converter = config['query_encoder_kwargs'].get('converter_kwargs', {})
    try:
        spec = QNetSpec.from_converter_kwargs(converter)
    except ValueError as e:
        raise CheckpointError(f'{where}: {e}') from None
    losses = config.get('loss_type') or []
    losses = [losses] if isinstance(losses, str) else list(losses)
    loss_kwargs = config.get('loss_kwargs') or [{}] * len(losses)
    unknown = [t for t in losses if t not in _PLAIN_LOSSES + (MATRYOSHKA_LOSS,)]
    if unknown:
        raise CheckpointError(f'{where} was trained with loss type {unknown[0]!r}, which neither the Hypencoder code nor '
                              f'the Matryoshka Hypencoder code knows (they know {list(_PLAIN_LOSSES + (MATRYOSHKA_LOSS,))}). '
                              'A loss may come with its own q-net semantics, so its scores cannot be reproduced '
                              'reliably; refusing to guess')
    if MATRYOSHKA_LOSS not in losses:
        return spec
    if len(loss_kwargs) != len(losses):
        raise CheckpointError(f'{where}: loss_type lists {len(losses)} losses but loss_kwargs {len(loss_kwargs)}')
    widths = []
    for loss, kwargs in zip(losses, loss_kwargs):
        if loss != MATRYOSHKA_LOSS:
            continue
        dims = (kwargs or {}).get('matryoshka_dims')
        if not isinstance(dims, list) or not dims or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
            raise CheckpointError(f'{where}: a {MATRYOSHKA_LOSS} loss needs loss_kwargs with matryoshka_dims, a list of '
                                  f'q-net widths (e.g. [128, 256, 512, 768]); got {dims!r}')
        widths += dims
    # The Matryoshka code honours no residual setting (see above); a config asking for a residual on the last block,
    # or for layer norm after the residual, is not one a released Matryoshka checkpoint has, and code that honours it
    # would score otherwise: refused rather than guessed.
    if spec.residual_on_last or not spec.layer_norm_before_residual:
        raise CheckpointError(f'{where}: a Matryoshka Hypencoder with converter_kwargs {converter} (a residual on the last '
                              'block, or layer norm after the residual; do_residual_on_last defaults to do_residual) '
                              'is not one this package can score exactly: the released Matryoshka code runs every '
                              'q-net block without residuals, do_residual_on_last false. Set do_residual_on_last '
                              'to false (or do_residual to false) if that is how it was trained')
    try:
        return replace(spec, residual=False, residual_on_last=False, widths=tuple(widths))
    except ValueError as e:
        raise CheckpointError(f'{where}: Matryoshka widths {widths} do not fit the q-net '
                              f'{list(spec.vector_dimensions)}: {e}') from None

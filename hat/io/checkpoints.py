"""The one checkpoint loader and saver: ``.pth`` / ``.safetensors``, the released layouts, trust and atomic writes.

    load_state_dict(path)        file -> flat ``{key: tensor}`` (``params_ema`` -> ``params`` -> bare state dict)
    load_checkpoint(path)        file -> the whole stored object (every entry), without running code
    save_checkpoint(obj, path)   ``{'params': sd, ...}`` or a flat state dict -> ``.pth`` / ``.safetensors``, atomic
    layout_differences(a, b)     which keys are missing, unexpected or mis-shaped between two layouts

Layouts: ``{'params_ema': sd}`` / ``{'params': sd}`` (BasicSR's released format; ``params_ema`` is preferred), a bare
state dict, keys prefixed with ``module.`` (DataParallel), and ``.safetensors`` files, flat or with the released
entries stored as ``params_ema.<key>`` / ``params.<key>``.

Trust rule: ``.pth`` files are read with ``torch.load(weights_only=True)``, which only rebuilds tensors and plain
containers. A pickle that needs anything else (a custom class, a function) could run code while loading and is
refused, unless the caller passes ``trust_remote_code=True`` for a file they trust.
"""
from __future__ import annotations

import logging
import os
import pickle
import re
import sys
import tempfile
import warnings
from os import PathLike
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
from torch import Tensor

from hat.utils.atomic import atomic_torch_save, give_normal_permissions

logger = logging.getLogger('basicsr')

# Containers of the weights inside a checkpoint, in the order BasicSR-style tools prefer them.
DEFAULT_PARAM_KEYS = ('params_ema', 'params')
# nn.DataParallel / DistributedDataParallel prefix every key of the wrapped module.
DATA_PARALLEL_PREFIX = 'module.'
CHECKPOINT_SUFFIXES = ('.pth', '.pt', '.ckpt', '.safetensors')

# Modules whose names a weights-only checkpoint may legitimately contain (see _names_nothing).
_WELL_KNOWN_MODULES = ('torch', 'collections', 'builtins')


def _looks_like_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def _describe_container(obj: Any) -> str:
    if isinstance(obj, Mapping):
        entries = [f'{k!r} ({type(v).__name__})' for k, v in list(obj.items())[:12]]
        more = f', ... ({len(obj)} in all)' if len(obj) > 12 else ''
        return f'a dict with keys {", ".join(entries) or "(none)"}{more}'
    return f'a {type(obj).__name__}'


def unwrap_state_dict(obj: Any, param_key: str | None = None) -> dict[str, Tensor]:
    """The flat state dict inside a loaded checkpoint.

    Args:
        obj: what ``torch.load`` returned: ``{'params_ema': sd}``, ``{'params': sd}``, a bare state dict, or a whole
            ``nn.Module`` (legacy files saved with ``torch.save(model)``).
        param_key: the entry to use; when None, ``params_ema``, then ``params``, then ``obj`` itself.
    Returns:
        ``{key: tensor}`` with a leading ``module.`` (DataParallel) removed from every key.
    Raises:
        ValueError: ``param_key`` is absent, or nothing in ``obj`` is a state dict; the message lists what is there.
    """
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if param_key is not None:
        if not isinstance(obj, Mapping) or param_key not in obj:
            raise ValueError(f'param_key={param_key!r} is not in the checkpoint, which is {_describe_container(obj)}. '
                             'Pick one of those keys (param_key=None tries params_ema, then params, then the '
                             'whole dict).')
        found = obj[param_key]
    else:
        found = next((obj[k] for k in DEFAULT_PARAM_KEYS if isinstance(obj, Mapping) and k in obj), obj)
    if isinstance(found, nn.Module):
        found = found.state_dict()
    if not _looks_like_state_dict(found):
        where = f'checkpoint[{param_key!r}]' if param_key is not None else 'the checkpoint'
        raise ValueError(f'{where} is not a state dict (a dict of tensors); it is {_describe_container(found)}. '
                         f'Pass param_key= naming the entry that holds the weights (tried: '
                         f'{", ".join(DEFAULT_PARAM_KEYS)}, then the dict itself).')
    return {(k[len(DATA_PARALLEL_PREFIX):] if k.startswith(DATA_PARALLEL_PREFIX) else k): v for k, v in found.items()}


def _refused_global(message: str) -> str | None:
    """The ``module.name`` that torch's weights-only unpickler refused, if that was the reason."""
    match = re.search(r'Unsupported global: GLOBAL (\S+)', message)
    return match.group(1) if match else None


def _names_nothing(qualified_name: str) -> bool:
    """True for a name in torch's or the standard containers' modules that does not exist: a damaged (cut) name.

    A truncated legacy checkpoint ends inside ``torch._utils._rebuild_tensor_v2`` and reads as a request for
    ``torch._utils._reb``. Other modules (``__main__``, a training script's package) say nothing about damage: a
    missing class there is just code the file needs. Only modules already imported are consulted; importing one
    named by an untrusted file would run code.
    """
    module_name, _, attribute = qualified_name.rpartition('.')
    module = sys.modules.get(module_name)
    return (module_name.split('.')[0] in _WELL_KNOWN_MODULES and module is not None
            and not hasattr(module, attribute))


def _refusal_detail(message: str) -> str:
    """The useful part of torch's weights-only refusal: which global or opcode it met."""
    name = _refused_global(message)
    if name:
        return f'it refers to {name}'
    match = re.search(r'Unsupported operand \d+', message)
    return match.group(0).lower() if match else message.strip().splitlines()[0]


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f'{type(error).__name__}: {text.splitlines()[0] if text else "(no message)"}'


def _require_safetensors(path: Path) -> Any:
    try:
        import safetensors.torch
    except ImportError:
        raise ImportError(f'{path} is a .safetensors file; it needs the safetensors package, which is not '
                          'installed: pip install safetensors') from None
    return safetensors.torch


def load_safetensors(path: str | PathLike, map_location: Any = 'cpu') -> dict[str, Any]:
    """A ``.safetensors`` file as a dict: flat, or ``{'params_ema': sd, 'params': sd}`` for the prefixed layout."""
    path = Path(path)
    load_file = _require_safetensors(path).load_file
    from safetensors import SafetensorError
    device = str(map_location) if isinstance(map_location, (str, torch.device)) else 'cpu'
    try:
        tensors = load_file(str(path), device=device)
    except SafetensorError as error:
        raise ValueError(f'{path} is not a readable .safetensors file (corrupt or truncated?): '
                         f'{_first_line(error)}') from error
    # A .safetensors file holds one flat dict. scripts/convert_checkpoint.py stores the entries of a released
    # checkpoint as 'params_ema.<key>' / 'params.<key>'; nest them again so that param_key works as for a .pth. A
    # plain state dict (no such prefix on some key) is returned as it is.
    containers = {key.split('.', 1)[0] for key in tensors}
    if tensors and containers <= set(DEFAULT_PARAM_KEYS) and all('.' in key for key in tensors):
        return {name: {key[len(name) + 1:]: value for key, value in tensors.items() if key.startswith(f'{name}.')}
                for name in DEFAULT_PARAM_KEYS if name in containers}
    return tensors


def load_checkpoint(path: str | PathLike, *, map_location: Any = 'cpu', trust_remote_code: bool = False) -> Any:
    """Read a checkpoint file as stored (every entry kept), without running code from it.

    Args:
        path: a ``.pth``/``.pt``/``.ckpt`` file written by ``torch.save``, or a ``.safetensors`` file (needs the
            ``safetensors`` package, imported only then; prefixed entries come back nested, see
            :func:`load_safetensors`).
        map_location: as in ``torch.load``.
        trust_remote_code: only for legacy files from a source you trust: unpickle with ``weights_only=False``, which
            can import and run arbitrary code named in the file. Default False: such files are refused.
    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a checkpoint (corrupt, truncated, another format), or it was refused because
            loading it could run code.
        ImportError: a .safetensors file and no ``safetensors`` package.
    """
    path = Path(path)
    if not path.is_file():
        what = 'is a directory, not a checkpoint file' if path.is_dir() else 'does not exist'
        raise FileNotFoundError(f'checkpoint not found: {path} {what}')
    if path.suffix.lower() == '.safetensors':
        return load_safetensors(path, map_location)

    try:
        with warnings.catch_warnings():
            # Old pickle protocols trigger a harmless warning of the weights-only unpickler on every load.
            warnings.filterwarnings('ignore', message='.*pickle protocol', category=UserWarning)
            obj = torch.load(path, map_location=map_location, weights_only=not trust_remote_code)
    except PermissionError:
        raise  # the OS message is the clearest one (torch raises other OSErrors for damaged zip files)
    except pickle.UnpicklingError as error:
        refused = _refused_global(str(error))
        if refused and _names_nothing(refused):
            raise ValueError(f'{path} is not a readable PyTorch checkpoint (corrupt or truncated?): it names '
                             f'{refused}, which does not exist') from None
        if not trust_remote_code and 'Weights only load failed' in str(error):
            raise ValueError(
                f'refused to load {path}: it is not a plain tensor checkpoint ({_refusal_detail(str(error))}), and '
                'loading it could run code stored in the file. Convert it to a state dict (or .safetensors) on a '
                'machine where you trust it, or, only if you trust the file, pass trust_remote_code=True to load it '
                'with weights_only=False. (A damaged file can be refused the same way.)') from None
        raise ValueError(f'{path} is not a readable PyTorch checkpoint (corrupt or truncated?): '
                         f'{_first_line(error)}') from error
    except Exception as error:  # torch.load raises RuntimeError, EOFError, KeyError, ... for damaged files
        raise ValueError(f'{path} is not a readable PyTorch checkpoint (corrupt, truncated, or not written by '
                         f'torch.save): {_first_line(error)}') from error
    if trust_remote_code:
        logger.warning(f'Loaded {path} with weights_only=False (trust_remote_code=True).')
    return obj


def load_state_dict(path: str | PathLike, param_key: str | None = None, *, map_location: Any = 'cpu',
                    trust_remote_code: bool = False) -> dict[str, Tensor]:
    """Read the weights of a checkpoint file without running code from it.

    Args:
        path, map_location, trust_remote_code: see :func:`load_checkpoint`.
        param_key: see :func:`unwrap_state_dict`.
    Returns:
        flat ``{key: tensor}``.
    Raises:
        FileNotFoundError, ImportError: see :func:`load_checkpoint`.
        ValueError: see :func:`load_checkpoint`, or the file holds no state dict (under ``param_key``).
    """
    obj = load_checkpoint(path, map_location=map_location, trust_remote_code=trust_remote_code)
    try:
        return unwrap_state_dict(obj, param_key)
    except ValueError as error:
        raise ValueError(f'{path}: {error}') from None


def _own(tensor: Tensor) -> Tensor:
    """A contiguous copy on the CPU: safetensors refuses tensors that share memory (as ``params`` and ``params_ema``
    may when a file was saved without EMA) and views into larger storages."""
    return tensor.detach().to('cpu', copy=True).contiguous()


def save_checkpoint(obj: Mapping[str, Any], path: str | PathLike, *, metadata: Mapping[str, str] | None = None,
                    overwrite: bool = True) -> None:
    """Write a checkpoint atomically (temporary file in the same folder, fsync, rename).

    Args:
        obj: ``{'params': sd, 'params_ema': sd}`` (the released layout) or a flat state dict.
        path: ``.safetensors`` (entries are stored flat as ``<entry>.<key>``, the layout :func:`load_safetensors`
            nests again; needs the ``safetensors`` package) or anything else for ``torch.save``.
        metadata: string metadata of a .safetensors file (ignored for .pth).
        overwrite: when False, an existing ``path`` is never replaced (FileExistsError).
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(f'{path} exists; not overwritten')
    if path.suffix.lower() != '.safetensors':
        atomic_torch_save(dict(obj), path)
        return
    safetensors_torch = _require_safetensors(path)
    if all(isinstance(v, Tensor) for v in obj.values()):
        flat = {k: _own(v) for k, v in obj.items()}
    else:
        flat = {f'{name}.{k}': _own(v) for name, sd in obj.items() for k, v in unwrap_state_dict(sd).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    os.close(fd)
    try:
        safetensors_torch.save_file(flat, tmp_name, metadata=dict(metadata or {}))
        give_normal_permissions(tmp_name)
        if not overwrite and path.exists():
            raise FileExistsError(f'{path} appeared while writing; not overwritten')
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def layout_differences(expected: Mapping[str, tuple], found: Mapping[str, tuple], limit: int = 5) -> list[str]:
    """How a checkpoint's layout differs from a network's, one phrase per kind (empty when they match).

    Args:
        expected: the network's ``{key: shape}``.
        found: the checkpoint's ``{key: shape}``.
        limit: how many keys each phrase names before counting the rest.
    Returns:
        e.g. ``['2 missing keys: a, b', '1 shape mismatches: conv.weight: checkpoint [8, 3], network [4, 3]']``.
    """
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [f'{k}: checkpoint {list(found[k])}, network {list(expected[k])}' for k in expected
              if k in found and tuple(found[k]) != tuple(expected[k])]
    parts = []
    for label, items in (('missing keys', missing), ('unexpected keys', unexpected), ('shape mismatches', shapes)):
        if items:
            more = f', ... and {len(items) - limit} more' if len(items) > limit else ''
            parts.append(f'{len(items)} {label}: {", ".join(items[:limit])}{more}')
    return parts


def state_dict_layout(state_dict: Mapping[str, Any]) -> dict[str, tuple]:
    """``{key: shape}`` of a state dict (values are never read: meta tensors work)."""
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def bare_network(network: nn.Module) -> nn.Module:
    """The module inside a DataParallel / DistributedDataParallel wrapper (or the module itself)."""
    if isinstance(network, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return network.module
    return network


def load_into_network(network: nn.Module, path: str | PathLike, *, param_key: str | None = 'params_ema',
                      strict: bool = True) -> None:
    """Load a checkpoint's weights into ``network`` (BasicSR's ``load_network`` contract, safely).

    Args:
        network: the network (a DataParallel/DDP wrapper is looked through).
        path: the checkpoint (see :func:`load_checkpoint`).
        param_key: the entry to load. ``'params_ema'`` or None follow BasicSR's convention: ``params_ema``, else
            ``params`` (a file saved without EMA), else a bare state dict. Any other name must be present.
        strict: every key and shape must match (the message then names the differences and what the checkpoint
            looks like); when False, only entries whose key and shape match are loaded, and the rest is logged.
    Raises:
        FileNotFoundError, ValueError, ImportError: see :func:`load_state_dict`; ValueError when a strict load does
            not fit.
    """
    network = bare_network(network)
    state_dict = load_state_dict(path, None if param_key in (None, DEFAULT_PARAM_KEYS[0]) else param_key)
    own = state_dict_layout(network.state_dict())
    if strict:
        if layout_differences(own, state_dict_layout(state_dict)):
            from hat.archs.detect import describe_mismatch  # detection builds on this module
            raise ValueError(f'{path} does not fit the network of the option file (strict_load is on).\n'
                             f'{describe_mismatch(network, state_dict)}')
        network.load_state_dict(state_dict, strict=True)
        return
    kept = {k: v for k, v in state_dict.items() if k in own and own[k] == tuple(v.shape)}
    skipped = sorted(set(state_dict) - set(kept))
    missing = sorted(set(own) - set(kept))
    if skipped or missing:
        logger.warning(f'Non-strict loading of {path}: {len(skipped)} checkpoint entries ignored '
                       f'(first: {skipped[:5]}), {len(missing)} network entries left as initialised '
                       f'(first: {missing[:5]}).')
    network.load_state_dict(kept, strict=False)

"""Finding and loading training states for ``--auto_resume`` and ``path.resume_state``.

States live in ``<project>/experiments/<name>/training_states/<iter>.state`` next to the networks in ``models/``,
found through the absolute paths of the parsed options, so resuming works from any working directory. A state that
cannot be read (a partial write from an older tool, a corrupt file) or whose network file is missing is skipped with
a warning, and the next older one is used.
"""
from __future__ import annotations

import collections
import logging
import re
from os import path as osp
from pathlib import Path

import torch

logger = logging.getLogger('basicsr')

_STATE_NAME = re.compile(r'^(\d+)\.state$')

# basicsr's MultiStepRestartLR keeps its milestones in a Counter; allow it in weights-only loading.
torch.serialization.add_safe_globals([collections.Counter])


def load_training_state(path: str, device: torch.device | str = 'cpu') -> dict:
    """Load a ``.state`` file (weights only: tensors, numbers, lists, dicts)."""
    state = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(state, dict) or 'iter' not in state or 'optimizers' not in state:
        raise ValueError(f'{path} is not a training state (no iter/optimizers entries).')
    return state


def network_files(opt: dict, current_iter: int) -> dict[str, str]:
    """The network checkpoints saved together with the state of ``current_iter``: {'network_g': path, ...}."""
    return {
        key: osp.join(opt['path']['models'], f'net_{key.removeprefix("network_")}_{current_iter}.pth')
        for key in opt if key.startswith('network_')
    }


def find_auto_resume_state(opt: dict, device: torch.device | str = 'cpu') -> tuple[str, dict] | None:
    """Newest complete state of this experiment, or None when there is none."""
    folder = Path(opt['path']['training_states'])
    if not folder.is_dir():
        return None
    candidates = sorted(((int(m.group(1)), p) for p in folder.iterdir() if (m := _STATE_NAME.match(p.name))),
                        reverse=True)
    for current_iter, path in candidates:
        missing = [p for p in network_files(opt, current_iter).values() if not osp.isfile(p)]
        if missing:
            logger.warning(f'Ignoring training state {path}: its network file {missing[0]} is missing.')
            continue
        try:
            return str(path), load_training_state(str(path), device)
        except Exception as err:  # a damaged state must not stop the search for an older good one
            logger.warning(f'Ignoring unreadable training state {path}: {err}')
    return None


def prepare_resume(opt: dict, device: torch.device | str = 'cpu') -> dict | None:
    """Load the state to resume from (auto or explicit) and point the networks at its checkpoints.

    Returns the state dict, or None for a fresh start. An explicit ``resume_state`` that cannot be read is an
    error (the user asked for it); with ``--auto_resume`` unreadable states are skipped.
    """
    if opt.get('auto_resume'):
        found = find_auto_resume_state(opt, device)
        if found is None:
            return None
        state_path, state = found
        opt['path']['resume_state'] = state_path
    elif opt['path'].get('resume_state'):
        state_path = opt['path']['resume_state']
        if not osp.isfile(state_path):
            raise FileNotFoundError(f'resume_state {state_path} does not exist.')
        state = load_training_state(state_path, device)
    else:
        return None

    for key, path in network_files(opt, state['iter']).items():
        ignored = opt['path'].get('ignore_resume_networks') or []
        if key in ignored:
            continue
        opt['path'][f'pretrain_{key}'] = path
        opt['path'][f'param_key_{key.removeprefix("network_")}'] = 'params'
        opt['path'][f'strict_load_{key.removeprefix("network_")}'] = True
    return state


def capture_rng_state() -> dict:
    """Python, NumPy and torch (CPU and CUDA) random states, saved with a training state so that a resumed run
    draws the same augmentations, dropout and degradations as an uninterrupted one."""
    import random

    import numpy as np

    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    # NumPy's key array as a tensor: weights-only loading accepts tensors, not NumPy arrays
    numpy_state = [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached_gaussian)]
    state = {'python': random.getstate(), 'numpy': numpy_state, 'torch': torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of :func:`capture_rng_state` (a missing CUDA entry leaves CUDA's generators as they are)."""
    import random

    import numpy as np

    random.setstate(_as_python_state(state['python']))
    np.random.set_state(_as_numpy_state(state['numpy']))
    torch.set_rng_state(state['torch'].cpu())
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state['cuda']])


def _as_python_state(value) -> tuple:
    # weights-only loading returns the tuple's inner tuple as a list; random.setstate needs tuples
    version, internal, gauss = value
    return (version, tuple(internal), gauss)


def _as_numpy_state(value) -> tuple:
    import numpy as np

    name, keys, pos, has_gauss, cached_gaussian = value
    return (name, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian)

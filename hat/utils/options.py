"""Option files: BasicSR's command line and YAML conventions, on any machine.

Compared with ``basicsr.utils.options.parse_options``:
* ``num_gpu: 1`` (or ``auto``) without CUDA runs on the CPU with one warning instead of crashing;
* ``--launcher pytorch`` (torchrun) works on the CPU: the backend falls back from nccl to gloo;
* ``--force_yml`` values are parsed as YAML (no ``eval``/``exec``), and unknown keys are reported;
* every ``network_*`` section is checked against its architecture's constructor, and ``model_type`` against the
  registered models: a misspelt key is an error with a suggestion, where the official code ignores it silently;
* relative paths (datasets, checkpoints, meta_info files) that do not exist from the working directory are looked up
  under the project root, so that the shipped option files run from any working directory.
"""
from __future__ import annotations

import argparse
import difflib
import inspect
import random
import warnings
from os import path as osp
from typing import Any

import torch
import yaml
from basicsr.utils import set_random_seed
from basicsr.utils.dist_util import get_dist_info
from basicsr.utils.registry import ARCH_REGISTRY, MODEL_REGISTRY, Registry

from hat.utils.dist import init_dist

_PATH_KEYS = ('dataroot_gt', 'dataroot_lq', 'meta_info_file', 'meta_info')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description='Run a HAT option file (BasicSR command line).')
    parser.add_argument('-opt', type=str, required=True, help='Path to the option YAML file.')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm'], default='none', help='Job launcher.')
    parser.add_argument('--auto_resume', action='store_true',
                        help='Resume from the newest complete training state of this experiment, if any.')
    parser.add_argument('--debug', action='store_true', help='Debug mode: prefix the name with debug_.')
    parser.add_argument('--local_rank', type=int, default=0, help='Set by older launchers; torchrun uses env vars.')
    parser.add_argument('--force_yml', nargs='+', default=None, metavar='KEY=VALUE',
                        help='Override options, nested keys joined by ":", e.g. train:ema_decay=0.999')
    return parser


def load_yaml(path: str) -> dict:
    """Read an option file; a missing or malformed file gets an error that names it."""
    if not osp.isfile(path):
        raise FileNotFoundError(f'Option file not found: {path}')
    with open(path, encoding='utf-8') as handle:
        try:
            opt = yaml.safe_load(handle)
        except yaml.YAMLError as err:
            raise ValueError(f'Option file {path} is not valid YAML: {err}') from err
    if not isinstance(opt, dict):
        raise ValueError(f'Option file {path} must hold a mapping of options, not {type(opt).__name__}.')
    return opt


def apply_force_yml(opt: dict, entries: list[str]) -> None:
    """Apply ``key1:key2=value`` overrides; values are YAML (``1e-4``, ``true``, ``[1, 2]``, ``~``)."""
    for entry in entries:
        if '=' not in entry:
            raise ValueError(f'--force_yml entry {entry!r} must look like key:subkey=value')
        keys, value = entry.split('=', 1)
        *parents, last = [k.strip() for k in keys.split(':')]
        node = opt
        for key in parents:
            if not isinstance(node.get(key), dict):
                raise KeyError(f'--force_yml {entry!r}: option {key!r} does not exist or is not a section')
            node = node[key]
        node[last] = yaml.safe_load(value.strip())


def _registered(registry: Registry, name: str) -> type | None:
    """What ``registry.get(name)`` returns, without its print and KeyError: ``name``, else ``name_basicsr``."""
    for key in (name, f'{name}_basicsr'):
        if key in registry:
            return registry.get(key)
    return None


def _unknown_name(what: str, name: Any, registry: Registry) -> ValueError:
    names = sorted(key for key, _ in registry)
    close = difflib.get_close_matches(str(name), names, n=1)
    hint = f' Did you mean {close[0]!r}?' if close else ''
    return ValueError(f'{what} {name!r} is not registered.{hint} Registered: {", ".join(names)}.')


def check_network_options(opt: dict) -> None:
    """Check ``model_type`` and every ``network_*`` section against what is registered.

    basicsr's ``build_network`` passes a section's keys to the architecture's constructor; the official HAT
    architecture takes ``**kwargs`` and drops what it does not know, so ``window_szie: 16`` used to train a network
    with the default window without a word. Here each key must be a parameter of the constructor.

    Raises:
        ValueError: an unregistered ``model_type`` or architecture ``type`` (naming the registered ones), or a key
            the architecture does not take (naming the section, the closest valid key and all accepted keys).
    """
    import basicsr.archs  # noqa: F401  (fills ARCH_REGISTRY with basicsr's own architectures)
    import basicsr.models  # noqa: F401  (fills MODEL_REGISTRY)

    if 'model_type' in opt and _registered(MODEL_REGISTRY, str(opt['model_type'])) is None:
        raise _unknown_name('model_type', opt['model_type'], MODEL_REGISTRY)
    for section, network in opt.items():
        if not str(section).startswith('network_') or network is None:
            continue
        if not isinstance(network, dict) or 'type' not in network:
            raise ValueError(f'{section} must be a mapping with a type (the architecture), e.g. type: HAT')
        arch = _registered(ARCH_REGISTRY, str(network['type']))
        if arch is None:
            raise _unknown_name(f'{section}: architecture type', network['type'], ARCH_REGISTRY)
        parameters = inspect.signature(arch).parameters.values()
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            continue  # takes any keyword: nothing to check against
        accepted = [p.name for p in parameters
                    if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
        unknown = [key for key in network if key != 'type' and key not in accepted]
        if unknown:
            problems = []
            for key in unknown:
                close = difflib.get_close_matches(str(key), accepted, n=1)
                problems.append(f'{key!r}' + (f' (did you mean {close[0]!r}?)' if close else ''))
            raise ValueError(f'{section}: {network["type"]} has no option {", ".join(problems)}. {network["type"]} '
                             f'accepts: {", ".join(accepted)}.')


def resolve_num_gpu(opt: dict) -> None:
    """Turn ``num_gpu`` into the number of CUDA devices actually used (0 means the CPU)."""
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    requested = opt.get('num_gpu', 'auto')
    if requested == 'auto':
        opt['num_gpu'] = available
        if available == 0:
            warnings.warn('num_gpu is auto and no CUDA device is available: running on the CPU.', stacklevel=2)
        return
    requested = int(requested)
    if requested > available:
        message = (f'num_gpu: {requested} but {available} CUDA device(s) available: '
                   + ('running on the CPU.' if available == 0 else f'using {available}.'))
        warnings.warn(message, stacklevel=2)
        requested = available
    opt['num_gpu'] = requested


def resolve_path(value: str | None, root_path: str) -> str | None:
    """A relative path that does not exist from the working directory but does under the project root is
    rewritten to the latter; anything else is returned unchanged (expanded for ``~``)."""
    if not value:
        return value
    value = osp.expanduser(value)
    if osp.isabs(value) or osp.exists(value):
        return value
    candidate = osp.normpath(osp.join(root_path, value))
    return candidate if osp.exists(candidate) else value


def parse_options(root_path: str, is_train: bool = True, argv: list[str] | None = None) -> tuple[dict, Any]:
    """Parse the command line and the option file; set up distribution, device count, seeds and paths.

    Args:
        root_path: project root; ``experiments/`` and ``results/`` live there whatever the working directory.
        is_train: training (``experiments/<name>``) or testing (``results/<name>``).
        argv: arguments (default: ``sys.argv[1:]``).
    Returns:
        (opt, args).
    """
    args = build_parser().parse_args(argv)
    opt = load_yaml(args.opt)
    for required in ('name', 'datasets'):
        if required not in opt:
            raise KeyError(f'Option file {args.opt} has no {required!r} entry.')
    opt.setdefault('path', {})
    if args.force_yml:
        apply_force_yml(opt, args.force_yml)
    check_network_options(opt)

    resolve_num_gpu(opt)
    if args.launcher == 'none':
        opt['dist'] = False
    else:
        opt['dist'] = True
        init_dist(args.launcher, use_cuda=opt['num_gpu'] > 0, **opt.get('dist_params', {}))
    opt['rank'], opt['world_size'] = get_dist_info()

    seed = opt.get('manual_seed')
    if seed is None:
        seed = random.randint(1, 10000)
        opt['manual_seed'] = seed
    set_random_seed(seed + opt['rank'])

    opt['auto_resume'] = args.auto_resume
    opt['is_train'] = is_train
    if args.debug and not opt['name'].startswith('debug'):
        opt['name'] = 'debug_' + opt['name']

    for phase, dataset in opt['datasets'].items():
        dataset['phase'] = phase.split('_')[0]
        if 'scale' in opt:
            dataset['scale'] = opt['scale']
        for key in _PATH_KEYS:
            if isinstance(dataset.get(key), str):
                dataset[key] = resolve_path(dataset[key], root_path)

    for key, value in opt['path'].items():
        if isinstance(value, str) and ('resume_state' in key or 'pretrain_network' in key):
            opt['path'][key] = resolve_path(value, root_path)

    if is_train:
        experiments_root = osp.join(root_path, 'experiments', opt['name'])
        opt['path'].update(
            experiments_root=experiments_root,
            models=osp.join(experiments_root, 'models'),
            training_states=osp.join(experiments_root, 'training_states'),
            log=experiments_root,
            visualization=osp.join(experiments_root, 'visualization'))
        if 'debug' in opt['name']:
            if 'val' in opt:
                opt['val']['val_freq'] = 8
            opt['logger']['print_freq'] = 1
            opt['logger']['save_checkpoint_freq'] = 8
    else:
        results_root = osp.join(root_path, 'results', opt['name'])
        opt['path'].update(results_root=results_root, log=results_root,
                           visualization=osp.join(results_root, 'visualization'))
    return opt, args


def copy_option_file(opt_file: str, folder: str, argv: list[str] | None = None) -> str:
    """Copy the option file into the run folder, stamped with the time and the command line that ran it."""
    import shutil
    import sys
    import time

    command = ' '.join(sys.argv if argv is None else ['hat', *argv])
    target = osp.join(folder, osp.basename(opt_file))
    shutil.copyfile(opt_file, target)
    with open(target, 'r+', encoding='utf-8') as handle:
        body = handle.read()
        handle.seek(0)
        handle.write(f'# GENERATE TIME: {time.asctime()}\n# CMD:\n# {command}\n\n{body}')
    return target

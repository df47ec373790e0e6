"""Model and image loading shared by the analysis command lines.

A model is given either as a checkpoint (architecture detected from the state dict by
:func:`hat.archs.detect.build_from_checkpoint`) or as an option file (``network_g`` built through basicsr's
``ARCH_REGISTRY``, weights from ``path.pretrain_network_g``). Either way the network comes back in eval mode.
"""
from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn as nn
import yaml
from torch import Tensor

from basicsr.utils.registry import ARCH_REGISTRY
from hat.archs.detect import build_from_checkpoint, load_state_dict

logger = logging.getLogger(__name__)

OPTION_SUFFIXES = ('.yml', '.yaml')
DEFAULT_PARAM_KEY = 'params_ema'


def default_device() -> str:
    return 'cuda' if torch.cuda.is_available() else 'cpu'


def load_model(spec: str | Path, *, param_key: str | None = None, device: str | torch.device = 'cpu') -> nn.Module:
    """Build a network from a checkpoint (``.pth``) or an option file (``.yml``/``.yaml``), in eval mode on ``device``.

    Args:
        spec: path of a checkpoint or of an option file.
        param_key: key of the state dict inside the checkpoint; default: ``params_ema``, then ``params``, then the
            whole file (for an option file: its ``path.param_key_g``).
        device: where the network is put.
    """
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f'model {spec}: no such file. Pass a checkpoint (.pth) or an option file (.yml) '
                                'with network_g and path.pretrain_network_g.')
    if path.suffix.lower() in OPTION_SUFFIXES:
        return build_from_options(path, param_key=param_key, device=device)
    return build_from_checkpoint(path, param_key=param_key, device=device).eval()


def build_from_options(path: str | Path, *, param_key: str | None = None,
                       device: str | torch.device = 'cpu') -> nn.Module:
    """Build ``network_g`` of an option file through ``ARCH_REGISTRY`` and load ``path.pretrain_network_g`` into it.

    ``path.param_key_g`` (default ``params_ema``) and ``path.strict_load_g`` (default true) are honoured;
    ``param_key`` overrides the former. A relative weight path is taken from the working directory, as the training
    and test pipelines do.
    """
    path = Path(path)
    with open(path, encoding='utf-8') as f:
        opt = yaml.safe_load(f) or {}
    network = opt.get('network_g')
    if not isinstance(network, dict) or 'type' not in network:
        raise ValueError(f'{path}: no network_g with a type; an option file for the analysis tools needs network_g '
                         '(the architecture) and path.pretrain_network_g (the weights).')
    cfg = dict(network)
    arch = cfg.pop('type')
    try:
        cls = ARCH_REGISTRY.get(arch)
    except KeyError as err:
        raise ValueError(f'{path}: network_g.type={arch!r} is not a registered architecture ({err}).') from err
    net = cls(**cfg)
    paths = opt.get('path') or {}
    weights = paths.get('pretrain_network_g')
    if not weights:
        raise ValueError(f'{path}: path.pretrain_network_g is not set; point it to the checkpoint to analyse.')
    weights_path = Path(weights).expanduser()
    if not weights_path.is_file():
        raise FileNotFoundError(f'{path}: path.pretrain_network_g = {weights} is not a file (a relative path is '
                                f'taken from the working directory, {Path.cwd()}).')
    key = param_key or paths.get('param_key_g') or DEFAULT_PARAM_KEY
    # basicsr falls back to params when params_ema is absent; load_state_dict(param_key=None) does the same.
    state = load_state_dict(weights_path, param_key=None if key == DEFAULT_PARAM_KEY else key)
    net.load_state_dict(state, strict=bool(paths.get('strict_load_g', True)))
    logger.info('Built %s from %s with weights %s [%s]', arch, path, weights, key)
    return net.to(device).eval()


def input_channels(net: nn.Module) -> int:
    """Number of image channels the network takes (``conv_first`` or its first convolution)."""
    first = getattr(net, 'conv_first', None)
    if isinstance(first, nn.Conv2d):
        return first.in_channels
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    raise ValueError(f'{type(net).__name__} has no Conv2d; cannot tell how many image channels it takes.')


def read_image(path: str | Path, *, channels: int = 3) -> Tensor:
    """Read an image file as [channels, H, W] float32 in [0, 1]: RGB for 3 channels, luminance for 1.

    8- and 16-bit files are accepted; an alpha channel is dropped.
    """
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise FileNotFoundError(f'cannot read image {path} (missing, or not a format OpenCV reads).')
    peak = 65535.0 if img.dtype == np.uint16 else 255.0
    img = img.astype(np.float32) / peak
    if img.ndim == 2:
        img = img[..., None]
    if img.shape[2] == 4:
        img = img[..., :3]
    if channels == 3:
        img = np.repeat(img, 3, axis=2) if img.shape[2] == 1 else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    elif channels == 1:
        img = img if img.shape[2] == 1 else cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)[..., None]
    else:
        raise ValueError(f'networks with {channels} input channels are not supported; use 1 (gray) or 3 (RGB).')
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))

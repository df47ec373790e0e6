"""Perceptual (VGG feature) loss whose ImageNet weights come from a local file, never from the internet.

basicsr's ``PerceptualLoss`` builds its VGG through ``VGGFeatureExtractor``, which reads
``experiments/pretrained_models/vgg19-dcbb9e9d.pth`` relative to the working directory when that file exists and
otherwise asks torchvision for the pretrained weights, i.e. downloads them in the middle of model construction (and
fails without internet). :class:`LocalVGGPerceptualLoss` computes the same loss (same layers, input normalisation,
criteria and style term) from a file it finds up front:

* ``vgg_weights`` in the loss options (a path, absolute or relative to the working directory or the project root);
* otherwise torchvision's file name for the VGG type (``vgg19-dcbb9e9d.pth`` for ``vgg19``) in
  ``experiments/pretrained_models/`` under the project root, then under the working directory (where basicsr looks).

The network is torchvision's own, ``torchvision.models.vgg19(weights=None).features`` (or the VGG type asked for),
with basicsr's layer names (``conv1_1``, ``relu1_1``, ...); torchvision's weight files load as they are. A missing or
unsuitable file raises at construction, with a message that names the file, where it was looked for, where to put it
and where to get it. There is no fallback to random weights and no download.

The Real-HAT models build ``type: PerceptualLoss`` of the official option files with this class
(:func:`build_perceptual_loss`), so those files work unchanged; other models can name it directly as
``type: LocalVGGPerceptualLoss``.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from os import path as osp
from typing import Any, Mapping

import torch
import torch.nn as nn
import torchvision
from basicsr.losses import build_loss
from basicsr.utils.registry import LOSS_REGISTRY
from torch import Tensor

from hat.archs.detect import load_state_dict

logger = logging.getLogger('basicsr')

# torchvision's ImageNet weights (IMAGENET1K_V1) of each VGG type, as torchvision names the files.
VGG_WEIGHT_FILES = {
    'vgg11': 'vgg11-8a719046.pth', 'vgg13': 'vgg13-19584684.pth', 'vgg16': 'vgg16-397923af.pth',
    'vgg19': 'vgg19-dcbb9e9d.pth', 'vgg11_bn': 'vgg11_bn-6002323d.pth', 'vgg13_bn': 'vgg13_bn-abd245e5.pth',
    'vgg16_bn': 'vgg16_bn-6c64b313.pth', 'vgg19_bn': 'vgg19_bn-c79401a0.pth',
}
WEIGHTS_URL = 'https://download.pytorch.org/models/'
DEFAULT_WEIGHTS_FOLDER = osp.join('experiments', 'pretrained_models')
SUPPORTED_CRITERIA = ('l1', 'l2', 'fro')
# ImageNet statistics of inputs in [0, 1], as torchvision's VGGs were trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PERCEPTUAL_LOSS_TYPES = ('PerceptualLoss', 'LocalVGGPerceptualLoss')
_PROJECT_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


def _check_type(vgg_type: str) -> None:
    if vgg_type not in VGG_WEIGHT_FILES:
        raise ValueError(f'vgg_type {vgg_type!r} is not supported; use one of {sorted(VGG_WEIGHT_FILES)}.')


def _vgg_features(vgg_type: str) -> nn.Sequential:
    """``torchvision.models.<vgg_type>(weights=None).features`` on the meta device, ready for ``load_state_dict(...,
    assign=True)``: its layer indices give the keys ``features.<i>.*`` of torchvision's weight files, and nothing is
    allocated or initialised for the classifier (100M parameters the loss never uses) or for weights about to be
    replaced."""
    _check_type(vgg_type)
    with torch.device('meta'):
        features = getattr(torchvision.models, vgg_type)(weights=None).features
    for layer in features:
        if isinstance(layer, nn.ReLU):
            layer.inplace = False  # the pre-activation features (conv*, bn*) are kept for the loss
    return features


def vgg_layer_names(vgg_type: str) -> list[str]:
    """BasicSR's names of the ``features`` layers of a VGG, in order: ``conv1_1, relu1_1, conv1_2, ..., pool5``
    (with ``bn<b>_<i>`` after each conv for the ``_bn`` types)."""
    names = []
    block, conv = 1, 1
    for layer in _vgg_features(vgg_type):
        if isinstance(layer, nn.MaxPool2d):
            names.append(f'pool{block}')
            block, conv = block + 1, 1
        elif isinstance(layer, nn.Conv2d):
            names.append(f'conv{block}_{conv}')
        elif isinstance(layer, nn.BatchNorm2d):
            names.append(f'bn{block}_{conv}')
        else:
            names.append(f'relu{block}_{conv}')
            conv += 1
    return names


def _unique(paths: list[str]) -> list[str]:
    seen: list[str] = []
    for path in paths:
        if path not in seen:
            seen.append(path)
    return seen


def find_vgg_weights(vgg_type: str = 'vgg19', vgg_weights: str | os.PathLike | None = None,
                     root_path: str | os.PathLike | None = None) -> str:
    """The local file of torchvision's ImageNet weights for ``vgg_type``.

    Args:
        vgg_type: one of :data:`VGG_WEIGHT_FILES`.
        vgg_weights: an explicit path (the ``vgg_weights`` loss option); relative paths are tried from the working
            directory, then from ``root_path``.
        root_path: the project root (``experiments/`` lives there); default: the folder that holds ``hat/``.
    Returns:
        an existing file path.
    Raises:
        FileNotFoundError: no file; the message says where it was looked for, where to put it and where to get it.
    """
    _check_type(vgg_type)
    file_name = VGG_WEIGHT_FILES[vgg_type]
    root = osp.abspath(root_path) if root_path is not None else _PROJECT_ROOT
    if vgg_weights:
        given = osp.expanduser(os.fspath(vgg_weights))
        candidates = [given] if osp.isabs(given) else _unique([osp.abspath(given), osp.join(root, given)])
    else:
        candidates = _unique([osp.join(root, DEFAULT_WEIGHTS_FOLDER, file_name),
                              osp.abspath(osp.join(DEFAULT_WEIGHTS_FOLDER, file_name))])
    for candidate in candidates:
        if osp.isfile(candidate):
            return candidate
    looked = '\n'.join(f'  {c}' for c in candidates)
    raise FileNotFoundError(
        f'The perceptual loss needs the ImageNet weights of torchvision\'s {vgg_type} ({file_name}), and no such file '
        f'was found. Looked at:\n{looked}\n'
        'Training does not download anything. Get the file from '
        f'{WEIGHTS_URL}{file_name} (or copy it from ~/.cache/torch/hub/checkpoints/ of a machine where torchvision '
        f'has downloaded it) and put it at {osp.join(root, DEFAULT_WEIGHTS_FOLDER, file_name)}, or point '
        'train: perceptual_opt: vgg_weights: at it in the option file.')


def load_vgg_features(vgg_type: str, weights_file: str) -> nn.Sequential:
    """torchvision's ``vgg.features`` for ``vgg_type`` with the weights of ``weights_file``.

    The file is read weights-only; it may hold the whole torchvision state dict (the classifier is ignored) or only
    its ``features.*`` entries. Every feature layer must be there with the right shape.

    Raises:
        ValueError: the file is not a checkpoint, or not one of ``vgg_type`` (names the first mismatching key).
    """
    state_dict = load_state_dict(weights_file)
    features = _vgg_features(vgg_type)
    found = {k.removeprefix('features.'): v for k, v in state_dict.items() if k.startswith('features.')}
    expected = features.state_dict()
    missing = [k for k in expected if k not in found]
    wrong = [k for k in expected if k in found and tuple(found[k].shape) != tuple(expected[k].shape)]
    unexpected = [k for k in found if k not in expected]
    if missing or wrong or unexpected:
        if wrong:
            detail = (f'features.{wrong[0]} has shape {list(found[wrong[0]].shape)}, expected '
                      f'{list(expected[wrong[0]].shape)}')
        else:
            detail = f'missing features.{missing[0]}' if missing else f'unexpected features.{unexpected[0]}'
        raise ValueError(f'{weights_file} does not hold the weights of torchvision\'s {vgg_type} ({detail}). Use '
                         f'{VGG_WEIGHT_FILES[vgg_type]} from {WEIGHTS_URL}{VGG_WEIGHT_FILES[vgg_type]}, or set '
                         'vgg_type to the network the file belongs to.')
    # assign: the meta tensors are replaced by the file's, in the dtype the network has (a half-precision file too)
    features.load_state_dict({k: v.to(expected[k].dtype) for k, v in found.items()}, strict=True, assign=True)
    return features


class VGGFeatures(nn.Module):
    """Frozen VGG features at named layers (BasicSR's ``VGGFeatureExtractor`` without its download).

    Args:
        layer_names: layers to return, e.g. ``['conv1_2', 'conv5_4']`` (``conv*`` are before the ReLU).
        vgg_type: a torchvision VGG (see :data:`VGG_WEIGHT_FILES`).
        weights_file: local file of that VGG's ImageNet weights.
        use_input_norm: normalise inputs in [0, 1] with the ImageNet mean and std.
        range_norm: map inputs from [-1, 1] to [0, 1] first.
    """

    def __init__(self, *, layer_names: list[str], vgg_type: str, weights_file: str, use_input_norm: bool = True,
                 range_norm: bool = False) -> None:
        super().__init__()
        names = vgg_layer_names(vgg_type)
        unknown = [n for n in layer_names if n not in names]
        if unknown or not layer_names:
            raise ValueError(f'layer_weights names {unknown or "no layer"}; {vgg_type} has {names}.')
        self.layer_names = list(layer_names)
        self.use_input_norm = use_input_norm
        self.range_norm = range_norm
        last = max(names.index(n) for n in layer_names)
        features = load_vgg_features(vgg_type, weights_file)
        # only the layers up to the deepest requested one: the rest would cost time and never reach the loss
        self.vgg_net = nn.Sequential(OrderedDict(zip(names[:last + 1], list(features)[:last + 1])))
        self.vgg_net.eval()
        for param in self.parameters():
            param.requires_grad = False
        self.register_buffer('mean', torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> 'VGGFeatures':
        super().train(mode)
        self.vgg_net.eval()  # frozen: batch-norm statistics (``_bn`` types) must never update
        return self

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x: [B, 3, H, W] in [0, 1] (or [-1, 1] with ``range_norm``) -> {layer name: [B, C_l, H_l, W_l]}."""
        if self.range_norm:
            x = (x + 1) / 2
        if self.use_input_norm:
            x = (x - self.mean) / self.std
        out = {}
        for name, layer in self.vgg_net.named_children():
            x = layer(x)
            if name in self.layer_names:
                out[name] = x
        return out


def gram_matrix(x: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, C, C], normalised by C * H * W."""
    b, c, h, w = x.shape
    flat = x.reshape(b, c, h * w)
    return flat.bmm(flat.transpose(1, 2)) / (c * h * w)


@LOSS_REGISTRY.register()
class LocalVGGPerceptualLoss(nn.Module):
    """BasicSR's ``PerceptualLoss`` (and style loss) with the VGG weights read from a local file.

    Args:
        layer_weights: ``{layer name: weight}``, e.g. ``{'conv5_4': 1.0}`` (features before the ReLU).
        vgg_type: torchvision VGG type.
        use_input_norm: normalise inputs with the ImageNet mean/std (inputs in [0, 1]).
        range_norm: inputs are in [-1, 1].
        perceptual_weight: weight of the feature loss; 0 disables it (returns None).
        style_weight: weight of the Gram-matrix style loss; 0 disables it (returns None).
        criterion: ``l1``, ``l2`` (mean squared error) or ``fro`` (Frobenius norm).
        vgg_weights: the weights file; default: see :func:`find_vgg_weights`.
        root_path: project root for the default location and relative ``vgg_weights``.

    Returns ``(perceptual loss or None, style loss or None)`` for ``forward(x, gt)`` with ``x, gt: [B, 3, H, W]``.
    """

    def __init__(self, *, layer_weights: Mapping[str, float], vgg_type: str = 'vgg19', use_input_norm: bool = True,
                 range_norm: bool = False, perceptual_weight: float = 1.0, style_weight: float = 0.0,
                 criterion: str = 'l1', vgg_weights: str | None = None, root_path: str | None = None) -> None:
        super().__init__()
        if criterion not in SUPPORTED_CRITERIA:
            raise ValueError(f'perceptual loss criterion {criterion!r} is not supported; use one of '
                             f'{SUPPORTED_CRITERIA}.')
        _check_type(vgg_type)
        self.layer_weights = {str(k): float(v) for k, v in layer_weights.items()}
        self.perceptual_weight = float(perceptual_weight)
        self.style_weight = float(style_weight)
        self.criterion_type = criterion
        self.weights_file = find_vgg_weights(vgg_type, vgg_weights, root_path)
        self.vgg = VGGFeatures(layer_names=list(self.layer_weights), vgg_type=vgg_type, weights_file=self.weights_file,
                               use_input_norm=use_input_norm, range_norm=range_norm)
        logger.info(f'Perceptual loss: {vgg_type} ImageNet weights from {self.weights_file}.')

    def _distance(self, a: Tensor, b: Tensor) -> Tensor:
        if self.criterion_type == 'l1':
            return torch.nn.functional.l1_loss(a, b)
        if self.criterion_type == 'l2':
            return torch.nn.functional.mse_loss(a, b)
        return torch.linalg.norm((a - b).flatten())  # the Frobenius norm of the whole difference, as BasicSR

    def forward(self, x: Tensor, gt: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x_features = self.vgg(x)
        with torch.no_grad():
            gt_features = self.vgg(gt.detach())
        percep = style = None
        if self.perceptual_weight > 0:
            percep = sum(self._distance(x_features[k], gt_features[k]) * w for k, w in self.layer_weights.items())
            percep = percep * self.perceptual_weight
        if self.style_weight > 0:
            style = sum(self._distance(gram_matrix(x_features[k]), gram_matrix(gt_features[k])) * w
                        for k, w in self.layer_weights.items())
            style = style * self.style_weight
        return percep, style


def build_perceptual_loss(opt: Mapping[str, Any], *, root_path: str | None = None) -> nn.Module:
    """Build ``train.perceptual_opt``: ``PerceptualLoss`` and ``LocalVGGPerceptualLoss`` become a
    :class:`LocalVGGPerceptualLoss` (local weights, checked now); any other registered type goes to basicsr."""
    opt = dict(opt)
    loss_type = opt.pop('type', None)
    if loss_type not in PERCEPTUAL_LOSS_TYPES:
        if loss_type is None:
            raise KeyError('train: perceptual_opt needs a type (PerceptualLoss).')
        return build_loss({'type': loss_type, **opt})
    known = {'layer_weights', 'vgg_type', 'use_input_norm', 'range_norm', 'perceptual_weight', 'style_weight',
             'criterion', 'vgg_weights'}
    unknown = sorted(set(opt) - known)
    if unknown:
        raise ValueError(f'train: perceptual_opt has unknown keys {unknown}; allowed: {sorted(known)}.')
    if 'layer_weights' not in opt:
        raise KeyError('train: perceptual_opt needs layer_weights, e.g. {conv5_4: 1.0}.')
    return LocalVGGPerceptualLoss(**opt, root_path=root_path)

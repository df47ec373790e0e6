"""What a loaded model is: the network and everything a runner needs to know about it, in one object.

A :class:`ModelDescriptor` is built from a checkpoint (architecture detected from the state dict, see
:mod:`hat.archs.detect`), from an option file (``network_g`` + ``path.pretrain_network_g``), or from a network in
hand (:meth:`ModelDescriptor.from_network`, e.g. the model being trained). Every entry point that runs a model
(test/validation, hat-upscale, the analysis tools, the predictor) gets one through :func:`load_model` and hands it
to :class:`hat.inference.upscaler.Upscaler`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import yaml
from basicsr.utils.registry import ARCH_REGISTRY
from torch import Tensor

from hat.archs.detect import VARIANT_CUSTOM, DetectedArch, build_from_checkpoint
from hat.io.checkpoints import bare_network, load_into_network

logger = logging.getLogger('basicsr')

OPTION_SUFFIXES = ('.yml', '.yaml')
ONNX_SUFFIX = '.onnx'
TORCH_PRECISIONS = ('fp32', 'bf16', 'fp16')


@dataclass
class ModelDescriptor:
    """A loaded super-resolution model.

    Attributes:
        network: maps [B, in_channels, h, w] in [0, 1] to [B, out_channels, h * scale, w * scale]; an ``nn.Module``
            in eval mode (or any callable on tensors, e.g. an ONNX Runtime session wrapper).
        architecture: the architecture's name (``'HAT'``, ``'SRVGGNetCompact'``, or the class name).
        variant: ``'HAT-S'``, ``'HAT'``, ``'HAT-L'`` for released HAT configurations, else ``'custom'``.
        scale: the upscaling factor.
        in_channels, out_channels: image channels taken and returned.
        size_multiple: inputs are padded to a multiple of this (HAT: the window size; 1: any size).
        precisions: the precisions this model can run in (``'fp32'``, ``'bf16'``, ``'fp16'``).
        notes: what was assumed when the model was recognised (values the weights do not store).
        source: the file it came from, if any.
        options: the ``network_g`` options that rebuild the network (``type`` included), when known.
    """

    network: Callable[[Tensor], Tensor]
    architecture: str
    scale: int
    in_channels: int
    out_channels: int
    size_multiple: int = 1
    variant: str = VARIANT_CUSTOM
    precisions: tuple[str, ...] = TORCH_PRECISIONS
    notes: list[str] = field(default_factory=list)
    source: str | None = None
    options: dict[str, Any] | None = None

    @classmethod
    def from_network(cls, network: nn.Module, *, scale: int | None = None, size_multiple: int | None = None,
                     detected: DetectedArch | None = None, source: str | PathLike | None = None,
                     options: dict[str, Any] | None = None) -> 'ModelDescriptor':
        """Describe a network in hand. ``scale`` and ``size_multiple`` default to its ``upscale`` and
        ``window_size`` attributes (1 when absent, as in SRVGGNetCompact); a DataParallel/DDP wrapper is looked
        through for them, and the wrapper itself is what runs."""
        bare = bare_network(network)
        detected = detected or getattr(bare, 'detected', None)
        in_channels, out_channels = network_channels(bare)
        if scale is None:
            if not hasattr(bare, 'upscale'):
                raise ValueError(f'{type(bare).__name__} has no upscale attribute; pass scale=')
            scale = int(bare.upscale)
        multiple = size_multiple if size_multiple is not None else int(getattr(bare, 'window_size', 1) or 1)
        return cls(network=network, architecture=detected.type if detected else type(bare).__name__,
                   variant=detected.variant if detected else VARIANT_CUSTOM, scale=int(scale),
                   in_channels=in_channels, out_channels=out_channels, size_multiple=multiple,
                   notes=list(detected.notes) if detected else [], source=None if source is None else str(source),
                   options=detected.network_options() if detected else options)

    @property
    def module(self) -> nn.Module | None:
        """The network as an ``nn.Module`` (None for other backends)."""
        return self.network if isinstance(self.network, nn.Module) else None

    def summary(self) -> str:
        """One line: ``HAT-S x4 (HAT, embed_dim=144, ...)`` for detected checkpoints, else name and scale."""
        detected = getattr(self.module, 'detected', None) if self.module is not None else None
        if detected is not None:
            return detected.summary()
        name = self.variant if self.variant != VARIANT_CUSTOM else f'a custom {self.architecture}'
        return f'{name} x{self.scale} ({self.architecture}, {self.in_channels} -> {self.out_channels} channels)'


def network_channels(net: nn.Module) -> tuple[int, int]:
    """(input channels, output channels) of an SR network: its first convolution, and ``num_out_ch`` if it has
    one (SRVGGNetCompact), else the input channels."""
    first = getattr(net, 'conv_first', None)
    if not isinstance(first, nn.Conv2d):
        first = next((m for m in net.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        raise ValueError(f'{type(net).__name__} has no Conv2d; cannot tell how many image channels it takes')
    return first.in_channels, int(getattr(net, 'num_out_ch', first.in_channels))


def read_option_file(path: str | PathLike) -> dict[str, Any]:
    """The options of a YAML option file (an empty file gives ``{}``)."""
    with open(path, encoding='utf-8') as f:
        return yaml.safe_load(f) or {}


def build_from_options(path: str | PathLike, *, param_key: str | None = None, device: str | torch.device = 'cpu',
                       opt: dict[str, Any] | None = None) -> nn.Module:
    """Build ``network_g`` of an option file through ``ARCH_REGISTRY`` and load ``path.pretrain_network_g``.

    ``path.param_key_g`` (default ``params_ema``, which falls back to ``params`` as in BasicSR) and
    ``path.strict_load_g`` (default true) are honoured; ``param_key`` overrides the former. A relative weight path
    is taken from the working directory, as the training and test pipelines do. ``opt``: the file's options when
    the caller has read them already.
    """
    path = Path(path)
    opt = read_option_file(path) if opt is None else opt
    network = opt.get('network_g')
    if not isinstance(network, dict) or 'type' not in network:
        raise ValueError(f'{path}: no network_g with a type; an option file for a model needs network_g '
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
        raise ValueError(f'{path}: path.pretrain_network_g is not set; point it to the checkpoint to use.')
    weights_path = Path(weights).expanduser()
    if not weights_path.is_file():
        raise FileNotFoundError(f'{path}: path.pretrain_network_g = {weights} is not a file (a relative path is '
                                f'taken from the working directory, {Path.cwd()}).')
    key = param_key or paths.get('param_key_g') or 'params_ema'
    load_into_network(net, weights_path, param_key=key, strict=bool(paths.get('strict_load_g', True)))
    logger.info('Built %s from %s with weights %s [%s]', arch, path, weights, key)
    return net.to(device).eval()


def load_model(spec: str | PathLike, *, param_key: str | None = None,
               device: str | torch.device = 'cpu') -> ModelDescriptor:
    """Load a model from a checkpoint (``.pth``/``.safetensors``), an option file (``.yml``) or an ONNX file.

    Args:
        spec: the file.
        param_key: the checkpoint entry with the weights (default ``params_ema``, then ``params``, then the file).
        device: where the network runs (an ONNX file runs on ONNX Runtime's CPU provider).
    Raises:
        FileNotFoundError: no such file.
        ValueError: an unrecognised checkpoint, an option file without a model, a checkpoint that does not fit.
        ImportError: a format whose optional package is missing (safetensors, onnxruntime); the message says what
            to install.
    """
    path = Path(spec).expanduser()
    if not path.is_file():
        what = 'is a folder' if path.is_dir() else 'does not exist'
        raise FileNotFoundError(f'model {spec} {what}. Pass a checkpoint (.pth/.safetensors), an option file (.yml) '
                                'with network_g and path.pretrain_network_g, or an exported .onnx file.')
    suffix = path.suffix.lower()
    if suffix == ONNX_SUFFIX:
        from hat.inference.onnx_backend import load_onnx_model  # onnxruntime is optional
        return load_onnx_model(path, device=device)
    if suffix in OPTION_SUFFIXES:
        opt = read_option_file(path)
        net = build_from_options(path, param_key=param_key, device=device, opt=opt)
        options = dict(opt['network_g'])
        # Networks without an ``upscale`` attribute (basicsr's EDSR, RCAN) take the scale from the options.
        scale = getattr(net, 'upscale', None) or options.get('upscale') or options.get('scale') or opt.get('scale')
        return ModelDescriptor.from_network(net, scale=scale, source=path, options=options)
    net = build_from_checkpoint(path, param_key=param_key, device=device)
    return ModelDescriptor.from_network(net, source=path)

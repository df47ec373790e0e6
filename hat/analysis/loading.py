"""Models for the analysis command lines, through the project's one loader.

A model is a checkpoint (architecture detected) or an option file (``network_g`` + ``path.pretrain_network_g``),
loaded by :func:`hat.inference.load_model` (the tools read images with :func:`hat.io.images.read_image_tensor`).
The analysis tools call the network itself rather than an :class:`~hat.inference.Upscaler`, because LAM
differentiates through it and the feature maps hook its layers; HAT pads any input size itself, so they see the same
function.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from hat.inference.descriptor import load_model as load_descriptor
from hat.inference.descriptor import network_channels


def load_model(spec: str | Path, *, param_key: str | None = None, device: str | torch.device = 'cpu') -> nn.Module:
    """The network of a checkpoint or option file, in eval mode on ``device`` (see :func:`hat.inference.load_model`).

    Raises:
        ValueError: an exported ONNX file (the analysis tools need the PyTorch network), or what the loader raises.
    """
    model = load_descriptor(spec, param_key=param_key, device=device)
    if model.module is None:
        raise ValueError(f'{spec}: the analysis tools need the PyTorch network; pass its checkpoint or option file, '
                         'not an exported model.')
    return model.module


def input_channels(net: nn.Module) -> int:
    """Number of image channels the network takes (``conv_first`` or its first convolution)."""
    return network_channels(net)[0]

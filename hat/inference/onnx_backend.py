"""The ONNX Runtime backend: an exported model file (``python -m hat.export``) as a :class:`ModelDescriptor`.

The exported graph takes ``N x C x H x W`` float32 in [0, 1] of any size (it pads to its window itself) and returns
``N x C x sH x sW``; its metadata says what it is (architecture, variant, scale, window size). The Upscaler runs it
like a checkpoint: same image handling, tiling, progress and checks. onnxruntime is an optional dependency
(``pip install onnxruntime``, or the ``onnx`` extra of this package).
"""
from __future__ import annotations

import logging
from os import PathLike
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from hat.inference.descriptor import ModelDescriptor

logger = logging.getLogger('basicsr')

INSTALL_HINT = 'pip install onnxruntime (or: pip install -e ".[onnx]")'


class OnnxNetwork:
    """An ONNX Runtime session called like a network: [N, C, h, w] tensor -> [N, C', s*h, s*w] float32 tensor.

    Runs on ONNX Runtime's CUDA provider when it is available and ``device`` is CUDA, else on its CPU provider;
    inputs and outputs are host tensors either way.
    """

    def __init__(self, path: str | PathLike, *, device: torch.device | str = 'cpu') -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise ImportError(f'{path} is an ONNX model; running it needs onnxruntime, which is not installed: '
                              f'{INSTALL_HINT}') from None
        providers = ['CPUExecutionProvider']
        if torch.device(device).type == 'cuda' and 'CUDAExecutionProvider' in ort.get_available_providers():
            providers.insert(0, 'CUDAExecutionProvider')
        try:
            self.session = ort.InferenceSession(str(path), providers=providers)
        except Exception as error:  # onnxruntime raises its own exception types for unreadable or invalid files
            first = (str(error).strip().splitlines() or ['(no message)'])[0]
            raise ValueError(f'{path} is not a readable ONNX model ({type(error).__name__}: {first})') from None
        self.input_name = self.session.get_inputs()[0].name
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    def __call__(self, x: Tensor) -> Tensor:
        array = np.ascontiguousarray(x.detach().float().cpu().numpy())
        (out, ) = self.session.run(None, {self.input_name: array})[:1]
        return torch.from_numpy(out)


def load_onnx_model(path: str | PathLike, *, device: torch.device | str = 'cpu') -> ModelDescriptor:
    """Describe an exported model from its metadata.

    Raises:
        ImportError: onnxruntime is not installed (the message says what to install).
        ValueError: not a readable ONNX file, or one without this project's metadata (scale, window size).
    """
    network = OnnxNetwork(path, device=device)
    meta = network.metadata
    try:
        scale = int(meta['scale'])
        window = int(meta.get('window_size', 1) or 1)
    except (KeyError, ValueError):
        raise ValueError(f'{path}: the ONNX model has no scale in its metadata ({sorted(meta) or "none"}); export it '
                         'with python -m hat.export, which records the architecture, scale and window size') from None
    channels = network.session.get_inputs()[0].shape[1]
    in_channels = channels if isinstance(channels, int) else int(meta.get('in_channels', 3))
    out_shape = network.session.get_outputs()[0].shape[1]
    out_channels = out_shape if isinstance(out_shape, int) else in_channels
    notes = [f'ONNX Runtime providers: {", ".join(network.session.get_providers())}']
    return ModelDescriptor(network=network, architecture=meta.get('architecture', 'ONNX'), scale=scale,
                           in_channels=in_channels, out_channels=out_channels, size_multiple=window,
                           variant=meta.get('variant', 'custom'), precisions=('fp32', ), notes=notes,
                           source=str(Path(path)))

"""The one way to run a super-resolution model: padding, precision, tiles, memory, self-ensemble, checks.

:class:`Upscaler` wraps a :class:`~hat.inference.descriptor.ModelDescriptor`. Test/validation (``HATModel``),
hat-upscale, the analysis tools, the benchmark script and the predictor all run models through it, so each of these
is done in one place:

* padding: every piece (a whole image or a tile) is reflect-padded to the model's size multiple (HAT: the window)
  and the output cropped back, as the released models were evaluated;
* precision: :func:`hat.inference.precision.resolve_precision` (``auto`` = bf16 where native, else fp32);
* tiles (:func:`hat.utils.tiling.tiled_forward`): square tiles of ``tile`` LR pixels overlapping by
  ``2 * tile_pad`` and blended, so the network's memory is that of one tile; the output canvas lives in host memory.
  ``tile='auto'`` picks the largest tile, a multiple of the size multiple, whose estimated peak memory fits the
  budget (:class:`~hat.inference.memory.MemoryModel` from two trial forwards on small tiles; budget: ``max_memory``,
  or 80% of the free GPU memory, or 50% of the available RAM less the output canvas on the CPU; HAT runs its
  upsampling head in bands for pieces taller than ~70 rows, so there the estimate is an upper bound); a tile that
  still runs out of memory is halved and the image retried;
* the x8 self-ensemble, and a check that the output is finite;
* the host memory of an image given back once it is done, where the command set the heap to keep it between the
  network's blocks (:func:`hat.utils.heap.release_freed_memory`).
"""
from __future__ import annotations

import contextlib
import logging

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from hat.archs.window import pad_to_multiple
from hat.inference.descriptor import ModelDescriptor
from hat.inference.memory import MemoryModel, available_memory, is_out_of_memory, measure_peak_memory
from hat.inference.precision import resolve_precision
from hat.io.images import LUMA_WEIGHTS, ImageError, Picture
from hat.utils.ensemble import self_ensemble as ensemble_x8
from hat.utils.heap import release_freed_memory
from hat.utils.tiling import tiled_forward

logger = logging.getLogger('basicsr')

DEFAULT_TILE_PAD = 32
# --tile auto: trial tile sides (LR pixels; rounded up to the size multiple) and the share of the free memory to use.
CALIBRATION_SIDES = (32, 48)
# --tile auto for backends whose memory torch cannot see (ONNX Runtime): a tile that fits a few GiB for HAT-L.
UNMEASURED_BACKEND_TILE = 256
CUDA_MEMORY_FRACTION = 0.8
CPU_MEMORY_FRACTION = 0.5
# Host bytes per output pixel and channel of the tiled output: canvas and blend weights, the crop, the quantisation's
# float copy and its uint result, with a margin; the x8 self-ensemble keeps a running sum and a back-transformed copy
# on top.
CANVAS_COPIES = 3
ENSEMBLE_CANVAS_COPIES = 5


class NonFiniteOutputError(ImageError):
    """The network produced NaN or infinite values."""


def all_finite(t: Tensor, rows: int = 256) -> bool:
    """``torch.isfinite(t).all()`` of a [..., H, W] tensor, a band of ``rows`` rows at a time: on the CPU, isfinite
    makes several full-size temporaries, which for a large output would outweigh a tile."""
    return all(bool(torch.isfinite(band).all()) for band in t.split(rows, dim=-2))


def parse_tile(value: str) -> int | str | None:
    """``'auto'`` -> ``'auto'``; ``'0'`` (or ``'none'``, ``'off'``) -> None (whole images); ``'256'`` -> 256.

    Raises:
        ValueError: anything else.
    """
    text = str(value).strip().lower()
    if text == 'auto':
        return 'auto'
    if text in ('0', 'none', 'off'):
        return None
    try:
        tile = int(text)
    except ValueError:
        raise ValueError(f"tile must be 'auto', 0 (whole image) or a tile side in pixels, got {value!r}") from None
    if tile < 0:
        raise ValueError(f'tile must be 0 or a positive number of pixels, got {tile}')
    return tile


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class Upscaler:
    """Runs a super-resolution model on whole images in bounded memory.

    Args:
        model: a :class:`ModelDescriptor`, or a network (described by :meth:`ModelDescriptor.from_network`).
        device: where the network runs (it must already be there); images and output canvases stay in host memory.
        precision: ``'auto'``, ``'fp32'``, ``'bf16'`` or ``'fp16'`` (see :mod:`hat.inference.precision`).
        tile: ``'auto'``, a tile side in LR pixels, or None for whole images.
        tile_pad: half the overlap of neighbouring tiles, LR pixels (capped at a quarter of the tile, so that
            consecutive tiles always advance by at least half a tile).
        self_ensemble: average the 8 flips/rotations (x8 the time).
        max_memory: budget in bytes for ``tile='auto'``; default: a share of the free memory.
        progress: show a progress bar over the tiles.
        precision_option: the option that set ``precision``, for messages (``'--precision'``, ``'val: amp'``).
    """

    def __init__(self, model: ModelDescriptor | nn.Module, *, device: torch.device | str = 'cpu',
                 precision: str = 'auto', tile: int | str | None = 'auto', tile_pad: int = DEFAULT_TILE_PAD,
                 self_ensemble: bool = False, max_memory: float | None = None, progress: bool = True,
                 precision_option: str = 'precision') -> None:
        if tile != 'auto' and tile is not None and (not isinstance(tile, int) or tile <= 0):
            raise ValueError(f"tile must be 'auto', a positive number of pixels or None, got {tile!r}")
        if tile_pad < 0:
            raise ValueError(f'tile_pad must be non-negative, got {tile_pad}')
        self.model = model if isinstance(model, ModelDescriptor) else ModelDescriptor.from_network(model)
        self.device = torch.device(device)
        resolved = resolve_precision(precision, self.device, where=precision_option)
        if precision == 'auto' and resolved.name not in self.model.precisions:
            resolved = resolve_precision('fp32', self.device)._replace(
                reason=f'auto: {self.model.architecture} runs in {", ".join(self.model.precisions)} only')
        if resolved.name not in self.model.precisions:
            raise ValueError(f'{self.model.summary()} runs in {", ".join(self.model.precisions)} only, not '
                             f'{resolved.name}')
        self.precision = resolved.name
        self.precision_reason = resolved.reason
        self._dtype = resolved.dtype
        self.tile = tile
        self.tile_pad = tile_pad
        self.self_ensemble = self_ensemble
        self.max_memory = max_memory
        self.progress = progress
        self._memory_model: MemoryModel | None = None
        self._auto_budget: float | None = None

    @property
    def net(self):
        return self.model.network

    @property
    def scale(self) -> int:
        return self.model.scale

    @property
    def multiple(self) -> int:
        return self.model.size_multiple

    @property
    def in_channels(self) -> int:
        return self.model.in_channels

    @property
    def out_channels(self) -> int:
        return self.model.out_channels

    def describe(self) -> str:
        """What this upscaler runs, for the log: model, device, precision (and why), tiles, ensemble."""
        tile = 'whole images' if self.tile is None else 'auto' if self.tile == 'auto' else f'{self.tile} px'
        ensemble = ', self-ensemble x8' if self.self_ensemble else ''
        return (f'{self.model.summary()} on {self.device}, {self.precision} ({self.precision_reason}), tile '
                f'{tile}{ensemble}')

    # ----- one piece: a tile or a whole image -----
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self._dtype is None:
            return contextlib.nullcontext()
        # Without autocast's cache of low-precision weight copies: under no_grad (not inference_mode, see forward) it
        # keeps a copy of each weight, made at its first use in the forward, between the forward's large maps. HAT
        # x4 at 256x256 in bf16 (Zen 4): peak RSS 1333 MiB without the cache against 1714 MiB with it, and 1417
        # against 4224 MiB where the heap keeps freed memory (hat/utils/heap.py); no slower. Each weight is cast
        # once per call instead, and the cast values are the same.
        return torch.autocast(device_type=self.device.type, dtype=self._dtype, cache_enabled=False)

    def forward(self, x: Tensor) -> Tensor:
        """One piece: [B, C, h, w] (any h, w) -> [B, C', s*h, s*w] float32 on the host. Padded to the size multiple
        here, once, and cropped back."""
        h, w = x.shape[-2:]
        padded, _, _ = pad_to_multiple(x, self.multiple) if self.multiple > 1 else (x, 0, 0)
        # no_grad, not inference_mode: the network caches index tensors (window orders) per size, and tensors made
        # in inference mode could never be saved for a backward pass later (training after validation, LAM).
        with torch.no_grad(), self._autocast():
            out = self.net(padded.to(self.device))
        return out[..., :h * self.scale, :w * self.scale].float().cpu()

    # ----- tile size -----
    def memory_model(self) -> MemoryModel:
        """Measure (once) the peak memory of forward passes on two small tiles and fit ``fixed + per_pixel * h * w``."""
        if self._memory_model is None:
            sides = [_round_up(s, self.multiple) for s in CALIBRATION_SIDES]
            if sides[1] <= sides[0]:
                sides[1] = sides[0] + self.multiple
            module = self.model.module
            known = list(module.parameters()) + list(module.buffers()) if module is not None else []
            self.forward(torch.rand(1, self.in_channels, self.multiple, self.multiple))  # warm-up: bias caches
            peaks = []
            for side in sides:
                x = torch.rand(1, self.in_channels, side, side)
                peaks.append(measure_peak_memory(lambda: self.forward(x), device=self.device,  # noqa: B023 (called here)
                                                 known=known + [x]))
            per_pixel = max((peaks[1] - peaks[0]) / (sides[1]**2 - sides[0]**2), peaks[1] / sides[1]**2 / 4)
            fixed = max(peaks[0] - per_pixel * sides[0]**2, 0.0)
            self._memory_model = MemoryModel(fixed=fixed, per_pixel=per_pixel)
            logger.debug(f'Memory model: {fixed / 2**20:.1f} MiB + {per_pixel / 1024:.2f} KiB per LR pixel '
                         f'(measured {[round(p / 2**20, 1) for p in peaks]} MiB at {sides} px)')
        return self._memory_model

    def _host_bytes(self, height: int, width: int, channels: int) -> float:
        copies = ENSEMBLE_CANVAS_COPIES if self.self_ensemble else CANVAS_COPIES
        return height * width * self.scale**2 * 4 * (channels + 1) * copies

    def memory_budget(self, height: int, width: int, channels: int) -> float:
        """Bytes the tiles of one ``height x width`` image may use on the device."""
        if self.max_memory is not None:
            budget = float(self.max_memory)
        else:
            if self._auto_budget is None:
                fraction = CUDA_MEMORY_FRACTION if self.device.type == 'cuda' else CPU_MEMORY_FRACTION
                self._auto_budget = available_memory(self.device) * fraction
            budget = self._auto_budget
        if self.device.type == 'cpu':
            budget -= self._host_bytes(height, width, channels)
        return budget

    def tile_for(self, height: int, width: int, channels: int | None = None) -> int | None:
        """The tile side used for an ``height x width`` image, or None for one piece."""
        if self.tile is None:
            return None
        if self.tile != 'auto':
            return None if self.tile >= max(height, width) else int(self.tile)
        if self.model.module is None:  # ONNX Runtime allocates outside torch: nothing to measure
            return None if UNMEASURED_BACKEND_TILE >= max(height, width) else UNMEASURED_BACKEND_TILE
        channels = self.out_channels if channels is None else channels
        model = self.memory_model()
        budget = self.memory_budget(height, width, channels)
        if model.peak(_round_up(height, self.multiple), _round_up(width, self.multiple)) <= budget:
            return None
        side = model.largest_side(budget, self.multiple)
        if side < self.multiple:
            smallest = model.peak(self.multiple, self.multiple)
            logger.warning(f'--tile auto: {budget / 2**30:.2f} GiB is not enough for one {self.multiple}x'
                           f'{self.multiple} tile (estimated {smallest / 2**30:.2f} GiB); trying it anyway')
            side = self.multiple
        return side

    def _pad_for(self, tile: int) -> int:
        return min(self.tile_pad, tile // 4)

    # ----- whole images -----
    def _run(self, x: Tensor, tile: int | None) -> Tensor:
        def whole(t: Tensor) -> Tensor:
            if tile is None:
                return self.forward(t)
            return tiled_forward(self.forward, t, scale=self.scale, tile_size=tile, tile_pad=self._pad_for(tile),
                                 multiple=self.multiple, progress=self.progress)

        return ensemble_x8(whole, x) if self.self_ensemble else whole(x)

    def upscale_tensor(self, x: Tensor) -> Tensor:
        """Super-resolve a batch: [B, C, H, W] (C = the model's input channels) -> [B, C', sH, sW] float32 on the
        host (not clipped). With ``tile='auto'``, a tile that runs out of memory is halved and the batch retried."""
        try:
            return self._run_in_memory(x)
        finally:
            # Where the command set the heap to keep freed memory (for the next block's maps), give it back once the
            # image is done: a server or a folder of images then holds no more between images than by default.
            release_freed_memory()

    def _run_in_memory(self, x: Tensor) -> Tensor:
        """:meth:`upscale_tensor`, halving an automatic tile that runs out of memory."""
        height, width = x.shape[-2:]
        tile = self.tile_for(height, width, x.shape[1])
        while True:
            try:
                return self._run(x, tile)
            except Exception as error:  # noqa: BLE001 (only out-of-memory errors are retried)
                if self.tile != 'auto' or not is_out_of_memory(error):
                    raise
                current = tile or _round_up(max(height, width), self.multiple)
                smaller = max(_round_up(current // 2, self.multiple), self.multiple)
                if smaller >= current:
                    raise
            # Out of the except clause: the error's traceback, which holds the failed tile's tensors, is gone.
            logger.warning(f'Out of memory with {current}-pixel tiles; retrying with {smaller}.')
            tile = smaller
            if self.device.type == 'cuda':
                torch.cuda.empty_cache()

    def upscale(self, pixels: np.ndarray) -> np.ndarray:
        """Super-resolve an image.

        Args:
            pixels: [H, W, C] float32 in [0, 1], C = 1 (grey) or 3 (RGB).
        Returns:
            [H * scale, W * scale, C] float32 (not clipped).
        Raises:
            NonFiniteOutputError: the network produced non-finite values.
            ImageError: channels that cannot be mapped to the network's.
        """
        x = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))[None]
        channels = x.shape[1]
        if channels == self.in_channels:
            inputs = [x]
        elif channels == 1:
            inputs = [x.expand(1, self.in_channels, *x.shape[-2:]).contiguous()]
        elif self.in_channels == 1:
            inputs = [x[:, i:i + 1] for i in range(channels)]  # colour through a grey network: channel by channel
        else:
            raise ImageError(f'the network takes {self.in_channels} channels and the image has {channels}')
        outputs = [self.upscale_tensor(t) for t in inputs]
        out = torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]
        if not all_finite(out):
            advice = ' (fp16 overflows in HAT\'s attention: use --precision bf16 or fp32)' \
                if self.precision == 'fp16' else ''
            raise NonFiniteOutputError(f'the network produced NaN or infinite values{advice}')
        if out.shape[1] != channels:
            if channels == 1 and out.shape[1] == 3:
                weights = torch.tensor(LUMA_WEIGHTS).view(1, 3, 1, 1)
                out = (out * weights).sum(dim=1, keepdim=True)
            else:
                raise ImageError(f'the network returns {out.shape[1]} channels for a {channels}-channel image')
        return out[0].permute(1, 2, 0).numpy()

    def upscale_alpha(self, alpha: np.ndarray) -> np.ndarray:
        """Bicubic upscaling of an alpha channel: [H, W] -> [H * scale, W * scale], clipped to [0, 1]."""
        a = torch.from_numpy(np.ascontiguousarray(alpha))[None, None]
        out = F.interpolate(a, scale_factor=self.scale, mode='bicubic', align_corners=False)
        return out[0, 0].clamp_(0, 1).numpy()

    def upscale_picture(self, picture: Picture) -> Picture:
        """A decoded image -> the upscaled image (alpha by bicubic interpolation), same bit depth."""
        pixels = self.upscale(picture.pixels)
        alpha = None if picture.alpha is None else self.upscale_alpha(picture.alpha)
        return Picture(pixels=pixels, alpha=alpha, bit_depth=picture.bit_depth)

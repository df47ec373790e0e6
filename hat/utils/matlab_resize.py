"""Bicubic ``imresize`` that reproduces MATLAB's, in numpy.

Super-resolution benchmarks define their low-resolution inputs as MATLAB ``imresize(modcrop(HR, s), 1/s, 'bicubic')``
on uint8 images. MATLAB resizes one dimension at a time and, for uint8 input, rounds the intermediate image back to
uint8 between the two 1-D passes. ``basicsr.utils.matlab_functions.imresize`` keeps floats end to end, so its result
differs from MATLAB's by one grey level on roughly a tenth of the pixels; :func:`imresize_uint8` keeps the rounding and
matches MATLAB bit for bit. :func:`imresize` is the float variant (no intermediate rounding) for training pipelines.

What MATLAB does, and so what this module does:

- Kernel: Keys cubic with ``a = -0.5``, support ``[-2, 2]``. When shrinking (``scale < 1``) with antialiasing the
  kernel is stretched by ``1 / scale`` and scaled by ``scale``, so it low-pass filters while it interpolates.
- Output size: ``ceil(scale * input_size)`` per dimension (``floor(H / s)`` for a mod-cropped image and ``1 / s``).
- Coordinates: output pixel ``x`` (1-based) samples the input at ``u = x / scale + 0.5 * (1 - 1 / scale)``, which
  lines up pixel edges, not pixel centres.
- Borders: taps outside the image are mirrored with the edge pixel repeated (``[1..n, n..1]`` periodically).
- Weights: normalised to sum to one per output pixel; taps whose weight is zero for every output pixel are dropped.
- Order: MATLAB resizes the dimension with the smallest scale first and, for equal scales, the rows (height) first;
  with one scale for both dimensions that is height, then width.
- uint8 output: every 1-D pass accumulates in double precision, then rounds half away from zero and saturates to
  ``[0, 255]``.

Each dimension's weights and indices are computed once per ``(in_length, out_length, scale)`` and cached; the pass
itself is a loop over the handful of kernel taps, each a vectorised gather-multiply-add over the whole image. Summing
the taps in order, as MATLAB does, keeps ties at ``x.5`` resolved the same way.
"""
from __future__ import annotations

import functools
import math

import numpy as np

__all__ = ['imresize', 'imresize_uint8', 'output_size']

KERNEL_WIDTH = 4.0  # support of the cubic kernel, in input pixels, before antialiasing stretches it


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys cubic convolution kernel with ``a = -0.5`` (MATLAB's ``cubic``), evaluated elementwise in float64."""
    absx = np.abs(x)
    absx2 = absx * absx
    absx3 = absx2 * absx
    inner = (1.5 * absx3 - 2.5 * absx2 + 1.0) * (absx <= 1.0)
    outer = (-0.5 * absx3 + 2.5 * absx2 - 4.0 * absx + 2.0) * ((absx > 1.0) & (absx <= 2.0))
    return inner + outer


def output_size(length: int, scale: float) -> int:
    """MATLAB's output length for one dimension: ``ceil(scale * length)``.

    For a length that is a multiple of ``s`` and ``scale = 1 / s`` this is ``length // s``.
    """
    return int(math.ceil(scale * length))


@functools.lru_cache(maxsize=64)
def _contributions(in_length: int, out_length: int, scale: float,
                   antialiasing: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-pixel weights and input indices of one 1-D bicubic resize.

    Returns:
        weights: [out_length, P] float64, each row sums to one.
        indices: [out_length, P] int64, 0-based input indices, already mirrored into ``[0, in_length)``.
        Both are read-only (they are cached and shared).
    """
    kernel_width = KERNEL_WIDTH
    stretch = scale < 1.0 and antialiasing
    if stretch:
        kernel_width = kernel_width / scale

    x = np.arange(1, out_length + 1, dtype=np.float64)  # 1-based output coordinates, as in MATLAB
    u = x / scale + 0.5 * (1.0 - 1.0 / scale)  # where each output pixel samples the input (1-based)
    left = np.floor(u - kernel_width / 2.0)
    taps = int(math.ceil(kernel_width)) + 2
    indices = left[:, None] + np.arange(taps, dtype=np.float64)[None, :]  # [out, P], 1-based, may leave the image
    distance = u[:, None] - indices
    weights = scale * _cubic(scale * distance) if stretch else _cubic(distance)

    # Sum left to right (not numpy's pairwise reduction) so the normalisation rounds as a plain loop does.
    row_sum = np.zeros(out_length, dtype=np.float64)
    for k in range(taps):
        row_sum += weights[:, k]
    weights = weights / row_sum[:, None]

    # Symmetric padding with the edge repeated: index i maps into [1..n, n..1] repeated periodically.
    mirror = np.concatenate([np.arange(in_length), np.arange(in_length)[::-1]])
    indices = mirror[np.mod(indices.astype(np.int64) - 1, 2 * in_length)]

    keep = np.any(weights != 0.0, axis=0)
    weights = np.ascontiguousarray(weights[:, keep])
    indices = np.ascontiguousarray(indices[:, keep])
    weights.flags.writeable = False
    indices.flags.writeable = False
    return weights, indices


def _round_to_uint8(values: np.ndarray) -> np.ndarray:
    """Round half away from zero and saturate to uint8, like MATLAB's double -> uint8 conversion.

    ``floor(v + 0.5)`` would misround values just below a half (``0.49999999999999994 + 0.5 == 1.0``); comparing the
    exact fractional part does not.
    """
    floor = np.floor(values)
    rounded = floor + (values - floor >= 0.5)
    return np.clip(rounded, 0, 255).astype(np.uint8)


def _resize_axis(img: np.ndarray, out_length: int, scale: float, axis: int, antialiasing: bool,
                 acc_dtype: type) -> np.ndarray:
    """One 1-D bicubic pass along ``axis`` (0 = height, 1 = width) of an [H, W, C] array.

    Returns the unrounded result in ``acc_dtype``, shaped like ``img`` with ``out_length`` along ``axis``.
    """
    weights, indices = _contributions(img.shape[axis], out_length, scale, antialiasing)
    weights = weights.astype(acc_dtype, copy=False)
    out_shape = list(img.shape)
    out_shape[axis] = out_length
    acc = np.zeros(out_shape, dtype=acc_dtype)
    term = np.empty(out_shape, dtype=acc_dtype)
    broadcast = [1] * img.ndim
    broadcast[axis] = out_length
    for k in range(weights.shape[1]):
        # Gather the k-th tap of every output pixel; the multiply upcasts uint8 input on the fly.
        np.multiply(weights[:, k].reshape(broadcast), np.take(img, indices[:, k], axis=axis), out=term)
        acc += term
    return acc


def _check_image(img: np.ndarray, scale: float) -> None:
    if not isinstance(img, np.ndarray):
        raise TypeError(f'expected a numpy array, got {type(img).__name__}')
    if img.ndim not in (2, 3):
        raise ValueError(f'expected an image shaped [H, W] or [H, W, C], got shape {img.shape}')
    if img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f'cannot resize an empty image of shape {img.shape}')
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f'scale must be a finite positive number, got {scale!r}')


def _resize(img: np.ndarray, scale: float, antialiasing: bool, acc_dtype: type, round_between: bool) -> np.ndarray:
    squeeze = img.ndim == 2
    x = img[:, :, None] if squeeze else img
    out_h, out_w = output_size(x.shape[0], scale), output_size(x.shape[1], scale)
    # Equal scales: MATLAB resizes height first, then width.
    x = _resize_axis(x, out_h, scale, 0, antialiasing, acc_dtype)
    if round_between:
        x = _round_to_uint8(x)
    x = _resize_axis(x, out_w, scale, 1, antialiasing, acc_dtype)
    if round_between:
        x = _round_to_uint8(x)
    return x[:, :, 0] if squeeze else x


def imresize_uint8(img: np.ndarray, scale: float, *, antialiasing: bool = True) -> np.ndarray:
    """MATLAB ``imresize(img, scale, 'bicubic')`` on a uint8 image, bit for bit.

    Both 1-D passes accumulate in float64 and are rounded to uint8 (half away from zero, saturated), as MATLAB does
    between and after its passes. Works for shrinking and enlarging; channels are resized independently, so the
    channel order (RGB or BGR) does not matter.

    Args:
        img: [H, W] or [H, W, C] uint8.
        scale: resize factor, e.g. ``1 / 4`` to shrink by four (pass ``1 / s``, as MATLAB code does).
        antialiasing: stretch the kernel when shrinking (MATLAB's default, ``'Antialiasing', true``).

    Returns:
        [ceil(scale * H), ceil(scale * W)] or [..., C] uint8.
    """
    _check_image(img, scale)
    if img.dtype != np.uint8:
        raise TypeError(f'imresize_uint8 expects a uint8 image, got {img.dtype}; use imresize() for float images '
                        'or convert 16-bit images to 8 bits first')
    return _resize(img, float(scale), antialiasing, np.float64, round_between=True)


def imresize(img: np.ndarray, scale: float, *, antialiasing: bool = True) -> np.ndarray:
    """MATLAB's bicubic ``imresize`` on a float image, without rounding: same kernel, borders and pass order.

    The float counterpart of :func:`imresize_uint8` for training pipelines (what
    ``basicsr.utils.matlab_functions.imresize`` computes, vectorised). Values are neither rounded nor clipped, so
    bicubic overshoot outside ``[0, 1]`` is kept.

    Args:
        img: [H, W] or [H, W, C] floating point, any range (usually ``[0, 1]``).
        scale: resize factor, e.g. ``1 / 4`` to shrink by four.
        antialiasing: stretch the kernel when shrinking (MATLAB's default).

    Returns:
        [ceil(scale * H), ceil(scale * W)] or [..., C] float32.
    """
    _check_image(img, scale)
    if not np.issubdtype(img.dtype, np.floating):
        raise TypeError(f'imresize expects a floating point image, got {img.dtype}; use imresize_uint8() for uint8 '
                        'images (it also rounds between the passes, like MATLAB)')
    return _resize(img.astype(np.float32, copy=False), float(scale), antialiasing, np.float32, round_between=False)

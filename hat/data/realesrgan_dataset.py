"""RealESRGANDataset: GT patches plus the random blur kernels of Real-ESRGAN's second-order degradation.

Real-HAT (``train_Real_HAT_*.yml``) trains on LQ images synthesised from each GT image by two rounds of
blur -> resize -> noise -> JPEG and a final sinc filter. Only the random kernels are drawn here, per sample, on the
CPU workers; the model applies the whole degradation to the batch on the device. The contract is basicsr's
``RealESRGANDataset_basicsr`` (same output keys, kernel sizes and sampling order, so the same seed draws the same
kernels), with three differences: the meta_info file is read from ``meta_info_file`` as the HAT option files spell
it (``meta_info`` also works, and a folder without either is scanned), ``blur_kernel_size``/``blur_kernel_size2``
are honoured instead of a hard-coded 21, and errors name the file or option at fault.

A sample:

1. read the GT image, flip/rotate it (``use_hflip``, ``use_rot``);
2. pad (reflect-101, bottom/right) to at least ``crop_pad_size`` (400) per side, then crop a random
   ``crop_pad_size`` square; the model later crops its ``gt_size`` patch from the degraded pair;
3. draw ``kernel1`` (first degradation), ``kernel2`` (second) and ``sinc_kernel`` (final filter).

Each blur kernel has an odd side drawn from 7, 9, ..., ``blur_kernel_size``; with probability ``sinc_prob`` it is a
circular low-pass (sinc) filter, otherwise one of ``kernel_list`` drawn with ``kernel_prob``: isotropic/anisotropic
Gaussian (``blur_sigma``), generalized Gaussian (shape ``betag_range``) or plateau (``betap_range``), rotated
uniformly. It is zero-padded to ``blur_kernel_size`` so a batch stacks. The final sinc kernel is, with probability
``final_sinc_prob``, a sinc filter of cut-off in [pi/3, pi], else a unit pulse (no filtering), padded likewise. Every
kernel sums to 1.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
from basicsr.data.degradations import circular_lowpass_kernel, random_mixed_kernels
from basicsr.data.transforms import augment
from basicsr.utils import img2tensor
from basicsr.utils.registry import DATASET_REGISTRY
from torch import Tensor

from hat.data.gt_source import GTOnlyDataset

SUPPORTED_KERNELS = ('iso', 'aniso', 'generalized_iso', 'generalized_aniso', 'plateau_iso', 'plateau_aniso')
MIN_KERNEL_SIZE = 7
# Real-ESRGAN's patch size before degradation: large enough for a 256 GT crop after the random resizes.
DEFAULT_CROP_PAD_SIZE = 400


@dataclass(frozen=True)
class BlurSettings:
    """The options of one blur stage (keys without suffix for the first degradation, with ``2`` for the second)."""

    kernel_size: int
    kernel_list: tuple[str, ...]
    kernel_prob: tuple[float, ...]
    blur_sigma: tuple[float, float]
    betag_range: tuple[float, float]
    betap_range: tuple[float, float]
    sinc_prob: float

    @classmethod
    def from_options(cls, opt: dict[str, Any], *, suffix: str, dataset: str) -> 'BlurSettings':
        keys = ('blur_kernel_size', 'kernel_list', 'kernel_prob', 'blur_sigma', 'betag_range', 'betap_range',
                'sinc_prob')
        missing = [key + suffix for key in keys if key + suffix not in opt]
        if missing:
            raise KeyError(f'{dataset}: RealESRGANDataset options lack {", ".join(missing)} '
                           '(see options/train/train_Real_HAT_SRx4_mse_model.yml for a complete block)')
        settings = cls(
            kernel_size=int(opt['blur_kernel_size' + suffix]),
            kernel_list=tuple(opt['kernel_list' + suffix]),
            kernel_prob=tuple(float(p) for p in opt['kernel_prob' + suffix]),
            blur_sigma=_pair(opt, 'blur_sigma' + suffix, dataset),
            betag_range=_pair(opt, 'betag_range' + suffix, dataset),
            betap_range=_pair(opt, 'betap_range' + suffix, dataset),
            sinc_prob=float(opt['sinc_prob' + suffix]),
        )
        settings.validate(suffix=suffix, dataset=dataset)
        return settings

    def validate(self, *, suffix: str, dataset: str) -> None:
        if self.kernel_size < MIN_KERNEL_SIZE or self.kernel_size % 2 == 0:
            raise ValueError(f'{dataset}: blur_kernel_size{suffix} must be odd and >= {MIN_KERNEL_SIZE}, '
                             f'got {self.kernel_size}')
        unknown = [k for k in self.kernel_list if k not in SUPPORTED_KERNELS]
        if unknown:
            raise ValueError(f'{dataset}: kernel_list{suffix} has unknown kernels {unknown}; '
                             f'allowed: {SUPPORTED_KERNELS}')
        if len(self.kernel_prob) != len(self.kernel_list) or not self.kernel_list:
            raise ValueError(f'{dataset}: kernel_prob{suffix} needs one probability per kernel_list{suffix} entry, '
                             f'got {len(self.kernel_prob)} for {len(self.kernel_list)}')

    @property
    def sizes(self) -> list[int]:
        """The odd kernel sides a sample may draw: 7, 9, ..., kernel_size."""
        return list(range(MIN_KERNEL_SIZE, self.kernel_size + 1, 2))


def _pair(opt: dict[str, Any], key: str, dataset: str) -> tuple[float, float]:
    value = opt[key]
    if len(value) != 2:
        raise ValueError(f'{dataset}: {key} must be a [low, high] pair, got {value!r}')
    return float(value[0]), float(value[1])


def pad_kernel(kernel: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad an odd ``[k, k]`` kernel to ``[size, size]``, keeping it centred."""
    pad = (size - kernel.shape[0]) // 2
    return np.pad(kernel, ((pad, pad), (pad, pad)))


def sinc_cutoff(kernel_size: int) -> float:
    """Cut-off frequency of a random sinc blur: small kernels cannot represent the lowest cut-offs (ringing)."""
    low = math.pi / 3 if kernel_size < 13 else math.pi / 5
    return np.random.uniform(low, math.pi)


def random_blur_kernel(settings: BlurSettings) -> np.ndarray:
    """One random blur kernel ``[kernel_size, kernel_size]`` (float64, sums to 1) for one degradation stage."""
    size = random.choice(settings.sizes)
    if np.random.uniform() < settings.sinc_prob:
        kernel = circular_lowpass_kernel(sinc_cutoff(size), size, pad_to=0)
    else:
        kernel = random_mixed_kernels(
            settings.kernel_list, settings.kernel_prob, size, settings.blur_sigma, settings.blur_sigma,
            (-math.pi, math.pi), settings.betag_range, settings.betap_range, noise_range=None)
    return pad_kernel(kernel, settings.kernel_size)


def random_final_sinc_kernel(prob: float, sizes: list[int], out_size: int) -> np.ndarray:
    """The final-stage filter ``[out_size, out_size]``: a sinc low-pass with probability ``prob``, else a pulse."""
    if np.random.uniform() < prob:
        size = random.choice(sizes)
        return circular_lowpass_kernel(np.random.uniform(math.pi / 3, math.pi), size, pad_to=out_size)
    pulse = np.zeros((out_size, out_size))
    pulse[out_size // 2, out_size // 2] = 1.0
    return pulse


def crop_or_pad(img: np.ndarray, size: int) -> np.ndarray:
    """Pad ``img [H, W, C]`` (reflect-101 at the bottom/right) to at least ``size`` per side, then randomly crop
    ``[size, size, C]``."""
    h, w = img.shape[:2]
    if h < size or w < size:
        img = cv2.copyMakeBorder(img, 0, max(0, size - h), 0, max(0, size - w), cv2.BORDER_REFLECT_101)
    h, w = img.shape[:2]
    if h > size or w > size:
        top = random.randint(0, h - size)
        left = random.randint(0, w - size)
        img = img[top:top + size, left:left + size]
    return img


@DATASET_REGISTRY.register()
class RealESRGANDataset(GTOnlyDataset):
    """GT patches with random degradation kernels for Real-ESRGAN-style training.

    Options (the ``datasets.train`` block of ``train_Real_HAT_*.yml``):
        dataroot_gt, io_backend, meta_info_file: as for :class:`~hat.data.ImageNetPairedDataset` (folder or lmdb;
            ``meta_info`` is accepted as an alias of ``meta_info_file``; without either the folder is scanned).
        use_hflip, use_rot: random flips / rotations.
        blur_kernel_size, kernel_list, kernel_prob, blur_sigma, betag_range, betap_range, sinc_prob: first blur.
        blur_kernel_size2, kernel_list2, ... sinc_prob2: second blur.
        final_sinc_prob: probability of the final sinc filter.
        crop_pad_size: side of the GT patch (default 400, Real-ESRGAN's value).

    Items: ``{'gt': [3, S, S] float32 RGB in [0, 1], 'kernel1': [K1, K1], 'kernel2': [K2, K2],
    'sinc_kernel': [K1, K1] (float32, each summing to 1), 'gt_path': str}`` with ``S = crop_pad_size``,
    ``K1 = blur_kernel_size`` and ``K2 = blur_kernel_size2``.
    """

    def __init__(self, opt: dict[str, Any]) -> None:
        super().__init__(opt, default_name='RealESRGANDataset')
        name = self.name
        self.crop_pad_size = int(opt.get('crop_pad_size', DEFAULT_CROP_PAD_SIZE))
        if self.crop_pad_size <= 0:
            raise ValueError(f'{name}: crop_pad_size must be positive, got {self.crop_pad_size}')
        self.blur1 = BlurSettings.from_options(opt, suffix='', dataset=name)
        self.blur2 = BlurSettings.from_options(opt, suffix='2', dataset=name)
        if 'final_sinc_prob' not in opt:
            raise KeyError(f'{name}: RealESRGANDataset options lack final_sinc_prob')
        self.final_sinc_prob = float(opt['final_sinc_prob'])

    def __getitem__(self, index: int) -> dict[str, Tensor | str]:
        img_gt, gt_path = self.source.read(index)
        # Same order of random draws as basicsr's RealESRGANDataset: augment, crop, kernel1, kernel2, final sinc.
        img_gt = augment(img_gt, self.opt.get('use_hflip', False), self.opt.get('use_rot', False))
        img_gt = crop_or_pad(img_gt, self.crop_pad_size)
        kernel1 = random_blur_kernel(self.blur1)
        kernel2 = random_blur_kernel(self.blur2)
        sinc_kernel = random_final_sinc_kernel(self.final_sinc_prob, self.blur1.sizes, self.blur1.kernel_size)
        gt = img2tensor(np.ascontiguousarray(img_gt), bgr2rgb=True, float32=True)
        return {
            'gt': gt,
            'kernel1': torch.from_numpy(kernel1.astype(np.float32)),
            'kernel2': torch.from_numpy(kernel2.astype(np.float32)),
            'sinc_kernel': torch.from_numpy(sinc_kernel.astype(np.float32)),
            'gt_path': gt_path,
        }

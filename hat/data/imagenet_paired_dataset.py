"""ImageNetPairedDataset: GT images only; each LQ image is the MATLAB-style bicubic downscale of its GT, made on load.

This is the dataset of HAT's ImageNet pre-training (``train_HAT*_ImageNet_from_scratch.yml``). ImageNet has no LR
counterpart, so the bicubic degradation of the classic SR benchmarks is applied while loading: basicsr's float
``imresize`` (MATLAB ``imresize`` with antialiasing), the same function that made the benchmarks' ``LRbicx*`` images,
without the final rounding to uint8.

Training sample, for ``scale`` s and ``gt_size`` P (a multiple of s):

1. read the GT image and crop it to a multiple of s (bottom/right rows and columns go);
2. if a side is shorter than P, stretch that side to P (bicubic) -- ImageNet has some images under 256 pixels;
3. take a random P x P patch whose corner lies on the s-pixel grid, flip/rotate it (``use_hflip``, ``use_rot``);
4. LQ = ``imresize(patch, 1 / s)``, clipped to [0, 1]: a (P/s) x (P/s) image aligned with the patch.

The official code downscales the whole image and then crops a pair; downscaling the patch instead is cheaper and
differs only in the outermost LQ pixels, where the bicubic kernel sees the mirrored patch border instead of the
image's neighbouring pixels. Validation/test samples (``phase`` other than ``train``) are the whole GT image,
cropped to a multiple of s, and its downscale.
"""
from __future__ import annotations

import random
from typing import Any, Optional

import cv2
import numpy as np
from basicsr.data.transforms import augment
from basicsr.utils import bgr2ycbcr, img2tensor
from basicsr.utils.matlab_functions import imresize
from basicsr.utils.registry import DATASET_REGISTRY
from torch import Tensor

from hat.data.gt_source import GTOnlyDataset

SUPPORTED_COLORS = (None, 'y')


def mod_crop(img: np.ndarray, scale: int, *, path: str) -> np.ndarray:
    """Crop ``img [H, W, C]`` to ``[H - H % scale, W - W % scale, C]`` (a view)."""
    h, w = img.shape[:2]
    if h < scale or w < scale:
        raise ValueError(f'GT image {path} is {h}x{w}, smaller than the scale {scale}; remove it from the training set')
    return img[:h - h % scale, :w - w % scale]


def bicubic_downscale(img: np.ndarray, scale: int) -> np.ndarray:
    """MATLAB-style bicubic downscale of ``img [H, W, C]`` (float32, [0, 1]) to ``[H / scale, W / scale, C]``.

    Bicubic overshoot at sharp edges is clipped, so the LQ stays in [0, 1] like an image read from disk.
    """
    return np.clip(imresize(img, 1 / scale), 0.0, 1.0).astype(np.float32)


@DATASET_REGISTRY.register()
class ImageNetPairedDataset(GTOnlyDataset):
    """GT images paired with their bicubic downscale, made while loading.

    Options (the ``datasets.<phase>`` block of an option file; ``scale`` and ``phase`` are added by the pipeline):
        dataroot_gt: folder of GT images (any depth), or a ``*.lmdb`` folder for ``io_backend: {type: lmdb}``.
        io_backend: ``{type: disk}`` or ``{type: lmdb}``.
        meta_info_file: optional list of the images to use, paths relative to ``dataroot_gt`` (``meta_info`` is
            accepted as an alias).
        gt_size: side of the GT training patch, a multiple of ``scale`` (train phase only).
        use_hflip, use_rot: random horizontal flip / 90-degree rotations and vertical flip (train phase only).
        color: ``y`` for the Y channel of YCbCr (1-channel tensors), absent for RGB.

    Items: ``{'lq': [C, h, w], 'gt': [C, h * scale, w * scale], 'lq_path': str, 'gt_path': str}``, float32 RGB (or
    Y) in [0, 1]; both paths name the GT image, the LQ has no file of its own.
    """

    def __init__(self, opt: dict[str, Any]) -> None:
        super().__init__(opt, default_name='ImageNetPairedDataset')
        name = self.name
        if 'scale' not in opt:
            raise KeyError(f'{name}: the dataset options need `scale` (the training pipeline copies it from the top '
                           'level of the option file)')
        self.scale = int(opt['scale'])
        self.phase = opt.get('phase', 'train')
        self.color: Optional[str] = opt.get('color')
        if self.color not in SUPPORTED_COLORS:
            raise ValueError(f'{name}: color must be one of {SUPPORTED_COLORS}, got {self.color!r}')
        self.gt_size: Optional[int] = None
        if self.phase == 'train':
            if 'gt_size' not in opt:
                raise KeyError(f'{name}: training needs `gt_size` (the GT patch size) in the dataset options')
            self.gt_size = int(opt['gt_size'])
            if self.gt_size <= 0 or self.gt_size % self.scale:
                raise ValueError(f'{name}: gt_size must be a positive multiple of scale {self.scale}, '
                                 f'got {self.gt_size}')

    def _train_patch(self, img_gt: np.ndarray, path: str) -> np.ndarray:
        """A random, augmented ``[gt_size, gt_size, C]`` patch of a mod-cropped GT image."""
        assert self.gt_size is not None
        size, scale = self.gt_size, self.scale
        h, w = img_gt.shape[:2]
        if h < size or w < size:
            img_gt = np.clip(cv2.resize(img_gt, (max(w, size), max(h, size)), interpolation=cv2.INTER_CUBIC), 0, 1)
            h, w = img_gt.shape[:2]
        # Corner on the scale grid, as the official paired crop chooses it in LQ coordinates.
        top = random.randint(0, (h - size) // scale) * scale
        left = random.randint(0, (w - size) // scale) * scale
        patch = np.ascontiguousarray(img_gt[top:top + size, left:left + size])
        return augment(patch, self.opt.get('use_hflip', False), self.opt.get('use_rot', False))

    def __getitem__(self, index: int) -> dict[str, Tensor | str]:
        img_gt, gt_path = self.source.read(index)
        img_gt = mod_crop(img_gt, self.scale, path=gt_path)
        if self.phase == 'train':
            img_gt = self._train_patch(img_gt, gt_path)
        img_lq = bicubic_downscale(img_gt, self.scale)
        if self.color == 'y':
            img_gt = bgr2ycbcr(img_gt, y_only=True)[..., None]
            img_lq = bgr2ycbcr(img_lq, y_only=True)[..., None]
        gt, lq = img2tensor([np.ascontiguousarray(img_gt), np.ascontiguousarray(img_lq)], bgr2rgb=True, float32=True)
        return {'lq': lq, 'gt': gt, 'lq_path': gt_path, 'gt_path': gt_path}

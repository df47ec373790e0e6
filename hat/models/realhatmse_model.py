"""RealHATMSEModel: Real-HAT's first stage, HAT trained with L1 on LQ images synthesised on the fly.

Each training batch of GT patches (with the random blur kernels that :class:`~hat.data.RealESRGANDataset` drew per
sample) is degraded on ``self.device`` (the CPU works as well as CUDA) by Real-ESRGAN's second-order pipeline:

    first stage    blur (kernel1) -> random resize -> Gaussian or Poisson noise -> JPEG
    second stage   blur (kernel2, with probability second_blur_prob) -> random resize -> noise
    final          [resize to GT/scale + sinc filter (sinc_kernel)] and JPEG, in random order
    then           clamp to [0, 1] and round to 8-bit levels, crop a random gt_size patch (and its LQ patch)

Options (top level of ``options/train/train_Real_HAT_*.yml``): ``resize_prob`` ([up, down, keep]),
``resize_range``, ``gaussian_noise_prob``, ``noise_range`` (sigma on the 0-255 scale), ``poisson_scale_range``,
``gray_noise_prob``, ``jpeg_range`` (quality) for the first stage; the same keys with a ``2`` suffix and
``second_blur_prob`` for the second; ``gt_size``; ``queue_size``; ``gt_usm`` (``l1_gt_usm`` is accepted as its
alias): USM-sharpen the GT first, so that the LQ is made from, and the loss compares with, the sharpened image.

The random draws (Python ``random``, NumPy, torch) happen in the same order as in Real-ESRGAN's ``RealESRNetModel``,
so a seed gives the same degradations as the official code. Pairs then pass through a pool of ``queue_size`` pairs
(:class:`TrainingPairPool`) so that a batch mixes degradations drawn for different batches. The pool is not part of
the training state: after a resume it fills up again, as in Real-ESRGAN.

Batches that already hold ``lq`` (validation sets, or paired training data) are used as they are; validation and
inference are HATModel's (window padding, tiling, self-ensemble).
"""
from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from basicsr.archs import build_network
from basicsr.data.degradations import random_add_gaussian_noise_pt, random_add_poisson_noise_pt
from basicsr.data.transforms import paired_random_crop
from basicsr.losses import build_loss
from basicsr.utils import DiffJPEG, USMSharp
from basicsr.utils.img_process_util import filter2D
from basicsr.utils.registry import MODEL_REGISTRY
from torch import Tensor

from hat.data.realesrgan_dataset import DEFAULT_CROP_PAD_SIZE
from hat.losses.perceptual import PERCEPTUAL_LOSS_TYPES, build_perceptual_loss, find_vgg_weights
from hat.models.hat_model import HATModel

logger = logging.getLogger('basicsr')

RESIZE_MODES = ('area', 'bilinear', 'bicubic')
# USMSharp's Gaussian is 51 pixels wide (radius 50, made odd); its reflect padding needs images wider than 25.
USM_RADIUS = 50
USM_MIN_SIZE = USM_RADIUS // 2 + 1
REFERENCE_OPTIONS = 'options/train/train_Real_HAT_SRx4_mse_model.yml'


def _pair(opt: dict[str, Any], key: str) -> tuple[float, float]:
    value = opt[key]
    if not isinstance(value, (list, tuple)) or len(value) != 2 or float(value[0]) > float(value[1]):
        raise ValueError(f'Option {key} must be a [low, high] pair, got {value!r}.')
    return float(value[0]), float(value[1])


def _probability(opt: dict[str, Any], key: str) -> float:
    value = float(opt[key])
    if not 0 <= value <= 1:
        raise ValueError(f'Option {key} is a probability and must lie in [0, 1], got {value}.')
    return value


@dataclass(frozen=True)
class DegradationStage:
    """The settings of one of the two degradation stages (option keys without suffix, or with ``2``)."""

    blur_prob: float
    resize_prob: tuple[float, float, float]  # up, down, keep
    resize_range: tuple[float, float]
    gaussian_noise_prob: float
    noise_range: tuple[float, float]
    poisson_scale_range: tuple[float, float]
    gray_noise_prob: float
    jpeg_range: tuple[float, float]

    @classmethod
    def from_options(cls, opt: dict[str, Any], *, suffix: str) -> 'DegradationStage':
        keys = ['resize_prob', 'resize_range', 'gaussian_noise_prob', 'noise_range', 'poisson_scale_range',
                'gray_noise_prob', 'jpeg_range']
        missing = [k + suffix for k in keys if k + suffix not in opt]
        if suffix and 'second_blur_prob' not in opt:
            missing.append('second_blur_prob')
        if missing:
            raise KeyError(f'The Real-HAT degradation needs the top-level options {", ".join(missing)} '
                           f'(see {REFERENCE_OPTIONS}).')
        resize_prob = tuple(float(p) for p in opt['resize_prob' + suffix])
        if len(resize_prob) != 3 or min(resize_prob) < 0 or sum(resize_prob) <= 0:
            raise ValueError(f'Option resize_prob{suffix} must be three non-negative weights [up, down, keep], '
                             f'got {opt["resize_prob" + suffix]!r}.')
        resize_range = _pair(opt, 'resize_range' + suffix)
        if resize_range[0] <= 0:
            raise ValueError(f'Option resize_range{suffix} must be positive, got {list(resize_range)}.')
        jpeg_range = _pair(opt, 'jpeg_range' + suffix)
        if jpeg_range[0] < 1 or jpeg_range[1] > 100:
            raise ValueError(f'Option jpeg_range{suffix} holds JPEG qualities in [1, 100], got {list(jpeg_range)}.')
        return cls(
            blur_prob=_probability(opt, 'second_blur_prob') if suffix else 1.0,
            resize_prob=resize_prob,  # type: ignore[arg-type]
            resize_range=resize_range,
            gaussian_noise_prob=_probability(opt, 'gaussian_noise_prob' + suffix),
            noise_range=_pair(opt, 'noise_range' + suffix),
            poisson_scale_range=_pair(opt, 'poisson_scale_range' + suffix),
            gray_noise_prob=_probability(opt, 'gray_noise_prob' + suffix),
            jpeg_range=jpeg_range,
        )

    def random_scale(self) -> float:
        """A resize factor: up in [1, high], down in [low, 1] or keep (1), chosen with ``resize_prob``."""
        direction = random.choices(['up', 'down', 'keep'], self.resize_prob)[0]
        if direction == 'up':
            return float(np.random.uniform(1, self.resize_range[1]))
        if direction == 'down':
            return float(np.random.uniform(self.resize_range[0], 1))
        return 1.0

    def smallest_scale(self) -> float:
        """The smallest factor :meth:`random_scale` can return."""
        return min(self.resize_range[0], 1.0) if self.resize_prob[1] > 0 else 1.0

    def add_noise(self, img: Tensor) -> Tensor:
        """Gaussian (``gaussian_noise_prob``) or else Poisson noise, colour or (``gray_noise_prob``) grey, clipped."""
        if np.random.uniform() < self.gaussian_noise_prob:
            return random_add_gaussian_noise_pt(img, sigma_range=self.noise_range, clip=True, rounds=False,
                                                gray_prob=self.gray_noise_prob)
        return random_add_poisson_noise_pt(img, scale_range=self.poisson_scale_range, gray_prob=self.gray_noise_prob,
                                           clip=True, rounds=False)


def blur(img: Tensor, kernel: Tensor) -> Tensor:
    """img: [B, C, H, W], kernel: [B or 1, K, K] (K odd) -> [B, C, H, W], reflect-padded.

    basicsr's ``filter2D`` reshapes with ``.view``, which fails on tensors that are not contiguous in the default
    (channels-first) layout; make sure the input is.
    """
    return filter2D(img.contiguous(), kernel.contiguous())


class RealESRGANDegradation:
    """Real-ESRGAN's second-order degradation of a GT batch, on the device of its inputs.

    Args:
        first, second: the settings of the two stages.
        scale: the SR factor; the output is the GT size divided by it.
        device: where the JPEG tables live (the inputs must be there too).
    """

    def __init__(self, *, first: DegradationStage, second: DegradationStage, scale: int,
                 device: torch.device | str) -> None:
        self.first = first
        self.second = second
        self.scale = int(scale)
        # JPEG as a differentiable-free torch module: runs batched on any device (quality per sample)
        self.jpeger = DiffJPEG(differentiable=False).to(device)

    @classmethod
    def from_options(cls, opt: dict[str, Any], *, device: torch.device | str) -> 'RealESRGANDegradation':
        return cls(first=DegradationStage.from_options(opt, suffix=''),
                   second=DegradationStage.from_options(opt, suffix='2'), scale=opt['scale'], device=device)

    def jpeg(self, img: Tensor, quality_range: tuple[float, float]) -> Tensor:
        """JPEG-compress each image at a random quality in ``quality_range``."""
        quality = img.new_zeros(img.size(0)).uniform_(*quality_range)
        # clamp first: the JPEG colour conversion of out-of-range values gives unpleasant artifacts
        return self.jpeger(torch.clamp(img, 0, 1), quality=quality)

    def _resize_and_sinc(self, img: Tensor, size: tuple[int, int], sinc_kernel: Tensor) -> Tensor:
        img = F.interpolate(img, size=size, mode=random.choice(RESIZE_MODES))
        return blur(img, sinc_kernel)

    @torch.no_grad()
    def __call__(self, gt: Tensor, kernel1: Tensor, kernel2: Tensor, sinc_kernel: Tensor) -> Tensor:
        """gt: [B, 3, H, W] in [0, 1]; kernels: [B, K, K] -> LQ [B, 3, H // scale, W // scale] in [0, 1], on the
        8-bit grid (multiples of 1/255)."""
        h, w = gt.shape[-2:]
        # ----- first stage -----
        out = blur(gt, kernel1)
        out = F.interpolate(out, scale_factor=self.first.random_scale(), mode=random.choice(RESIZE_MODES))
        out = self.first.add_noise(out)
        out = self.jpeg(out, self.first.jpeg_range)
        # ----- second stage -----
        if np.random.uniform() < self.second.blur_prob:
            out = blur(out, kernel2)
        factor = self.second.random_scale()
        out = F.interpolate(out, size=(int(h / self.scale * factor), int(w / self.scale * factor)),
                            mode=random.choice(RESIZE_MODES))
        out = self.second.add_noise(out)
        # ----- final sinc filter and JPEG -----
        # [resize back + sinc] and JPEG in random order; Real-ESRGAN found that other orders twist lines
        lq_size = (h // self.scale, w // self.scale)
        if np.random.uniform() < 0.5:
            out = self._resize_and_sinc(out, lq_size, sinc_kernel)
            out = self.jpeg(out, self.second.jpeg_range)
        else:
            out = self.jpeg(out, self.second.jpeg_range)
            out = self._resize_and_sinc(out, lq_size, sinc_kernel)
        return torch.clamp((out * 255.0).round(), 0, 255) / 255.0


class TrainingPairPool:
    """A pool of ``size`` (LQ, GT) pairs that shuffles training pairs across batches.

    All samples of a batch share the random resize factors and modes of the degradation; exchanging each new batch
    for a random draw from the pool mixes degradations of different batches (Real-ESRGAN's training-pair pool).
    While the pool fills, batches pass through unchanged; once it is full, the pool is shuffled, its first
    ``batch`` pairs are returned and the new batch takes their places. ``size == 0`` disables the pool.
    """

    def __init__(self, *, size: int) -> None:
        if size < 0:
            raise ValueError(f'queue_size must be >= 0, got {size}.')
        self.size = int(size)
        self.lq: Tensor | None = None
        self.gt: Tensor | None = None
        self.filled = 0

    @torch.no_grad()
    def exchange(self, lq: Tensor, gt: Tensor) -> tuple[Tensor, Tensor]:
        """lq: [B, C, h, w], gt: [B, C, H, W] -> a batch of pairs of the same shapes (see the class docstring)."""
        if self.size == 0:
            return lq, gt
        batch = lq.size(0)
        if self.size % batch:
            raise ValueError(f'queue_size {self.size} is not a multiple of the batch size {batch}: set queue_size '
                             'to a multiple of datasets.train.batch_size_per_gpu.')
        if self.lq is None or self.gt is None:
            self.lq = lq.new_zeros((self.size, *lq.shape[1:]))
            self.gt = gt.new_zeros((self.size, *gt.shape[1:]))
        if self.lq.shape[1:] != lq.shape[1:] or self.gt.shape[1:] != gt.shape[1:]:
            raise ValueError(f'Pairs of shape {list(lq.shape[1:])}/{list(gt.shape[1:])} do not fit the pool of '
                             f'{list(self.lq.shape[1:])}/{list(self.gt.shape[1:])}: gt_size must stay fixed.')
        if self.filled < self.size:
            self.lq[self.filled:self.filled + batch] = lq
            self.gt[self.filled:self.filled + batch] = gt
            self.filled += batch
            return lq, gt
        order = torch.randperm(self.size).to(self.lq.device)  # CPU generator, as Real-ESRGAN draws it
        self.lq, self.gt = self.lq[order], self.gt[order]
        out_lq, out_gt = self.lq[:batch].clone(), self.gt[:batch].clone()
        self.lq[:batch] = lq
        self.gt[:batch] = gt
        return out_lq, out_gt


def usm_flag(opt: dict[str, Any], key: str, *, alias: str | None = None, default: bool) -> bool:
    """A boolean USM option, optionally also spelt ``alias``; both set to different values is an error."""
    values = {k: opt[k] for k in (key, alias) if k is not None and k in opt and opt[k] is not None}
    if len(set(map(bool, values.values()))) > 1:
        raise ValueError(f'Options {key} and {alias} disagree ({values}); set only one of them.')
    return bool(next(iter(values.values()))) if values else default


def check_synthesis_sizes(opt: dict[str, Any], *, first: DegradationStage, sharpen_patches: bool) -> tuple[int, int]:
    """Check gt_size and queue_size against the dataset settings before anything is built.

    Returns (gt_size, queue_size). The checks turn what would be a shape or padding error deep inside the first
    iteration into a message that names the options to change.
    """
    scale = int(opt['scale'])
    train_set = (opt.get('datasets') or {}).get('train') or {}
    gt_size = opt.get('gt_size', train_set.get('gt_size'))
    if gt_size is None:
        raise KeyError('The Real-HAT models need gt_size (the GT crop size) at the top level '
                       f'(see {REFERENCE_OPTIONS}).')
    gt_size = int(gt_size)
    if gt_size <= 0 or gt_size % scale:
        raise ValueError(f'gt_size {gt_size} must be a positive multiple of scale {scale}.')
    queue_size = int(opt.get('queue_size', 180))
    batch = train_set.get('batch_size_per_gpu')
    if queue_size < 0 or (batch and queue_size % int(batch)):
        raise ValueError(f'queue_size {queue_size} must be a non-negative multiple of datasets.train.'
                         f'batch_size_per_gpu ({batch}).')
    if train_set.get('type', 'RealESRGANDataset') == 'RealESRGANDataset':
        crop = int(train_set.get('crop_pad_size', DEFAULT_CROP_PAD_SIZE))
        if crop % scale or crop < gt_size:
            raise ValueError(f'datasets.train.crop_pad_size {crop} (the GT patch the LQ is made from) must be a '
                             f'multiple of scale {scale} and at least gt_size {gt_size}.')
        # blur2 and the final sinc filter pad by reflection, which needs images wider than half the kernel
        smallest = math.floor(crop * first.smallest_scale())
        kernel2 = int(train_set.get('blur_kernel_size2', 21))
        kernel1 = int(train_set.get('blur_kernel_size', 21))
        if smallest <= kernel2 // 2 or crop // scale <= kernel1 // 2:
            raise ValueError(f'datasets.train.crop_pad_size {crop} is too small for the degradation: after the '
                             f'first resize (down to x{first.smallest_scale():g}) images are {smallest} px wide, and '
                             f'the blur kernels ({kernel1}, {kernel2} px) need more than half their size. Raise '
                             'crop_pad_size or lower blur_kernel_size/blur_kernel_size2.')
        if crop < USM_MIN_SIZE:
            raise ValueError(f'datasets.train.crop_pad_size {crop} must be at least {USM_MIN_SIZE} (USM sharpening).')
    if sharpen_patches and gt_size < USM_MIN_SIZE:
        raise ValueError(f'gt_size {gt_size} must be at least {USM_MIN_SIZE}: the GT patches are USM-sharpened '
                         f'with a {USM_RADIUS + 1}-pixel kernel.')
    return gt_size, queue_size


@MODEL_REGISTRY.register()
class RealHATMSEModel(HATModel):
    """HAT on LQ synthesised from GT by Real-ESRGAN's degradation, trained with a pixel loss (see module doc)."""

    def __init__(self, opt: dict[str, Any]) -> None:
        if opt['is_train']:
            self._check_training_options(opt)  # before the networks are built: fail fast on option errors
        super().__init__(opt)
        self.usm_sharpener = USMSharp(radius=USM_RADIUS).to(self.device)
        if self.is_train:
            self.degradation = RealESRGANDegradation.from_options(opt, device=self.device)
            self.pair_pool = TrainingPairPool(size=self.queue_size)

    # ----- options -----
    def read_usm_options(self, opt: dict[str, Any]) -> bool:
        """Read the USM flags; returns whether the ``gt_size`` patches (not only the larger GT) get sharpened."""
        self.gt_usm = usm_flag(opt, 'gt_usm', alias='l1_gt_usm', default=True)
        return False  # the GT is sharpened whole, before the degradation and the crop

    def _check_training_options(self, opt: dict[str, Any]) -> None:
        sharpen_patches = self.read_usm_options(opt)
        first = DegradationStage.from_options(opt, suffix='')
        DegradationStage.from_options(opt, suffix='2')
        self.gt_size, self.queue_size = check_synthesis_sizes(opt, first=first, sharpen_patches=sharpen_patches)
        perceptual_opt = opt['train'].get('perceptual_opt')
        if perceptual_opt and perceptual_opt.get('type') in PERCEPTUAL_LOSS_TYPES:
            # the VGG weights must be there before hours of network building and data loading, not at iter 1
            find_vgg_weights(perceptual_opt.get('vgg_type', 'vgg19'), perceptual_opt.get('vgg_weights'),
                             opt.get('root_path'))

    # ----- training set-up -----
    def init_ema(self) -> None:
        """``net_g_ema`` when ``train.ema_decay > 0``: from the pretrained ``params_ema`` or a copy of net_g."""
        self.ema_decay = self.opt['train'].get('ema_decay', 0)
        if self.ema_decay <= 0:
            return
        logger.info(f'Use Exponential Moving Average with decay: {self.ema_decay}')
        self.net_g_ema = build_network(self.opt['network_g']).to(self.device)
        load_path = self.opt['path'].get('pretrain_network_g')
        if load_path is not None:
            self.load_network(self.net_g_ema, load_path, self.opt['path'].get('strict_load_g', True), 'params_ema')
        else:
            self.model_ema(0)  # start from net_g's weights
        self.net_g_ema.eval()

    def build_losses(self) -> None:
        """``cri_pix`` from ``train.pixel_opt`` and ``cri_perceptual`` from ``train.perceptual_opt`` (or None)."""
        train_opt = self.opt['train']
        self.cri_pix = build_loss(train_opt['pixel_opt']).to(self.device) if train_opt.get('pixel_opt') else None
        self.cri_perceptual = None
        if train_opt.get('perceptual_opt'):
            self.cri_perceptual = build_perceptual_loss(train_opt['perceptual_opt'],
                                                        root_path=self.opt.get('root_path')).to(self.device)

    def init_training_settings(self) -> None:
        self.net_g.train()
        self.init_ema()
        self.build_losses()
        if self.cri_pix is None and self.cri_perceptual is None:
            raise ValueError('RealHATMSEModel needs train.pixel_opt (L1Loss) or train.perceptual_opt.')
        self.setup_optimizers()
        self.setup_schedulers()

    # ----- data -----
    def degradation_source_and_target(self, gt: Tensor) -> tuple[Tensor, Tensor]:
        """(the image the LQ is made from, the training target), both [B, 3, H, W]: the USM-sharpened GT for both
        when ``gt_usm``, else the GT itself."""
        if self.gt_usm:
            gt = self.usm_sharpener(gt)
        return gt, gt

    @torch.no_grad()
    def synthesise(self, data: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """A RealESRGANDataset batch -> (lq [B, 3, g/s, g/s], target [B, 3, g, g]) with g = gt_size, s = scale,
        before the pair pool."""
        missing = [k for k in ('gt', 'kernel1', 'kernel2', 'sinc_kernel') if k not in data]
        if missing:
            raise KeyError(f'{type(self).__name__} synthesises LQ images from RealESRGANDataset batches (gt and blur '
                           f'kernels); this batch lacks {missing}. Use type: RealESRGANDataset for datasets.train.')
        gt = data['gt'].to(self.device)
        source, target = self.degradation_source_and_target(gt)
        lq = self.degradation(source, data['kernel1'].to(self.device), data['kernel2'].to(self.device),
                              data['sinc_kernel'].to(self.device))
        target, lq = paired_random_crop(target, lq, self.gt_size, self.opt['scale'])
        return lq, target

    @torch.no_grad()
    def feed_data(self, data: dict[str, Any]) -> None:
        """Batches with ``lq`` are used as they are (validation, paired data); others are degraded on the device,
        cropped and exchanged with the pair pool."""
        if 'lq' in data or not self.is_train:
            super().feed_data(data)
            return
        lq, gt = self.synthesise(data)
        lq, self.gt = self.pair_pool.exchange(lq, gt)
        self.lq = lq.contiguous()  # gradients of a contiguous input keep the layout the parameters expect

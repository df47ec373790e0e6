"""SRVGGNetCompact: the compact VGG-style super-resolution network of Real-ESRGAN (realesr-general-x4v3, animevideo).

Structure (state-dict names in brackets, identical to basicsr's ``SRVGGNetCompact_basicsr`` and to the released
Real-ESRGAN compact checkpoints):

    body.0                      3x3 conv, num_in_ch -> num_feat
    body.1                      activation (PReLU carries ``body.1.weight``; ReLU/LeakyReLU have no parameters)
    body.2k, body.2k+1          num_conv times: 3x3 conv num_feat -> num_feat, activation   (k = 1..num_conv)
    body.2*num_conv+2           3x3 conv, num_feat -> num_out_ch * upscale^2
    upsampler                   pixel shuffle by ``upscale``

All convolutions run at the low resolution; the output is the pixel-shuffled residual plus the nearest-neighbour
upsampled input, so an untrained network already returns a (blocky) enlargement of the input.
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from basicsr.utils.registry import ARCH_REGISTRY
from torch import Tensor

SUPPORTED_ACT_TYPES = ('relu', 'prelu', 'leakyrelu')

# Real-ESRGAN's compact models use a fixed 0.1 slope for 'leakyrelu'; released weights assume it.
LEAKY_RELU_SLOPE = 0.1


def make_activation(act_type: str, num_feat: int) -> nn.Module:
    """One activation layer of the body; PReLU learns one slope per channel (``num_feat`` parameters)."""
    if act_type == 'relu':
        return nn.ReLU(inplace=True)
    if act_type == 'prelu':
        return nn.PReLU(num_parameters=num_feat)
    if act_type == 'leakyrelu':
        return nn.LeakyReLU(negative_slope=LEAKY_RELU_SLOPE, inplace=True)
    raise ValueError(f'act_type must be one of {SUPPORTED_ACT_TYPES}, got {act_type!r}')


@ARCH_REGISTRY.register()
class SRVGGNetCompact(nn.Module):
    """Compact VGG-style network: a plain conv stack at low resolution, upsampled once by pixel shuffle at the end.

    Args:
        num_in_ch: channels of the input image.
        num_out_ch: channels of the output image.
        num_feat: channels of the intermediate features.
        num_conv: number of num_feat -> num_feat convolutions between the first and the last one.
        upscale: upsampling factor (pixel shuffle and the nearest-neighbour residual).
        act_type: one of ``'relu'``, ``'prelu'``, ``'leakyrelu'`` (slope 0.1).
    """

    def __init__(self, *, num_in_ch: int = 3, num_out_ch: int = 3, num_feat: int = 64, num_conv: int = 16,
                 upscale: int = 4, act_type: str = 'prelu') -> None:
        super().__init__()
        if act_type not in SUPPORTED_ACT_TYPES:
            raise ValueError(f'act_type must be one of {SUPPORTED_ACT_TYPES}, got {act_type!r}')
        if upscale < 1:
            raise ValueError(f'upscale must be a positive integer, got {upscale}')
        if num_conv < 0:
            raise ValueError(f'num_conv must be >= 0, got {num_conv}')
        if num_in_ch not in (num_out_ch, 1):
            # The upsampled input is added to the output: channels must match, or a 1-channel input broadcasts.
            raise ValueError(f'num_in_ch ({num_in_ch}) must equal num_out_ch ({num_out_ch}) or be 1, because the '
                             'nearest-upsampled input is added to the output')
        self.num_in_ch = num_in_ch
        self.num_out_ch = num_out_ch
        self.num_feat = num_feat
        self.num_conv = num_conv
        self.upscale = upscale
        self.act_type = act_type

        # One flat ModuleList (not nn.Sequential of blocks) so the keys stay ``body.N.*`` as in released weights.
        layers: list[nn.Module] = [nn.Conv2d(num_in_ch, num_feat, 3, 1, 1), make_activation(act_type, num_feat)]
        for _ in range(num_conv):
            layers += [nn.Conv2d(num_feat, num_feat, 3, 1, 1), make_activation(act_type, num_feat)]
        layers.append(nn.Conv2d(num_feat, num_out_ch * upscale * upscale, 3, 1, 1))
        self.body = nn.ModuleList(layers)
        self.upsampler = nn.PixelShuffle(upscale)

    def forward(self, x: Tensor) -> Tensor:
        """Args: x: [B, num_in_ch, H, W]. Returns: [B, num_out_ch, H * upscale, W * upscale]."""
        out = x
        for layer in self.body:
            out = layer(out)
        out = self.upsampler(out)
        # The network only learns the residual over a nearest-neighbour enlargement of the input.
        return out + F.interpolate(x, scale_factor=self.upscale, mode='nearest')

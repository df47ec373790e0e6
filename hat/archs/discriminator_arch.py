"""UNetDiscriminatorSN: the U-Net discriminator with spectral normalisation of Real-ESRGAN, used by Real-HAT GAN.

It scores realism per pixel rather than per image: the output has the input's height and width.

Structure (state-dict names in brackets, identical to basicsr's ``UNetDiscriminatorSN_basicsr``; ``SN`` layers
store ``weight_orig``, ``weight_u`` and ``weight_v`` instead of ``weight`` and have no bias):

    conv0                 3x3 conv, num_in_ch -> F                   [H, W]       (plain, with bias)
    conv1, conv2, conv3   SN 4x4 stride-2 convs, F -> 2F -> 4F -> 8F   [H/2, H/4, H/8]
    conv4, conv5, conv6   bilinear x2 then SN 3x3 conv, 8F -> 4F -> 2F -> F, each optionally plus the encoder
                          feature of the same size (x2, x1, x0)      [H/4, H/2, H]
    conv7, conv8          SN 3x3 convs, F -> F
    conv9                 3x3 conv, F -> 1                           (plain, with bias)

Every convolution but the last is followed by LeakyReLU(0.2).
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from basicsr.utils.registry import ARCH_REGISTRY
from torch import Tensor
from torch.nn.utils import spectral_norm

NEGATIVE_SLOPE = 0.2
# Three stride-2 stages: with skip connections, decoder features must line up with encoder features.
SIZE_MULTIPLE = 8


def _sn_conv(in_ch: int, out_ch: int, kernel_size: int, stride: int) -> nn.Conv2d:
    """A bias-free conv wrapped in the hook-based spectral norm.

    The hook-based ``torch.nn.utils.spectral_norm`` (not ``torch.nn.utils.parametrizations``) keeps the
    ``weight_orig`` / ``weight_u`` / ``weight_v`` keys of released Real-ESRGAN discriminators.
    """
    return spectral_norm(nn.Conv2d(in_ch, out_ch, kernel_size, stride, 1, bias=False))


def _act(x: Tensor) -> Tensor:
    # In place is safe: every input here is a fresh conv output that nothing else reads.
    return F.leaky_relu(x, negative_slope=NEGATIVE_SLOPE, inplace=True)


def _upsample(x: Tensor) -> Tensor:
    return F.interpolate(x, scale_factor=2, mode='bilinear', align_corners=False)


@ARCH_REGISTRY.register()
class UNetDiscriminatorSN(nn.Module):
    """U-Net discriminator with spectral normalisation (Real-ESRGAN).

    Args:
        num_in_ch: channels of the input image.
        num_feat: channels of the first stage; deeper stages use 2x, 4x and 8x as many.
        skip_connection: add each encoder feature to the decoder feature of the same size (the U-Net skips).

    Spectral norm runs one power iteration per forward pass in train mode, updating the ``weight_u`` /
    ``weight_v`` buffers; in eval mode it only uses them.
    """

    def __init__(self, *, num_in_ch: int, num_feat: int = 64, skip_connection: bool = True) -> None:
        super().__init__()
        self.skip_connection = skip_connection
        f = num_feat
        self.conv0 = nn.Conv2d(num_in_ch, f, 3, 1, 1)
        # encoder: halve the size, double the channels
        self.conv1 = _sn_conv(f, f * 2, 4, 2)
        self.conv2 = _sn_conv(f * 2, f * 4, 4, 2)
        self.conv3 = _sn_conv(f * 4, f * 8, 4, 2)
        # decoder: applied after each bilinear x2 upsampling
        self.conv4 = _sn_conv(f * 8, f * 4, 3, 1)
        self.conv5 = _sn_conv(f * 4, f * 2, 3, 1)
        self.conv6 = _sn_conv(f * 2, f, 3, 1)
        # head
        self.conv7 = _sn_conv(f, f, 3, 1)
        self.conv8 = _sn_conv(f, f, 3, 1)
        self.conv9 = nn.Conv2d(f, 1, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Args: x: [B, num_in_ch, H, W]; with skip connections H and W must be multiples of 8.

        Returns: [B, 1, H, W] unnormalised per-pixel realism logits (without skip connections, sizes that are not
        multiples of 8 give [B, 1, 8 * (H // 8), 8 * (W // 8)]).
        """
        height, width = x.shape[-2:]
        if self.skip_connection and (height % SIZE_MULTIPLE or width % SIZE_MULTIPLE):
            raise ValueError(f'UNetDiscriminatorSN with skip_connection=True needs height and width that are '
                             f'multiples of {SIZE_MULTIPLE}, got {height}x{width}: crop or pad the patches '
                             f'(e.g. gt_size in the dataset options)')
        x0 = _act(self.conv0(x))  # [B, F, H, W]
        x1 = _act(self.conv1(x0))  # [B, 2F, H/2, W/2]
        x2 = _act(self.conv2(x1))  # [B, 4F, H/4, W/4]
        x3 = _act(self.conv3(x2))  # [B, 8F, H/8, W/8]

        x4 = _act(self.conv4(_upsample(x3)))  # [B, 4F, H/4, W/4]
        if self.skip_connection:
            x4 = x4 + x2
        x5 = _act(self.conv5(_upsample(x4)))  # [B, 2F, H/2, W/2]
        if self.skip_connection:
            x5 = x5 + x1
        x6 = _act(self.conv6(_upsample(x5)))  # [B, F, H, W]
        if self.skip_connection:
            x6 = x6 + x0

        out = _act(self.conv7(x6))
        out = _act(self.conv8(out))
        return self.conv9(out)  # [B, 1, H, W]

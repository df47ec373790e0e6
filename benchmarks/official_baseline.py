"""HAT computed the way the official implementation computes it: the baseline of the speed benchmarks.

``OfficialHAT`` is our :class:`hat.archs.hat_arch.HAT` (same modules, same state-dict keys, so any checkpoint loads
into both) with a ``forward`` that follows the data flow of the released code step by step, written from its
description:

* attention is explicit in every block: ``q * scale``, ``q @ k^T``, ``+ bias``, ``+ mask``, softmax, ``@ v``; the
  full attention maps [windows, heads, N, N] are materialised;
* the relative-position bias is gathered from its table at every call;
* the shift mask of the whole image, [nW, N, N], is rebuilt on the CPU at every forward (``calculate_mask``) and
  then moved to the input's device, and added to the logits of every window, including windows that need no mask;
* windows are formed with ``view``/``permute``/``contiguous`` copies, per block;
* OCAB's enlarged key/value windows come from ``nn.Unfold`` on a [B, 2C, H, W] map, reordered with ``rearrange``
  (a copy), and the qkv map is permuted and concatenated before;
* linear layers run through ``F.linear`` (as ``nn.Linear`` does; our ``Linear`` may take a faster kernel), and
  only standard ``torch.nn`` modules (LayerNorm, Conv2d, GELU, Dropout) and our thin wrappers whose forward the
  speed work leaves as the official one (CAB, DropPath, PatchEmbed, Upsample) are called as modules;
* the RGB mean is a plain tensor converted with ``type_as`` at every forward; the input is reflect-padded to a
  multiple of the window size as the official model's ``pre_process`` does.

This module exists to measure against; it is not used by the library. ``tests/test_official_baseline.py`` proves it
reproduces the golden outputs of the official code.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from basicsr.utils.registry import ARCH_REGISTRY
from einops import rearrange
from torch import Tensor

from hat.archs.hat_arch import DIV2K_RGB_MEAN, HAB, HAT, OCAB, RHAG


def official_window_partition(x: Tensor, window_size: int) -> Tensor:
    """[B, H, W, C] -> [B * nW, ws, ws, C] (a copy)."""
    b, h, w, c = x.shape
    x = x.view(b, h // window_size, window_size, w // window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window_size, window_size, c)


def official_window_reverse(windows: Tensor, window_size: int, h: int, w: int) -> Tensor:
    """[B * nW, ws, ws, C] -> [B, H, W, C] (a copy)."""
    b = int(windows.shape[0] / (h * w / window_size / window_size))
    x = windows.view(b, h // window_size, w // window_size, window_size, window_size, -1)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(b, h, w, -1)


def official_calculate_mask(x_size: tuple, window_size: int, shift_size: int) -> Tensor:
    """The shift mask of every window of an H x W map, built on the CPU: [nW, N, N], 0 or -100."""
    h, w = x_size
    img_mask = torch.zeros((1, h, w, 1))
    slices = (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None))
    label = 0
    for hs in slices:
        for ws in slices:
            img_mask[:, hs, ws, :] = label
            label += 1
    mask_windows = official_window_partition(img_mask, window_size).view(-1, window_size * window_size)
    attn_mask = mask_windows.unsqueeze(1) - mask_windows.unsqueeze(2)
    return attn_mask.masked_fill(attn_mask != 0, -100.0).masked_fill(attn_mask == 0, 0.0)


def official_linear(layer: nn.Linear, x: Tensor) -> Tensor:
    """``nn.Linear`` as the official code runs it (``F.linear``: MKL on the CPU, whatever our ``Linear`` does)."""
    return F.linear(x, layer.weight, layer.bias)


def official_mlp(mlp: nn.Module, x: Tensor) -> Tensor:
    """fc1 -> GELU -> dropout -> fc2 -> dropout."""
    x = mlp.drop(F.gelu(official_linear(mlp.fc1, x)))
    return mlp.drop(official_linear(mlp.fc2, x))


def official_window_attention(blk: HAB, x: Tensor, rpi: Tensor, mask: Tensor | None) -> Tensor:
    """x: [B * nW, N, C] -> [B * nW, N, C]; ``mask``: [nW, N, N] or None."""
    attn_mod = blk.attn
    b_, n, c = x.shape
    heads = attn_mod.num_heads
    qkv = official_linear(attn_mod.qkv, x).reshape(b_, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q = q * attn_mod.scale
    attn = q @ k.transpose(-2, -1)
    bias = attn_mod.relative_position_bias_table[rpi.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()
    attn = attn + bias.unsqueeze(0)
    if mask is not None:
        nw = mask.shape[0]
        attn = attn.view(b_ // nw, nw, heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, heads, n, n)
    attn = torch.softmax(attn, dim=-1)
    attn = F.dropout(attn, p=attn_mod.attn_drop, training=attn_mod.training)
    x = (attn @ v).transpose(1, 2).reshape(b_, n, c)
    return attn_mod.proj_drop(official_linear(attn_mod.proj, x))


def official_hab(blk: HAB, x: Tensor, x_size: tuple, rpi_sa: Tensor, attn_mask: Tensor) -> Tensor:
    """x: [B, H*W, C] -> [B, H*W, C]."""
    h, w = x_size
    b, _, c = x.shape
    ws, shift = blk.window_size, blk.shift_size
    shortcut = x
    x = blk.norm1(x).view(b, h, w, c)

    conv_x = blk.conv_block(x.permute(0, 3, 1, 2))
    conv_x = conv_x.permute(0, 2, 3, 1).contiguous().view(b, h * w, c)

    if shift > 0:
        shifted_x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
        mask = attn_mask
    else:
        shifted_x = x
        mask = None
    x_windows = official_window_partition(shifted_x, ws).view(-1, ws * ws, c)
    attn_windows = official_window_attention(blk, x_windows, rpi_sa, mask).view(-1, ws, ws, c)
    shifted_x = official_window_reverse(attn_windows, ws, h, w)
    attn_x = torch.roll(shifted_x, shifts=(shift, shift), dims=(1, 2)) if shift > 0 else shifted_x
    attn_x = attn_x.view(b, h * w, c)

    x = shortcut + blk.drop_path(attn_x) + conv_x * blk.conv_scale
    return x + blk.drop_path(official_mlp(blk.mlp, blk.norm2(x)))


def official_ocab(blk: OCAB, unfold: nn.Unfold, x: Tensor, x_size: tuple, rpi_oca: Tensor) -> Tensor:
    """x: [B, H*W, C] -> [B, H*W, C]."""
    h, w = x_size
    b, _, c = x.shape
    ws, ows, heads = blk.window_size, blk.overlap_win_size, blk.num_heads
    shortcut = x
    x = blk.norm1(x).view(b, h, w, c)
    qkv = official_linear(blk.qkv, x).reshape(b, h, w, 3, c).permute(3, 0, 4, 1, 2)  # [3, B, C, H, W]
    q = qkv[0].permute(0, 2, 3, 1)  # [B, H, W, C]
    kv = torch.cat((qkv[1], qkv[2]), dim=1)  # [B, 2C, H, W]

    q_windows = official_window_partition(q, ws).view(-1, ws * ws, c)
    kv_windows = unfold(kv)  # [B, 2C * ows * ows, nW]
    kv_windows = rearrange(kv_windows, 'b (nc ch owh oww) nw -> nc (b nw) (owh oww) ch', nc=2, ch=c, owh=ows,
                           oww=ows).contiguous()
    k_windows, v_windows = kv_windows[0], kv_windows[1]

    b_, nq, _ = q_windows.shape
    n = k_windows.shape[1]
    d = c // heads
    q = q_windows.reshape(b_, nq, heads, d).permute(0, 2, 1, 3)
    k = k_windows.reshape(b_, n, heads, d).permute(0, 2, 1, 3)
    v = v_windows.reshape(b_, n, heads, d).permute(0, 2, 1, 3)
    q = q * blk.scale
    attn = q @ k.transpose(-2, -1)
    bias = blk.relative_position_bias_table[rpi_oca.view(-1)].view(ws * ws, ows * ows, -1)
    attn = attn + bias.permute(2, 0, 1).contiguous().unsqueeze(0)
    attn = torch.softmax(attn, dim=-1)
    attn_windows = (attn @ v).transpose(1, 2).reshape(b_, nq, c).view(-1, ws, ws, c)
    x = official_window_reverse(attn_windows, ws, h, w).view(b, h * w, c)

    x = official_linear(blk.proj, x) + shortcut
    return x + official_mlp(blk.mlp, blk.norm2(x))


class OfficialHAT(HAT):
    """Our HAT's modules and weights, computed in the official order and memory footprint (see the module doc).

    Takes the keywords of :class:`HAT`; the state dict is the same. The ``fused_attn`` and ``use_checkpoint``
    switches are ignored (the official code has neither: its ``use_checkpoint`` is a no-op).
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        mean = DIV2K_RGB_MEAN if self.in_chans == 3 else (0.0, ) * self.in_chans
        self.plain_mean = torch.Tensor(mean).view(1, self.in_chans, 1, 1)  # not a buffer, as in the official code
        ows = self.layers[0].residual_group.overlap_attn.overlap_win_size
        self.unfold = nn.Unfold(kernel_size=(ows, ows), stride=self.window_size,
                                padding=(ows - self.window_size) // 2)

    def official_features(self, x: Tensor) -> Tensor:
        """x: [B, C, H, W] -> [B, C, H, W]."""
        x_size = (x.shape[2], x.shape[3])
        attn_mask = official_calculate_mask(x_size, self.window_size, self.shift_size).to(x.device)
        rpi_sa, rpi_oca = self.relative_position_index_SA, self.relative_position_index_OCA
        x = self.patch_embed(x)
        if self.ape:
            x = x + self.absolute_pos_embed
        x = self.pos_drop(x)
        for layer in self.layers:
            x = self.official_rhag(layer, x, x_size, attn_mask, rpi_sa, rpi_oca)
        x = self.norm(x)
        b, _, c = x.shape
        return x.transpose(1, 2).view(b, c, *x_size)

    def official_rhag(self, layer: RHAG, x: Tensor, x_size: tuple, attn_mask: Tensor, rpi_sa: Tensor,
                      rpi_oca: Tensor) -> Tensor:
        b, _, c = x.shape
        y = x
        for blk in layer.residual_group.blocks:
            y = official_hab(blk, y, x_size, rpi_sa, attn_mask)
        y = official_ocab(layer.residual_group.overlap_attn, self.unfold, y, x_size, rpi_oca)
        y = layer.conv(y.transpose(1, 2).view(b, c, *x_size))
        return y.flatten(2).transpose(1, 2) + x

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        ws = self.window_size
        pad_h = ws - h % ws if h % ws else 0
        pad_w = ws - w % ws if w % ws else 0
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), 'reflect')
        self.plain_mean = self.plain_mean.type_as(x)
        x = (x - self.plain_mean) * self.img_range
        x = self.conv_first(x)
        x = self.conv_after_body(self.official_features(x)) + x
        x = self.conv_before_upsample(x)
        x = self.conv_last(self.upsample(x))
        x = x / self.img_range + self.plain_mean
        return x[..., :h * self.upscale, :w * self.upscale]


if 'OfficialHAT' not in ARCH_REGISTRY:  # lets bench_train build it from options (network_g: {type: OfficialHAT})
    ARCH_REGISTRY.register(OfficialHAT)

"""HAT: Hybrid Attention Transformer (Chen et al., "Activating More Pixels in Image Super-Resolution Transformer").

Structure (state-dict names in brackets, identical to the released checkpoints):

    HAT
      conv_first                              shallow features
      patch_embed.norm                        LayerNorm on the flattened map
      layers[i]: RHAG                         residual hybrid attention group
        residual_group.blocks[j]: HAB         (shifted) window MSA + CAB * conv_scale, then MLP
        residual_group.overlap_attn: OCAB     overlapping cross-attention, then MLP
        conv                                  3x3 conv of the group's residual
      norm, conv_after_body                   end of the deep features, global residual
      conv_before_upsample, upsample, conv_last   pixel-shuffle reconstruction

Buffers ``relative_position_index_SA`` and ``relative_position_index_OCA`` are persistent (the released files carry
them); the RGB mean and the shift masks are not.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from basicsr.utils.registry import ARCH_REGISTRY
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from hat.archs.attention import attention
from hat.archs.window import (full_shift_mask, overlapping_window_size, pad_to_multiple, relative_position_index_oca,
                              relative_position_index_sa, shift_mask_patterns, window_merge, window_partition)

SUPPORTED_UPSAMPLERS = ('pixelshuffle', )
SUPPORTED_RESI_CONNECTIONS = ('1conv', 'identity')
DIV2K_RGB_MEAN = (0.4488, 0.4371, 0.4040)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch of a sample with probability ``p`` in training."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0], ) + (1, ) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Mlp(nn.Module):
    """Token-wise feed-forward network: fc1 -> GELU -> fc2. x: [..., C] -> [..., C]."""

    def __init__(self, *, in_features: int, hidden_features: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation channel attention. x: [B, C, H, W] -> [B, C, H, W]."""

    def __init__(self, *, num_feat: int, squeeze_factor: int) -> None:
        super().__init__()
        self.attention = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(num_feat, num_feat // squeeze_factor, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(num_feat // squeeze_factor, num_feat, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x * self.attention(x)


class CAB(nn.Module):
    """Channel attention block: conv (compress) -> GELU -> conv (expand) -> channel attention.

    x: [B, C, H, W] -> [B, C, H, W].
    """

    def __init__(self, *, num_feat: int, compress_ratio: int, squeeze_factor: int) -> None:
        super().__init__()
        self.cab = nn.Sequential(
            nn.Conv2d(num_feat, num_feat // compress_ratio, 3, 1, 1),
            nn.GELU(),
            nn.Conv2d(num_feat // compress_ratio, num_feat, 3, 1, 1),
            ChannelAttention(num_feat=num_feat, squeeze_factor=squeeze_factor),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.cab(x)


class RelativePositionBias(nn.Module):
    """Base for modules with a learnable relative-position bias table, gathered into a [heads, Nq, Nk] bias.

    In inference (no autograd graph needed) the gathered bias is cached per device and dtype and refreshed when the
    table changes (its version counter moves on every in-place update, e.g. an optimiser step or a state-dict load).
    """

    relative_position_bias_table: nn.Parameter

    def __init__(self) -> None:
        super().__init__()
        self._bias_cache: tuple | None = None

    def gathered_bias(self, rpi: Tensor, num_queries: int, num_keys: int) -> Tensor:
        """Args: rpi: [Nq, Nk] int64 index into the table. Returns: [heads, Nq, Nk]."""
        table = self.relative_position_bias_table
        needs_graph = torch.is_grad_enabled() and table.requires_grad
        key = (table._version, table.data_ptr(), rpi._version, rpi.data_ptr(), table.device, table.dtype)
        if not needs_graph and self._bias_cache is not None and self._bias_cache[0] == key:
            return self._bias_cache[1]
        bias = table[rpi.view(-1)].view(num_queries, num_keys, -1).permute(2, 0, 1).contiguous()
        if not needs_graph:
            self._bias_cache = (key, bias)
        return bias

    def _apply(self, fn, *args, **kwargs):
        self._bias_cache = None  # .to() / .cuda() / .half() move the table: drop tensors of the old device/dtype
        return super()._apply(fn, *args, **kwargs)


class WindowAttention(RelativePositionBias):
    """Multi-head self-attention inside (shifted) windows with relative-position bias.

    Attributes keep the official names: ``qkv``, ``proj``, ``relative_position_bias_table``.
    """

    def __init__(self, *, dim: int, window_size: int, num_heads: int, qkv_bias: bool = True,
                 qk_scale: float | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads)**-0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1)**2, num_heads))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.fused_attn = True
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, windows: Tensor, rpi: Tensor, shift_patterns: Tensor | None) -> Tensor:
        """Args:
            windows: [B, nRows, nCols, N, C] window tokens (N = ws * ws), from a shifted map when
                ``shift_patterns`` is given.
            rpi: [N, N] relative position index.
            shift_patterns: [2, 2, N, N] masks by (last window row, last window column), or None (no shift).
        Returns:
            [B, nRows, nCols, N, C].
        """
        b, n_rows, n_cols, n, c = windows.shape
        heads = self.num_heads
        qkv = self.qkv(windows).view(b, n_rows, n_cols, n, 3, heads, c // heads).permute(4, 0, 1, 2, 5, 3, 6)
        q, k, v = qkv.unbind(0)  # each [B, nRows, nCols, heads, N, d]
        bias = self.gathered_bias(rpi, n, n)
        dropout_p = self.attn_drop if self.training else 0.0
        if shift_patterns is None:
            out = attention(q, k, v, bias, scale=self.scale, fused=self.fused_attn, dropout_p=dropout_p)
        elif not self.fused_attn:
            mask = full_shift_mask(shift_patterns, n_rows, n_cols).view(n_rows, n_cols, 1, n, n)
            out = attention(q, k, v, bias, scale=self.scale, fused=False, dropout_p=dropout_p, mask=mask)
        else:
            out = self._shifted_fused(q, k, v, bias, shift_patterns, dropout_p)
        out = out.transpose(-3, -2).reshape(b, n_rows, n_cols, n, c)
        return self.proj_drop(self.proj(out))

    def _shifted_fused(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor, patterns: Tensor,
                       dropout_p: float) -> Tensor:
        """Shifted-window attention with one [heads, N, N] mask per group of windows that share a mask.

        Windows fall in up to four groups (interior, last column, last row, corner); attending group by group keeps
        the mask at [heads, N, N] instead of [windows, heads, N, N], which grows with the image.
        q, k, v: [B, nRows, nCols, heads, N, d] -> [B, nRows, nCols, heads, N, d].
        """
        n_rows, n_cols = q.shape[1], q.shape[2]

        def groups(count: int) -> list:
            parts = [(slice(0, count - 1), 0)] if count > 1 else []
            return parts + [(slice(count - 1, count), 1)]

        row_blocks = []
        for rows, last_row in groups(n_rows):
            col_blocks = []
            for cols, last_col in groups(n_cols):
                mask = None if not (last_row or last_col) else patterns[last_row, last_col]
                col_blocks.append(
                    attention(q[:, rows, cols], k[:, rows, cols], v[:, rows, cols], bias, scale=self.scale,
                              fused=True, dropout_p=dropout_p, mask=mask))
            row_blocks.append(torch.cat(col_blocks, dim=2) if len(col_blocks) > 1 else col_blocks[0])
        return torch.cat(row_blocks, dim=1) if len(row_blocks) > 1 else row_blocks[0]


class HAB(nn.Module):
    """Hybrid attention block: (shifted) window MSA in parallel with a CAB scaled by ``conv_scale``, then an MLP.

    x: [B, H*W, C] -> [B, H*W, C].
    """

    def __init__(self, *, dim: int, num_heads: int, window_size: int, shift_size: int, compress_ratio: int,
                 squeeze_factor: int, conv_scale: float, mlp_ratio: float, qkv_bias: bool, qk_scale: float | None,
                 drop: float, attn_drop: float, drop_path: float) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift_size = shift_size
        self.conv_scale = conv_scale
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim=dim, window_size=window_size, num_heads=num_heads, qkv_bias=qkv_bias,
                                    qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=drop)
        self.conv_block = CAB(num_feat=dim, compress_ratio=compress_ratio, squeeze_factor=squeeze_factor)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), drop=drop)

    def forward(self, x: Tensor, x_size: tuple, rpi_sa: Tensor, shift_patterns: Tensor) -> Tensor:
        h, w = x_size
        b, _, c = x.shape
        ws, shift = self.window_size, self.shift_size
        shortcut = x
        x = self.norm1(x).view(b, h, w, c)

        conv_x = self.conv_block(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(b, h * w, c)

        if shift > 0:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
        windows = self.attn(window_partition(x, ws), rpi_sa, shift_patterns if shift > 0 else None)
        attn_x = window_merge(windows, ws)
        if shift > 0:
            attn_x = torch.roll(attn_x, shifts=(shift, shift), dims=(1, 2))
        attn_x = attn_x.reshape(b, h * w, c)

        x = shortcut + self.drop_path(attn_x) + conv_x * self.conv_scale
        return x + self.drop_path(self.mlp(self.norm2(x)))


class OCAB(RelativePositionBias):
    """Overlapping cross-attention block: queries from each window, keys/values from the enlarged window around it.

    The map of keys/values is zero-padded by ``(ows - ws) / 2`` after the qkv projection, as in the released models,
    so border windows attend to zero keys with their biases (not masked out). x: [B, H*W, C] -> [B, H*W, C].
    """

    def __init__(self, *, dim: int, window_size: int, overlap_ratio: float, num_heads: int, qkv_bias: bool,
                 qk_scale: float | None, mlp_ratio: float) -> None:
        super().__init__()
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads)**-0.5
        self.overlap_win_size = overlapping_window_size(window_size, overlap_ratio)
        if (self.overlap_win_size - window_size) % 2:
            raise ValueError(f'overlap_ratio={overlap_ratio} with window_size={window_size} gives an overlapping '
                             f'window of {self.overlap_win_size}, which cannot be centred on the window: '
                             'int(window_size * overlap_ratio) must be even.')
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((window_size + self.overlap_win_size - 1)**2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio))
        self.fused_attn = True

    def forward(self, x: Tensor, x_size: tuple, rpi_oca: Tensor) -> Tensor:
        h, w = x_size
        b, _, c = x.shape
        ws, ows, heads = self.window_size, self.overlap_win_size, self.num_heads
        d = c // heads
        shortcut = x
        qkv = self.qkv(self.norm1(x)).view(b, h, w, 3, c)
        q_windows = window_partition(qkv[..., 0, :], ws)  # [B, nRows, nCols, ws*ws, C]
        n_rows, n_cols = q_windows.shape[1:3]

        pad = (ows - ws) // 2
        kv = F.pad(qkv[..., 1:, :].reshape(b, h, w, 2 * c), (0, 0, pad, pad, pad, pad))  # zeros, like nn.Unfold
        kv = kv.unfold(1, ows, ws).unfold(2, ows, ws)  # [B, nRows, nCols, 2C, ows, ows] (a view)
        kv = kv.reshape(b, n_rows, n_cols, 2, heads, d, ows * ows)

        q = q_windows.view(b, n_rows, n_cols, ws * ws, heads, d).transpose(-3, -2)  # [B, nR, nC, heads, ws*ws, d]
        k = kv[..., 0, :, :, :].transpose(-2, -1)  # [B, nR, nC, heads, ows*ows, d]
        v = kv[..., 1, :, :, :].transpose(-2, -1)
        bias = self.gathered_bias(rpi_oca, ws * ws, ows * ows)
        out = attention(q, k, v, bias, scale=self.scale, fused=self.fused_attn)
        out = out.transpose(-3, -2).reshape(b, n_rows, n_cols, ws * ws, c)
        x = window_merge(out, ws).reshape(b, h * w, c)

        x = self.proj(x) + shortcut
        return x + self.mlp(self.norm2(x))


class AttenBlocks(nn.Module):
    """The HABs of one RHAG followed by its OCAB. x: [B, H*W, C] -> [B, H*W, C]."""

    def __init__(self, *, dim: int, depth: int, num_heads: int, window_size: int, shift_windows: bool,
                 compress_ratio: int, squeeze_factor: int, conv_scale: float, overlap_ratio: float, mlp_ratio: float,
                 qkv_bias: bool, qk_scale: float | None, drop: float, attn_drop: float, drop_path: Sequence[float],
                 use_checkpoint: bool) -> None:
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList([
            HAB(dim=dim, num_heads=num_heads, window_size=window_size,
                shift_size=window_size // 2 if (i % 2 == 1 and shift_windows) else 0, compress_ratio=compress_ratio,
                squeeze_factor=squeeze_factor, conv_scale=conv_scale, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                qk_scale=qk_scale, drop=drop, attn_drop=attn_drop, drop_path=drop_path[i]) for i in range(depth)
        ])
        self.overlap_attn = OCAB(dim=dim, window_size=window_size, overlap_ratio=overlap_ratio, num_heads=num_heads,
                                 qkv_bias=qkv_bias, qk_scale=qk_scale, mlp_ratio=mlp_ratio)

    def forward(self, x: Tensor, x_size: tuple, params: dict) -> Tensor:
        # Checkpointing trades a second forward of each block in backward for not storing its activations.
        run_checkpointed = self.use_checkpoint and self.training and torch.is_grad_enabled()
        for blk in self.blocks:
            args = (x, x_size, params['rpi_sa'], params['shift_patterns'])
            x = checkpoint(blk, *args, use_reentrant=False) if run_checkpointed else blk(*args)
        args = (x, x_size, params['rpi_oca'])
        return checkpoint(self.overlap_attn, *args, use_reentrant=False) if run_checkpointed else self.overlap_attn(
            *args)


class RHAG(nn.Module):
    """Residual hybrid attention group: blocks, a conv on the 2-D map, and a residual connection.

    x: [B, H*W, C] -> [B, H*W, C].
    """

    def __init__(self, *, dim: int, resi_connection: str, **block_kwargs) -> None:
        super().__init__()
        self.residual_group = AttenBlocks(dim=dim, **block_kwargs)
        self.conv = nn.Conv2d(dim, dim, 3, 1, 1) if resi_connection == '1conv' else nn.Identity()

    def forward(self, x: Tensor, x_size: tuple, params: dict) -> Tensor:
        b, _, c = x.shape
        y = self.residual_group(x, x_size, params)
        y = self.conv(y.transpose(1, 2).reshape(b, c, *x_size))
        return y.flatten(2).transpose(1, 2) + x


class PatchEmbed(nn.Module):
    """Flatten a [B, C, H, W] map to tokens [B, H*W, C], with an optional LayerNorm (``patch_embed.norm``)."""

    def __init__(self, *, embed_dim: int, norm: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim) if norm else None

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(2).transpose(1, 2)
        return self.norm(x) if self.norm is not None else x


class Upsample(nn.Sequential):
    """Pixel-shuffle upsampler: log2(scale) x (conv 4C, shuffle 2) for powers of two, (conv 9C, shuffle 3) for 3."""

    def __init__(self, *, scale: int, num_feat: int) -> None:
        layers: list = []
        if scale > 0 and scale & (scale - 1) == 0:
            for _ in range(int(math.log2(scale))):
                layers += [nn.Conv2d(num_feat, 4 * num_feat, 3, 1, 1), nn.PixelShuffle(2)]
        elif scale == 3:
            layers += [nn.Conv2d(num_feat, 9 * num_feat, 3, 1, 1), nn.PixelShuffle(3)]
        else:
            raise ValueError(f'upscale={scale} is not supported: use 1, 2, 3, 4 or another power of two.')
        super().__init__(*layers)


@ARCH_REGISTRY.register()
class HAT(nn.Module):
    """Hybrid Attention Transformer for single-image super-resolution.

    Keywords are those of ``network_g`` in the official option files. ``forward`` takes [B, in_chans, H, W] in
    [0, 1] (any H, W: the input is reflect-padded to a multiple of ``window_size`` and the output cropped back) and
    returns [B, in_chans, H * upscale, W * upscale].

    Beyond the official keywords:
        fused_attn: compute attention with ``scaled_dot_product_attention`` (default) instead of the explicit
            reference path; both give the same function (see ``set_fused_attn``).
    """

    def __init__(self, *, img_size: int | Sequence[int] = 64, patch_size: int = 1, in_chans: int = 3,
                 embed_dim: int = 96, depths: Sequence[int] = (6, 6, 6, 6), num_heads: Sequence[int] = (6, 6, 6, 6),
                 window_size: int = 7, compress_ratio: int = 3, squeeze_factor: int = 30, conv_scale: float = 0.01,
                 overlap_ratio: float = 0.5, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 qk_scale: float | None = None, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, ape: bool = False, patch_norm: bool = True, use_checkpoint: bool = False,
                 upscale: int = 2, img_range: float = 1.0, upsampler: str = 'pixelshuffle',
                 resi_connection: str = '1conv', fused_attn: bool = True) -> None:
        super().__init__()
        if upsampler not in SUPPORTED_UPSAMPLERS:
            raise ValueError(f'upsampler={upsampler!r} is not supported; supported: {", ".join(SUPPORTED_UPSAMPLERS)}')
        if resi_connection not in SUPPORTED_RESI_CONNECTIONS:
            raise ValueError(f'resi_connection={resi_connection!r} is not supported; '
                             f'supported: {", ".join(SUPPORTED_RESI_CONNECTIONS)}')
        if patch_size != 1:
            raise ValueError(f'patch_size={patch_size} is not supported; HAT works on pixels: use patch_size=1.')
        if len(depths) != len(num_heads):
            raise ValueError(f'depths {list(depths)} and num_heads {list(num_heads)} must have the same length '
                             '(one entry per RHAG).')
        if embed_dim % compress_ratio or embed_dim % squeeze_factor:
            raise ValueError(f'embed_dim={embed_dim} must be divisible by compress_ratio={compress_ratio} and '
                             f'squeeze_factor={squeeze_factor}.')
        for heads in num_heads:
            if embed_dim % heads:
                raise ValueError(f'embed_dim={embed_dim} must be divisible by every num_heads entry, not {heads}.')
        img_hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if min(img_hw) < window_size:
            raise ValueError(f'img_size={img_size} is smaller than window_size={window_size}; '
                             'img_size is the training patch size and must be at least the window size.')

        self.window_size = window_size
        self.shift_size = window_size // 2
        self.overlap_ratio = overlap_ratio
        self.upscale = upscale
        self.upsampler = upsampler
        self.img_range = img_range
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.ape = ape
        self.patch_norm = patch_norm
        self.num_features = embed_dim
        self.mlp_ratio = mlp_ratio
        self.patches_resolution = img_hw
        num_feat = 64

        mean = DIV2K_RGB_MEAN if in_chans == 3 else (0.0, ) * in_chans
        self.register_buffer('mean', torch.tensor(mean).view(1, in_chans, 1, 1), persistent=False)
        self.register_buffer('relative_position_index_SA', relative_position_index_sa(window_size))
        self.register_buffer('relative_position_index_OCA', relative_position_index_oca(window_size, overlap_ratio))
        self._shift_patterns: Tensor | None = None

        # 1. shallow features
        self.conv_first = nn.Conv2d(in_chans, embed_dim, 3, 1, 1)

        # 2. deep features
        self.patch_embed = PatchEmbed(embed_dim=embed_dim, norm=patch_norm)
        if ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, img_hw[0] * img_hw[1], embed_dim))
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(p=drop_rate)
        stochastic_depth = torch.linspace(0, drop_path_rate, sum(depths), device='cpu').tolist()
        # The released models train on patches larger than the window; a patch the size of one window has nothing to
        # shift, and the official blocks then skip the shift. Kept so that such configurations compute the same.
        shift_windows = min(img_hw) > window_size
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            self.layers.append(
                RHAG(dim=embed_dim, resi_connection=resi_connection, depth=depth, num_heads=num_heads[i],
                     window_size=window_size, shift_windows=shift_windows, compress_ratio=compress_ratio,
                     squeeze_factor=squeeze_factor, conv_scale=conv_scale, overlap_ratio=overlap_ratio,
                     mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop_rate,
                     attn_drop=attn_drop_rate, drop_path=stochastic_depth[sum(depths[:i]):sum(depths[:i + 1])],
                     use_checkpoint=use_checkpoint))
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after_body = nn.Conv2d(embed_dim, embed_dim, 3, 1, 1) if resi_connection == '1conv' else nn.Identity()

        # 3. reconstruction
        self.conv_before_upsample = nn.Sequential(nn.Conv2d(embed_dim, num_feat, 3, 1, 1), nn.LeakyReLU(inplace=True))
        self.upsample = Upsample(scale=upscale, num_feat=num_feat)
        self.conv_last = nn.Conv2d(num_feat, in_chans, 3, 1, 1)

        self.apply(self._init_weights)
        self.set_fused_attn(fused_attn)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.zeros_(m.bias)
            nn.init.ones_(m.weight)

    def set_fused_attn(self, enabled: bool) -> None:
        """Switch every attention between ``scaled_dot_product_attention`` and the explicit reference path."""
        for m in self.modules():
            if isinstance(m, (WindowAttention, OCAB)):
                m.fused_attn = enabled

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in backward instead of storing them (training only)."""
        for layer in self.layers:
            layer.residual_group.use_checkpoint = enabled

    def no_weight_decay_keywords(self) -> set:
        return {'relative_position_bias_table'}

    def _shift_masks(self, device: torch.device) -> Tensor:
        if self._shift_patterns is None or self._shift_patterns.device != device:
            self._shift_patterns = shift_mask_patterns(self.window_size, self.shift_size, device=device)
        return self._shift_patterns

    def forward_features(self, x: Tensor) -> Tensor:
        """Deep feature extraction. x: [B, C, H, W] (multiples of the window) -> [B, C, H, W]."""
        x_size = (x.shape[2], x.shape[3])
        params = {
            'shift_patterns': self._shift_masks(x.device),
            'rpi_sa': self.relative_position_index_SA,
            'rpi_oca': self.relative_position_index_OCA,
        }
        x = self.patch_embed(x)
        if self.ape:
            x = x + self.absolute_pos_embed
        x = self.pos_drop(x)
        for layer in self.layers:
            x = layer(x, x_size, params)
        x = self.norm(x)
        return x.transpose(1, 2).reshape(x.shape[0], self.embed_dim, *x_size)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        x, pad_h, pad_w = pad_to_multiple(x, self.window_size)
        mean = self.mean.to(x.dtype)
        x = (x - mean) * self.img_range

        x = self.conv_first(x)
        x = self.conv_after_body(self.forward_features(x)) + x
        x = self.conv_before_upsample(x)
        x = self.conv_last(self.upsample(x))

        x = x / self.img_range + mean
        if pad_h or pad_w:
            x = x[..., :h * self.upscale, :w * self.upscale]
        return x

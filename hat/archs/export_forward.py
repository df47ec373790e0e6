"""HAT's forward pass written for graph export (ONNX, ``torch.export``): only shape-driven tensor operations.

The eager forward of :class:`hat.archs.hat_arch.HAT` is built for speed: it groups windows by the shift mask they
need (a Python list whose length depends on the image size), caches index tensors and bias gathers keyed on tensor
versions, and runs fp32 CPU products on oneDNN operators. None of that can be traced into a graph whose input size is
dynamic. :class:`ExportableHAT` computes the same function from the same parameters with operations whose every
index and mask is computed from the input's height and width inside the graph:

* padding to the window multiple: one gather of rows and one of columns, whose indices reflect (or, for inputs
  smaller than the pad, replicate) the last rows/columns, as :func:`hat.archs.window.pad_to_multiple` does;
* (shifted) window attention: a cyclic ``roll``, the window partition as reshape/permute, and for shifted blocks
  one [N, N] mask per window picked from the four patterns of :func:`hat.archs.window.shift_mask_patterns` by
  whether the window is in the last window row and/or column;
* overlapping cross-attention: the enlarged key/value windows as two gathers (rows, then columns) of the zero-padded
  map, with indices ``i * ws + arange(ows)``;
* attention in the official order (scale q, multiply, add bias, add mask, softmax, multiply), plain ``F.linear`` and
  erf GELU, so that every operator has a standard ONNX translation.

Nothing here is used by the eager forward, which stays as it is; tests prove both compute the same function.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from hat.archs.hat_arch import HAB, HAT, OCAB, RHAG, Linear, Mlp, WindowAttention
from hat.archs.window import shift_mask_patterns


def _linear(layer: Linear, x: Tensor) -> Tensor:
    # F.linear, not the module: the eager module may call a oneDNN operator that has no ONNX translation.
    return F.linear(x, layer.weight, layer.bias)


def _mlp(mlp: Mlp, x: Tensor) -> Tensor:
    """fc1 -> exact GELU -> fc2 (dropout is the identity in inference). x: [..., C] -> [..., C]."""
    return _linear(mlp.fc2, F.gelu(_linear(mlp.fc1, x)))


def reflected_index(size: int, padded: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """Source index of every position of one axis reflect-padded from ``size`` to ``padded``.

    Position ``i >= size`` reads ``2 * (size - 1) - i`` (reflection without repeating the edge, as ``F.pad`` does).
    Whether reflection is possible (pad smaller than the side) is returned as a tensor, not decided in Python, so
    that one graph serves every size.

    Args:
        size: the side of the input (symbolic while tracing).
        padded: the padded side.
    Returns:
        (index [padded] int64, fits: 0-dim bool). Where ``fits`` is false some entries are negative.
    """
    positions = torch.arange(padded, device=device)
    reflected = torch.where(positions < size, positions, 2 * (size - 1) - positions)
    return reflected, reflected.min() >= 0


def pad_to_window_multiple(x: Tensor, window_size: int) -> tuple[Tensor, int, int]:
    """Pad the bottom and right of an image batch to multiples of ``window_size`` with two gathers, as
    :func:`hat.archs.window.pad_to_multiple` pads (reflect, or replicate for inputs smaller than the pad).

    Args:
        x: [B, C, H, W], any H and W >= 1.
    Returns:
        (padded [B, C, nR * ws, nC * ws], nR, nC) with nR = ceil(H / ws), nC = ceil(W / ws). The padded sides are
        written as products with ``ws`` so that a tracer sees them as multiples of the window without a guard.
    """
    h, w = x.shape[-2:]
    n_rows = (h + window_size - 1) // window_size
    n_cols = (w + window_size - 1) // window_size
    rows, rows_fit = reflected_index(h, n_rows * window_size, device=x.device)
    cols, cols_fit = reflected_index(w, n_cols * window_size, device=x.device)
    # As pad_to_multiple: reflect on both axes when both pads are smaller than their sides, else replicate both.
    reflect = rows_fit & cols_fit
    rows = torch.where(reflect, rows, torch.arange(n_rows * window_size, device=x.device).clamp(max=h - 1))
    cols = torch.where(reflect, cols, torch.arange(n_cols * window_size, device=x.device).clamp(max=w - 1))
    return x.index_select(2, rows).index_select(3, cols), n_rows, n_cols


def partition(x: Tensor, n_rows: int, n_cols: int, window_size: int) -> Tensor:
    """[B, nR * ws, nC * ws, C] -> [B * nR * nC, ws * ws, C], windows batch-major then row-major."""
    b, c = x.shape[0], x.shape[-1]
    x = x.reshape(b, n_rows, window_size, n_cols, window_size, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b * n_rows * n_cols, window_size * window_size, c)


def merge(windows: Tensor, batch: int, n_rows: int, n_cols: int, window_size: int) -> Tensor:
    """Inverse of :func:`partition`: [B * nR * nC, ws * ws, C] -> [B, nR * ws, nC * ws, C]."""
    c = windows.shape[-1]
    x = windows.reshape(batch, n_rows, n_cols, window_size, window_size, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, n_rows * window_size, n_cols * window_size, c)


class WindowGrid(NamedTuple):
    """What every block needs to know about the padded map, computed once per forward pass.

    ``n_rows`` and ``n_cols`` count windows (symbolic while tracing); ``shift_masks`` is [nR * nC, N, N], the additive
    mask of each window of the shifted grid (None when no block shifts); ``kv_rows`` and ``kv_cols`` index the rows
    and columns of OCAB's zero-padded key/value map that form the enlarged windows (see :func:`enlarged_window_index`).
    """
    n_rows: int
    n_cols: int
    shift_masks: Tensor | None
    kv_rows: Tensor
    kv_cols: Tensor


def window_shift_masks(patterns: Tensor, n_rows: int, n_cols: int) -> Tensor:
    """The additive shift mask of every window of an nR x nC grid.

    Only windows in the last window row and/or column mix image regions after the cyclic shift, so each window's mask
    is one of four patterns, chosen by comparing its row and column with the last ones.

    Args:
        patterns: [4, N, N], :func:`shift_mask_patterns` flattened over (is_last_row, is_last_col).
    Returns:
        [nR * nC, N, N], row-major windows.
    """
    last_row = (torch.arange(n_rows, device=patterns.device) == n_rows - 1).long()
    last_col = (torch.arange(n_cols, device=patterns.device) == n_cols - 1).long()
    return patterns.index_select(0, (last_row[:, None] * 2 + last_col[None, :]).reshape(-1))


def enlarged_window_index(n_windows: int, window_size: int, overlap_win_size: int, device: torch.device) -> Tensor:
    """Positions, along one axis of the map padded by ``(ows - ws) / 2``, of every enlarged window's rows.

    Returns:
        [nWindows * ows] int64: window i covers ``i * ws + arange(ows)``.
    """
    starts = torch.arange(n_windows, device=device) * window_size
    return (starts[:, None] + torch.arange(overlap_win_size, device=device)[None, :]).reshape(-1)


def window_attention(attn: WindowAttention, windows: Tensor, rpi: Tensor, mask: Tensor | None, batch: int) -> Tensor:
    """WindowAttention on all windows at once, with one mask per window position.

    Args:
        windows: [B * nW, N, C] from :func:`partition`.
        mask: [nW, N, N] additive shift mask, or None (unshifted block).
    Returns:
        [B * nW, N, C].
    """
    n, c, heads = windows.shape[1], attn.dim, attn.num_heads
    q, k, v = _linear(attn.qkv, windows).reshape(-1, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
    logits = (q * attn.scale) @ k.transpose(-2, -1) + attn._gather(attn.relative_position_bias_table, rpi, n, n)
    if mask is not None:
        # The official order: the bias first, then the mask (it matters in the last bits of fp32).
        logits = (logits.reshape(batch, -1, heads, n, n) + mask[None, :, None]).reshape(-1, heads, n, n)
    out = torch.softmax(logits, dim=-1) @ v  # [B * nW, heads, N, d]
    return _linear(attn.proj, out.transpose(1, 2).reshape(-1, n, c))


def hab_forward(block: HAB, x: Tensor, grid: WindowGrid, rpi: Tensor) -> Tensor:
    """One hybrid attention block. x: [B, H * W, C] with H = nR * ws, W = nC * ws -> [B, H * W, C]."""
    ws, shift = block.window_size, block.shift_size
    b, c = x.shape[0], x.shape[-1]
    h, w = grid.n_rows * ws, grid.n_cols * ws
    shortcut = x
    x = block.norm1(x)
    conv_x = block.conv_block(x.reshape(b, h, w, c).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(b, h * w, c)

    attn_x = x.reshape(b, h, w, c)
    if shift:
        attn_x = torch.roll(attn_x, shifts=(-shift, -shift), dims=(1, 2))
    windows = partition(attn_x, grid.n_rows, grid.n_cols, ws)
    windows = window_attention(block.attn, windows, rpi, grid.shift_masks if shift else None, b)
    attn_x = merge(windows, b, grid.n_rows, grid.n_cols, ws)
    if shift:
        attn_x = torch.roll(attn_x, shifts=(shift, shift), dims=(1, 2))

    x = shortcut + attn_x.reshape(b, h * w, c) + conv_x * block.conv_scale
    return x + _mlp(block.mlp, block.norm2(x))


def ocab_forward(block: OCAB, x: Tensor, grid: WindowGrid, rpi: Tensor) -> Tensor:
    """Overlapping cross-attention block. x: [B, H * W, C] with H = nR * ws, W = nC * ws -> [B, H * W, C]."""
    ws, ows, heads = block.window_size, block.overlap_win_size, block.num_heads
    b, c = x.shape[0], x.shape[-1]
    h, w = grid.n_rows * ws, grid.n_cols * ws
    d = c // heads
    shortcut = x
    qkv = _linear(block.qkv, block.norm1(x)).reshape(b, h, w, 3 * c)

    q = partition(qkv[..., :c], grid.n_rows, grid.n_cols, ws)
    q = q.reshape(-1, ws * ws, heads, d).transpose(1, 2)  # [W, heads, ws*ws, d]

    # Zero padding after the projection, as the released models' nn.Unfold pads the key/value map.
    pad = (ows - ws) // 2
    kv = F.pad(qkv[..., c:], (0, 0, pad, pad, pad, pad))
    kv = kv.index_select(1, grid.kv_rows).index_select(2, grid.kv_cols)  # [B, nR * ows, nC * ows, 2C]
    kv = partition(kv, grid.n_rows, grid.n_cols, ows)  # [W, ows * ows, 2C]
    k, v = kv.reshape(-1, ows * ows, 2, heads, d).permute(2, 0, 3, 1, 4).unbind(0)  # each [W, heads, ows*ows, d]

    bias = block._gather(block.relative_position_bias_table, rpi, ws * ws, ows * ows)
    out = torch.softmax((q * block.scale) @ k.transpose(-2, -1) + bias, dim=-1) @ v  # [W, heads, ws*ws, d]
    x = merge(out.transpose(1, 2).reshape(-1, ws * ws, c), b, grid.n_rows, grid.n_cols, ws).reshape(b, h * w, c)

    x = _linear(block.proj, x) + shortcut
    return x + _mlp(block.mlp, block.norm2(x))


def rhag_forward(group: RHAG, x: Tensor, grid: WindowGrid, window_size: int, rpi_sa: Tensor,
                 rpi_oca: Tensor) -> Tensor:
    """Residual hybrid attention group. x: [B, H * W, C] -> [B, H * W, C]."""
    b, c = x.shape[0], x.shape[-1]
    y = x
    for block in group.residual_group.blocks:
        y = hab_forward(block, y, grid, rpi_sa)
    y = ocab_forward(group.residual_group.overlap_attn, y, grid, rpi_oca)
    y = group.conv(y.reshape(b, grid.n_rows * window_size, grid.n_cols * window_size, c).permute(0, 3, 1, 2))
    return y.permute(0, 2, 3, 1).reshape(b, -1, c) + x


class ExportableHAT(nn.Module):
    """The inference function of a :class:`HAT` (same parameters, shared), traceable with dynamic N, H and W.

    ``forward`` takes [N, in_chans, H, W] (any H, W >= 1), pads to the window multiple, runs the network and crops,
    returning [N, in_chans, H * upscale, W * upscale]: what ``network.eval()(x)`` returns, to fp32 rounding.
    Training-only parts (dropout, stochastic depth, checkpointing) are left out: this is the eval-mode function.

    Args:
        network: the HAT to export; its parameters are used, not copied, so later changes show.
    Raises:
        ValueError: for a HAT with an absolute position embedding (``ape=True``), which fixes the input size.
    """

    def __init__(self, *, network: HAT) -> None:
        super().__init__()
        if network.ape:
            raise ValueError('a HAT with ape=True (absolute position embedding) only runs on img_size x img_size '
                             'inputs, so it cannot be exported for any input size')
        self.network = network
        ws = network.window_size
        self.register_buffer('shift_patterns', shift_mask_patterns(ws, network.shift_size).reshape(4, ws * ws, ws * ws),
                             persistent=False)

    def window_grid(self, n_rows: int, n_cols: int, x: Tensor) -> WindowGrid:
        """Masks and gather indices shared by all blocks, for an nR x nC window grid (x gives device and dtype)."""
        net = self.network
        shifts = any(block.shift_size for layer in net.layers for block in layer.residual_group.blocks)
        masks = window_shift_masks(self.shift_patterns.to(x.dtype), n_rows, n_cols) if shifts else None
        ows = net.layers[0].residual_group.overlap_attn.overlap_win_size if len(net.layers) else net.window_size
        return WindowGrid(n_rows, n_cols, masks, enlarged_window_index(n_rows, net.window_size, ows, x.device),
                          enlarged_window_index(n_cols, net.window_size, ows, x.device))

    def forward(self, x: Tensor) -> Tensor:
        """Args: x: [N, C, H, W]. Returns: [N, C, H * upscale, W * upscale]."""
        net = self.network
        ws = net.window_size
        h, w = x.shape[-2:]
        x, n_rows, n_cols = pad_to_window_multiple(x, ws)
        mean = net.mean.to(x.dtype)
        x = (x - mean) * net.img_range

        x = net.conv_first(x)
        b, c = x.shape[:2]
        tokens = net.patch_embed(x)
        grid = self.window_grid(n_rows, n_cols, x)
        for layer in net.layers:
            tokens = rhag_forward(layer, tokens, grid, ws, net.relative_position_index_SA,
                                  net.relative_position_index_OCA)
        tokens = net.norm(tokens)
        features = tokens.transpose(1, 2).reshape(b, c, n_rows * ws, n_cols * ws)
        x = net.conv_after_body(features) + x
        x = net.conv_before_upsample(x)
        x = net.conv_last(net.upsample(x))

        x = x / net.img_range + mean
        # The crop as gathers: a slice would make a tracer guard on the padded size being at least the crop.
        rows = torch.arange(h * net.upscale, device=x.device)
        cols = torch.arange(w * net.upscale, device=x.device)
        return x.index_select(2, rows).index_select(3, cols)

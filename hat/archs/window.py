"""Window geometry of HAT: partitioning, relative position indices, the shifted-window mask and padding.

Everything here is a pure function of sizes; none of it holds learnable state.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Value the official implementation adds to the logits of token pairs that lie in different regions of a shifted
# window. It is finite (not -inf), so masked pairs keep a tiny weight; reproducing it keeps outputs identical.
SHIFT_MASK_VALUE = -100.0


def window_partition(x: Tensor, window_size: int) -> Tensor:
    """Split a feature map into non-overlapping windows, keeping the window grid.

    Args:
        x: [B, H, W, C], H and W multiples of ``window_size``.
    Returns:
        [B, H // ws, W // ws, ws * ws, C], windows in row-major order, tokens row-major inside each window.
    """
    b, h, w, c = x.shape
    x = x.view(b, h // window_size, window_size, w // window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h // window_size, w // window_size, window_size * window_size, c)


def window_merge(windows: Tensor, window_size: int) -> Tensor:
    """Inverse of :func:`window_partition`.

    Args:
        windows: [B, nH, nW, ws * ws, C].
    Returns:
        [B, nH * ws, nW * ws, C].
    """
    b, n_rows, n_cols, _, c = windows.shape
    x = windows.view(b, n_rows, n_cols, window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, n_rows * window_size, n_cols * window_size, c)


def overlapping_window_size(window_size: int, overlap_ratio: float) -> int:
    """Side of the enlarged key/value window of OCAB: ``int(window_size * overlap_ratio) + window_size``."""
    return int(window_size * overlap_ratio) + window_size


def relative_position_index_sa(window_size: int) -> Tensor:
    """Index into the (2ws-1)^2 bias table for every query/key pair of a window.

    Returns:
        [ws * ws, ws * ws] int64, entry (i, j) = (dy + ws - 1) * (2ws - 1) + (dx + ws - 1) with (dy, dx) = pos_i - pos_j.
    """
    coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing='ij'))
    coords = coords.flatten(1)  # [2, N]
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # [N, N, 2]
    relative = relative + (window_size - 1)
    return relative[..., 0] * (2 * window_size - 1) + relative[..., 1]


def relative_position_index_oca(window_size: int, overlap_ratio: float) -> Tensor:
    """Index into the (ws + ows - 1)^2 bias table for every (window query, enlarged-window key) pair.

    This reproduces the released models' buffer exactly, including its offset: the enlarged window's coordinates are
    not shifted by the padding, so about a quarter of the entries are negative and index the table from its end.
    Released checkpoints store this buffer, and their biases were trained with it.

    Returns:
        [ws * ws, ows * ows] int64.
    """
    ext = overlapping_window_size(window_size, overlap_ratio)
    ori = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing='ij')).flatten(1)
    enl = torch.stack(torch.meshgrid(torch.arange(ext), torch.arange(ext), indexing='ij')).flatten(1)
    relative = (enl[:, None, :] - ori[:, :, None]).permute(1, 2, 0)  # [ws*ws, ows*ows, 2]
    relative = relative + (window_size - ext + 1)
    return relative[..., 0] * (window_size + ext - 1) + relative[..., 1]


def shift_mask_patterns(window_size: int, shift_size: int, device: torch.device | None = None) -> Tensor:
    """The four distinct attention masks of a cyclically shifted window grid.

    After rolling the map by ``-shift_size``, only windows in the last window row and/or last window column mix
    tokens from different image regions; all others need no mask. The mask of a window therefore depends only on
    whether it is in the last row and whether it is in the last column, for any image size.

    Returns:
        [2, 2, N, N] float, indexed by (is_last_row, is_last_col); 0 where two tokens share a region and
        ``SHIFT_MASK_VALUE`` where they do not. N = ws * ws.
    """
    local = torch.arange(window_size, device=device)
    region = (local >= window_size - shift_size).long()  # region of a row (or column) inside a border window
    zeros = torch.zeros_like(region)
    patterns = []
    for last_row in (False, True):
        row_region = region if last_row else zeros
        for last_col in (False, True):
            col_region = region if last_col else zeros
            label = (row_region[:, None] * 2 + col_region[None, :]).flatten()  # [N]
            different = label[:, None] != label[None, :]
            patterns.append(torch.zeros(different.shape, device=device).masked_fill(different, SHIFT_MASK_VALUE))
    n = window_size * window_size
    return torch.stack(patterns).view(2, 2, n, n)


def full_shift_mask(patterns: Tensor, n_rows: int, n_cols: int) -> Tensor:
    """Mask of every window of an ``n_rows`` x ``n_cols`` grid, as the official implementation builds it.

    Args:
        patterns: [2, 2, N, N] from :func:`shift_mask_patterns`.
    Returns:
        [n_rows * n_cols, N, N].
    """
    last_row = (torch.arange(n_rows, device=patterns.device) == n_rows - 1).long()
    last_col = (torch.arange(n_cols, device=patterns.device) == n_cols - 1).long()
    masks = patterns[last_row[:, None], last_col[None, :]]  # [n_rows, n_cols, N, N]
    return masks.flatten(0, 1)


def pad_to_multiple(x: Tensor, multiple: int) -> tuple[Tensor, int, int]:
    """Reflect-pad an image batch on the bottom and right so that H and W are multiples of ``multiple``.

    Reflection needs the pad to be smaller than the side; for inputs smaller than that (tinier than a window) the
    border is replicated instead, so any input size works.

    Args:
        x: [B, C, H, W].
    Returns:
        (padded [B, C, H', W'], pad_h, pad_w).
    """
    h, w = x.shape[-2:]
    pad_h = (multiple - h % multiple) % multiple
    pad_w = (multiple - w % multiple) % multiple
    if pad_h == 0 and pad_w == 0:
        return x, 0, 0
    mode = 'reflect' if pad_h < h and pad_w < w else 'replicate'
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode), pad_h, pad_w

"""Seam-free tiled inference: run a super-resolution network on overlapping tiles and blend them.

The image is covered by tiles of ``tile_size`` LR pixels that overlap their neighbours by ``2 * tile_pad`` pixels.
In an overlap, each tile's output is weighted by a linear ramp that falls towards the tile's inner edge, so the two
tiles cross-fade: no seams, and pixels near a tile edge (which lack context) count the least. Memory is that of one
tile plus the output canvas.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from tqdm import tqdm


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``length`` with at least ``overlap`` shared pixels.

    The last tile is aligned with the end, so every tile has the full size (when ``tile <= length``).
    """
    if tile >= length:
        return [0]
    stride = max(tile - overlap, 1)
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def _ramp(size: int, ramp_before: int, ramp_after: int, device: torch.device) -> Tensor:
    """1-D blending weights: rising over ``ramp_before`` samples, flat at 1, falling over ``ramp_after``. [size]"""
    pos = torch.arange(size, device=device, dtype=torch.float32) + 0.5
    weight = torch.ones(size, device=device)
    if ramp_before > 0:
        weight = torch.minimum(weight, pos / ramp_before)
    if ramp_after > 0:
        weight = torch.minimum(weight, (size - pos) / ramp_after)
    return weight


def tiled_forward(net: Callable[[Tensor], Tensor], lq: Tensor, *, scale: int, tile_size: int, tile_pad: int,
                  multiple: int = 1, progress: bool = True, out_device: torch.device | None = None) -> Tensor:
    """Super-resolve ``lq`` tile by tile and blend the tiles.

    Args:
        net: maps [B, C, h, w] to [B, C, h * scale, w * scale].
        lq: [B, C, H, W].
        scale: upscaling factor of ``net``.
        tile_size: tile side in LR pixels; rounded up to a multiple of ``multiple`` (the window size), so that no
            tile needs padding inside the network.
        tile_pad: half the overlap between neighbouring tiles, in LR pixels.
        multiple: the network's size multiple (window size).
        progress: show one progress bar over the tiles.
        out_device: device of the output canvas (default: that of ``lq``); the CPU keeps GPU memory to one tile.
    Returns:
        [B, C, H * scale, W * scale].

    Errors raised by ``net`` propagate: a failed tile never leaves stale content in the output.
    """
    if tile_size <= 0:
        raise ValueError(f'tile_size must be positive, got {tile_size}')
    if tile_pad < 0:
        raise ValueError(f'tile_pad must be non-negative, got {tile_pad}')
    b, c, h, w = lq.shape
    tile = -(-tile_size // multiple) * multiple
    tile_h, tile_w = min(tile, h), min(tile, w)
    overlap = 2 * tile_pad
    rows = tile_starts(h, tile_h, overlap)
    cols = tile_starts(w, tile_w, overlap)
    out_device = lq.device if out_device is None else out_device

    if len(rows) == 1 and len(cols) == 1:
        return net(lq).to(out_device)

    output = weights = None
    bar = tqdm(total=len(rows) * len(cols), desc='tiles', unit='tile', disable=not progress, leave=False)
    for i, top in enumerate(rows):
        for j, left in enumerate(cols):
            out_tile = net(lq[..., top:top + tile_h, left:left + tile_w]).to(out_device)
            if output is None:
                output = out_tile.new_zeros(b, out_tile.shape[1], h * scale, w * scale)
                weights = out_tile.new_zeros(1, 1, h * scale, w * scale)
            # Ramps only where a neighbour overlaps; over the part shared with it, so the weights cross-fade.
            ramp_top = (rows[i - 1] + tile_h - top) * scale if i > 0 else 0
            ramp_bottom = (top + tile_h - rows[i + 1]) * scale if i + 1 < len(rows) else 0
            ramp_left = (cols[j - 1] + tile_w - left) * scale if j > 0 else 0
            ramp_right = (left + tile_w - cols[j + 1]) * scale if j + 1 < len(cols) else 0
            weight_y = _ramp(tile_h * scale, ramp_top, ramp_bottom, out_device)
            weight_x = _ramp(tile_w * scale, ramp_left, ramp_right, out_device)
            weight = (weight_y[:, None] * weight_x[None, :]).to(out_tile.dtype)
            ys = slice(top * scale, (top + tile_h) * scale)
            xs = slice(left * scale, (left + tile_w) * scale)
            output[..., ys, xs] += out_tile * weight
            weights[..., ys, xs] += weight
            bar.update(1)
    bar.close()
    # In place: a second canvas would add half the peak memory of a large image on the CPU.
    return output.div_(weights)

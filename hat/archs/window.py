"""Window geometry of HAT: partitioning, relative position indices, the shifted-window mask and padding.

Everything here is a pure function of sizes; none of it holds learnable state.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

T = TypeVar('T')

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


def overlapping_window_size(window_size: int, overlap_ratio: float) -> int:
    """Side of the enlarged key/value window of OCAB: ``int(window_size * overlap_ratio) + window_size``."""
    return int(window_size * overlap_ratio) + window_size


def relative_position_index_sa(window_size: int) -> Tensor:
    """Index into the (2ws-1)^2 bias table for every query/key pair of a window.

    Returns:
        [ws * ws, ws * ws] int64, entry (i, j) = (dy + ws - 1) * (2ws - 1) + (dx + ws - 1) with
        (dy, dx) = pos_i - pos_j.
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


class WindowOrder(NamedTuple):
    """Tokens of a batch of maps rearranged into (shifted) windows, windows grouped by the shift mask they need.

    ``gather`` lists, for each position of the window order, the flat index (b * H * W + y * W + x) of the token of
    the unshifted maps that lands there; ``scatter`` is its inverse permutation. ``groups`` gives, in order, the
    number of windows of each group and its (is_last_row, is_last_col) key into :func:`shift_mask_patterns`.

    The order moves tokens in runs of ``run`` = gcd(window size, shift) consecutive tokens of a map row (the window
    size without shift), which stay consecutive and aligned to ``run`` in both layouts: :meth:`take`, :meth:`put`
    and :meth:`restore` gather and scatter whole runs (``gather_runs``, ``scatter_runs``: the same permutations in
    units of runs), rows of ``run * C`` values instead of ``C``. On a Xeon an ``index_copy_`` of 1024 tokens took
    35 instead of 61 us in runs of 8.
    """
    gather: Tensor
    scatter: Tensor
    groups: tuple[tuple[int, int, int], ...]
    run: int
    gather_runs: Tensor
    scatter_runs: Tensor

    def take(self, tokens: Tensor, start: int = 0, stop: int | None = None) -> Tensor:
        """The tokens at positions [start, stop) of the window order (multiples of ``run``).

        tokens: [B * H * W, C] of the maps, flat and unshifted, contiguous. Returns: [stop - start, C].
        """
        runs = self.gather_runs[start // self.run:None if stop is None else stop // self.run]
        return _in_runs(tokens, self.run).index_select(0, runs).view(-1, tokens.shape[-1])

    def put(self, out: Tensor, values: Tensor, start: int = 0) -> None:
        """Write ``values`` [R, C], positions [start, start + R) of the window order, to their tokens' rows of
        ``out`` [B * H * W, C] (both contiguous; start and R multiples of ``run``)."""
        runs = self.gather_runs[start // self.run:(start + values.shape[0]) // self.run]
        _in_runs(out, self.run).index_copy_(0, runs, _in_runs(values, self.run))

    def restore(self, windows: Tensor) -> Tensor:
        """The inverse of :meth:`take` over the whole order: windows [B * H * W, C] -> tokens [B * H * W, C]."""
        return _in_runs(windows, self.run).index_select(0, self.scatter_runs).view(-1, windows.shape[-1])


def _in_runs(rows: Tensor, run: int) -> Tensor:
    """[R, C] -> [R / run, run * C] (a view of contiguous rows)."""
    return rows.view(-1, run * rows.shape[-1])


def compiling() -> bool:
    """Whether ``torch.compile`` is tracing the caller (always False before torch 2.3)."""
    is_compiling = getattr(getattr(torch, 'compiler', None), 'is_compiling', None)
    return bool(is_compiling and is_compiling())


def cached_outside_compile(build: Callable[..., T]) -> Callable[..., T]:
    """``build`` memoised for its last 16 argument tuples, except while ``torch.compile`` traces the caller.

    The index tensors of a layout are rebuilt by every block of every forward pass otherwise; under tracing the
    builder runs uncached, so that the compiler builds the indices into its graph.
    """
    cached = functools.lru_cache(maxsize=16)(build)

    @functools.wraps(build)
    def build_or_reuse(*args, **kwargs):
        return build(*args, **kwargs) if compiling() else cached(*args, **kwargs)
    return build_or_reuse


@cached_outside_compile
def window_order(batch: int, height: int, width: int, window_size: int, shift_size: int,
                 device: torch.device) -> WindowOrder:
    """How HAB's (shifted) window attention reads and writes the token maps, as one gather and one scatter.

    The official code rolls the map by ``-shift_size`` (two copies), partitions it into windows (one more) and adds
    a shift mask to every window; the inverse also takes three copies. A single row gather does the roll and the
    partition at once, and ordering the windows by mask group (interior, last window column, last window row,
    corner) lets each group attend with one shared [N, N] mask on a contiguous slice of windows. Without a shift
    there is one group, in row-major window order. Inside a group, windows run over the batch, then row-major.

    Args:
        batch, height, width: map sizes (multiples of ``window_size``).
    Returns:
        the :class:`WindowOrder` (index tensors of B * H * W entries on ``device``; cached for the last 16 layouts,
        see :func:`cached_outside_compile`).
    """
    n_rows, n_cols = height // window_size, width // window_size
    local = torch.arange(window_size, device=device)
    if shift_size > 0:
        keys = ((0, 0), (0, 1), (1, 0), (1, 1))  # (is_last_row, is_last_col)
    else:
        keys = ((0, 0), )
    parts, groups = [], []
    for last_row, last_col in keys:
        rows = _group_windows(n_rows, last_row if shift_size > 0 else None, device)
        cols = _group_windows(n_cols, last_col if shift_size > 0 else None, device)
        if len(rows) == 0 or len(cols) == 0:
            continue
        # Position (y, x) of the rolled map holds the token ((y + shift) % H, (x + shift) % W) of the map.
        y = (rows[:, None, None, None] * window_size + local[None, None, :, None] + shift_size) % height
        x = (cols[None, :, None, None] * window_size + local[None, None, None, :] + shift_size) % width
        flat = (y * width + x).reshape(-1)  # [windows * N], windows row-major, tokens row-major
        parts.append((torch.arange(batch, device=device)[:, None] * (height * width) + flat[None]).reshape(-1))
        groups.append((batch * len(rows) * len(cols), last_row, last_col))
    gather = torch.cat(parts)
    run = math.gcd(window_size, shift_size)  # the window size when there is no shift
    gather_runs = gather[::run] // run
    return WindowOrder(gather, _inverse(gather), tuple(groups), run, gather_runs, _inverse(gather_runs))


def _group_windows(count: int, last: int | None, device: torch.device) -> Tensor:
    """Indices of a mask group's window rows (or columns) among ``count``: all of them without a shift (``last``
    None), else the last one (``last`` 1) or all the others (0).

    A slice, not a boolean mask: its size is known when torch.compile traces it, where a mask's size depends on the
    data and breaks the block's graph (fails under ``fullgraph``).
    """
    part = slice(None) if last is None else slice(count - 1, count) if last else slice(0, count - 1)
    return torch.arange(count, device=device)[part]


def _inverse(permutation: Tensor) -> Tensor:
    inverse = torch.empty_like(permutation)
    inverse[permutation] = torch.arange(permutation.numel(), device=permutation.device)
    return inverse


@cached_outside_compile
def overlapping_window_index(batch: int, height: int, width: int, window_size: int, overlap_win_size: int,
                             device: torch.device) -> Tensor:
    """Rows of the key/value maps that form OCAB's enlarged windows, as one gather index.

    Window (b, i, j) takes the ows x ows block at (i * ws - p, j * ws - p), p = (ows - ws) / 2, of the maps zero-padded
    by ``p`` on every side (as ``nn.Unfold(ows, stride=ws, padding=p)`` does). The index points into the maps
    [B, H, W, C] flattened to [B * H * W, C] with one zero row appended: positions in the padding point to that row
    (index B * H * W), so that no padded copy of the maps is made. A row gather (``index_select``) makes the windows
    and, unlike ``unfold``, has a fast backward (index_add) for training.

    Returns:
        [B * nRows * nCols * ows * ows] int64 on ``device``: windows batch-major then row-major (the order of
        :func:`window_order` without shift), tokens row-major inside each window.
    """
    pad = (overlap_win_size - window_size) // 2
    local = torch.arange(overlap_win_size, device=device)
    window_rows = torch.arange(height // window_size, device=device)
    window_cols = torch.arange(width // window_size, device=device)
    y = window_rows[:, None, None, None] * window_size + local[None, None, :, None] - pad
    x = window_cols[None, :, None, None] * window_size + local[None, None, None, :] - pad
    inside = ((y >= 0) & (y < height) & (x >= 0) & (x < width)).reshape(-1)
    flat = (y * width + x).reshape(-1)  # [windows * ows * ows]
    index = torch.arange(batch, device=device)[:, None] * (height * width) + flat[None]
    return torch.where(inside[None], index, batch * height * width).reshape(-1)


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

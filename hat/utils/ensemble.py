"""Geometric self-ensemble (x8): average a network's outputs over the 8 flips/rotations of its input."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def self_ensemble(net: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Run ``net`` on the 8 dihedral transforms of ``x``, undo each transform on the output, and average.

    Args:
        x: [B, C, H, W].
    Returns:
        [B, C, H * s, W * s], the mean of the 8 back-transformed outputs (accumulated in float32).
    """
    total = None
    for flip in (False, True):
        flipped = x.flip(-1) if flip else x
        for quarter_turns in range(4):
            out = net(torch.rot90(flipped, quarter_turns, dims=(-2, -1)))
            out = torch.rot90(out, -quarter_turns, dims=(-2, -1))
            out = (out.flip(-1) if flip else out).float()
            total = out if total is None else total + out
    return total / 8

"""Errors raised by this project's datasets for bad input: which file, what is wrong with it, what to do.

``UnreadableImageError`` is the one a caller may choose to survive: the validation loop skips such an item with a
warning and evaluates the rest of the set, while training lets it stop the run (a silently smaller training set
would change the experiment). Everything else about a data set (a missing folder, a meta_info entry without its
file, a GT/LQ pair of the wrong sizes) is a configuration mistake and stops the run.
"""
from __future__ import annotations

from typing import Optional

from hat.io.images import UNREADABLE_ADVICE, UnreadableImageError  # noqa: F401  (the one image error)


class ImagePairSizeError(ValueError):
    """A GT/LQ pair whose sizes do not match the scale.

    Attributes:
        gt_path, lq_path: the two files.
        gt_size, lq_size: their ``(height, width)``.
        scale: the scale of the option file.
    """

    def __init__(self, message: str, *, gt_path: Optional[str] = None, lq_path: Optional[str] = None,
                 gt_size: Optional[tuple[int, int]] = None, lq_size: Optional[tuple[int, int]] = None,
                 scale: Optional[int] = None) -> None:
        super().__init__(message)
        self.gt_path, self.lq_path = gt_path, lq_path
        self.gt_size, self.lq_size = gt_size, lq_size
        self.scale = scale

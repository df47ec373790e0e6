"""Errors raised by this project's datasets for bad input: which file, what is wrong with it, what to do.

``UnreadableImageError`` is the one a caller may choose to survive: the validation loop skips such an item with a
warning and evaluates the rest of the set, while training lets it stop the run (a silently smaller training set
would change the experiment). Everything else about a data set (a missing folder, a meta_info entry without its
file, a GT/LQ pair of the wrong sizes) is a configuration mistake and stops the run.
"""
from __future__ import annotations

from typing import Optional

# What the user can do about a file that does not decode; appended to every UnreadableImageError message.
UNREADABLE_ADVICE = ('Replace it with a good copy (re-export or re-download it, or re-run the script that prepared '
                     'the data set), or remove it from the data set (and from its meta_info file, if there is one).')


class UnreadableImageError(ValueError):
    """An image file that cannot be read or decoded: missing, empty, truncated, or not an image at all.

    Args:
        message: the whole message (names the file and says what to do).
        path: the file (or ``lmdb folder:key``) that failed. ``None`` when the error was re-raised from a DataLoader
            worker process, which rebuilds the exception from its message only; the message still names the file.
    Attributes:
        path: as given.
    """

    def __init__(self, message: str, *, path: Optional[str] = None) -> None:
        super().__init__(message)
        self.path = path

    @classmethod
    def for_file(cls, path: str, problem: str, *, role: str = 'image') -> 'UnreadableImageError':
        """``cannot read <role> <path>: <problem>. <advice>``, e.g. ``role='GT image'``."""
        return cls(f'cannot read {role} {path}: {problem}. {UNREADABLE_ADVICE}', path=path)


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

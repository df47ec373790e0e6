"""Reading dataset images through basicsr's ``FileClient`` (disk or lmdb), decoded as BasicSR decodes them.

The decoding itself (checks, ``cv2.IMREAD_COLOR``, the conversions reported once per data set) lives in
:mod:`hat.io.images`; this module only fetches the bytes and turns a missing file into an error that names it.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from hat.io.images import ConversionLog, UnreadableImageError, decode_as_basicsr

__all__ = ['ConversionLog', 'read_image']


def read_image(file_client: Any, path: str, client_key: str, *, role: str,
               where: Optional[str] = None) -> tuple[np.ndarray, tuple[str, ...]]:
    """Fetch an image through a basicsr ``FileClient`` and :func:`hat.io.images.decode_as_basicsr` it.

    Args:
        file_client: basicsr's ``FileClient`` (disk or lmdb).
        path: file path (disk) or key (lmdb).
        client_key: the lmdb environment (``'gt'``/``'lq'``); ignored on disk.
        role: see :func:`hat.io.images.decode_as_basicsr`.
        where: for an lmdb, its folder, so that a message can say where the key was looked up.
    """
    try:
        content = file_client.get(path, client_key)
    except FileNotFoundError:
        raise UnreadableImageError.for_file(path, 'the file does not exist (it did when the data set was built: was '
                                            'it moved or deleted?)', role=role) from None
    except IsADirectoryError:
        raise UnreadableImageError.for_file(path, 'it is a folder, not an image file', role=role) from None
    except OSError as error:
        raise UnreadableImageError.for_file(path, f'the file cannot be opened ({error.strerror or error})',
                                            role=role) from None
    if content is None and where:
        raise UnreadableImageError.for_file(path, f'the key is not stored in lmdb {where}', role=role)
    return decode_as_basicsr(content, path, role=role)

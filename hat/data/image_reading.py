"""Checked image decoding: basicsr's ``imfrombytes(content, float32=True)``, plus an error that names the file.

basicsr decodes with ``cv2.imdecode`` and, when that fails, crashes on ``None.astype`` with an ``AttributeError``
that names neither the file nor the problem. Depending on the OpenCV build, a truncated JPEG may even decode
"successfully" with the missing rows filled in grey. Here the bytes are checked first and any failure raises
:class:`~hat.data.errors.UnreadableImageError` with the path:

- empty content, a file that does not exist any more, a missing lmdb key;
- PNG: the chunk list must reach ``IEND`` without running past the end of the data (a cut file does not);
- JPEG: after the last scan an end-of-image marker must follow (a cut file has none);
- then ``cv2.imdecode(..., cv2.IMREAD_COLOR)`` must return an image (random bytes, text, unknown formats do not).

Decoding is then exactly basicsr's: ``IMREAD_COLOR`` gives 8-bit 3-channel BGR whatever the file holds (16-bit
samples are reduced to 8 bits, grey is copied to 3 channels, alpha is dropped), divided by 255 as float32. What was
converted is read from the PNG/JPEG header (a few bytes, no second decode; other formats are decoded a second time
with ``IMREAD_UNCHANGED`` to find out) and reported once per data set by :class:`ConversionLog`.
"""
from __future__ import annotations

import logging
import re
import struct
from dataclasses import dataclass
from typing import Any, Optional

import cv2
import numpy as np

from hat.data.errors import UnreadableImageError

logger = logging.getLogger('basicsr')

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
JPEG_SOI = b'\xff\xd8'
# Start-of-frame markers (baseline, extended, progressive, lossless; Huffman and arithmetic coded).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_SOS, _JPEG_EOI = 0xDA, 0xD9
# Markers that stand alone (no length field): TEM, RSTn, SOI, EOI.
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8), 0xD8, 0xD9})
# Inside entropy-coded data a 0xFF is followed by 0x00 (stuffing), 0xFF (fill) or a restart marker; anything else is
# the next marker.
_JPEG_NEXT_MARKER = re.compile(rb'\xff[^\x00\xd0-\xd7\xff]')

# Conversions IMREAD_COLOR applies, with their level when reported: grey -> 3 channels loses nothing; the others do.
CONVERSIONS = {
    'high_bit_depth': (logging.WARNING, 'has more than 8 bits per sample (reduced to 8 bits)'),
    'grey': (logging.INFO, 'is grey (copied to 3 identical channels)'),
    'alpha': (logging.WARNING, 'has an alpha channel (dropped)'),
}


@dataclass(frozen=True)
class ImageHeader:
    """What a PNG/JPEG header says; None where the header does not say (other formats, cut headers)."""

    kind: str  # 'png', 'jpeg' or 'other'
    bit_depth: Optional[int] = None
    channels: Optional[int] = None  # 1 grey, 2 grey + alpha, 3 colour, 4 colour + alpha (JPEG: 4 is CMYK)
    has_alpha: bool = False


def _png_problem(content: bytes) -> tuple[Optional[str], ImageHeader]:
    """(what is wrong or None, header) for PNG bytes, walking the chunk list up to IEND."""
    header = ImageHeader('png')
    pos, size = len(PNG_SIGNATURE), len(content)
    seen_idat = False
    while True:
        if pos + 8 > size:
            return ('truncated PNG: the data ends before the IEND chunk' if seen_idat else
                    'truncated or damaged PNG: the data ends before the image data'), header
        length, chunk = struct.unpack('>I4s', content[pos:pos + 8])
        end = pos + 12 + length  # length field, type, data, CRC
        if end > size:
            return f'truncated PNG: its {chunk.decode("latin-1")!r} chunk runs past the end of the data', header
        if chunk == b'IHDR' and length >= 13:
            bit_depth, colour_type = content[pos + 16], content[pos + 17]
            channels = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}.get(colour_type)
            header = ImageHeader('png', bit_depth=bit_depth, channels=channels, has_alpha=colour_type in (4, 6))
        elif chunk == b'tRNS' and header.channels is not None:
            header = ImageHeader('png', bit_depth=header.bit_depth, channels=header.channels, has_alpha=True)
        elif chunk == b'IDAT':
            seen_idat = True
        elif chunk == b'IEND':
            return (None if seen_idat else 'damaged PNG: it has no image data (IDAT chunk)'), header
        pos = end


def _jpeg_problem(content: bytes) -> tuple[Optional[str], ImageHeader]:
    """(what is wrong or None, header) for JPEG bytes, walking the markers up to the end-of-image marker."""
    header = ImageHeader('jpeg')
    pos, size = len(JPEG_SOI), len(content)
    while True:
        # Next marker: skip fill bytes; after a scan, skip its entropy-coded data.
        if pos + 2 > size:
            return 'truncated JPEG: the data ends before the end-of-image marker', header
        if content[pos] != 0xFF:
            found = _JPEG_NEXT_MARKER.search(content, pos)
            if found is None:
                return 'truncated JPEG: the data ends before the end-of-image marker', header
            pos = found.start()
        while pos + 1 < size and content[pos + 1] == 0xFF:
            pos += 1
        if pos + 2 > size:
            return 'truncated JPEG: the data ends before the end-of-image marker', header
        marker = content[pos + 1]
        if marker == _JPEG_EOI:
            return None, header
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        if pos + 4 > size:
            return 'truncated JPEG: the data ends inside a marker', header
        length = struct.unpack('>H', content[pos + 2:pos + 4])[0]
        end = pos + 2 + length
        if length < 2 or end > size:
            return 'truncated or damaged JPEG: a marker segment runs past the end of the data', header
        if marker in _JPEG_SOF and length >= 8:
            header = ImageHeader('jpeg', bit_depth=content[pos + 4], channels=content[pos + 9])
        pos = end
        if marker == _JPEG_SOS:
            found = _JPEG_NEXT_MARKER.search(content, pos)
            if found is None:
                return 'truncated JPEG: the data ends inside the image data', header
            pos = found.start()


def check_image_bytes(content: bytes) -> tuple[Optional[str], ImageHeader]:
    """Look at encoded image bytes without decoding them.

    Returns:
        (a description of what is wrong, or None when nothing was found; the header, ``kind='other'`` for formats
        other than PNG and JPEG, which are left to the decoder).
    """
    if not content:
        return 'the file is empty (0 bytes)', ImageHeader('other')
    if content.startswith(PNG_SIGNATURE):
        return _png_problem(content)
    if content.startswith(JPEG_SOI):
        return _jpeg_problem(content)
    return None, ImageHeader('other')


def _conversions(header: ImageHeader, content: bytes) -> tuple[str, ...]:
    """Which of :data:`CONVERSIONS` ``IMREAD_COLOR`` applies to this image."""
    if header.kind == 'other':
        raw = cv2.imdecode(np.frombuffer(content, np.uint8), cv2.IMREAD_UNCHANGED)
        if raw is None:
            return ()
        channels = 1 if raw.ndim == 2 else raw.shape[2]
        bit_depth = 8 * raw.dtype.itemsize if raw.dtype.kind in 'ui' else 32
        header = ImageHeader('other', bit_depth=bit_depth, channels=channels, has_alpha=channels in (2, 4))
    found = []
    if header.bit_depth is not None and header.bit_depth > 8:
        found.append('high_bit_depth')
    if header.channels in (1, 2):
        found.append('grey')
    if header.has_alpha:
        found.append('alpha')
    return tuple(found)


def decode_image(content: Optional[bytes], path: str, *, role: str = 'image') -> tuple[np.ndarray, tuple[str, ...]]:
    """Decode image bytes exactly as basicsr's ``imfrombytes(content, float32=True)``, checked.

    Args:
        content: the encoded image (``None`` counts as missing, as an lmdb returns for an unknown key).
        path: the file (or lmdb key) it came from, for the error message.
        role: what the image is, for the error message (``'GT image'``, ``'LQ image'``).
    Returns:
        (``[H, W, 3]`` float32 BGR in [0, 1]; the names of the :data:`CONVERSIONS` that were applied).
    Raises:
        UnreadableImageError: empty, truncated, or not decodable.
    """
    if content is None:
        raise UnreadableImageError.for_file(path, 'no data was stored under this name', role=role)
    problem, header = check_image_bytes(content)
    if problem is not None:
        raise UnreadableImageError.for_file(path, problem, role=role)
    try:
        img = cv2.imdecode(np.frombuffer(content, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as error:
        raise UnreadableImageError.for_file(path, f'OpenCV failed to decode it ({str(error).strip()[-200:]})',
                                            role=role) from None
    if img is None:
        what = {'png': 'a damaged PNG', 'jpeg': 'a damaged JPEG'}.get(header.kind, 'not an image OpenCV can decode')
        raise UnreadableImageError.for_file(path, f'{what} ({len(content)} bytes; corrupt, or another kind of file '
                                            'with an image extension)', role=role)
    return img.astype(np.float32) / 255., _conversions(header, content)


def read_image(file_client: Any, path: str, client_key: str, *, role: str,
               where: Optional[str] = None) -> tuple[np.ndarray, tuple[str, ...]]:
    """Fetch an image through a basicsr ``FileClient`` and :func:`decode_image` it.

    Args:
        file_client: basicsr's ``FileClient`` (disk or lmdb).
        path: file path (disk) or key (lmdb).
        client_key: the lmdb environment (``'gt'``/``'lq'``); ignored on disk.
        role: see :func:`decode_image`.
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
    return decode_image(content, path, role=role)


class ConversionLog:
    """Reports each kind of conversion once per data set (per process: each DataLoader worker reports its own).

    Args:
        dataset: the data set's name.
    """

    def __init__(self, dataset: str) -> None:
        self.dataset = dataset
        self.reported: set[str] = set()

    def note(self, path: str, conversions: tuple[str, ...]) -> None:
        for name in conversions:
            if name in self.reported:
                continue
            self.reported.add(name)
            level, description = CONVERSIONS[name]
            logger.log(level, f'{self.dataset}: {path} {description}; it is read as 8-bit 3-channel BGR, as '
                       'basicsr reads every image (cv2.IMREAD_COLOR). Other images of this data set converted the '
                       'same way are not reported again.')

"""The one image reader and writer: every entry point decodes and encodes images here.

* :func:`read_picture` (hat-upscale, the predictor, the analysis tools): the image as stored, upright. PNG, JPEG,
  WebP, TIFF, BMP, 8 or 16 bits; decoded completely by Pillow (a damaged file raises; OpenCV would return a truncated
  JPEG with a grey lower part), except 16-bit colour, which Pillow reduces to 8 bits and OpenCV decodes.
* :func:`decode_as_basicsr` (the datasets): exactly BasicSR's ``imfrombytes(content, float32=True)`` (8-bit BGR via
  ``cv2.IMREAD_COLOR``), so that training and metrics see BasicSR's pixels; Pillow first decodes the bytes to catch
  damaged files and tells which conversions apply (reported once per data set by :class:`ConversionLog`).
* :func:`write_picture`: atomic writes. :func:`read_array`: the stored array as OpenCV gives
  it, for scripts. :func:`image_header`: size and depth without decoding.

Every failure to read raises :class:`UnreadableImageError`, which names the file.
"""
from __future__ import annotations

import functools
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import cv2
import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from torch import Tensor

logger = logging.getLogger('basicsr')

# The image files every tool looks for in a folder (lower case).
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.webp', '.tif', '.tiff', '.bmp', '.ppm', '.pgm')
# Output extension -> (can hold 16-bit samples, can hold alpha), as OpenCV writes them.
OUTPUT_FORMATS = {
    'png': (True, True),
    'tif': (True, True),
    'tiff': (True, True),
    'webp': (False, True),
    'bmp': (False, True),
    'jpg': (False, False),
    'jpeg': (False, False),
}
# ITU-R BT.601 luma, the weights of OpenCV's RGB2GRAY and Pillow's convert('L').
LUMA_WEIGHTS = (0.299, 0.587, 0.114)

_TEMP_PREFIX = '.'  # outputs are written to a hidden temporary file and renamed, so a crash leaves no half image

# What the user can do about a file that does not decode; appended to every UnreadableImageError message.
UNREADABLE_ADVICE = ('Replace it with a good copy (re-export or re-download it, or re-run the script that prepared '
                     'the data set), or remove it from the data set (and from its meta_info file, if there is one).')


class ImageError(ValueError):
    """An image cannot be read, processed or written; the message says what and why."""


class UnreadableImageError(ImageError):
    """An image file that cannot be read or decoded: missing, empty, truncated, or not an image at all.

    Args:
        message: the whole message (names the file and says what to do).
        path: the file (or ``lmdb folder:key``) that failed. ``None`` when the error was re-raised from a DataLoader
            worker process, which rebuilds the exception from its message only; the message still names the file.
        problem: what is wrong, without the file name and advice (for callers that name the file themselves).
    """

    def __init__(self, message: str, *, path: Optional[str] = None, problem: Optional[str] = None) -> None:
        super().__init__(message)
        self.path = path
        self.problem = problem or message

    @classmethod
    def for_file(cls, path: str, problem: str, *, role: str = 'image') -> 'UnreadableImageError':
        """``cannot read <role> <path>: <problem>. <advice>``, e.g. ``role='GT image'``."""
        return cls(f'cannot read {role} {path}: {problem}. {UNREADABLE_ADVICE}', path=path, problem=problem)


# ---------------------------------------------------------------------------------------------------------------
# Pictures: images as stored, upright (hat-upscale, the predictor, the analysis tools)
# ---------------------------------------------------------------------------------------------------------------


# Modes Pillow decodes an image into -> (the mode its pixels are taken in, bit depth). 16-bit colour is not here:
# Pillow reduces it to 8-bit RGB(A), so it is decoded by OpenCV instead.
PILLOW_MODES = {
    '1': ('L', 8), 'L': ('L', 8), 'LA': ('LA', 8), 'La': ('LA', 8), 'RGB': ('RGB', 8), 'RGBA': ('RGBA', 8),
    'RGBa': ('RGBA', 8), 'RGBX': ('RGB', 8), 'CMYK': ('RGB', 8), 'YCbCr': ('RGB', 8), 'PA': ('RGBA', 8),
    'I;16': ('I;16', 16), 'I;16L': ('I;16', 16), 'I;16B': ('I;16', 16), 'I;16N': ('I;16', 16),
}


@dataclass
class Picture:
    """A decoded image, upright.

    Attributes:
        pixels: [H, W, C] float32 in [0, 1]; C = 3 (RGB) or 1 (grey).
        alpha: [H, W] float32 in [0, 1], or None.
        bit_depth: 8 or 16, the depth of the file's samples.
    """

    pixels: np.ndarray
    alpha: np.ndarray | None
    bit_depth: int


def apply_exif_orientation(img: np.ndarray, orientation: int) -> np.ndarray:
    """Make an image upright: the transposition ``ImageOps.exif_transpose`` applies for each EXIF orientation.

    Args:
        img: [H, W] or [H, W, C], as stored in the file.
        orientation: the EXIF/TIFF Orientation tag (274), 1-8; other values leave the image unchanged.
    Returns:
        the upright image (a view); [W, H, ...] for orientations 5-8.
    """
    if orientation == 2:  # FLIP_LEFT_RIGHT
        return img[:, ::-1]
    if orientation == 3:  # ROTATE_180
        return img[::-1, ::-1]
    if orientation == 4:  # FLIP_TOP_BOTTOM
        return img[::-1]
    if orientation == 5:  # TRANSPOSE
        return img.swapaxes(0, 1)
    if orientation == 6:  # ROTATE_270 (counter-clockwise), i.e. 90 degrees clockwise
        return np.rot90(img, -1)
    if orientation == 7:  # TRANSVERSE
        return img[::-1, ::-1].swapaxes(0, 1)
    if orientation == 8:  # ROTATE_90 (counter-clockwise)
        return np.rot90(img, 1)
    return img


def _raw_mode(img: Image.Image) -> str:
    """How the file stores its samples (``'RGB;16B'``, ``'I;16B'``, ``'RGBA'``, ...), before Pillow converts them."""
    if not img.tile:
        return ''
    args = img.tile[0].args if hasattr(img.tile[0], 'args') else img.tile[0][3]
    return args if isinstance(args, str) else str(args[0]) if isinstance(args, tuple) and args else ''


def _from_pillow(img: Image.Image, sixteen_bit_grey: bool) -> Picture:
    """A loaded Pillow image -> upright :class:`Picture` (``ImageOps.exif_transpose``)."""
    img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode == 'P':
        mode = 'RGBA' if 'transparency' in img.info else 'RGB'
    elif mode == 'I' and sixteen_bit_grey:  # older Pillow reads 16-bit grey PNG as 32-bit 'I'
        mode = 'I;16'
    if mode not in PILLOW_MODES:
        raise ImageError(f'Pillow mode {img.mode!r} is not supported; convert the image to 8- or 16-bit grey or RGB')
    target, bit_depth = PILLOW_MODES[mode]
    if target == 'I;16':
        samples = np.asarray(img).astype(np.uint16)  # I;16B is big-endian in memory
    else:
        samples = np.asarray(img if img.mode == target else img.convert(target))
    pixels = samples.astype(np.float32) / float(2**bit_depth - 1)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    alpha = None
    if target in ('LA', 'RGBA'):
        pixels, alpha = pixels[..., :-1], pixels[..., -1]
    return Picture(pixels=np.ascontiguousarray(pixels), alpha=alpha, bit_depth=bit_depth)


@functools.lru_cache(maxsize=None)
def _opencv_applies_orientation(pillow_format: str) -> bool:
    """Whether ``cv2.imdecode(..., IMREAD_UNCHANGED)`` already turns images of this format upright.

    OpenCV does for TIFF and not for PNG, and this has changed between versions: ask it, with a 3x2 image tagged
    orientation 6 (turned 90 degrees: upright it is 2x3).
    """
    probe = Image.new('RGB', (3, 2))
    buffer = io.BytesIO()
    try:
        if pillow_format == 'TIFF':
            probe.save(buffer, format='TIFF', tiffinfo={ExifTags.Base.Orientation: 6})
        else:
            exif = probe.getexif()
            exif[ExifTags.Base.Orientation] = 6
            probe.save(buffer, format=pillow_format, exif=exif)
    except (OSError, KeyError, ValueError, TypeError):
        return False
    decoded = cv2.imdecode(np.frombuffer(buffer.getvalue(), np.uint8), cv2.IMREAD_UNCHANGED)
    return decoded is not None and decoded.shape[:2] == (3, 2)


def _from_opencv(data: bytes, orientation: int, pillow_format: str) -> Picture:
    """Decode with OpenCV (16-bit colour, which Pillow would reduce to 8 bits) -> upright :class:`Picture`."""
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if decoded is None:
        raise ImageError('not an image that Pillow or OpenCV can decode (corrupt, or not an image)')
    if decoded.dtype not in (np.uint8, np.uint16):
        raise ImageError(f'{decoded.dtype} samples are not supported; convert the image to 8 or 16 bits per sample')
    bit_depth = 16 if decoded.dtype == np.uint16 else 8
    img = decoded.astype(np.float32) / float(2**bit_depth - 1)
    if img.ndim == 2:
        img = img[..., None]
    alpha = None
    if img.shape[2] in (2, 4):
        img, alpha = img[..., :-1], img[..., -1]
    if img.shape[2] == 3:
        img = img[..., ::-1]  # BGR -> RGB
    elif img.shape[2] != 1:
        raise ImageError(f'{img.shape[2]} colour channels are not supported (1 or 3, with or without alpha)')
    if pillow_format and not _opencv_applies_orientation(pillow_format):
        img = apply_exif_orientation(img, orientation)
        alpha = None if alpha is None else apply_exif_orientation(alpha, orientation)
    return Picture(pixels=np.ascontiguousarray(img), alpha=None if alpha is None else np.ascontiguousarray(alpha),
                   bit_depth=bit_depth)


def read_picture(path: Path) -> Picture:
    """Read an image file as an upright :class:`Picture`.

    Pillow decodes every file completely (a damaged one raises here) and supplies the pixels, made upright by
    ``ImageOps.exif_transpose``, unless the file has 16-bit colour samples, which Pillow reduces to 8 bits: those
    come from OpenCV, turned upright with the same transposition.

    Raises:
        UnreadableImageError: the file cannot be read, is not an image, is damaged, or its samples are not 8/16-bit
            integers (the message names the file; ``.problem`` says what is wrong without it).
    """
    try:
        data = path.read_bytes()
    except OSError as error:
        raise UnreadableImageError.for_file(str(path), f'cannot read the file ({error.strerror or error})') from None
    if not data:
        raise UnreadableImageError.for_file(str(path), 'the file is empty (0 bytes)')
    try:
        with Image.open(io.BytesIO(data)) as img:
            raw_mode = _raw_mode(img)
            sixteen_bit_colour = ';16' in raw_mode and not raw_mode.startswith('I;16')
            orientation = int(img.getexif().get(ExifTags.Base.Orientation, 1) or 1)
            pillow_format = img.format or ''
            img.load()  # the pixel data: this is where truncation shows
            if not sixteen_bit_colour:
                return _from_pillow(img, sixteen_bit_grey=raw_mode.startswith('I;16'))
    except UnidentifiedImageError:
        orientation, pillow_format = 1, ''  # not a format Pillow knows: OpenCV may
    except ImageError as error:
        raise UnreadableImageError.for_file(str(path), str(error)) from None
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise UnreadableImageError.for_file(
            str(path), f'damaged or truncated image ({type(error).__name__}: {error})') from None
    try:
        return _from_opencv(data, orientation, pillow_format)
    except ImageError as error:
        raise UnreadableImageError.for_file(str(path), str(error)) from None


def quantise(values: np.ndarray, bit_depth: int) -> np.ndarray:
    """[0, 1] floats -> uint8/uint16 (clipped, rounded); one float copy, then in place."""
    peak = 2**bit_depth - 1
    out = np.clip(values, 0.0, 1.0)  # one float copy, then in place: a large image's host memory
    out *= peak
    np.rint(out, out=out)
    return out.astype(np.uint16 if bit_depth == 16 else np.uint8)


def write_picture(path: Path, picture: Picture) -> list[str]:
    """Write ``picture`` to ``path`` (format from the extension), atomically. Returns notes about lost information.

    Raises:
        ImageError: unsupported extension, or the encoder or the file system failed.
    """
    ext = path.suffix.lower().lstrip('.')
    if ext not in OUTPUT_FORMATS:
        raise ImageError(f'cannot write .{ext} files; use one of {", ".join(OUTPUT_FORMATS)}')
    holds_16_bits, holds_alpha = OUTPUT_FORMATS[ext]
    notes = []
    bit_depth = picture.bit_depth
    if bit_depth == 16 and not holds_16_bits:
        notes.append(f'.{ext} holds 8 bits per sample: the 16-bit result was written with 8 bits (use --ext png or '
                     'tif to keep 16)')
        bit_depth = 8
    alpha = picture.alpha
    if alpha is not None and not holds_alpha:
        notes.append(f'.{ext} has no alpha channel: the alpha channel was dropped (use --ext png to keep it)')
        alpha = None
    pixels = picture.pixels
    if pixels.shape[2] == 3:
        pixels = pixels[..., ::-1]  # RGB -> BGR
    elif alpha is not None:
        pixels = np.repeat(pixels, 3, axis=2)  # OpenCV writes 1, 3 or 4 channels: grey + alpha becomes RGBA
    else:
        pixels = pixels[..., 0]
    if alpha is not None:
        pixels = np.dstack([pixels, alpha])
    encoded_ok, buffer = cv2.imencode(f'.{ext}', quantise(pixels, bit_depth))
    if not encoded_ok:
        raise ImageError(f'OpenCV could not encode the result as .{ext}')
    _write_atomically(path, buffer.tobytes())
    return notes


def _write_atomically(path: Path, data: bytes) -> None:
    """Write through a hidden temporary file in the same folder and rename, so a crash leaves no half image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f'{_TEMP_PREFIX}{path.name}.partial')
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise ImageError(f'cannot write {path} ({error.strerror or error})') from None


def read_image_tensor(path: str | os.PathLike, *, channels: int = 3) -> Tensor:
    """An image file as [channels, H, W] float32 in [0, 1]: RGB for 3 channels, luma (BT.601) for 1.

    8- and 16-bit files are accepted and made upright; an alpha channel is dropped.

    Raises:
        UnreadableImageError: see :func:`read_picture`.
        ValueError: ``channels`` is neither 1 nor 3.
    """
    if channels not in (1, 3):
        raise ValueError(f'networks with {channels} input channels are not supported; use 1 (gray) or 3 (RGB).')
    pixels = read_picture(Path(path)).pixels
    if channels == 3 and pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    elif channels == 1 and pixels.shape[2] == 3:
        pixels = (pixels * np.asarray(LUMA_WEIGHTS, dtype=np.float32)).sum(axis=2, keepdims=True)
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def read_array(path: str | os.PathLike, *, colour: bool = False) -> np.ndarray:
    """The stored samples as OpenCV gives them, checked: ``cv2.imread(path, IMREAD_UNCHANGED)`` ([H, W] or
    [H, W, C] BGR(A), uint8/uint16), or with ``colour=True`` BasicSR's 8-bit 3-channel BGR (``IMREAD_COLOR``).

    For scripts that must keep the exact stored values (MATLAB-exact downscaling, cropping sub-images).

    Raises:
        UnreadableImageError: missing, empty, damaged or not an image.
    """
    path = Path(path)
    try:
        content = path.read_bytes()
    except OSError as error:
        raise UnreadableImageError.for_file(str(path), f'cannot read the file ({error.strerror or error})') from None
    _check_with_pillow(content, str(path), role='image')
    img = cv2.imdecode(np.frombuffer(content, np.uint8), cv2.IMREAD_COLOR if colour else cv2.IMREAD_UNCHANGED)
    if img is None:
        raise UnreadableImageError.for_file(str(path), 'not an image OpenCV can decode')
    return img


class ImageHeader(NamedTuple):
    """What an image file's header says."""

    width: int
    height: int
    channels: int
    bit_depth: int  # per sample: 8, or 16 for 16-bit grey and colour


def image_header(path: str | os.PathLike) -> ImageHeader:
    """Size, channels and bit depth from the file's header, without decoding the pixels.

    Raises:
        UnreadableImageError: not an image Pillow recognises, or unreadable.
    """
    try:
        with Image.open(path) as img:
            sixteen = ';16' in _raw_mode(img) or img.mode.startswith('I')
            return ImageHeader(img.width, img.height, len(img.getbands()), 16 if sixteen else 8)
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise UnreadableImageError.for_file(str(path), f'not a readable image ({type(error).__name__}: {error})') \
            from None


# ---------------------------------------------------------------------------------------------------------------
# BasicSR's reader (the datasets)
# ---------------------------------------------------------------------------------------------------------------

# Conversions IMREAD_COLOR applies, with their level when reported: grey -> 3 channels loses nothing; the others do.
CONVERSIONS = {
    'high_bit_depth': (logging.WARNING, 'has more than 8 bits per sample (reduced to 8 bits)'),
    'grey': (logging.INFO, 'is grey (copied to 3 identical channels)'),
    'alpha': (logging.WARNING, 'has an alpha channel (dropped)'),
}
_GREY_MODES = ('1', 'L', 'LA', 'La', 'I', 'I;16', 'I;16L', 'I;16B', 'I;16N', 'F')


def _check_with_pillow(content: bytes, path: str, *, role: str) -> Optional[tuple[str, ...]]:
    """Decode ``content`` completely with Pillow to find damage; return the conversions IMREAD_COLOR will apply.

    Returns None for formats Pillow does not know (OpenCV alone decides about those).

    Raises:
        UnreadableImageError: empty, truncated or damaged.
    """
    if not content:
        raise UnreadableImageError.for_file(path, 'the file is empty (0 bytes)', role=role)
    try:
        with Image.open(io.BytesIO(content)) as img:
            mode, raw_mode = img.mode, _raw_mode(img)
            has_transparency = 'transparency' in img.info
            img.load()  # the pixel data: this is where truncation and damage show
    except UnidentifiedImageError:
        return None
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise UnreadableImageError.for_file(path, f'damaged or truncated image ({type(error).__name__}: {error})',
                                            role=role) from None
    found = []
    if ';16' in raw_mode or mode.startswith('I') or mode == 'F':
        found.append('high_bit_depth')
    if mode in _GREY_MODES:
        found.append('grey')
    if 'A' in mode or 'a' in mode or has_transparency:
        found.append('alpha')
    return tuple(found)


def _opencv_conversions(content: bytes) -> tuple[str, ...]:
    """The conversions of a format only OpenCV reads, from a second, unchanged decode."""
    raw = cv2.imdecode(np.frombuffer(content, np.uint8), cv2.IMREAD_UNCHANGED)
    if raw is None:
        return ()
    channels = 1 if raw.ndim == 2 else raw.shape[2]
    found = []
    if raw.dtype.itemsize > 1 or raw.dtype.kind == 'f':
        found.append('high_bit_depth')
    if channels in (1, 2):
        found.append('grey')
    if channels in (2, 4):
        found.append('alpha')
    return tuple(found)


def decode_as_basicsr(content: Optional[bytes], path: str, *,
                      role: str = 'image') -> tuple[np.ndarray, tuple[str, ...]]:
    """Decode image bytes exactly as basicsr's ``imfrombytes(content, float32=True)``, checked.

    Args:
        content: the encoded image (``None`` counts as missing, as an lmdb returns for an unknown key).
        path: the file (or lmdb key) it came from, for the error message.
        role: what the image is, for the error message (``'GT image'``, ``'LQ image'``).
    Returns:
        (``[H, W, 3]`` float32 BGR in [0, 1]; the names of the :data:`CONVERSIONS` that were applied).
    Raises:
        UnreadableImageError: missing, empty, truncated, or not decodable.
    """
    if content is None:
        raise UnreadableImageError.for_file(path, 'no data was stored under this name', role=role)
    conversions = _check_with_pillow(content, path, role=role)
    try:
        img = cv2.imdecode(np.frombuffer(content, np.uint8), cv2.IMREAD_COLOR)
    except cv2.error as error:
        raise UnreadableImageError.for_file(path, f'OpenCV failed to decode it ({str(error).strip()[-200:]})',
                                            role=role) from None
    if img is None:
        raise UnreadableImageError.for_file(path, f'not an image OpenCV can decode ({len(content)} bytes; corrupt, '
                                            'or another kind of file with an image extension)', role=role)
    if conversions is None:
        conversions = _opencv_conversions(content)
    return img.astype(np.float32) / 255., conversions


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

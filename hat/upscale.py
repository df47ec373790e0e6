"""Super-resolve your own images with a HAT (any variant) or SRVGGNetCompact checkpoint.

    hat-upscale -i photos/ -o photos_x4/ -m experiments/pretrained_models/HAT_SRx4_ImageNet-pretrain.pth
    python -m hat.upscale -i scan.tif -o out/ -m HAT-L_SRx2_ImageNet-pretrain.pth --precision bf16 --self-ensemble

The architecture, variant and scale are read from the checkpoint (:mod:`hat.archs.detect`). ``-i`` is one image or a
folder, searched recursively; the outputs mirror its sub-folders under ``-o`` as ``<name><suffix>.<ext>``
(``photo.jpg`` -> ``photo_x4.png`` by default). An input file is never overwritten: the run is refused when an output
path would be one of the inputs, and an output folder inside the input folder is not searched for inputs.

Each image, as stored in the file:
* formats: PNG, JPEG, WebP, TIFF and BMP, 8 or 16 bits per sample. Every file is decoded completely by Pillow, which
  raises on damaged data (OpenCV would return a truncated JPEG with a grey lower part), so a damaged file is reported
  and skipped instead of upscaled. Pillow supplies the pixels, except for 16-bit colour, which it reduces to 8 bits:
  those are decoded by OpenCV.
* EXIF orientation (JPEG, PNG, WebP, TIFF) is applied before upscaling: by Pillow's ``ImageOps.exif_transpose``, or
  for 16-bit colour by the same transposition on the array (unless OpenCV already applied it, as it does for TIFF);
  the output is written upright, without the tag.
* 16-bit images are computed in float32 and written with 16 bits (PNG, TIFF); JPEG, WebP and BMP hold 8 bits only,
  so ``--ext jpg`` on a 16-bit input writes 8 bits and says so.
* grey images stay grey: for a network with 3 input channels the grey channel is repeated, and the colour output is
  converted back with the ITU-R BT.601 luma weights (0.299 R + 0.587 G + 0.114 B, what OpenCV's RGB2GRAY uses).
  A colour image given to a 1-channel network is upscaled channel by channel.
* alpha is upscaled separately with bicubic interpolation (not by the network, which was trained on natural images,
  not on masks, and would cost as much again) and re-attached. A grey image with alpha is written as RGBA, because
  OpenCV writes 1, 3 or 4 channels; JPEG has no alpha, so ``--ext jpg`` drops it and says so.

Memory (``--tile``). The image is processed in square tiles of ``--tile`` LR pixels that overlap by
``2 * --tile-pad`` and are blended (:func:`hat.utils.tiling.tiled_forward`), so the network's memory is that of one
tile; the output canvas lives in host memory. ``--tile auto`` (the default) picks the largest tile, a multiple of the
network's window, whose estimated peak memory fits the budget:

* model: peak(t) = a + b * t^2 for a t x t tile, because everything HAT holds while running (features, qkv, window
  attention maps of a fixed size per window) grows with the number of pixels. a and b come from two trial forwards
  on small tiles (32 and 48 pixels, after one warm-up forward that fills the bias caches), with the requested
  precision: on CUDA the peak of the caching allocator (``torch.cuda.max_memory_allocated``), elsewhere the peak of
  the bytes held by tensors, tracked op by op (:class:`TensorPeakMemory`).
* budget: ``--max-memory`` GiB, or 80% of what CUDA reports free (``torch.cuda.mem_get_info``, plus memory the
  caching allocator holds unused), or 50% of the available RAM (``/proc/meminfo`` MemAvailable, psutil when it is
  installed, the cgroup limit when it is lower) on the CPU, where the output canvas (about
  ``4 x (channels + 1) x 3`` bytes per output pixel, x5/3 with self-ensemble) is taken off first. The margin covers
  what the model does not see: kernel workspaces, allocator fragmentation, other processes.
* if the whole image fits, it is processed in one piece; if a tile still runs out of memory, the tile is halved and
  the image retried.
``--tile N`` uses N-pixel tiles, ``--tile 0`` the whole image. ``--tile-pad`` is 32 (the official tile example's
value), reduced to a quarter of the tile for small tiles, so that consecutive tiles always advance by at least half a
tile.

Precision: ``fp32`` (default), ``bf16`` and ``fp16`` through ``torch.autocast`` on the device; fp16 needs CUDA, and
HAT's attention may overflow in fp16: a non-finite output is reported with the advice to use bf16.

Exit status: 0 when every image was written; 1 when some could not be read, upscaled or written (each is logged with
its path and the reason, and the others are processed); 2 for bad arguments (missing model or input, an
unrecognised checkpoint, an output that would overwrite an input, fp16 on the CPU).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import logging
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from hat.archs.detect import build_from_checkpoint
from hat.utils.ensemble import self_ensemble as ensemble_x8
from hat.utils.tiling import tiled_forward

logger = logging.getLogger('hat.upscale')

INPUT_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.webp', '.tif', '.tiff', '.bmp')
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
EXT_AUTO = 'auto'
DEFAULT_EXT = 'png'
DEFAULT_SUFFIX = '_x{scale}'
DEFAULT_TILE_PAD = 32
PRECISIONS = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

# ITU-R BT.601 luma, the weights of OpenCV's RGB2GRAY and Pillow's convert('L').
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
# Modes Pillow decodes an image into -> (the mode its pixels are taken in, bit depth). 16-bit colour is not here:
# Pillow reduces it to 8-bit RGB(A), so it is decoded by OpenCV instead.
PILLOW_MODES = {
    '1': ('L', 8), 'L': ('L', 8), 'LA': ('LA', 8), 'La': ('LA', 8), 'RGB': ('RGB', 8), 'RGBA': ('RGBA', 8),
    'RGBa': ('RGBA', 8), 'RGBX': ('RGB', 8), 'CMYK': ('RGB', 8), 'YCbCr': ('RGB', 8), 'PA': ('RGBA', 8),
    'I;16': ('I;16', 16), 'I;16L': ('I;16', 16), 'I;16B': ('I;16', 16), 'I;16N': ('I;16', 16),
}

# --tile auto: trial tile sides (LR pixels; rounded up to the window) and the share of the free memory it may use.
CALIBRATION_SIDES = (32, 48)
CUDA_MEMORY_FRACTION = 0.8
CPU_MEMORY_FRACTION = 0.5
# Host bytes per output pixel and channel of the tiled output: canvas and blend weights, the crop, the quantisation's
# float copy and its uint result, with a margin; the x8 self-ensemble keeps a running sum and a back-transformed copy
# on top.
CANVAS_COPIES = 3
ENSEMBLE_CANVAS_COPIES = 5

_TEMP_PREFIX = '.'  # outputs are written to a hidden temporary file and renamed, so a crash leaves no half image


class UsageError(Exception):
    """A bad argument: nothing is processed and the exit status is 2."""


class ImageError(Exception):
    """One image cannot be processed: it is reported and skipped, and the exit status is 1."""


# ---------------------------------------------------------------------------------------------------------------
# Which files, written where
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One input image and the path its result is written to.

    Attributes:
        source: the input file.
        target: the output file.
        conflict: another input that already writes ``target`` (the job is then reported, not run).
    """

    source: Path
    target: Path
    conflict: Path | None = None


def find_images(root: Path, *, exclude: Path | None = None) -> list[Path]:
    """Image files under ``root`` (recursively, sorted, hidden files and the ``exclude`` folder left out).

    A file given directly is returned as it is, whatever its extension: the user asked for it.
    """
    if root.is_file():
        return [root]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        folder = Path(dirpath)
        dirnames[:] = sorted(n for n in dirnames
                             if not n.startswith('.') and (exclude is None or (folder / n).resolve() != exclude))
        found.extend(folder / name for name in sorted(filenames)
                     if not name.startswith('.') and Path(name).suffix.lower() in INPUT_EXTENSIONS)
    return found


def plan_jobs(input_path: Path, output_dir: Path, *, suffix: str, ext: str) -> list[Job]:
    """Pair every input image with its output path, mirroring the input's sub-folders under ``output_dir``.

    Raises:
        UsageError: no input, no image in it, or an output path that is one of the inputs.
    """
    if not input_path.exists():
        raise UsageError(f'input not found: {input_path}')
    output_resolved = output_dir.resolve()
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f'-o {output_dir} is a file; pass a folder for the outputs')
    sources = find_images(input_path, exclude=output_resolved)
    if not sources:
        raise UsageError(f'no images in {input_path} (searched recursively for '
                         f'{", ".join(INPUT_EXTENSIONS)})')
    base = input_path if input_path.is_dir() else input_path.parent
    inputs = {p.resolve() for p in sources}
    jobs: list[Job] = []
    writers: dict[Path, Path] = {}
    for source in sources:
        extension = source.suffix if ext == EXT_AUTO else f'.{ext}'
        relative = source.relative_to(base)
        target = output_dir / relative.parent / f'{source.stem}{suffix}{extension}'
        resolved = target.resolve()
        if resolved in inputs:
            raise UsageError(f'refusing to overwrite the input {source}: with -o {output_dir}, --suffix '
                             f'{suffix!r} and --ext {ext} its output would be written onto it. Choose another -o, '
                             'a --suffix or an --ext.')
        key = Path(os.path.normcase(resolved))
        jobs.append(Job(source, target, conflict=writers.get(key)))
        writers.setdefault(key, source)
    return jobs


# ---------------------------------------------------------------------------------------------------------------
# Reading and writing images
# ---------------------------------------------------------------------------------------------------------------


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
        ImageError: the file cannot be read, is not an image, is damaged, or its samples are not 8/16-bit integers.
    """
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ImageError(f'cannot read the file ({error.strerror or error})') from None
    if not data:
        raise ImageError('the file is empty')
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
    except ImageError:
        raise
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise ImageError(f'damaged or truncated image ({type(error).__name__}: {error})') from None
    return _from_opencv(data, orientation, pillow_format)


def all_finite(t: Tensor, rows: int = 256) -> bool:
    """``torch.isfinite(t).all()`` of a [..., H, W] tensor, a band of ``rows`` rows at a time: on the CPU, isfinite
    makes several full-size temporaries, which for a large output would outweigh a tile."""
    return all(bool(torch.isfinite(band).all()) for band in t.split(rows, dim=-2))


def _quantise(values: np.ndarray, bit_depth: int) -> np.ndarray:
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
    encoded_ok, buffer = cv2.imencode(f'.{ext}', _quantise(pixels, bit_depth))
    if not encoded_ok:
        raise ImageError(f'OpenCV could not encode the result as .{ext}')
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f'{_TEMP_PREFIX}{path.name}.partial')
    try:
        temporary.write_bytes(buffer.tobytes())
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise ImageError(f'cannot write {path} ({error.strerror or error})') from None
    return notes


# ---------------------------------------------------------------------------------------------------------------
# Memory: measuring a forward pass, and choosing the tile
# ---------------------------------------------------------------------------------------------------------------


def _tensors(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)


class TensorPeakMemory(TorchDispatchMode):
    """Peak number of bytes held at once by the tensors that the operations run inside this context create.

    Every operation that allocates its outputs (whose schema does not declare them aliases of an input, as views and
    in-place operations do) has them recorded by their storage with a weak reference; a storage counts from the
    operation that created it until it is freed. Storages that exist before (``known``: the weights, the input, and
    anything reached only through views, such as cached attention biases) are not counted. Works on any device,
    including ``meta``; memory that kernels use internally and release before returning is not seen.
    """

    def __init__(self, known: Sequence[Tensor] = ()) -> None:
        super().__init__()
        self._known = {t.untyped_storage()._cdata: StorageWeakRef(t.untyped_storage()) for t in known}
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Drop freed storages first: while a weak reference is held, no new storage can take the same address.
        for key in [k for k, (ref, _) in self._live.items() if ref.expired()]:
            self.current -= self._live.pop(key)[1]
        if any(r.alias_info is not None for r in func._schema.returns):
            return out  # a view or an in-place result: no new memory
        for tensor in _tensors(out):
            storage = tensor.untyped_storage()
            key = storage._cdata
            if key not in self._live and key not in self._known:
                self._live[key] = (StorageWeakRef(storage), storage.nbytes())
                self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def measure_peak_memory(run: Callable[[], Any], *, device: torch.device, known: Sequence[Tensor] = ()) -> int:
    """Bytes of ``device`` memory that ``run()`` needs on top of what is already allocated.

    CUDA: the caching allocator's peak (everything, including kernel workspaces). Other devices: the tensor peak of
    :class:`TensorPeakMemory`.
    """
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with TensorPeakMemory(known) as tracker:
        run()
    return tracker.peak


def _cgroup_available() -> int | None:
    """Memory left under the cgroup limit (containers), if there is one."""
    for limit_file, usage_file in (('/sys/fs/cgroup/memory.max', '/sys/fs/cgroup/memory.current'),
                                   ('/sys/fs/cgroup/memory/memory.limit_in_bytes',
                                    '/sys/fs/cgroup/memory/memory.usage_in_bytes')):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:  # 'max' or a huge number: no limit
            return max(int(limit) - usage, 0)
    return None


def available_ram() -> int:
    """Bytes of RAM that can be allocated without swapping: psutil if installed, else /proc/meminfo, capped by the
    cgroup limit."""
    available = None
    try:
        import psutil  # optional; not a dependency
        available = int(psutil.virtual_memory().available)
    except ImportError:
        try:
            match = re.search(r'^MemAvailable:\s+(\d+) kB', Path('/proc/meminfo').read_text(), re.MULTILINE)
            available = int(match.group(1)) * 1024 if match else None
        except OSError:
            pass
    if available is None:
        try:
            available = os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
        except (ValueError, OSError, AttributeError):
            raise RuntimeError('cannot tell how much memory is available on this system; pass --max-memory '
                               'or --tile') from None
    cgroup = _cgroup_available()
    return min(available, cgroup) if cgroup is not None else available


def available_memory(device: torch.device) -> int:
    """Bytes that tensors on ``device`` can still use."""
    if device.type == 'cuda':
        free, _ = torch.cuda.mem_get_info(device)
        # What the caching allocator holds but does not use is free for this process too.
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return available_ram()


@dataclass(frozen=True)
class MemoryModel:
    """Estimated peak memory of one forward pass over a ``h x w`` LR tile: ``fixed + per_pixel * h * w`` bytes."""

    fixed: float
    per_pixel: float

    def peak(self, height: int, width: int) -> float:
        return self.fixed + self.per_pixel * height * width

    def largest_side(self, budget: float, multiple: int) -> int:
        """The largest multiple of ``multiple`` whose square tile fits ``budget`` (0 when not even one window)."""
        if budget <= self.fixed:
            return 0
        side = math.isqrt(int((budget - self.fixed) / max(self.per_pixel, 1e-9)))
        return side // multiple * multiple


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


# ---------------------------------------------------------------------------------------------------------------
# The upscaler
# ---------------------------------------------------------------------------------------------------------------


def _is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, (MemoryError, getattr(torch, 'OutOfMemoryError', MemoryError))):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ('out of memory' in text or "can't allocate memory" in text)


def _network_channels(net: nn.Module) -> tuple[int, int]:
    """(input channels, output channels) of an SR network."""
    first = next((m for m in net.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        raise ValueError(f'{type(net).__name__} has no Conv2d; cannot tell how many image channels it takes')
    in_channels = first.in_channels
    return in_channels, int(getattr(net, 'num_out_ch', in_channels))


class Upscaler:
    """Runs a super-resolution network on whole images in bounded memory.

    Args:
        net: maps [B, C, h, w] in [0, 1] to [B, C', h * scale, w * scale], on ``device``, in eval mode; its
            ``upscale`` attribute is the scale and ``window_size`` (HAT's; 1 when absent, as in SRVGGNetCompact) the
            multiple tiles are rounded to.
        device: where the network runs; images and output canvases stay in host memory.
        precision: ``'fp32'``, ``'bf16'`` or ``'fp16'`` (autocast).
        tile: ``'auto'``, a tile side in LR pixels, or None for whole images.
        tile_pad: half the overlap of neighbouring tiles, LR pixels (capped at a quarter of the tile).
        self_ensemble: average the 8 flips/rotations (x8 the time).
        max_memory: budget in bytes for ``tile='auto'``; default: a share of the free memory (module docstring).
        progress: show a progress bar over the tiles.
    """

    def __init__(self, net: nn.Module, *, device: torch.device | str = 'cpu', precision: str = 'fp32',
                 tile: int | str | None = 'auto', tile_pad: int = DEFAULT_TILE_PAD, self_ensemble: bool = False,
                 max_memory: float | None = None, progress: bool = True) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f'precision must be one of {", ".join(PRECISIONS)}, got {precision!r}')
        if tile != 'auto' and tile is not None and (not isinstance(tile, int) or tile <= 0):
            raise ValueError(f"tile must be 'auto', a positive number of pixels or None, got {tile!r}")
        if tile_pad < 0:
            raise ValueError(f'tile_pad must be non-negative, got {tile_pad}')
        self.net = net
        self.device = torch.device(device)
        self.precision = precision
        self.tile = tile
        self.tile_pad = tile_pad
        self.self_ensemble = self_ensemble
        self.max_memory = max_memory
        self.progress = progress
        self.scale = int(net.upscale)
        self.multiple = int(getattr(net, 'window_size', 1) or 1)
        self.in_channels, self.out_channels = _network_channels(net)
        self._memory_model: MemoryModel | None = None
        self._auto_budget: float | None = None

    # ----- one forward pass -----
    def _autocast(self) -> contextlib.AbstractContextManager:
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        """One tile or whole image: [B, C, h, w] on the host -> [B, C', s*h, s*w] float32 on the host."""
        with torch.inference_mode(), self._autocast():
            out = self.net(x.to(self.device))
        return out.float().cpu()

    # ----- tile size -----
    def memory_model(self) -> MemoryModel:
        """Measure (once) the peak memory of forward passes on two small tiles and fit ``fixed + per_pixel * h * w``."""
        if self._memory_model is None:
            sides = [_round_up(s, self.multiple) for s in CALIBRATION_SIDES]
            if sides[1] <= sides[0]:
                sides[1] = sides[0] + self.multiple
            known = list(self.net.parameters()) + list(self.net.buffers())
            self.forward(torch.rand(1, self.in_channels, self.multiple, self.multiple))  # warm-up: bias caches
            peaks = []
            for side in sides:
                x = torch.rand(1, self.in_channels, side, side)
                peaks.append(measure_peak_memory(lambda: self.forward(x), device=self.device, known=known + [x]))
            per_pixel = max((peaks[1] - peaks[0]) / (sides[1]**2 - sides[0]**2), peaks[1] / sides[1]**2 / 4)
            fixed = max(peaks[0] - per_pixel * sides[0]**2, 0.0)
            self._memory_model = MemoryModel(fixed=fixed, per_pixel=per_pixel)
            logger.debug(f'Memory model: {fixed / 2**20:.1f} MiB + {per_pixel / 1024:.2f} KiB per LR pixel '
                         f'(measured {[round(p / 2**20, 1) for p in peaks]} MiB at {sides} px)')
        return self._memory_model

    def _host_bytes(self, height: int, width: int, channels: int) -> float:
        copies = ENSEMBLE_CANVAS_COPIES if self.self_ensemble else CANVAS_COPIES
        return height * width * self.scale**2 * 4 * (channels + 1) * copies

    def memory_budget(self, height: int, width: int, channels: int) -> float:
        """Bytes the tiles of one ``height x width`` image may use on the device."""
        if self.max_memory is not None:
            budget = float(self.max_memory)
        else:
            if self._auto_budget is None:
                fraction = CUDA_MEMORY_FRACTION if self.device.type == 'cuda' else CPU_MEMORY_FRACTION
                self._auto_budget = available_memory(self.device) * fraction
            budget = self._auto_budget
        if self.device.type == 'cpu':
            budget -= self._host_bytes(height, width, channels)
        return budget

    def tile_for(self, height: int, width: int, channels: int | None = None) -> int | None:
        """The tile side used for an ``height x width`` image, or None for one piece."""
        if self.tile is None:
            return None
        if self.tile != 'auto':
            return None if self.tile >= max(height, width) else int(self.tile)
        channels = self.out_channels if channels is None else channels
        model = self.memory_model()
        budget = self.memory_budget(height, width, channels)
        if model.peak(_round_up(height, self.multiple), _round_up(width, self.multiple)) <= budget:
            return None
        side = model.largest_side(budget, self.multiple)
        if side < self.multiple:
            smallest = model.peak(self.multiple, self.multiple)
            logger.warning(f'--tile auto: {budget / 2**30:.2f} GiB is not enough for one {self.multiple}x'
                           f'{self.multiple} tile (estimated {smallest / 2**30:.2f} GiB); trying it anyway')
            side = self.multiple
        return side

    def _pad_for(self, tile: int) -> int:
        return min(self.tile_pad, tile // 4)

    # ----- whole images -----
    def _run(self, x: Tensor, tile: int | None) -> Tensor:
        def whole(t: Tensor) -> Tensor:
            if tile is None:
                return self.forward(t)
            return tiled_forward(self.forward, t, scale=self.scale, tile_size=tile, tile_pad=self._pad_for(tile),
                                 multiple=self.multiple, progress=self.progress)

        return ensemble_x8(whole, x) if self.self_ensemble else whole(x)

    def _run_adaptive(self, x: Tensor) -> Tensor:
        """Run with the chosen tile; with ``tile='auto'``, halve the tile and retry when memory runs out."""
        height, width = x.shape[-2:]
        tile = self.tile_for(height, width, x.shape[1])
        while True:
            try:
                return self._run(x, tile)
            except Exception as error:  # noqa: BLE001 (only out-of-memory errors are retried)
                if self.tile != 'auto' or not _is_out_of_memory(error):
                    raise
                current = tile or _round_up(max(height, width), self.multiple)
                smaller = max(_round_up(current // 2, self.multiple), self.multiple)
                if smaller >= current:
                    raise
            # Out of the except clause: the error's traceback, which holds the failed tile's tensors, is gone.
            logger.warning(f'Out of memory with {current}-pixel tiles; retrying with {smaller}.')
            tile = smaller
            if self.device.type == 'cuda':
                torch.cuda.empty_cache()

    def upscale(self, pixels: np.ndarray) -> np.ndarray:
        """Super-resolve an image.

        Args:
            pixels: [H, W, C] float32 in [0, 1], C = 1 (grey) or 3 (RGB).
        Returns:
            [H * scale, W * scale, C] float32 (not clipped).
        Raises:
            ImageError: the network produced non-finite values, or channels that cannot be mapped back.
        """
        x = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))[None]
        channels = x.shape[1]
        if channels == self.in_channels:
            inputs = [x]
        elif channels == 1:
            inputs = [x.expand(1, self.in_channels, *x.shape[-2:]).contiguous()]
        elif self.in_channels == 1:
            inputs = [x[:, i:i + 1] for i in range(channels)]  # colour through a grey network: channel by channel
        else:
            raise ImageError(f'the network takes {self.in_channels} channels and the image has {channels}')
        outputs = [self._run_adaptive(t) for t in inputs]
        out = torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]
        if not all_finite(out):
            advice = ' (fp16 overflows in HAT\'s attention: use --precision bf16 or fp32)' \
                if self.precision == 'fp16' else ''
            raise ImageError(f'the network produced NaN or infinite values{advice}')
        if out.shape[1] != channels:
            if channels == 1 and out.shape[1] == 3:
                weights = torch.tensor(LUMA_WEIGHTS).view(1, 3, 1, 1)
                out = (out * weights).sum(dim=1, keepdim=True)
            else:
                raise ImageError(f'the network returns {out.shape[1]} channels for a {channels}-channel image')
        return out[0].permute(1, 2, 0).numpy()

    def upscale_alpha(self, alpha: np.ndarray) -> np.ndarray:
        """Bicubic upscaling of an alpha channel: [H, W] -> [H * scale, W * scale], clipped to [0, 1]."""
        a = torch.from_numpy(np.ascontiguousarray(alpha))[None, None]
        out = F.interpolate(a, scale_factor=self.scale, mode='bicubic', align_corners=False)
        return out[0, 0].clamp_(0, 1).numpy()

    def upscale_picture(self, picture: Picture) -> Picture:
        pixels = self.upscale(picture.pixels)
        alpha = None if picture.alpha is None else self.upscale_alpha(picture.alpha)
        return Picture(pixels=pixels, alpha=alpha, bit_depth=picture.bit_depth)


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def _tile_argument(value: str) -> int | str | None:
    text = value.strip().lower()
    if text == 'auto':
        return 'auto'
    if text in ('0', 'none', 'off'):
        return None
    try:
        tile = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto', 0 (whole images) or a tile side in pixels, got {value!r}")
    if tile < 0:
        raise argparse.ArgumentTypeError(f'the tile side must be positive, got {tile}')
    return tile or None


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f'must be 0 or more, got {number}')
    return number


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f'must be positive, got {value}')
    return number


def default_device() -> str:
    return 'cuda' if torch.cuda.is_available() else 'cpu'


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='hat-upscale',
        description='Super-resolve images with a HAT (any variant) or SRVGGNetCompact checkpoint; the architecture '
        'and scale are read from the checkpoint.',
        epilog='Exit status: 0 all images written, 1 some images failed (reported, the rest processed), '
        '2 bad arguments.')
    parser.add_argument('-i', '--input', type=Path, required=True,
                        help=f'an image, or a folder searched recursively ({" ".join(INPUT_EXTENSIONS)})')
    parser.add_argument('-o', '--output', type=Path, required=True,
                        help='output folder; the input\'s sub-folders are mirrored inside it')
    parser.add_argument('-m', '--model', type=Path, required=True,
                        help='checkpoint (.pth/.safetensors): HAT-S/HAT/HAT-L or a custom HAT, SRVGGNetCompact')
    parser.add_argument('--param-key', default=None,
                        help='entry of the checkpoint holding the weights (default: params_ema, then params)')
    parser.add_argument('--tile', type=_tile_argument, default='auto',
                        help='tile side in LR pixels, "auto" (default: the largest that fits in memory) or 0 (whole '
                        'images)')
    parser.add_argument('--tile-pad', type=_non_negative_int, default=DEFAULT_TILE_PAD,
                        help=f'overlap of neighbouring tiles / 2, in LR pixels (default {DEFAULT_TILE_PAD}; at most a '
                        'quarter of the tile)')
    parser.add_argument('--max-memory', type=_positive_float, default=None, metavar='GIB',
                        help='memory budget of --tile auto, in GiB (default: 80%% of the free GPU memory, 50%% of the '
                        'available RAM on the CPU)')
    parser.add_argument('--precision', choices=tuple(PRECISIONS), default='fp32',
                        help='fp32 (default), bf16 or fp16 (CUDA only) via torch.autocast')
    parser.add_argument('--device', default=None,
                        help=f'torch device (default: cuda if available, else cpu; here {default_device()})')
    parser.add_argument('--suffix', default=DEFAULT_SUFFIX,
                        help=f'appended to each output name; {{scale}} is replaced (default {DEFAULT_SUFFIX!r})')
    parser.add_argument('--ext', default=DEFAULT_EXT, choices=(*OUTPUT_FORMATS, EXT_AUTO), type=str.lower,
                        help=f'output format (default {DEFAULT_EXT}); "auto" keeps each input\'s extension')
    parser.add_argument('--self-ensemble', action='store_true',
                        help='average the outputs of the 8 flips/rotations (x8 slower, slightly better)')
    parser.add_argument('--skip-existing', action='store_true', help='leave images whose output already exists')
    parser.add_argument('-q', '--quiet', action='store_true', help='no progress bars; warnings and errors only')
    return parser


def _resolve_device(name: str | None, precision: str) -> torch.device:
    try:
        device = torch.device(name or default_device())
    except RuntimeError as error:
        raise UsageError(f'--device {name}: {error}') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UsageError(f'--device {name}: CUDA is not available on this machine; use --device cpu')
    if precision == 'fp16' and device.type != 'cuda':
        raise UsageError(f'--precision fp16 needs a CUDA device (this run uses {device}); on the CPU use '
                         '--precision bf16 or fp32')
    if precision == 'bf16' and device.type == 'cuda' and not torch.cuda.is_bf16_supported():
        raise UsageError('--precision bf16: this GPU does not support bfloat16; use fp16 or fp32')
    return device


def load_network(path: Path, *, param_key: str | None, device: torch.device) -> nn.Module:
    """The network of a checkpoint (architecture detected), on ``device`` in eval mode.

    Raises:
        UsageError: missing, unreadable or unrecognised checkpoint.
    """
    try:
        return build_from_checkpoint(path, param_key=param_key, device=device)
    except (FileNotFoundError, ValueError, ImportError) as error:
        raise UsageError(f'-m {path}: {error}') from None


def process(job: Job, upscaler: Upscaler) -> list[str]:
    """Read, upscale and write one image. Returns notes about the output.

    Raises:
        ImageError: for any failure of this image (the message says what and why).
    """
    try:
        picture = read_picture(job.source)
        result = upscaler.upscale_picture(picture)
        return write_picture(job.target, result)
    except ImageError:
        raise
    except Exception as error:  # noqa: BLE001 (an error in one image must not stop the others)
        advice = ' (use a smaller --tile or --max-memory)' if _is_out_of_memory(error) else ''
        first_line = (str(error).strip().splitlines() or ['(no message)'])[0]
        raise ImageError(f'{type(error).__name__}: {first_line}{advice}') from error


def run(args: argparse.Namespace) -> int:
    """Process the parsed command line. Returns the exit status."""
    try:
        device = _resolve_device(args.device, args.precision)
        if not args.model.is_file():
            raise UsageError(f'-m {args.model}: checkpoint not found')
        suffix_template = args.suffix
        if '{' in suffix_template and suffix_template.replace('{scale}', '').count('{'):
            raise UsageError(f'--suffix {suffix_template!r}: the only placeholder is {{scale}}')
        net = load_network(args.model, param_key=args.param_key, device=device)
        upscaler = Upscaler(net, device=device, precision=args.precision, tile=args.tile, tile_pad=args.tile_pad,
                            self_ensemble=args.self_ensemble,
                            max_memory=None if args.max_memory is None else args.max_memory * 2**30,
                            progress=not args.quiet)
        suffix = suffix_template.replace('{scale}', str(upscaler.scale))
        jobs = plan_jobs(args.input, args.output, suffix=suffix, ext=args.ext)
    except UsageError as error:
        logger.error(str(error))
        return EXIT_USAGE
    detected = getattr(net, 'detected', None)
    logger.info(f'{len(jobs)} image(s) -> {args.output} with {detected.summary() if detected else type(net).__name__}'
                f' on {device} ({args.precision}{", self-ensemble" if args.self_ensemble else ""}).')

    failures: list[tuple[Path, str]] = []
    written = skipped = 0
    with logging_redirect_tqdm(loggers=[logging.getLogger()]):
        for job in tqdm(jobs, desc='hat-upscale', unit='image', disable=args.quiet):
            if job.conflict is not None:
                reason = (f'its output {job.target} is also the output of {job.conflict}; use --ext auto or '
                          'rename one of them')
            elif args.skip_existing and job.target.exists():
                skipped += 1
                continue
            else:
                try:
                    for note in process(job, upscaler):
                        logger.warning(f'{job.source}: {note}')
                    written += 1
                    continue
                except ImageError as error:
                    reason = str(error)
            logger.error(f'{job.source}: skipped: {reason}')
            failures.append((job.source, reason))

    summary = f'{written} written' + (f', {skipped} skipped (output exists)' if skipped else '')
    if failures:
        logger.error(f'{summary}, {len(failures)} failed:\n' +
                     '\n'.join(f'  {path}: {reason}' for path, reason in failures))
        return EXIT_FAILED
    logger.info(f'{summary}.')
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """``hat-upscale``: returns the exit status (0 all written, 1 some images failed, 2 bad arguments)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:  # --help (0) or a usage error (2): return it instead of exiting
        return int(exit_request.code or 0)
    level = logging.WARNING if args.quiet else logging.INFO
    if logging.getLogger().handlers:  # called from a program that set logging up: leave it as it is, but ours
        logger.setLevel(level)
    else:
        logging.basicConfig(level=level, format='%(levelname)s: %(message)s')
    with contextlib.suppress(AttributeError):  # OpenCV's own warnings (libtiff, ...) duplicate ours
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    return run(args)


def cli() -> None:
    """Console-script entry point (``hat-upscale``)."""
    sys.exit(main())


if __name__ == '__main__':
    cli()

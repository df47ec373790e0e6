"""Make the GTmod{s} / LRbicx{s} folders of a super-resolution benchmark set from its HR images.

The benchmark protocol: the ground truth is the HR image cropped at the bottom and right to a multiple of the scale
(``modcrop``), and the low-resolution input is MATLAB ``imresize(GTmod, 1/s, 'bicubic')`` on uint8, reproduced here
bit for bit by :func:`hat.utils.matlab_resize.imresize_uint8`. The output layout is the one the official option files
read (``datasets/Set5/GTmod4``, ``datasets/Set5/LRbicx4``)::

    python scripts/prepare_benchmark.py --hr /path/to/Set5/HR --out datasets/Set5 --scales 2 3 4

writes ``datasets/Set5/GTmod{2,3,4}/<name>.png`` and ``datasets/Set5/LRbicx{2,3,4}/<name>.png``. Grey images stay
single-channel and colour images keep their channels as read; only 8-bit images are accepted. Existing files are
overwritten.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Iterable, Sequence

import cv2
import numpy as np
from tqdm import tqdm

from hat.io.images import IMAGE_EXTENSIONS, read_array
from hat.utils.matlab_resize import imresize_uint8

logger = logging.getLogger('prepare_benchmark')

DEFAULT_SCALES = (2, 3, 4)


def list_images(hr_dir: Path) -> list[Path]:
    """The images directly inside ``hr_dir``, sorted by name.

    Raises:
        FileNotFoundError: ``hr_dir`` is not a folder.
        ValueError: no image in it, or two images would write the same ``<stem>.png``.
    """
    if not hr_dir.is_dir():
        raise FileNotFoundError(f'HR folder not found: {hr_dir} (pass the folder holding the high-resolution images '
                                'with --hr)')
    images = sorted(p for p in hr_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise ValueError(f'no images in {hr_dir}: expected files ending in {", ".join(IMAGE_EXTENSIONS)}')
    seen: dict[str, Path] = {}
    for path in images:
        if path.stem in seen:
            raise ValueError(f'{seen[path.stem].name} and {path.name} in {hr_dir} would both be written as '
                             f'{path.stem}.png; rename one of them')
        seen[path.stem] = path
    return images


def read_uint8(path: Path) -> np.ndarray:
    """Read an 8-bit image as stored: [H, W] for grey, [H, W, C] (BGR or BGRA) for colour.

    Raises:
        ValueError: the file cannot be decoded or is not 8 bits per channel.
    """
    img = read_array(path)  # UnreadableImageError (a ValueError) names the file
    if img.dtype != np.uint8:
        bits = img.dtype.itemsize * 8
        raise ValueError(f'{path} has {bits}-bit samples ({img.dtype}); the benchmark protocol is defined on 8-bit '
                         'images, convert it to 8 bits per channel first')
    return img


def modcrop(img: np.ndarray, scale: int) -> np.ndarray:
    """Crop the bottom rows and right columns so that height and width are multiples of ``scale``.

    Args:
        img: [H, W] or [H, W, C].

    Returns:
        [H - H % scale, W - W % scale] or [..., C], a view of ``img``.
    """
    height, width = img.shape[0] - img.shape[0] % scale, img.shape[1] - img.shape[1] % scale
    return img[:height, :width]


def _write(path: Path, img: np.ndarray) -> None:
    if not cv2.imwrite(str(path), img):
        raise OSError(f'could not write {path}')


def prepare_benchmark(hr_dir: Path, out_dir: Path, scales: Iterable[int] = DEFAULT_SCALES) -> int:
    """Write ``out_dir/GTmod{s}/<stem>.png`` and ``out_dir/LRbicx{s}/<stem>.png`` for every image and scale.

    Returns:
        The number of HR images processed.
    """
    scales = sorted(set(scales))
    bad = [s for s in scales if s < 1]
    if bad:
        raise ValueError(f'scales must be positive integers, got {bad}')
    images = list_images(hr_dir)
    for scale in scales:
        (out_dir / f'GTmod{scale}').mkdir(parents=True, exist_ok=True)
        (out_dir / f'LRbicx{scale}').mkdir(parents=True, exist_ok=True)

    for path in tqdm(images, desc=f'{out_dir.name} x{",".join(map(str, scales))}', unit='img'):
        hr = read_uint8(path)
        for scale in scales:
            gt = modcrop(hr, scale)
            if gt.shape[0] == 0 or gt.shape[1] == 0:
                raise ValueError(f'{path} is {hr.shape[1]}x{hr.shape[0]} pixels, smaller than the scale {scale}')
            _write(out_dir / f'GTmod{scale}' / f'{path.stem}.png', gt)
            _write(out_dir / f'LRbicx{scale}' / f'{path.stem}.png', imresize_uint8(gt, 1.0 / scale))
    return len(images)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description='Create GTmod{s} (HR cropped to a multiple of s) and LRbicx{s} (MATLAB-exact bicubic '
        'downscaling by s) folders of a super-resolution benchmark set.',
        epilog='Example: python scripts/prepare_benchmark.py --hr ~/sr_benchmarks/Set5/HR --out datasets/Set5')
    parser.add_argument('--hr', type=Path, required=True,
                        help=f'folder of high-resolution images ({", ".join(IMAGE_EXTENSIONS)}; 8-bit only)')
    parser.add_argument('--out', type=Path, required=True,
                        help='set folder to write GTmod{s}/ and LRbicx{s}/ into, e.g. datasets/Set5')
    parser.add_argument('--scales', type=int, nargs='+', default=list(DEFAULT_SCALES),
                        help='integer scale factors (default: 2 3 4)')
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point. Returns the exit status: 0 on success, 1 on a problem with the input."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(levelname)s: %(message)s')
    try:
        count = prepare_benchmark(args.hr, args.out, args.scales)
    except (FileNotFoundError, ValueError, OSError) as err:
        logger.error('%s', err)
        return 1
    scales = ' '.join(str(s) for s in sorted(set(args.scales)))
    logger.info('%d images, scales %s: wrote %s/GTmod{s} and %s/LRbicx{s}', count, scales, args.out, args.out)
    return 0


if __name__ == '__main__':
    sys.exit(main())

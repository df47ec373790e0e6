"""Cut large training images into overlapping sub-images, for faster loading during training.

DF2K images are 2K pixels wide; a training step needs one 256 (or 192, 128) pixel patch of each. Reading and decoding
a whole 2K PNG for one patch makes the data loader the bottleneck, so BasicSR's recipe cuts each image once into
480x480 tiles every 240 pixels (HR) and the matching tiles of the bicubic LR images (120x120 every 60 for x4).

Tiles of image ``name.ext`` are written as ``name_s001.png``, ``name_s002.png``, ... (row-major), lossless PNG
whatever the input format, so the HR and LR folders get the same names and pair up. DIV2K/Flickr2K name their LR
images ``0001x4.png``: ``--strip-suffix x4`` (the default of ``--preset lrx4``) writes ``0001_s001.png`` like the HR
side. A last row/column of tiles is
added flush with the bottom/right border when more than ``--thresh-size`` pixels would otherwise be left uncovered.
Images with a side shorter than the crop size are skipped with a warning.

Examples (BasicSR's DF2K recipe)::

    python scripts/extract_subimages.py --input datasets/DF2K/DF2K_HR --output datasets/DF2K/DF2K_HR_sub --preset hr
    python scripts/extract_subimages.py --input datasets/DF2K/DF2K_LR_bicubic/X4 \\
        --output datasets/DF2K/DF2K_LR_bicubic/X4_sub --preset lrx4

    # any folder of photos, own sizes
    python scripts/extract_subimages.py --input ~/photos --output datasets/photos_sub --crop-size 512 --step 256
"""
from __future__ import annotations

import argparse
import logging
import os
import os.path as osp
import sys
from multiprocessing import Pool
from typing import Optional, Sequence

import cv2
import numpy as np
from tqdm import tqdm

from hat.data.gt_source import list_images
from hat.io.images import IMAGE_EXTENSIONS, read_array

logger = logging.getLogger('extract_subimages')


# (crop_size, step, thresh_size) of BasicSR's DF2K recipe: HR 480/240/0, LR xN the same divided by N.
PRESETS = {
    'hr': (480, 240, 0),
    'lrx2': (240, 120, 0),
    'lrx3': (160, 80, 0),
    'lrx4': (120, 60, 0),
}


def tile_starts(length: int, crop_size: int, step: int, thresh_size: int) -> list[int]:
    """Start offsets of the tiles along one side of ``length`` pixels (empty when ``length < crop_size``)."""
    if length < crop_size:
        return []
    starts = list(range(0, length - crop_size + 1, step))
    if length - (starts[-1] + crop_size) > thresh_size:
        starts.append(length - crop_size)
    return starts


def extract_one(task: tuple[str, str, str, int, int, int, int, str]) -> tuple[str, int]:
    """Cut one image into tiles. Returns its relative path and the number of tiles written (-1: too small)."""
    input_folder, rel_path, output_folder, crop_size, step, thresh_size, compression, strip_suffix = task
    img = read_array(osp.join(input_folder, rel_path))
    h, w = img.shape[:2]
    tops = tile_starts(h, crop_size, step, thresh_size)
    lefts = tile_starts(w, crop_size, step, thresh_size)
    if not tops or not lefts:
        return rel_path, -1
    stem = osp.splitext(rel_path)[0]
    if strip_suffix and stem.endswith(strip_suffix):
        stem = stem[:-len(strip_suffix)]
    out_dir = osp.join(output_folder, osp.dirname(rel_path))
    os.makedirs(out_dir, exist_ok=True)
    index = 0
    for top in tops:
        for left in lefts:
            index += 1
            tile = np.ascontiguousarray(img[top:top + crop_size, left:left + crop_size, ...])
            out_path = osp.join(output_folder, f'{stem}_s{index:03d}.png')
            if not cv2.imwrite(out_path, tile, [cv2.IMWRITE_PNG_COMPRESSION, compression]):
                raise OSError(f'cannot write {out_path}')
    return rel_path, index


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description='Cut the images of a folder into overlapping square sub-images (PNG), keeping sub-folders.',
        epilog='DF2K recipe: --preset hr for the HR folder, --preset lrx2/lrx3/lrx4 for the bicubic LR folders.')
    parser.add_argument('--input', required=True, help='folder of source images (searched recursively)')
    parser.add_argument('--output', required=True, help='folder for the sub-images; must not exist or be empty')
    parser.add_argument('--preset', choices=sorted(PRESETS),
                        help='crop/step/thresh of BasicSR\'s DF2K recipe: ' +
                        ', '.join(f'{k}={v[0]}/{v[1]}/{v[2]}' for k, v in PRESETS.items()))
    parser.add_argument('--crop-size', type=int, help='side of a sub-image in pixels (default 480, or the preset\'s)')
    parser.add_argument('--step', type=int, help='distance between sub-images in pixels (default 240)')
    parser.add_argument('--thresh-size', type=int,
                        help='add a border-flush last row/column of tiles when more than this many pixels would be '
                        'left uncovered (default 0: always cover the whole image)')
    parser.add_argument('--strip-suffix',
                        help='remove this ending from image names before adding _sNNN (default: xN for --preset '
                        'lrxN, matching DIV2K\'s 0001xN.png LR names to 0001.png; nothing otherwise)')
    parser.add_argument('--n-thread', type=int, default=min(8, os.cpu_count() or 1),
                        help='worker processes (default: min(8, CPU cores))')
    parser.add_argument('--compression-level', type=int, default=3, choices=range(10), metavar='0-9',
                        help='PNG compression level, 0 (fast, large) to 9 (slow, small); default 3')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    crop_size, step, thresh_size = PRESETS[args.preset] if args.preset else PRESETS['hr']
    crop_size = args.crop_size if args.crop_size is not None else crop_size
    step = args.step if args.step is not None else step
    thresh_size = args.thresh_size if args.thresh_size is not None else thresh_size
    strip_suffix = args.strip_suffix
    if strip_suffix is None:
        strip_suffix = args.preset[2:] if args.preset and args.preset.startswith('lr') else ''
    if crop_size <= 0 or step <= 0 or thresh_size < 0 or args.n_thread <= 0:
        logger.error('crop size, step and n-thread must be positive and thresh size >= 0')
        return 2
    if not osp.isdir(args.input):
        logger.error('input folder not found: %s', args.input)
        return 1
    if osp.isdir(args.output) and os.listdir(args.output):
        logger.error('output folder %s already exists and is not empty; remove it or choose another', args.output)
        return 1
    images = list_images(args.input)
    if not images:
        logger.error('no image (%s) found in %s', ', '.join(IMAGE_EXTENSIONS), args.input)
        return 1
    os.makedirs(args.output, exist_ok=True)
    logger.info('Cutting %d images from %s into %dx%d sub-images every %d pixels (thresh %d) -> %s',
                len(images), args.input, crop_size, crop_size, step, thresh_size, args.output)

    tasks = [(args.input, rel, args.output, crop_size, step, thresh_size, args.compression_level, strip_suffix)
             for rel in images]
    results = []
    try:
        with tqdm(total=len(tasks), unit='image') as pbar:
            if args.n_thread == 1:
                for task in tasks:
                    results.append(extract_one(task))
                    pbar.update(1)
            else:
                with Pool(args.n_thread) as pool:
                    for result in pool.imap_unordered(extract_one, tasks, chunksize=4):
                        results.append(result)
                        pbar.update(1)
    except OSError as err:
        logger.error('%s', err)
        return 1

    skipped = sorted(rel for rel, count in results if count < 0)
    for rel in skipped:
        logger.warning('skipped %s: a side is shorter than the crop size %d', rel, crop_size)
    written = sum(count for _, count in results if count > 0)
    logger.info('Wrote %d sub-images from %d images (%d skipped) to %s', written, len(results) - len(skipped),
                len(skipped), args.output)
    return 0


if __name__ == '__main__':
    sys.exit(main())

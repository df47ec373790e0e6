"""Write a meta_info file for a folder of training images: one ``relative/path.ext (h,w,c)`` line per image, sorted.

The training datasets (``ImageNetPairedDataset``, ``RealESRGANDataset``, basicsr's ``PairedImageDataset``) read the
first token of each line as an image path relative to ``dataroot_gt`` and use exactly the images listed: point
``meta_info_file`` at the output to train on a fixed list, or on a subset of a folder after editing the list. The
``(h,w,c)`` part is BasicSR's format and is only informational. Sizes come from the image headers (no decoding), so
the 1.28 million images of ImageNet take minutes, not hours.

Examples::

    python scripts/generate_meta_info.py --input datasets/DF2K/DF2K_HR_sub \
        --output hat/data/meta_info/meta_info_DF2Ksub_GT.txt
    python scripts/generate_meta_info.py --input datasets/ImageNet/GT \
        --output hat/data/meta_info/meta_info_ImageNet_GT.txt
"""
from __future__ import annotations

import argparse
import logging
import os
import os.path as osp
import sys
from typing import Optional, Sequence

from tqdm import tqdm

from hat.data.gt_source import list_images
from hat.io.images import IMAGE_EXTENSIONS, UnreadableImageError, image_header

logger = logging.getLogger('generate_meta_info')


def image_shape(path: str) -> tuple[int, int, int]:
    """``(height, width, channels)`` of an image file, read from its header."""
    header = image_header(path)
    return header.height, header.width, header.channels


def meta_info_lines(folder: str, names: Sequence[str]) -> list[str]:
    """The meta_info lines of ``names`` (paths relative to ``folder``)."""
    lines = []
    for name in tqdm(names, unit='image'):
        h, w, c = image_shape(osp.join(folder, name))
        lines.append(f'{name} ({h},{w},{c})')
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description='Write a BasicSR meta_info file ("name (h,w,c)" per line, sorted) for a folder of images.')
    parser.add_argument('--input', required=True, help='folder of images (searched recursively); the names in the '
                        'file are relative to it, so use the same folder as dataroot_gt')
    parser.add_argument('--output', required=True, help='meta_info .txt file to write (its folder is created)')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    if not osp.isdir(args.input):
        logger.error('input folder not found: %s', args.input)
        return 1
    names = list_images(args.input)
    if not names:
        logger.error('no image (%s) found in %s', ', '.join(IMAGE_EXTENSIONS), args.input)
        return 1
    spaced = [name for name in names if any(ch.isspace() for ch in name)]
    if spaced:
        logger.error('%d image paths contain white space, which the meta_info format cannot hold (first: %r); '
                     'rename them', len(spaced), spaced[0])
        return 1
    try:
        lines = meta_info_lines(args.input, names)
    except (OSError, UnreadableImageError) as err:
        logger.error('cannot read an image header: %s', err)
        return 1
    out_dir = osp.dirname(osp.abspath(args.output))
    os.makedirs(out_dir, exist_ok=True)
    with open(args.output, 'w', encoding='utf-8') as f:
        f.write('\n'.join(lines) + '\n')
    logger.info('Wrote %d lines to %s', len(lines), args.output)
    return 0


if __name__ == '__main__':
    sys.exit(main())

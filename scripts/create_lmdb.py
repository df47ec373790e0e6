"""Pack a folder of training images (GT only, or GT plus LQ) into lmdb databases in BasicSR's format.

An lmdb holds a whole folder in one memory-mapped file, which reads much faster than millions of small files on
network or spinning disks. Each database is a folder ``*.lmdb`` with ``data.mdb``, ``lock.mdb`` and ``meta_info.txt``;
the latter has one ``key.png (h,w,c) compression_level`` line per image. The key of ``a/b.jpg`` is ``a/b`` and the
stored value is the image re-encoded as PNG (lossless), which is what basicsr's ``LmdbBackend``, ``PairedImageDataset``
and this project's training datasets expect (``io_backend: {type: lmdb}``, ``dataroot_gt: path/to/GT.lmdb``).

With ``--lq``, the two folders must hold the same image names (as the sub-images of ``extract_subimages.py`` do), and
both databases get the same keys in the same order, as ``PairedImageDataset`` requires.

Examples::

    python scripts/create_lmdb.py --gt datasets/ImageNet/GT
    python scripts/create_lmdb.py --gt datasets/DF2K/DF2K_HR_sub --lq datasets/DF2K/DF2K_LR_bicubic/X4_sub
"""
from __future__ import annotations

import argparse
import logging
import os.path as osp
import sys
from typing import Optional, Sequence

import hat  # noqa: F401  (makes basicsr importable; must precede it)
from basicsr.utils.lmdb_util import make_lmdb_from_imgs  # noqa: E402
from hat.data.gt_source import list_images  # noqa: E402
from hat.io.images import IMAGE_EXTENSIONS, image_header  # noqa: E402

logger = logging.getLogger('create_lmdb')

# lmdb reserves its whole map up front (sparse on Linux) and fails when full; PNG can exceed the raw pixel size by a
# little, so reserve the raw size with a margin.
_MAP_SIZE_FACTOR = 1.5
_MAP_SIZE_MARGIN = 64 * 1024 ** 2


def lmdb_key(rel_path: str) -> str:
    """The lmdb key of an image: its relative path without extension."""
    return osp.splitext(rel_path)[0]


def check_keys(keys: Sequence[str], folder: str) -> Optional[str]:
    """An error message when some keys cannot be stored, else None.

    Readers split each ``meta_info.txt`` line at the first dot to get the key back, so a key may hold no dot; lmdb
    keys are ASCII and at most 511 bytes.
    """
    bad = [k for k in keys if '.' in k or not k.isascii() or len(k) > 511 or any(ch.isspace() for ch in k)]
    if bad:
        return (f'{len(bad)} images of {folder} have names that cannot be lmdb keys (a dot besides the extension, '
                f'non-ASCII, white space or too long), e.g. {bad[:3]}; rename them first')
    seen: set[str] = set()
    duplicates = sorted({k for k in keys if k in seen or seen.add(k)})
    if duplicates:
        return (f'{len(duplicates)} names of {folder} exist with two extensions and would share a key, e.g. '
                f'{duplicates[:3]}; keep one file of each')
    return None


def estimate_map_size(folder: str, rel_paths: Sequence[str]) -> int:
    """Bytes to reserve for the lmdb of these images, from their header sizes (raw pixels with a margin)."""
    total = 0
    for rel in rel_paths:
        header = image_header(osp.join(folder, rel))
        total += header.width * header.height * header.channels * header.bit_depth // 8
    return int(total * _MAP_SIZE_FACTOR) + _MAP_SIZE_MARGIN


def default_lmdb_path(folder: str) -> str:
    return osp.normpath(folder) + '.lmdb'


def make_lmdb(folder: str, lmdb_path: str, rel_paths: Sequence[str], *, compression_level: int, n_thread: int,
              batch: int) -> None:
    """Write one database with basicsr's ``make_lmdb_from_imgs`` (same file layout as BasicSR's own script)."""
    keys = [lmdb_key(p) for p in rel_paths]
    map_size = estimate_map_size(folder, rel_paths)
    logger.info('Packing %d images of %s into %s (map size %.1f GiB)', len(rel_paths), folder, lmdb_path,
                map_size / 1024 ** 3)
    make_lmdb_from_imgs(folder, lmdb_path, list(rel_paths), keys, batch=batch, compress_level=compression_level,
                        multiprocessing_read=n_thread > 1, n_thread=n_thread, map_size=map_size)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description='Pack a folder of images (GT only, or GT + LQ pairs) into lmdb databases in BasicSR\'s format '
        '(data.mdb, lock.mdb, meta_info.txt with "key.png (h,w,c) level" lines).')
    parser.add_argument('--gt', required=True, help='folder of GT images (searched recursively)')
    parser.add_argument('--lq', help='optional folder of LQ images with the same names as the GT ones')
    parser.add_argument('--gt-lmdb', help='output for the GT database, must end with .lmdb (default: GT folder + '
                        '.lmdb)')
    parser.add_argument('--lq-lmdb', help='output for the LQ database (default: LQ folder + .lmdb)')
    parser.add_argument('--compression-level', type=int, default=1, choices=range(10), metavar='0-9',
                        help='PNG compression of the stored images, 0-9 (default 1: BasicSR\'s, fast to decode)')
    parser.add_argument('--n-thread', type=int, default=1,
                        help='processes that read the images; above 1 all images of a folder are held in memory '
                        'first (default 1: read one by one)')
    parser.add_argument('--batch', type=int, default=5000, help='images per lmdb transaction (default 5000)')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    jobs = [('GT', args.gt, args.gt_lmdb or default_lmdb_path(args.gt))]
    if args.lq:
        jobs.append(('LQ', args.lq, args.lq_lmdb or default_lmdb_path(args.lq)))
    elif args.lq_lmdb:
        logger.error('--lq-lmdb needs --lq')
        return 2
    if args.n_thread < 1 or args.batch < 1:
        logger.error('--n-thread and --batch must be >= 1')
        return 2

    listed = {}
    for role, folder, lmdb_path in jobs:
        if not osp.isdir(folder):
            logger.error('%s folder not found: %s', role, folder)
            return 1
        if not lmdb_path.endswith('.lmdb'):
            logger.error('the %s lmdb path must end with .lmdb (basicsr reads only such folders): %s', role, lmdb_path)
            return 1
        if osp.exists(lmdb_path):
            logger.error('%s already exists; remove it or choose another output', lmdb_path)
            return 1
        rel_paths = list_images(folder)
        if not rel_paths:
            logger.error('no image (%s) found in %s', ', '.join(IMAGE_EXTENSIONS), folder)
            return 1
        message = check_keys([lmdb_key(p) for p in rel_paths], folder)
        if message:
            logger.error('%s', message)
            return 1
        listed[role] = rel_paths

    if 'LQ' in listed:
        gt_keys = [lmdb_key(p) for p in listed['GT']]
        lq_keys = [lmdb_key(p) for p in listed['LQ']]
        if gt_keys != lq_keys:
            only_gt = sorted(set(gt_keys) - set(lq_keys))
            only_lq = sorted(set(lq_keys) - set(gt_keys))
            logger.error('GT and LQ folders do not hold the same image names: %d only in GT (e.g. %s), %d only in LQ '
                         '(e.g. %s)', len(only_gt), only_gt[:3], len(only_lq), only_lq[:3])
            return 1

    for role, folder, lmdb_path in jobs:
        make_lmdb(folder, lmdb_path, listed[role], compression_level=args.compression_level, n_thread=args.n_thread,
                  batch=args.batch)
    logger.info('Done: %s', ', '.join(path for _, _, path in jobs))
    return 0


if __name__ == '__main__':
    sys.exit(main())

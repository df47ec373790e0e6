"""PairedImageDataset: basicsr's GT/LQ pair dataset, with its input checked.

Every test, validation and DF2K training entry of the official option files is ``type: PairedImageDataset``. This
class takes over that name in ``DATASET_REGISTRY`` (see :func:`replace_registry_entry`), so those files run
unchanged and get the checks. On good data it is basicsr's dataset: the same paths in the same order, the same
keys, crops, flips and rotations (the same random numbers drawn in the same order) and the same tensors. What it
adds:

When it is built, before any training starts:
- ``dataroot_gt`` / ``dataroot_lq`` must exist (for lmdb: be ``*.lmdb`` folders with ``data.mdb`` and
  ``meta_info.txt``); a ``meta_info_file`` must exist, and every GT and LQ file it lists must exist;
- without a meta_info file, every GT file needs its LQ file (``filename_tmpl``) and the other way round;
- the options each phase needs (``scale``, ``gt_size``, ``use_hflip``, ``use_rot``) must be present.

When an item is read:
- an image that does not decode raises :class:`~hat.data.errors.UnreadableImageError` (with ``.path``);
- a GT/LQ pair whose sizes do not fit the scale raises :class:`~hat.data.errors.ImagePairSizeError` with both
  files and sizes. Training needs GT = LQ x scale exactly (as basicsr's paired crop); validation also accepts up to
  ``scale - 1`` extra GT rows/columns, which basicsr crops away (an HR image that was not mod-cropped). A larger GT,
  which basicsr would silently crop to its top-left corner, is an error: usually the LQ folder of another scale;
- 16-bit, grey and RGBA images are read as 8-bit BGR like basicsr, and reported once per data set.
"""
from __future__ import annotations

import logging
import os
import os.path as osp
from typing import Any, Mapping

import numpy as np
from basicsr.data.paired_image_dataset import PairedImageDataset as BasicsrPairedImageDataset
from basicsr.data.transforms import augment, paired_random_crop
from basicsr.utils import FileClient, bgr2ycbcr, img2tensor, scandir
from basicsr.utils.registry import DATASET_REGISTRY, Registry
from torch import Tensor
from torchvision.transforms.functional import normalize

from hat.data.errors import ImagePairSizeError
from hat.data.image_reading import ConversionLog, read_image
from hat.io.images import IMAGE_EXTENSIONS

logger = logging.getLogger('basicsr')

# How many offending entries an error message names before it only counts the rest.
MAX_NAMED = 5
PREPARE_HINT = 'see datasets/README.md for the expected layout (scripts/prepare_benchmark.py makes benchmark pairs)'


def replace_registry_entry(registry: Registry, obj: type) -> None:
    """Register ``obj`` under its class name, replacing what is registered there.

    basicsr's ``Registry.register`` asserts that a name is new. Our checked datasets must answer to basicsr's own
    names (``PairedImageDataset``, ``SingleImageDataset``), because the shipped and official option files say
    ``type: PairedImageDataset`` and must keep working unchanged; so the entry is replaced explicitly instead.
    """
    registry._obj_map[obj.__name__] = obj  # noqa: SLF001  (Registry has no public way to replace an entry)


def name_some(items: list[str]) -> str:
    """``'a', 'b', 'c' and 7 more``."""
    named = ', '.join(repr(i) for i in items[:MAX_NAMED])
    return named + (f' and {len(items) - MAX_NAMED} more' if len(items) > MAX_NAMED else '')


def require_options(opt: Mapping[str, Any], keys: tuple[str, ...], *, dataset: str, why: str) -> None:
    missing = [k for k in keys if k not in opt]
    if missing:
        raise KeyError(f'{dataset}: the dataset options need {", ".join(missing)} ({why})')


def check_backend(opt: Mapping[str, Any], *, dataset: str) -> str:
    """The ``io_backend`` type, checked against basicsr's FileClient backends."""
    backend = opt.get('io_backend')
    if not isinstance(backend, Mapping) or 'type' not in backend:
        raise KeyError(f'{dataset}: the dataset options need io_backend: {{type: disk}} (or lmdb)')
    if backend['type'] not in FileClient._backends:  # noqa: SLF001
        raise ValueError(f'{dataset}: io_backend type {backend["type"]!r} is not supported; use one of '
                         f'{", ".join(FileClient._backends)}')  # noqa: SLF001
    return backend['type']


def check_folder(folder: Any, *, key: str, dataset: str) -> str:
    """``folder`` (the value of option ``key``) must be an existing folder."""
    if not folder:
        raise KeyError(f'{dataset}: the dataset options need {key} (a folder of images)')
    folder = str(folder)
    if not osp.isdir(folder):
        what = 'is a file, not a folder' if osp.exists(folder) else 'does not exist'
        raise FileNotFoundError(f'{dataset}: {key} {folder} {what} (working directory {os.getcwd()}); fix {key} in '
                                f'the option file or put the images there; {PREPARE_HINT}')
    return folder


def check_lmdb(folder: str, *, key: str, dataset: str) -> None:
    """``folder`` must be an lmdb made by scripts/create_lmdb.py."""
    if not folder.endswith('.lmdb'):
        raise ValueError(f'{dataset}: with io_backend type lmdb, {key} must be a *.lmdb folder, got {folder}')
    for name in ('data.mdb', 'meta_info.txt'):
        if not osp.isfile(osp.join(folder, name)):
            raise FileNotFoundError(f'{dataset}: {key} {folder} is not an lmdb made by scripts/create_lmdb.py '
                                    f'({name} is missing)')


def read_meta_info_names(meta_info_file: str, *, dataset: str) -> list[tuple[int, str]]:
    """(line number, first token) of every line, as basicsr reads them; blank lines are errors (basicsr would turn
    them into the folder itself)."""
    if not osp.isfile(meta_info_file):
        raise FileNotFoundError(f'{dataset}: meta_info_file {meta_info_file} does not exist (write one with '
                                'scripts/generate_meta_info.py, or remove meta_info_file to use every image of the '
                                'folder)')
    with open(meta_info_file, encoding='utf-8') as handle:
        entries = [(number, line.strip().split(' ')[0]) for number, line in enumerate(handle, start=1)]
    blank = [str(number) for number, name in entries if not name]
    if blank:
        raise ValueError(f'{dataset}: meta_info_file {meta_info_file} has blank lines ({", ".join(blank[:MAX_NAMED])}'
                         f'{" ..." if len(blank) > MAX_NAMED else ""}); remove them')
    if not entries:
        raise ValueError(f'{dataset}: meta_info_file {meta_info_file} lists no image')
    return entries


def warn_non_images(folder: str, names: list[str], *, dataset: str) -> None:
    """basicsr takes every (non-hidden) file of a folder; say which ones do not look like images."""
    odd = sorted(n for n in names if not n.lower().endswith(IMAGE_EXTENSIONS))
    if odd:
        logger.warning(f'{dataset}: {folder} holds files without an image extension ({name_some(odd)}); every file '
                       'of the folder is part of the data set, and reading these will fail unless they are images. '
                       'Move them out of the folder.')


def lq_file_name(gt_name: str, template: str) -> str:
    """The LQ file name paired with a GT file: ``filename_tmpl`` applied to its base name, with its extension."""
    base, ext = osp.splitext(osp.basename(gt_name))
    return f'{template.format(base)}{ext}'


def gt_fits_for_validation(gt_size: tuple[int, int], lq_size: tuple[int, int], scale: int) -> bool:
    """Whether a (H, W) GT pairs with a (H, W) LQ outside training: ``scale * LQ`` plus at most ``scale - 1`` rows
    and columns, which are cropped away (an HR image that was not mod-cropped)."""
    return all(0 <= g - scale * q < scale for g, q in zip(gt_size, lq_size))


class PairedImageDataset(BasicsrPairedImageDataset):
    """GT/LQ image pairs from two folders (or lmdbs, or a meta_info file), checked; see the module docstring.

    Options (``datasets.<phase>``; ``scale`` and ``phase`` are added by the pipeline): as basicsr's --
        dataroot_gt, dataroot_lq: folders (``*.lmdb`` folders for ``io_backend: {type: lmdb}``).
        io_backend: ``{type: disk}`` or ``{type: lmdb}``.
        meta_info_file: optional list of GT images (paths relative to ``dataroot_gt``); the LQ file of ``a/b.png`` is
            ``dataroot_lq/<filename_tmpl of b>.png``.
        filename_tmpl: LQ file name from the GT base name, default ``'{}'``.
        gt_size, use_hflip, use_rot: patch size and augmentation (train phase).
        color: ``y`` for Y-channel tensors; mean, std: optional normalisation.

    Items: ``{'lq': [C, h, w], 'gt': [C, H, W], 'lq_path': str, 'gt_path': str}``, float32 RGB in [0, 1]; in
    training ``H = h * scale = gt_size``, otherwise the GT is cropped to ``h * scale, w * scale``.
    """

    def __init__(self, opt: dict[str, Any]) -> None:
        self.name = str(opt.get('name', type(self).__name__))
        require_options(opt, ('scale', 'phase'), dataset=self.name,
                        why='the pipeline sets them: scale from the top level of the option file, phase from the '
                        'name of the datasets entry')
        if opt.get('phase') == 'train':
            require_options(opt, ('gt_size', 'use_hflip', 'use_rot'), dataset=self.name,
                            why='the patch size and augmentation of a training set')
        backend = check_backend(opt, dataset=self.name)
        gt_folder = check_folder(opt.get('dataroot_gt'), key='dataroot_gt', dataset=self.name)
        lq_folder = check_folder(opt.get('dataroot_lq'), key='dataroot_lq', dataset=self.name)
        template = opt.get('filename_tmpl', '{}')
        if backend == 'lmdb':
            check_lmdb(gt_folder, key='dataroot_gt', dataset=self.name)
            check_lmdb(lq_folder, key='dataroot_lq', dataset=self.name)
        elif opt.get('meta_info_file') is not None:
            self._check_meta_info(str(opt['meta_info_file']), gt_folder, lq_folder, template)
        elif backend == 'disk':
            self._check_folder_pairs(gt_folder, lq_folder, template)
        super().__init__(opt)
        if not self.paths:
            raise ValueError(f'{self.name}: no image pair found in {gt_folder} and {lq_folder}')
        self.conversions = ConversionLog(self.name)

    def _check_meta_info(self, meta_info_file: str, gt_folder: str, lq_folder: str, template: str) -> None:
        problems = []
        for number, name in read_meta_info_names(meta_info_file, dataset=self.name):
            lq_name = lq_file_name(name, template)
            if not osp.isfile(osp.join(gt_folder, name)):
                problems.append(f'line {number}: {name} (no such file in {gt_folder})')
            elif not osp.isfile(osp.join(lq_folder, lq_name)):
                problems.append(f'line {number}: {name} (its LQ file {lq_name} is not in {lq_folder})')
        if problems:
            raise FileNotFoundError(f'{self.name}: {len(problems)} entries of meta_info_file {meta_info_file} have no '
                                    f'file: {"; ".join(problems[:MAX_NAMED])}'
                                    f'{f"; and {len(problems) - MAX_NAMED} more" if len(problems) > MAX_NAMED else ""}'
                                    '. Regenerate the meta_info file (scripts/generate_meta_info.py) or fix the '
                                    'folders in the option file.')

    def _check_folder_pairs(self, gt_folder: str, lq_folder: str, template: str) -> None:
        gt_names, lq_names = list(scandir(gt_folder)), set(scandir(lq_folder))
        if not gt_names:
            raise ValueError(f'{self.name}: dataroot_gt {gt_folder} holds no image file; {PREPARE_HINT}')
        expected = {lq_file_name(name, template): name for name in gt_names}
        no_lq = sorted(f'{gt} (expected {lq})' if lq != gt else gt for lq, gt in expected.items() if lq not in lq_names)
        no_gt = sorted(lq_names - set(expected))
        if no_lq or no_gt:
            parts = []
            if no_lq:
                parts.append(f'{len(no_lq)} GT images have no LQ file in {lq_folder}: {name_some(no_lq)}')
            if no_gt:
                parts.append(f'{len(no_gt)} files of {lq_folder} have no GT file in {gt_folder}: {name_some(no_gt)}')
            raise FileNotFoundError(f'{self.name}: the GT and LQ folders do not pair up (every GT file needs the LQ '
                                    f'file of the same name, filename_tmpl {template!r}): ' + '; '.join(parts)
                                    + f'. Remove the extra files or regenerate the LQ folder; {PREPARE_HINT}.')
        warn_non_images(gt_folder, gt_names, dataset=self.name)

    def _read(self, path: str, client_key: str) -> np.ndarray:
        where = self.gt_folder if client_key == 'gt' else self.lq_folder
        img, conversions = read_image(self.file_client, path, client_key, role=f'{client_key.upper()} image',
                                      where=where if self.file_client.backend == 'lmdb' else None)
        self.conversions.note(path, conversions)
        return img

    def check_pair_sizes(self, img_gt: np.ndarray, img_lq: np.ndarray, gt_path: str, lq_path: str) -> None:
        """Raise :class:`ImagePairSizeError` unless the GT fits the LQ at this scale (see the module docstring)."""
        scale = int(self.opt['scale'])
        gt_size, lq_size = tuple(img_gt.shape[:2]), tuple(img_lq.shape[:2])
        expected = (lq_size[0] * scale, lq_size[1] * scale)
        training = self.opt['phase'] == 'train'
        if training:
            fits = gt_size == expected
            rule = 'exactly, as training crops aligned patches'
        else:
            fits = gt_fits_for_validation(gt_size, lq_size, scale)
            rule = f'(up to {scale - 1} more rows/columns, which are cropped)'
        if not fits:
            raise ImagePairSizeError(
                f'{self.name}: GT image {gt_path} is {gt_size[0]}x{gt_size[1]} (HxW) and LQ image {lq_path} is '
                f'{lq_size[0]}x{lq_size[1]}; at scale {scale} the GT must be {expected[0]}x{expected[1]} {rule}. Check '
                f'that dataroot_lq holds the x{scale} downscales of dataroot_gt (e.g. LRbicx{scale} with GTmod{scale}) '
                f'and that scale is right; {PREPARE_HINT}.',
                gt_path=gt_path, lq_path=lq_path, gt_size=gt_size, lq_size=lq_size, scale=scale)
        if training:
            patch = int(self.opt['gt_size']) // scale
            if min(lq_size) < patch:
                raise ImagePairSizeError(
                    f'{self.name}: LQ image {lq_path} is {lq_size[0]}x{lq_size[1]}, smaller than the LQ patch '
                    f'{patch}x{patch} (gt_size {self.opt["gt_size"]} / scale {scale}); remove the pair ({gt_path}, '
                    f'{lq_path}) from the training set or lower gt_size.',
                    gt_path=gt_path, lq_path=lq_path, gt_size=gt_size, lq_size=lq_size, scale=scale)

    def __getitem__(self, index: int) -> dict[str, Tensor | str]:
        if self.file_client is None:
            self.file_client = FileClient(self.io_backend_opt.pop('type'), **self.io_backend_opt)
        scale = self.opt['scale']
        gt_path, lq_path = self.paths[index]['gt_path'], self.paths[index]['lq_path']
        img_gt = self._read(gt_path, 'gt')
        img_lq = self._read(lq_path, 'lq')
        self.check_pair_sizes(img_gt, img_lq, gt_path, lq_path)

        # From here on, basicsr's steps in basicsr's order (same random draws, same results).
        if self.opt['phase'] == 'train':
            img_gt, img_lq = paired_random_crop(img_gt, img_lq, self.opt['gt_size'], scale, gt_path)
            img_gt, img_lq = augment([img_gt, img_lq], self.opt['use_hflip'], self.opt['use_rot'])
        if self.opt.get('color') == 'y':
            img_gt = bgr2ycbcr(img_gt, y_only=True)[..., None]
            img_lq = bgr2ycbcr(img_lq, y_only=True)[..., None]
        if self.opt['phase'] != 'train':
            img_gt = img_gt[0:img_lq.shape[0] * scale, 0:img_lq.shape[1] * scale, :]
        img_gt, img_lq = img2tensor([img_gt, img_lq], bgr2rgb=True, float32=True)
        if self.mean is not None or self.std is not None:
            normalize(img_lq, self.mean, self.std, inplace=True)
            normalize(img_gt, self.mean, self.std, inplace=True)
        return {'lq': img_lq, 'gt': img_gt, 'lq_path': lq_path, 'gt_path': gt_path}


replace_registry_entry(DATASET_REGISTRY, PairedImageDataset)

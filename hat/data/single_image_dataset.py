"""SingleImageDataset: basicsr's LQ-only dataset (test sets without ground truth, own photos), with its input checked.

Takes over basicsr's registry name like :mod:`hat.data.paired_image_dataset`, so ``type: SingleImageDataset`` in an
option file gets this class. On good data it is basicsr's dataset (same paths, order, keys and tensors). It adds:

- when built: ``dataroot_lq`` must exist (an lmdb must have ``data.mdb`` and ``meta_info.txt``), a
  ``meta_info_file`` must exist and every file it lists must exist; a folder must hold at least one file;
  ``meta_info_file: ~`` means no meta_info file (basicsr would try to open ``None``);
- when read: an image that does not decode raises :class:`~hat.data.errors.UnreadableImageError` naming it (the
  validation loop skips such an item with a warning); 16-bit, grey and RGBA images are read as 8-bit BGR like
  basicsr, and reported once per data set.
"""
from __future__ import annotations

import os.path as osp
from typing import Any

from basicsr.data.single_image_dataset import SingleImageDataset as BasicsrSingleImageDataset
from basicsr.utils import FileClient, img2tensor, rgb2ycbcr, scandir
from basicsr.utils.registry import DATASET_REGISTRY
from torch import Tensor
from torchvision.transforms.functional import normalize

from hat.data.image_reading import ConversionLog, read_image
from hat.data.paired_image_dataset import (MAX_NAMED, PREPARE_HINT, check_backend, check_folder, check_lmdb,
                                           read_meta_info_names, replace_registry_entry, warn_non_images)


class SingleImageDataset(BasicsrSingleImageDataset):
    """LQ images of a folder (or lmdb, or meta_info file), checked; see the module docstring.

    Options: ``dataroot_lq``, ``io_backend``, optional ``meta_info_file`` (paths relative to ``dataroot_lq``),
    ``color``, ``mean``, ``std``, as basicsr's.

    Items: ``{'lq': [C, h, w], 'lq_path': str}``, float32 RGB in [0, 1].
    """

    def __init__(self, opt: dict[str, Any]) -> None:
        self.name = str(opt.get('name', type(self).__name__))
        backend = check_backend(opt, dataset=self.name)
        lq_folder = check_folder(opt.get('dataroot_lq'), key='dataroot_lq', dataset=self.name)
        if 'meta_info_file' in opt and opt['meta_info_file'] is None:
            opt = {k: v for k, v in opt.items() if k != 'meta_info_file'}
        if backend == 'lmdb':
            check_lmdb(lq_folder, key='dataroot_lq', dataset=self.name)
        elif 'meta_info_file' in opt:
            meta_info_file = str(opt['meta_info_file'])
            missing = [f'line {number}: {name}' for number, name in read_meta_info_names(meta_info_file,
                                                                                            dataset=self.name)
                       if not osp.isfile(osp.join(lq_folder, name))]
            if missing:
                more = f'; and {len(missing) - MAX_NAMED} more' if len(missing) > MAX_NAMED else ''
                raise FileNotFoundError(f'{self.name}: {len(missing)} entries of meta_info_file {meta_info_file} are '
                                        f'not in {lq_folder}: {"; ".join(missing[:MAX_NAMED])}{more}. Regenerate the '
                                        'meta_info file (scripts/generate_meta_info.py) or fix dataroot_lq.')
        elif backend == 'disk':
            names = list(scandir(lq_folder))
            if not names:
                raise ValueError(f'{self.name}: dataroot_lq {lq_folder} holds no image file; {PREPARE_HINT}')
            warn_non_images(lq_folder, names, dataset=self.name)
        super().__init__(opt)
        if not self.paths:
            raise ValueError(f'{self.name}: no image found in {lq_folder}')
        self.conversions = ConversionLog(self.name)

    def __getitem__(self, index: int) -> dict[str, Tensor | str]:
        if self.file_client is None:
            self.file_client = FileClient(self.io_backend_opt.pop('type'), **self.io_backend_opt)
        lq_path = self.paths[index]
        img_lq, conversions = read_image(self.file_client, lq_path, 'lq', role='LQ image',
                                         where=self.lq_folder if self.file_client.backend == 'lmdb' else None)
        self.conversions.note(lq_path, conversions)

        # basicsr's steps, in its order (including rgb2ycbcr on a BGR image for color: y, as basicsr does).
        if self.opt.get('color') == 'y':
            img_lq = rgb2ycbcr(img_lq, y_only=True)[..., None]
        img_lq = img2tensor(img_lq, bgr2rgb=True, float32=True)
        if self.mean is not None or self.std is not None:
            normalize(img_lq, self.mean, self.std, inplace=True)
        return {'lq': img_lq, 'lq_path': lq_path}


replace_registry_entry(DATASET_REGISTRY, SingleImageDataset)

"""Where the GT images of a training set come from: a folder or an lmdb, optionally narrowed by a meta_info file.

Both training datasets of this project read GT images only (the LQ side is made on the fly), so listing and reading
those images lives here once:

- ``io_backend: {type: disk}``: ``dataroot_gt`` is a folder. Without a meta_info file every image under it (any depth,
  sorted) is used; with one, exactly the images it lists, as paths relative to ``dataroot_gt``.
- ``io_backend: {type: lmdb}``: ``dataroot_gt`` is a ``*.lmdb`` folder in BasicSR's format (``data.mdb``,
  ``lock.mdb``, ``meta_info.txt``; see ``scripts/create_lmdb.py``). The keys are the image names without extension;
  a meta_info file narrows them the same way (``a/b.png`` selects key ``a/b``).

meta_info files have BasicSR's format: one image per line, the first whitespace-separated token is its path relative
to ``dataroot_gt``; what follows (usually ``(h,w,c)``) is informational. ``scripts/generate_meta_info.py`` writes them.
"""
from __future__ import annotations

import os
import os.path as osp
from collections.abc import Mapping
from typing import Any, Optional

import numpy as np
from basicsr.data.data_util import paths_from_lmdb
from basicsr.utils import FileClient
from torch.utils import data

from hat.io.images import IMAGE_EXTENSIONS, decode_as_basicsr

SUPPORTED_BACKENDS = ('disk', 'lmdb')
# How many missing entries an error message names before it only counts the rest.
_MAX_NAMED = 5


def list_images(folder: str) -> list[str]:
    """Image files under ``folder`` (any depth, hidden files and folders skipped) as sorted relative paths with ``/``.

    basicsr's ``scandir(recursive=True)`` is not used: it descends into hidden *files* (``.DS_Store``) and crashes.
    """
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith('.')]
        for name in files:
            if not name.startswith('.') and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(osp.relpath(osp.join(root, name), folder).replace(os.sep, '/'))
    return sorted(found)


def resolve_meta_info_file(opt: Mapping[str, Any], *, dataset: str) -> Optional[str]:
    """The meta_info file of a dataset's options, or None.

    The official HAT option files spell the key ``meta_info_file`` (like basicsr's PairedImageDataset); option files
    written for Real-ESRGAN/basicsr's RealESRGANDataset spell it ``meta_info``. Both are accepted; giving both with
    different values is an error rather than a silent choice.
    """
    new, old = opt.get('meta_info_file'), opt.get('meta_info')
    if new and old and new != old:
        raise ValueError(f'{dataset}: both meta_info_file ({new}) and meta_info ({old}) are set and differ; '
                         'keep one of them in the option file')
    return new or old or None


def read_meta_info(meta_info_file: str) -> list[str]:
    """The image paths listed by a meta_info file (first token of each non-empty line), in file order."""
    if not osp.isfile(meta_info_file):
        raise FileNotFoundError(f'meta_info file not found: {meta_info_file} (run scripts/generate_meta_info.py on the '
                                'GT folder to write one, or remove meta_info_file from the option file to use every '
                                'image of the folder)')
    with open(meta_info_file, encoding='utf-8') as f:
        names = [line.split()[0] for line in f if line.strip()]
    if not names:
        raise ValueError(f'meta_info file {meta_info_file} lists no image')
    return names


def _missing_message(missing: list[str], *, where: str, meta_info_file: str) -> str:
    named = ', '.join(repr(m) for m in missing[:_MAX_NAMED])
    more = f' and {len(missing) - _MAX_NAMED} more' if len(missing) > _MAX_NAMED else ''
    return (f'{len(missing)} entries of meta_info file {meta_info_file} are not in {where}: {named}{more}. '
            'Regenerate the meta_info file for this folder (scripts/generate_meta_info.py) or fix dataroot_gt.')


class GTImageSource:
    """The list of GT images of a dataset and the means to read them.

    The file client is opened lazily, once per process: an lmdb environment must not cross a ``fork`` into the
    DataLoader workers, and it cannot be pickled for ``spawn`` either.

    Args:
        dataroot: ``dataroot_gt`` of the options (a folder, or a ``*.lmdb`` folder for the lmdb backend).
        io_backend: the ``io_backend`` options (``type`` plus, for lmdb, optional keyword arguments of
            basicsr's ``LmdbBackend`` such as ``readahead``). Not modified.
        meta_info_file: optional list of the images to use (see the module docstring).
        dataset: the dataset's name, used in error messages.
    """

    def __init__(self, *, dataroot: str, io_backend: Mapping[str, Any], meta_info_file: Optional[str],
                 dataset: str) -> None:
        backend_opt = dict(io_backend)
        self.backend = backend_opt.pop('type', 'disk')
        if self.backend not in SUPPORTED_BACKENDS:
            raise ValueError(f'{dataset}: io_backend type must be one of {SUPPORTED_BACKENDS}, got {self.backend!r}')
        self.root = str(dataroot)
        self.dataset = dataset
        self._backend_kwargs = backend_opt
        self._client: Optional[FileClient] = None
        self._client_pid: Optional[int] = None
        if not osp.isdir(self.root):
            raise FileNotFoundError(f'{dataset}: GT folder not found: {self.root} (dataroot_gt in the option file; '
                                    'see datasets/README.md for how to prepare training data)')
        if self.backend == 'lmdb':
            self.paths = self._lmdb_keys(meta_info_file)
        else:
            self.paths = self._disk_paths(meta_info_file)
        if not self.paths:
            raise ValueError(f'{dataset}: no image found in {self.root} (extensions {", ".join(IMAGE_EXTENSIONS)})')

    def _disk_paths(self, meta_info_file: Optional[str]) -> list[str]:
        if meta_info_file is None:
            return [osp.join(self.root, p) for p in list_images(self.root)]
        names = read_meta_info(meta_info_file)
        paths = [osp.join(self.root, name) for name in names]
        missing = [name for name, path in zip(names, paths) if not osp.isfile(path)]
        if missing:
            raise FileNotFoundError(_missing_message(missing, where=f'folder {self.root}',
                                                     meta_info_file=meta_info_file))
        return paths

    def _lmdb_keys(self, meta_info_file: Optional[str]) -> list[str]:
        for name in ('data.mdb', 'meta_info.txt'):
            if not osp.isfile(osp.join(self.root, name)):
                raise FileNotFoundError(f'{self.dataset}: {self.root} is not an lmdb made by scripts/create_lmdb.py '
                                        f'({name} is missing)')
        if not self.root.rstrip('/').endswith('.lmdb'):
            raise ValueError(f'{self.dataset}: an lmdb dataroot_gt must end with .lmdb, got {self.root}')
        keys = paths_from_lmdb(self.root.rstrip('/'))
        if meta_info_file is None:
            return keys
        wanted = [osp.splitext(name)[0] for name in read_meta_info(meta_info_file)]
        present = set(keys)
        missing = [key for key in wanted if key not in present]
        if missing:
            raise KeyError(_missing_message(missing, where=f'lmdb {self.root}', meta_info_file=meta_info_file))
        return wanted

    def __len__(self) -> int:
        return len(self.paths)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state['_client'] = None
        state['_client_pid'] = None
        return state

    def _file_client(self) -> FileClient:
        if self._client is None or self._client_pid != os.getpid():
            if self.backend == 'lmdb':
                self._client = FileClient('lmdb', db_paths=[self.root], client_keys=['gt'], **self._backend_kwargs)
            else:
                self._client = FileClient('disk')
            self._client_pid = os.getpid()
        return self._client

    def read(self, index: int) -> tuple[np.ndarray, str]:
        """Read one GT image.

        Returns:
            the image ``[H, W, 3]`` float32 BGR in [0, 1] (grey images are expanded to 3 channels), and its path
            (a file path on disk, the key for lmdb).
        """
        path = self.paths[index]
        try:
            content = self._file_client().get(path, 'gt')
        except OSError as err:
            raise OSError(f'{self.dataset}: cannot read GT image {path}: {err}') from err
        if content is None:
            raise KeyError(f'{self.dataset}: key {path!r} is listed in {osp.join(self.root, "meta_info.txt")} but not '
                           f'stored in lmdb {self.root}; rebuild it with scripts/create_lmdb.py')
        where = f'{self.dataset}: key {path!r} of lmdb {self.root}' if self.backend == 'lmdb' else \
            f'{self.dataset}: {path}'
        img, _ = decode_as_basicsr(content, where, role='GT image')
        return img, path


class GTOnlyDataset(data.Dataset):
    """Base of the datasets that read GT images only (their LQ is synthesised): the GT source, paths and length.

    Sets ``self.opt``, ``self.name`` and ``self.source`` from ``dataroot_gt``, ``io_backend`` and ``meta_info_file``.
    """

    def __init__(self, opt: dict[str, Any], *, default_name: str) -> None:
        super().__init__()
        self.opt = opt
        self.name = opt.get('name', default_name)
        if 'dataroot_gt' not in opt:
            raise KeyError(f'{self.name}: the dataset options need `dataroot_gt` (the folder of GT images)')
        self.source = GTImageSource(dataroot=opt['dataroot_gt'], io_backend=opt.get('io_backend', {'type': 'disk'}),
                                    meta_info_file=resolve_meta_info_file(opt, dataset=self.name),
                                    dataset=self.name)

    @property
    def paths(self) -> list[str]:
        """GT file paths (disk) or lmdb keys, in dataset order."""
        return self.source.paths

    def __len__(self) -> int:
        return len(self.source)

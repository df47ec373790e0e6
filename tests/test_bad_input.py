"""Bad input gets a clear error, good input is handled exactly as before, and checkpoints convert safely.

- PairedImageDataset/SingleImageDataset: same items as basicsr's classes on good data (same random crops for the
  same seed); damaged files raise UnreadableImageError naming them (fuzzed: truncations, random bytes, ...); size
  mismatches, missing folders and meta_info entries are named, at construction where possible.
- Option files: misspelt network keys, unknown architectures and models are named with a suggestion.
- Training stops on a damaged training image, naming it.
- scripts/convert_checkpoint.py: .pth <-> .safetensors round trips that reproduce the golden output; no overwrite.
"""
from __future__ import annotations

import copy
import importlib.util
import logging
import pickle
import random
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

import hat  # noqa: F401  (before basicsr: compat shim and registries)
from basicsr.data import build_dataset
from basicsr.data.paired_image_dataset import PairedImageDataset as BasicsrPairedImageDataset
from basicsr.data.single_image_dataset import SingleImageDataset as BasicsrSingleImageDataset
from basicsr.utils.registry import DATASET_REGISTRY
from torch.utils.data import DataLoader

from conftest import (GOLDEN, REPO, SHARED_DATASETS, golden_config, golden_state_dict, requires_shared_datasets,
                      smooth_image, tiny_hat_config)
from benchmarks.gpu_check import tiny_training_options
from hat.archs.detect import build_from_checkpoint, load_state_dict
from hat.archs.hat_arch import HAT
from hat.data import ImagePairSizeError, PairedImageDataset, SingleImageDataset, UnreadableImageError
from hat.test import test_pipeline as run_test_pipeline
from hat.train import train_pipeline
from hat.utils.options import check_network_options, parse_options

SCALE = 2
SEEDS = range(8)
TINY_HAT = {'type': 'HAT', **tiny_hat_config(upscale=SCALE)}


# ---------------------------------------------------------------------------------------------------- helpers

def downscale(img: np.ndarray, scale: int = SCALE) -> np.ndarray:
    h, w = img.shape[:2]
    return cv2.resize(img, (w // scale, h // scale), interpolation=cv2.INTER_AREA)


def write_pair(root: Path, name: str, gt: np.ndarray, lq: np.ndarray | None = None) -> None:
    (root / 'gt').mkdir(parents=True, exist_ok=True)
    (root / 'lq').mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(root / 'gt' / name), gt)
    assert cv2.imwrite(str(root / 'lq' / name), downscale(gt) if lq is None else lq)


def good_set(root: Path, count: int = 3) -> Path:
    """``count`` colour PNG pairs (GT 40x56 or 48x48, LQ at x2) in ``root/gt`` and ``root/lq``."""
    rng = np.random.default_rng(0)
    for i in range(count):
        h, w = [(40, 56), (48, 48)][i % 2]
        write_pair(root, f'img{i}.png', smooth_image(rng, h, w))
    return root


def paired_opt(root: Path, phase: str = 'val', **extra) -> dict:
    opt = {'name': 'pairs', 'type': 'PairedImageDataset', 'dataroot_gt': str(root / 'gt'),
           'dataroot_lq': str(root / 'lq'), 'io_backend': {'type': 'disk'}, 'scale': SCALE, 'phase': phase}
    if phase == 'train':
        opt.update(gt_size=16, use_hflip=True, use_rot=True)
    opt.update(extra)
    return opt


def single_opt(folder: Path, **extra) -> dict:
    return {'name': 'photos', 'type': 'SingleImageDataset', 'dataroot_lq': str(folder),
            'io_backend': {'type': 'disk'}, 'phase': 'test', 'scale': SCALE, **extra}


def items_of(dataset, seed: int = 0) -> list[dict]:
    """Every item, each read right after seeding ``random`` (crops and flips draw from it)."""
    items = []
    for index in range(len(dataset)):
        random.seed(seed + index)
        items.append(dataset[index])
    return items


def assert_same_items(ours: list[dict], theirs: list[dict]) -> None:
    assert len(ours) == len(theirs) > 0
    for a, b in zip(ours, theirs):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], torch.Tensor):
                assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
            else:
                assert a[key] == b[key], key


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f'hat_scripts_{name}', REPO / 'scripts' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


convert_checkpoint = load_script('convert_checkpoint')


# ------------------------------------------------------------------------------------- same as basicsr on good data

def test_registry_names_give_the_checked_datasets(tmp_path):
    assert DATASET_REGISTRY.get('PairedImageDataset') is PairedImageDataset
    assert DATASET_REGISTRY.get('SingleImageDataset') is SingleImageDataset
    assert issubclass(PairedImageDataset, BasicsrPairedImageDataset)
    assert issubclass(SingleImageDataset, BasicsrSingleImageDataset)
    assert type(build_dataset(paired_opt(good_set(tmp_path)))) is PairedImageDataset


@pytest.mark.parametrize('phase', ['train', 'val'])
@pytest.mark.parametrize('extra', [{}, {'color': 'y'}, {'mean': [0.4, 0.5, 0.6], 'std': [0.2, 0.25, 0.3]}],
                         ids=['rgb', 'y', 'normalised'])
def test_paired_items_equal_basicsr(tmp_path, phase, extra):
    """Colour, grey, RGBA, 16-bit PNG and JPEG pairs; in training the same random patch for the same seed."""
    root = good_set(tmp_path, 2)
    rng = np.random.default_rng(1)
    write_pair(root, 'grey.png', smooth_image(rng, 40, 40, 1))
    write_pair(root, 'rgba.png', smooth_image(rng, 40, 48, 4))
    deep = smooth_image(rng, 48, 40).astype(np.uint16) * 257 + 3
    write_pair(root, 'deep.png', deep, downscale(deep))
    write_pair(root, 'photo.jpg', smooth_image(rng, 48, 56))
    opt = paired_opt(root, phase, **extra)
    ours = PairedImageDataset(copy.deepcopy(opt))
    theirs = BasicsrPairedImageDataset(copy.deepcopy(opt))
    assert ours.paths == theirs.paths
    for seed in (0, 1):
        first, second = items_of(ours, seed), items_of(theirs, seed)
        assert_same_items(first, second)
    if phase == 'train':
        assert first[0]['gt'].shape[-2:] == (16, 16) and first[0]['lq'].shape[-2:] == (8, 8)
        # the crops differ between seeds, so the equality above is not trivially about whole images
        assert any(not torch.equal(a['gt'], b['gt']) for a, b in zip(items_of(ours, 0), items_of(ours, 100)))


def test_validation_tolerates_a_gt_that_is_not_mod_cropped(tmp_path):
    """An HR image with an odd size and the floor(HR / 2) LQ: both classes crop the GT to 2 x LQ."""
    rng = np.random.default_rng(2)
    gt = smooth_image(rng, 41, 57)
    write_pair(tmp_path, 'odd.png', gt, downscale(gt[:40, :56]))
    opt = paired_opt(tmp_path)
    ours = items_of(PairedImageDataset(copy.deepcopy(opt)))
    assert_same_items(ours, items_of(BasicsrPairedImageDataset(copy.deepcopy(opt))))
    assert ours[0]['gt'].shape == (3, 40, 56)


def test_meta_info_and_filename_template_equal_basicsr(tmp_path):
    rng = np.random.default_rng(3)
    (tmp_path / 'gt').mkdir()
    (tmp_path / 'lq').mkdir()
    for name in ('a', 'b', 'c'):
        gt = smooth_image(rng, 32, 32)
        cv2.imwrite(str(tmp_path / 'gt' / f'{name}.png'), gt)
        cv2.imwrite(str(tmp_path / 'lq' / f'{name}x2.png'), downscale(gt))
    meta = tmp_path / 'meta.txt'
    meta.write_text('c.png (32,32,3)\na.png (32,32,3)\n')
    opt = paired_opt(tmp_path, 'train', meta_info_file=str(meta), filename_tmpl='{}x2')
    ours, theirs = PairedImageDataset(copy.deepcopy(opt)), BasicsrPairedImageDataset(copy.deepcopy(opt))
    assert [p['lq_path'] for p in ours.paths] == [str(tmp_path / 'lq' / 'cx2.png'), str(tmp_path / 'lq' / 'ax2.png')]
    assert_same_items(items_of(ours), items_of(theirs))


@pytest.mark.parametrize('extra', [{}, {'color': 'y'}], ids=['rgb', 'y'])
def test_single_items_equal_basicsr(tmp_path, extra):
    rng = np.random.default_rng(4)
    cv2.imwrite(str(tmp_path / 'b.png'), smooth_image(rng, 20, 28))
    cv2.imwrite(str(tmp_path / 'a.jpg'), smooth_image(rng, 24, 24))
    cv2.imwrite(str(tmp_path / 'g.png'), smooth_image(rng, 24, 20, 1))
    opt = single_opt(tmp_path, **extra)
    ours, theirs = SingleImageDataset(copy.deepcopy(opt)), BasicsrSingleImageDataset(copy.deepcopy(opt))
    assert ours.paths == theirs.paths == sorted(str(tmp_path / n) for n in ('a.jpg', 'b.png', 'g.png'))
    assert_same_items(items_of(ours), items_of(theirs))
    meta = tmp_path / 'meta.txt'
    meta.write_text('g.png\nb.png\n')
    opt = single_opt(tmp_path, meta_info_file=str(meta))
    assert_same_items(items_of(SingleImageDataset(copy.deepcopy(opt))),
                      items_of(BasicsrSingleImageDataset(copy.deepcopy(opt))))


def test_conversions_are_logged_once_per_kind_and_dataset(tmp_path, caplog):
    rng = np.random.default_rng(5)
    for i in range(2):
        write_pair(tmp_path, f'grey{i}.png', smooth_image(rng, 32, 32, 1))
        write_pair(tmp_path, f'rgba{i}.png', smooth_image(rng, 32, 32, 4))
        deep = smooth_image(rng, 32, 32).astype(np.uint16) * 256
        write_pair(tmp_path, f'deep{i}.png', deep, downscale(deep))
    write_pair(tmp_path, 'colour.png', smooth_image(rng, 32, 32))
    dataset = PairedImageDataset(paired_opt(tmp_path))
    with caplog.at_level(logging.INFO, logger='basicsr'):
        items = items_of(dataset) + items_of(dataset)
    assert all(item['gt'].shape == (3, 32, 32) for item in items)
    messages = [r.getMessage() for r in caplog.records if 'read as 8-bit 3-channel BGR' in r.getMessage()]
    assert len(messages) == 3, messages
    assert sum('grey' in m for m in messages) == 1
    assert sum('alpha channel' in m for m in messages) == 1
    assert sum('more than 8 bits' in m for m in messages) == 1
    assert all(m.startswith('pairs: ') for m in messages)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger='basicsr'):
        items_of(PairedImageDataset(paired_opt(good_set(tmp_path / 'plain'))))
    assert not [r for r in caplog.records if 'read as 8-bit' in r.getMessage()]


@requires_shared_datasets
def test_set14_matches_basicsr_and_reports_the_grey_image(caplog):
    """Real benchmark files: Set14 HR (not mod-cropped) with MATLAB's x3 LR; bridge.png is grey."""
    hr, lr = SHARED_DATASETS / 'Set14' / 'HR', SHARED_DATASETS / 'Set14' / 'LR_bicubic' / 'X3'
    if not (hr.is_dir() and lr.is_dir()):
        pytest.skip(f'Set14 HR or LR_bicubic/X3 not found under {SHARED_DATASETS}')
    opt = {'name': 'Set14', 'dataroot_gt': str(hr), 'dataroot_lq': str(lr), 'io_backend': {'type': 'disk'},
           'scale': 3, 'phase': 'val'}
    with caplog.at_level(logging.INFO, logger='basicsr'):
        ours = items_of(PairedImageDataset(copy.deepcopy(opt)))
    assert_same_items(ours, items_of(BasicsrPairedImageDataset(copy.deepcopy(opt))))
    assert len(ours) == 14
    grey = [r.getMessage() for r in caplog.records if 'is grey' in r.getMessage()]
    assert len(grey) == 1 and 'bridge.png' in grey[0]


# ----------------------------------------------------------------------------------------- damaged files (fuzzed)

def _png_bytes(seed: int) -> bytes:
    return cv2.imencode('.png', smooth_image(np.random.default_rng(seed), 40, 56))[1].tobytes()


def _jpeg_bytes(seed: int) -> bytes:
    return cv2.imencode('.jpg', smooth_image(np.random.default_rng(seed), 40, 56))[1].tobytes()


def damaged(kind: str, seed: int) -> bytes:
    """Bytes of a damaged image file of the given kind."""
    rng = np.random.default_rng(1000 + seed)
    if kind == 'truncated_png':
        data = _png_bytes(seed)
        return data[:int(rng.integers(1, len(data)))]
    if kind == 'truncated_jpeg':
        data = _jpeg_bytes(seed)
        return data[:int(rng.integers(1, len(data)))]
    if kind == 'random_bytes':
        return rng.bytes(int(rng.integers(1, 4000)))
    if kind == 'png_signature_then_garbage':
        return b'\x89PNG\r\n\x1a\n' + rng.bytes(int(rng.integers(0, 4000)))
    if kind == 'png_with_a_flipped_byte':
        data = bytearray(_png_bytes(seed))
        data[int(rng.integers(41, len(data) - 12))] ^= 0xFF  # inside the image data, whose CRC then fails
        return bytes(data)
    if kind == 'empty':
        return b''
    if kind == 'text':
        return b'This is not an image.\nIt is a text file with an image extension.\n'
    raise ValueError(kind)


SEEDED_KINDS = ['truncated_png', 'truncated_jpeg', 'random_bytes', 'png_signature_then_garbage',
                'png_with_a_flipped_byte']
FUZZ_CASES = [(kind, seed) for kind in SEEDED_KINDS for seed in SEEDS] + [('empty', 0), ('text', 0)]


def assert_names(error: UnreadableImageError, path: Path) -> None:
    assert error.path == str(path)
    message = str(error)
    assert str(path) in message and 'cannot read' in message and 'Replace it' in message


@pytest.mark.parametrize('kind,seed', FUZZ_CASES)
@pytest.mark.parametrize('side', ['gt', 'lq'])
def test_damaged_file_in_a_paired_set_is_named(tmp_path, kind, seed, side):
    root = good_set(tmp_path, 2)
    suffix = '.jpg' if 'jpeg' in kind or kind == 'text' else '.png'
    write_pair(root, f'bad{suffix}', smooth_image(np.random.default_rng(seed), 40, 56))
    bad = root / side / f'bad{suffix}'
    bad.write_bytes(damaged(kind, seed))
    for phase in ('train', 'val'):
        dataset = PairedImageDataset(paired_opt(root, phase))
        index = [p[f'{side}_path'] for p in dataset.paths].index(str(bad))
        with pytest.raises(UnreadableImageError) as info:
            dataset[index]
        assert_names(info.value, bad)
        assert f'{side.upper()} image' in str(info.value)
        good = next(i for i in range(len(dataset)) if i != index)
        assert dataset[good]['gt'].ndim == 3  # the other items still read


@pytest.mark.parametrize('kind,seed', [(k, 0) for k in SEEDED_KINDS] + [('empty', 0), ('text', 0)])
def test_damaged_file_in_a_single_image_set_is_named(tmp_path, kind, seed):
    rng = np.random.default_rng(seed)
    cv2.imwrite(str(tmp_path / 'a.png'), smooth_image(rng, 20, 20))
    bad = tmp_path / 'b.png'
    bad.write_bytes(damaged(kind, seed))
    dataset = SingleImageDataset(single_opt(tmp_path))
    assert dataset[0]['lq'].shape == (3, 20, 20)
    with pytest.raises(UnreadableImageError) as info:
        dataset[1]
    assert_names(info.value, bad)
    assert isinstance(info.value, ValueError)


def test_lmdb_pairs_equal_basicsr_and_a_broken_lmdb_is_named(tmp_path):
    root = good_set(tmp_path, 3)
    assert load_script('create_lmdb').main(['--gt', str(root / 'gt'), '--lq', str(root / 'lq')]) == 0
    opt = paired_opt(root, 'train', dataroot_gt=str(root / 'gt.lmdb'), dataroot_lq=str(root / 'lq.lmdb'),
                     io_backend={'type': 'lmdb'})
    ours = PairedImageDataset(copy.deepcopy(opt))
    assert [p['gt_path'] for p in ours.paths] == ['img0', 'img1', 'img2']
    our_items = items_of(ours)
    for environment in ours.file_client.client._client.values():  # lmdb opens an environment once per process
        environment.close()
    assert_same_items(our_items, items_of(BasicsrPairedImageDataset(copy.deepcopy(opt))))
    (root / 'lq.lmdb' / 'data.mdb').unlink()
    with pytest.raises(FileNotFoundError, match=r'dataroot_lq .*lq\.lmdb is not an lmdb .*data\.mdb is missing'):
        PairedImageDataset(copy.deepcopy(opt))


def test_the_error_survives_pickling_with_its_path():
    error = UnreadableImageError.for_file('/data/x.png', 'truncated PNG', role='GT image')
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is UnreadableImageError and again.path == '/data/x.png' and str(again) == str(error)


def test_file_removed_after_construction_is_named(tmp_path):
    root = good_set(tmp_path)
    dataset = PairedImageDataset(paired_opt(root))
    gone = Path(dataset.paths[1]['lq_path'])
    gone.unlink()
    with pytest.raises(UnreadableImageError, match='does not exist') as info:
        dataset[1]
    assert_names(info.value, gone)


def test_a_dataloader_worker_passes_the_error_on(tmp_path):
    """With worker processes (as in training), the re-raised error keeps its type and its message names the file."""
    root = good_set(tmp_path, 2)
    (root / 'lq' / 'img1.png').write_bytes(damaged('truncated_png', 0))
    loader = DataLoader(PairedImageDataset(paired_opt(root)), batch_size=1, num_workers=1)
    with pytest.raises(UnreadableImageError, match=str(root / 'lq' / 'img1.png')):
        list(loader)


def test_files_without_an_image_extension_are_reported_at_construction(tmp_path, caplog):
    root = good_set(tmp_path, 2)
    for side in ('gt', 'lq'):
        (root / side / 'notes.txt').write_text('not an image')
    with caplog.at_level(logging.WARNING, logger='basicsr'):
        dataset = PairedImageDataset(paired_opt(root))
    assert any("'notes.txt'" in r.getMessage() for r in caplog.records)
    index = [p['gt_path'] for p in dataset.paths].index(str(root / 'gt' / 'notes.txt'))
    with pytest.raises(UnreadableImageError, match='notes.txt'):
        dataset[index]


# ------------------------------------------------------------------------------------------------ wrong sizes

def test_lq_of_another_scale_is_a_size_error_naming_both_files(tmp_path):
    """An x4 LQ folder read at x2: basicsr would silently score the GT's top-left quarter."""
    root = good_set(tmp_path, 1)
    gt = cv2.imread(str(root / 'gt' / 'img0.png'))
    cv2.imwrite(str(root / 'lq' / 'img0.png'), downscale(gt, 4))
    for phase in ('val', 'train'):
        with pytest.raises(ImagePairSizeError) as info:
            PairedImageDataset(paired_opt(root, phase))[0]
        message = str(info.value)
        assert str(root / 'gt' / 'img0.png') in message and str(root / 'lq' / 'img0.png') in message
        assert '40x56' in message and '10x14' in message and 'scale 2' in message
        assert (info.value.gt_size, info.value.lq_size, info.value.scale) == ((40, 56), (10, 14), 2)


def test_gt_smaller_than_scale_times_lq_is_a_size_error(tmp_path):
    rng = np.random.default_rng(6)
    gt = smooth_image(rng, 40, 56)
    write_pair(tmp_path, 'x.png', gt[:38], downscale(gt))
    with pytest.raises(ImagePairSizeError, match=r'38x56 .* 20x28; at scale 2 the GT must be 40x56'):
        PairedImageDataset(paired_opt(tmp_path))[0]


def test_training_needs_exact_sizes_and_a_big_enough_lq(tmp_path):
    rng = np.random.default_rng(7)
    gt = smooth_image(rng, 41, 56)
    write_pair(tmp_path, 'odd.png', gt, downscale(gt[:40]))
    assert PairedImageDataset(paired_opt(tmp_path, 'val'))[0]['gt'].shape == (3, 40, 56)
    with pytest.raises(ImagePairSizeError, match='exactly'):
        PairedImageDataset(paired_opt(tmp_path, 'train'))[0]
    small = tmp_path / 'small'
    write_pair(small, 'tiny.png', smooth_image(rng, 12, 40))
    with pytest.raises(ImagePairSizeError, match=r'smaller than the LQ patch 8x8 .*tiny\.png'):
        PairedImageDataset(paired_opt(small, 'train'))[0]


# ------------------------------------------------------------------------------- missing folders and entries

@pytest.mark.parametrize('key', ['dataroot_gt', 'dataroot_lq'])
def test_missing_folder_is_named_at_construction(tmp_path, key):
    root = good_set(tmp_path, 1)
    opt = paired_opt(root, **{key: str(tmp_path / 'nowhere')})
    with pytest.raises(FileNotFoundError, match=rf'{key} .*nowhere does not exist'):
        build_dataset(opt)
    with pytest.raises(FileNotFoundError, match=r'dataroot_lq .*nowhere does not exist'):
        SingleImageDataset(single_opt(tmp_path / 'nowhere'))


def test_unpaired_folders_are_named(tmp_path):
    root = good_set(tmp_path, 3)
    (root / 'lq' / 'img1.png').unlink()
    cv2.imwrite(str(root / 'lq' / 'extra.png'), smooth_image(np.random.default_rng(0), 8, 8))
    with pytest.raises(FileNotFoundError) as info:
        PairedImageDataset(paired_opt(root))
    message = str(info.value)
    assert "1 GT images have no LQ file" in message and "'img1.png'" in message
    assert "have no GT file" in message and "'extra.png'" in message


def test_meta_info_problems_are_named(tmp_path):
    root = good_set(tmp_path, 2)
    with pytest.raises(FileNotFoundError, match=r'meta_info_file .*absent\.txt does not exist'):
        PairedImageDataset(paired_opt(root, meta_info_file=str(tmp_path / 'absent.txt')))
    meta = tmp_path / 'meta.txt'
    meta.write_text('img0.png (40,56,3)\nimg9.png (40,56,3)\nimg1.png (48,48,3)\n')
    with pytest.raises(FileNotFoundError, match=r'1 entries .* line 2: img9\.png \(no such file'):
        PairedImageDataset(paired_opt(root, meta_info_file=str(meta)))
    (root / 'lq' / 'img1.png').unlink()
    meta.write_text('img0.png (40,56,3)\nimg1.png (48,48,3)\n')
    with pytest.raises(FileNotFoundError, match=r'line 2: img1\.png \(its LQ file img1\.png is not in'):
        PairedImageDataset(paired_opt(root, meta_info_file=str(meta)))
    meta.write_text('img0.png\nnope.png\n')
    with pytest.raises(FileNotFoundError, match=r'line 2: nope\.png'):
        SingleImageDataset(single_opt(root / 'lq', meta_info_file=str(meta)))


def test_missing_training_options_are_named(tmp_path):
    opt = paired_opt(good_set(tmp_path, 1), 'train')
    del opt['gt_size']
    with pytest.raises(KeyError, match='gt_size'):
        PairedImageDataset(opt)


# ------------------------------------------------------------------------------------------------ option files

def tiny_train_options(root: Path, name: str, total_iter: int = 4) -> dict:
    """gpu_check's tiny training options (the one home of a tiny training run) on ``root``'s pairs, on the CPU,
    without its validation and NCCL settings."""
    opt = tiny_training_options(root, name, total_iter)
    opt['num_gpu'] = 0
    del opt['datasets']['val_1'], opt['val'], opt['dist_params']
    opt['logger']['print_freq'] = 1
    return opt


def write_yaml(path: Path, opt: dict) -> str:
    path.write_text(yaml.safe_dump(opt, sort_keys=False))
    return str(path)


def test_misspelt_network_key_is_named_with_a_suggestion(tmp_path):
    opt = tiny_train_options(good_set(tmp_path), 'typo')
    opt['network_g']['window_szie'] = opt['network_g'].pop('window_size')
    opt_file = write_yaml(tmp_path / 'typo.yml', opt)
    with pytest.raises(ValueError) as info:
        parse_options(str(tmp_path), is_train=True, argv=['-opt', opt_file])
    message = str(info.value)
    assert "network_g: HAT has no option 'window_szie' (did you mean 'window_size'?)" in message
    assert 'accepts: img_size, patch_size' in message and 'resi_connection' in message
    # through the training pipeline: the same error, before any folder of the run is made
    with pytest.raises(ValueError, match="did you mean 'window_size'"):
        train_pipeline(str(tmp_path), ['-opt', opt_file])
    assert not (tmp_path / 'experiments').exists()


def test_force_yml_is_checked_too(tmp_path):
    opt_file = write_yaml(tmp_path / 'ok.yml', tiny_train_options(good_set(tmp_path), 'ok'))
    with pytest.raises(ValueError, match=r"'embed_dm' \(did you mean 'embed_dim'\?\)"):
        parse_options(str(tmp_path), is_train=True, argv=['-opt', opt_file, '--force_yml', 'network_g:embed_dm=24'])


def test_unknown_architecture_and_model_are_named():
    base = {'model_type': 'HATModel', 'network_g': dict(TINY_HAT)}
    check_network_options(copy.deepcopy(base))  # the good one passes
    with pytest.raises(ValueError, match=r"network_g: architecture type 'HATT' is not registered\. Did you mean "
                       r"'HAT'\? Registered: .*SRVGGNetCompact"):
        check_network_options({**base, 'network_g': {**TINY_HAT, 'type': 'HATT'}})
    with pytest.raises(ValueError, match=r"model_type 'HATModle' is not registered\. Did you mean 'HATModel'\?"):
        check_network_options({**base, 'model_type': 'HATModle'})
    with pytest.raises(ValueError, match=r"network_d: UNetDiscriminatorSN has no option 'skip_conection' \(did you "
                       r"mean 'skip_connection'\?\)"):
        check_network_options({**base, 'network_d': {'type': 'UNetDiscriminatorSN', 'num_in_ch': 3,
                                                      'skip_conection': True}})
    with pytest.raises(ValueError, match='network_g must be a mapping with a type'):
        check_network_options({'network_g': {'embed_dim': 12}})


def test_every_shipped_option_file_passes_the_check():
    files = sorted((REPO / 'options').rglob('*.yml'))
    assert len(files) >= 35
    for path in files:
        check_network_options(yaml.safe_load(path.read_text()))


# ------------------------------------------------------------------------------------- training on damaged data

def test_damaged_training_image_stops_training_naming_it(tmp_path):
    root = good_set(tmp_path / 'data', 4)
    bad = root / 'gt' / 'img2.png'
    bad.write_bytes(damaged('truncated_png', 3))
    opt_file = write_yaml(tmp_path / 'damaged.yml', tiny_train_options(root, 'damaged', total_iter=8))
    with pytest.raises(UnreadableImageError) as info:
        train_pipeline(str(tmp_path), ['-opt', opt_file])
    assert_names(info.value, bad)
    log_text = next((tmp_path / 'experiments' / 'damaged').glob('train_damaged_*.log')).read_text()
    assert 'Start training' in log_text  # it stopped in the loop: the data set itself was fine to build


def test_a_test_set_with_a_damaged_image_still_evaluates_the_rest(tmp_path):
    """The validation loop skips the item whose file raised UnreadableImageError, and says which one."""
    root = good_set(tmp_path / 'data', 3)
    bad = root / 'lq' / 'img1.png'
    bad.write_bytes(damaged('text', 0))
    opt = {
        'name': 'damaged_test', 'model_type': 'HATModel', 'scale': SCALE, 'num_gpu': 0,
        'datasets': {'test_1': {**paired_opt(root), 'name': 'pairs'}},
        'network_g': {'type': 'HAT', **golden_config('hat_tiny_x2')},
        'path': {'pretrain_network_g': str(GOLDEN / 'hat_tiny_x2.pth'), 'param_key_g': 'params_ema'},
        'val': {'save_img': True, 'suffix': 'sr',
                'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': SCALE, 'test_y_channel': True}}},
    }
    results = run_test_pipeline(str(tmp_path), ['-opt', write_yaml(tmp_path / 'damaged_test.yml', opt)])
    assert np.isfinite(results['pairs']['psnr'])
    out_dir = tmp_path / 'results' / 'damaged_test' / 'visualization' / 'pairs'
    assert sorted(p.name for p in out_dir.iterdir()) == ['img0_sr.png', 'img2_sr.png']
    log_text = next((tmp_path / 'results' / 'damaged_test').glob('test_damaged_test_*.log')).read_text()
    assert str(bad) in log_text


# ---------------------------------------------------------------------------------------- checkpoint conversion

def golden_output(state_dict: dict) -> tuple[torch.Tensor, torch.Tensor]:
    io = torch.load(GOLDEN / 'hat_tiny_x2_io.pt', weights_only=True)
    net = HAT(**golden_config('hat_tiny_x2')).eval()
    net.load_state_dict(state_dict, strict=True)
    with torch.no_grad():
        return net(io['input']), io['output']


def test_pth_to_safetensors_round_trip_reproduces_the_golden_output(tmp_path):
    pytest.importorskip('safetensors', reason='the safetensors package is not installed')
    source = tmp_path / 'hat_tiny_x2.pth'
    both = {'params_ema': golden_state_dict('hat_tiny_x2'),
            'params': {k: v * 0.5 if v.is_floating_point() else v for k, v in golden_state_dict('hat_tiny_x2').items()}}
    torch.save(both, source)
    assert convert_checkpoint.main([str(source)]) == 0
    converted = tmp_path / 'hat_tiny_x2.safetensors'
    for key in ('params_ema', 'params'):
        loaded = load_state_dict(converted, key)
        assert loaded.keys() == both[key].keys()
        assert all(loaded[k].dtype == v.dtype and torch.equal(loaded[k], v) for k, v in both[key].items())
    default = load_state_dict(converted)  # without a key: params_ema first, as for a .pth
    assert all(torch.equal(default[k], v) for k, v in both['params_ema'].items())
    output, expected = golden_output(load_state_dict(converted))
    assert (output - expected).abs().max().item() < 1e-5
    assert build_from_checkpoint(converted).detected.kwargs['embed_dim'] == 24

    back = tmp_path / 'back.pth'
    assert convert_checkpoint.main([str(converted), '--output', str(back)]) == 0
    restored = torch.load(back, weights_only=True)
    assert set(restored) == {'params_ema', 'params'}
    assert all(torch.equal(restored['params'][k], v) for k, v in both['params'].items())


def test_one_entry_is_a_plain_state_dict(tmp_path):
    pytest.importorskip('safetensors', reason='the safetensors package is not installed')
    from safetensors.torch import load_file
    flat = tmp_path / 'flat.safetensors'
    assert convert_checkpoint.main([str(GOLDEN / 'hat_tiny_x2.pth'), '-o', str(flat), '--param-key',
                                    'params_ema']) == 0
    expected = golden_state_dict('hat_tiny_x2')
    stored = load_file(str(flat))
    assert stored.keys() == expected.keys()  # no prefix: other tools read it as a state dict
    output, golden = golden_output(load_state_dict(flat))
    assert (output - golden).abs().max().item() < 1e-5
    assert convert_checkpoint.main([str(flat), '-o', str(tmp_path / 'plain.pth')]) == 0
    assert set(torch.load(tmp_path / 'plain.pth', weights_only=True)) == {'params'}
    assert convert_checkpoint.main([str(GOLDEN / 'hat_tiny_x2.pth'), '-o', str(tmp_path / 'x.safetensors'),
                                    '--param-key', 'params']) == 1
    assert not (tmp_path / 'x.safetensors').exists()


def test_conversion_never_overwrites(tmp_path, caplog):
    pytest.importorskip('safetensors', reason='the safetensors package is not installed')
    target = tmp_path / 'hat_tiny_x2.safetensors'
    target.write_bytes(b'precious')
    source = tmp_path / 'hat_tiny_x2.pth'
    source.write_bytes((GOLDEN / 'hat_tiny_x2.pth').read_bytes())
    with caplog.at_level(logging.ERROR):
        assert convert_checkpoint.main([str(source)]) == 1
    assert target.read_bytes() == b'precious'
    assert 'already exists; not overwriting it' in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ['hat_tiny_x2.pth', 'hat_tiny_x2.safetensors']


class NotWeights:
    """A custom class: a pickle of it needs code, which weights-only loading refuses."""


def test_conversion_refuses_a_pickle_that_needs_code(tmp_path, caplog):
    source = tmp_path / 'suspicious.pth'
    torch.save({'params_ema': golden_state_dict('hat_tiny_x2'), 'extra': NotWeights()}, source)
    with caplog.at_level(logging.ERROR):
        assert convert_checkpoint.main([str(source)]) == 1
    assert 'refused to load' in caplog.text and 'NotWeights' in caplog.text
    assert not (tmp_path / 'suspicious.safetensors').exists()


def test_conversion_command_line_help():
    with pytest.raises(SystemExit) as info:
        convert_checkpoint.main(['--help'])
    assert info.value.code == 0

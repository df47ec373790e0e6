"""Training data: ImageNetPairedDataset, RealESRGANDataset and the data preparation scripts."""
from __future__ import annotations

import importlib.util
import os
import random
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from basicsr.data.paired_image_dataset import PairedImageDataset
from basicsr.utils.matlab_functions import imresize
from basicsr.utils.registry import DATASET_REGISTRY

from conftest import REPO, SHARED_DATASETS, requires_shared_datasets
from hat.data import ImageNetPairedDataset, RealESRGANDataset
from hat.data.realesrgan_dataset import pad_kernel

# lmdb comes with basicsr's requirements; an environment without it (a bare GPU image) still runs the other tests.
requires_lmdb = pytest.mark.skipif(importlib.util.find_spec('lmdb') is None,
                                   reason='lmdb is not installed (pip install lmdb; basicsr requires it)')

# The data block of options/train/train_Real_HAT_SRx4_mse_model.yml, less the paths.
REAL_HAT_KERNEL_OPTIONS = {
    'blur_kernel_size': 21,
    'kernel_list': ['iso', 'aniso', 'generalized_iso', 'generalized_aniso', 'plateau_iso', 'plateau_aniso'],
    'kernel_prob': [0.45, 0.25, 0.12, 0.03, 0.12, 0.03],
    'sinc_prob': 0.1,
    'blur_sigma': [0.2, 3],
    'betag_range': [0.5, 4],
    'betap_range': [1, 2],
    'blur_kernel_size2': 21,
    'kernel_list2': ['iso', 'aniso', 'generalized_iso', 'generalized_aniso', 'plateau_iso', 'plateau_aniso'],
    'kernel_prob2': [0.45, 0.25, 0.12, 0.03, 0.12, 0.03],
    'sinc_prob2': 0.1,
    'blur_sigma2': [0.2, 1.5],
    'betag_range2': [0.5, 4],
    'betap_range2': [1, 2],
    'final_sinc_prob': 0.8,
}


def load_script(name: str):
    """Import scripts/<name>.py as a module (registered, so worker processes can unpickle its functions)."""
    module_name = f'hat_scripts_{name}'
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, REPO / 'scripts' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def write_image(path: Path, h: int, w: int, seed: int, channels: int = 3) -> np.ndarray:
    """A random uint8 image (BGR, or grey for channels=1), written losslessly; returns what was written."""
    rng = np.random.default_rng(seed)
    shape = (h, w) if channels == 1 else (h, w, channels)
    img = rng.integers(0, 256, size=shape, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img)
    return img


@pytest.fixture
def gt_folder(tmp_path) -> Path:
    """Four GT images of different sizes, one of them in a sub-folder, plus files that are not training images."""
    folder = tmp_path / 'GT'
    for i, (h, w) in enumerate([(52, 60), (64, 48), (41, 70), (80, 80)]):
        write_image(folder / ('sub' if i == 3 else '') / f'img{i}.png', h, w, seed=i)
    (folder / '.DS_Store').write_bytes(b'\0')  # basicsr's recursive scandir crashes on hidden files
    (folder / 'README.txt').write_text('not an image')
    return folder


def seeded(dataset, index: int, seed: int = 0):
    random.seed(seed)
    np.random.seed(seed)
    return dataset[index]


def imagenet_opt(root, **extra) -> dict:
    opt = {'name': 'test', 'type': 'ImageNetPairedDataset', 'dataroot_gt': str(root), 'io_backend': {'type': 'disk'},
           'gt_size': 32, 'use_hflip': True, 'use_rot': True, 'scale': 4, 'phase': 'train'}
    opt.update(extra)
    return opt


def realesrgan_opt(root, **extra) -> dict:
    opt = {'name': 'test', 'type': 'RealESRGANDataset', 'dataroot_gt': str(root), 'io_backend': {'type': 'disk'},
           'use_hflip': True, 'use_rot': False, 'phase': 'train', 'scale': 4, **REAL_HAT_KERNEL_OPTIONS}
    opt.update(extra)
    return opt


def to_hwc(t: torch.Tensor) -> np.ndarray:
    return t.numpy().transpose(1, 2, 0)


def expected_lq(gt: torch.Tensor, scale: int) -> np.ndarray:
    return np.clip(imresize(to_hwc(gt), 1 / scale), 0, 1)


# ---------------------------------------------------------------- ImageNetPairedDataset


def test_datasets_are_registered():
    assert DATASET_REGISTRY.get('ImageNetPairedDataset') is ImageNetPairedDataset
    assert DATASET_REGISTRY.get('RealESRGANDataset') is RealESRGANDataset


@pytest.mark.parametrize('scale', [2, 3, 4])
def test_imagenet_train_pair_is_gt_patch_and_its_bicubic_downscale(gt_folder, scale):
    gt_size = 12 * scale
    ds = ImageNetPairedDataset(imagenet_opt(gt_folder, scale=scale, gt_size=gt_size))
    assert len(ds) == 4
    for index in range(len(ds)):
        for seed in range(3):
            item = seeded(ds, index, seed)
            assert item['gt'].shape == (3, gt_size, gt_size) and item['gt'].dtype == torch.float32
            assert item['lq'].shape == (3, 12, 12)
            assert item['gt_path'] == item['lq_path'] == ds.paths[index]
            assert 0 <= item['lq'].min() and item['lq'].max() <= 1
            np.testing.assert_array_equal(to_hwc(item['lq']), expected_lq(item['gt'], scale))


def test_imagenet_patch_is_a_grid_aligned_crop_of_the_image(tmp_path):
    src = write_image(tmp_path / 'GT' / 'a.png', 70, 90, seed=5)
    ds = ImageNetPairedDataset(imagenet_opt(tmp_path / 'GT', use_hflip=False, use_rot=False))
    src_rgb = src[:68, :88, ::-1].astype(np.float32) / 255  # mod-cropped to a multiple of 4, RGB
    corners = set()
    for seed in range(12):
        gt = to_hwc(seeded(ds, 0, seed)['gt'])
        found = [(top, left) for top in range(0, 68 - 32 + 1) for left in range(0, 88 - 32 + 1)
                 if np.array_equal(src_rgb[top:top + 32, left:left + 32], gt)]
        assert len(found) == 1, 'the GT patch must be one crop of the source image'
        top, left = found[0]
        assert top % 4 == 0 and left % 4 == 0
        corners.add(found[0])
    assert len(corners) > 1, 'the crop position must be random'


def test_imagenet_flips_and_rotations_are_applied(tmp_path):
    write_image(tmp_path / 'GT' / 'a.png', 32, 32, seed=6)
    ds = ImageNetPairedDataset(imagenet_opt(tmp_path / 'GT'))
    base = to_hwc(ImageNetPairedDataset(imagenet_opt(tmp_path / 'GT', use_hflip=False, use_rot=False))[0]['gt'])
    # The 8 flips/rotations of the square (the patch is the whole image here).
    variants = set()
    for hflip in (False, True):
        for vflip in (False, True):
            for transpose in (False, True):
                v = base[:, ::-1] if hflip else base
                v = v[::-1] if vflip else v
                v = v.transpose(1, 0, 2) if transpose else v
                variants.add(np.ascontiguousarray(v).tobytes())
    assert len(variants) == 8
    seen = set()
    for seed in range(30):
        item = seeded(ds, 0, seed)
        seen.add(np.ascontiguousarray(to_hwc(item['gt'])).tobytes())
        np.testing.assert_array_equal(to_hwc(item['lq']), expected_lq(item['gt'], 4))
    assert seen <= variants, 'augmented patches are flips/rotations of the image'
    assert len(seen) >= 6, 'several augmentations occur'


def test_imagenet_small_image_is_enlarged_to_gt_size(tmp_path):
    src = write_image(tmp_path / 'GT' / 'small.png', 20, 40, seed=7)
    ds = ImageNetPairedDataset(imagenet_opt(tmp_path / 'GT', use_hflip=False, use_rot=False))
    # Only the short side is stretched: 20x40 -> 32x40, then a 32x32 crop.
    enlarged = np.clip(cv2.resize(src.astype(np.float32) / 255, (40, 32), interpolation=cv2.INTER_CUBIC), 0, 1)
    enlarged = enlarged[..., ::-1]
    for seed in range(4):
        item = seeded(ds, 0, seed)
        assert item['gt'].shape == (3, 32, 32) and item['lq'].shape == (3, 8, 8)
        gt = to_hwc(item['gt'])
        assert any(np.allclose(gt, enlarged[:, left:left + 32], atol=1e-6) for left in (0, 4, 8))
        np.testing.assert_array_equal(to_hwc(item['lq']), expected_lq(item['gt'], 4))


def test_imagenet_val_phase_uses_the_whole_mod_cropped_image(gt_folder):
    ds = ImageNetPairedDataset(imagenet_opt(gt_folder, phase='val', scale=3))
    item = ds[2]  # img2.png, 41x70
    assert item['gt'].shape == (3, 39, 69) and item['lq'].shape == (3, 13, 23)
    src = cv2.imread(ds.paths[2])[:39, :69, ::-1].astype(np.float32) / 255
    np.testing.assert_array_equal(to_hwc(item['gt']), src)
    np.testing.assert_array_equal(to_hwc(item['lq']), expected_lq(item['gt'], 3))


def test_imagenet_y_channel(gt_folder):
    item = seeded(ImageNetPairedDataset(imagenet_opt(gt_folder, color='y')), 0)
    assert item['gt'].shape == (1, 32, 32) and item['lq'].shape == (1, 8, 8)
    assert 16 / 255 - 1e-6 <= item['gt'].min() and item['gt'].max() <= 235 / 255 + 1e-6


def test_imagenet_meta_info_restricts_and_orders_the_set(gt_folder, tmp_path):
    meta = tmp_path / 'meta.txt'
    meta.write_text('sub/img3.png (80,80,3)\nimg1.png (64,48,3)\n')
    ds = ImageNetPairedDataset(imagenet_opt(gt_folder, meta_info_file=str(meta)))
    assert ds.paths == [str(gt_folder / 'sub' / 'img3.png'), str(gt_folder / 'img1.png')]
    assert seeded(ds, 1)['gt_path'] == str(gt_folder / 'img1.png')


def test_imagenet_meta_info_bad_entry_is_named(gt_folder, tmp_path):
    meta = tmp_path / 'meta.txt'
    meta.write_text('img1.png (64,48,3)\nnot_there.png (10,10,3)\n')
    with pytest.raises(FileNotFoundError, match=r"not_there\.png") as err:
        ImageNetPairedDataset(imagenet_opt(gt_folder, meta_info_file=str(meta)))
    assert str(meta) in str(err.value)
    with pytest.raises(FileNotFoundError, match='meta_info file not found'):
        ImageNetPairedDataset(imagenet_opt(gt_folder, meta_info_file=str(tmp_path / 'absent.txt')))


def test_imagenet_clear_errors(gt_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match='GT folder not found: .*nowhere'):
        ImageNetPairedDataset(imagenet_opt(tmp_path / 'nowhere'))
    with pytest.raises(ValueError, match='gt_size must be a positive multiple of scale 4'):
        ImageNetPairedDataset(imagenet_opt(gt_folder, gt_size=30))
    with pytest.raises(ValueError, match='io_backend type'):
        ImageNetPairedDataset(imagenet_opt(gt_folder, io_backend={'type': 'memcached'}))
    (gt_folder / 'broken.png').write_bytes(b'this is not a png')
    ds = ImageNetPairedDataset(imagenet_opt(gt_folder))
    broken = ds.paths.index(str(gt_folder / 'broken.png'))
    with pytest.raises(ValueError, match=r'cannot read GT image .*broken\.png'):
        ds[broken]


@requires_lmdb
def test_imagenet_lmdb_gives_the_same_samples_as_the_folder(gt_folder, tmp_path):
    create_lmdb = load_script('create_lmdb')
    db = tmp_path / 'GT.lmdb'
    assert create_lmdb.main(['--gt', str(gt_folder), '--gt-lmdb', str(db)]) == 0
    from_disk = ImageNetPairedDataset(imagenet_opt(gt_folder))
    from_lmdb = ImageNetPairedDataset(imagenet_opt(db, io_backend={'type': 'lmdb'}))
    assert from_lmdb.paths == ['img0', 'img1', 'img2', 'sub/img3']
    for index in range(4):
        a, b = seeded(from_disk, index, index), seeded(from_lmdb, index, index)
        assert torch.equal(a['gt'], b['gt']) and torch.equal(a['lq'], b['lq'])
        assert b['gt_path'] == from_lmdb.paths[index]
    # A meta_info file narrows lmdb keys too, and names what the lmdb lacks.
    meta = tmp_path / 'meta.txt'
    meta.write_text('sub/img3.png (80,80,3)\n')
    assert ImageNetPairedDataset(imagenet_opt(db, io_backend={'type': 'lmdb'}, meta_info_file=str(meta))).paths == \
        ['sub/img3']
    meta.write_text('img9.png (80,80,3)\n')
    with pytest.raises(KeyError, match='img9'):
        ImageNetPairedDataset(imagenet_opt(db, io_backend={'type': 'lmdb'}, meta_info_file=str(meta)))


@requires_shared_datasets
def test_imagenet_on_real_training_images(tmp_path):
    t91 = SHARED_DATASETS / 'train' / 'T91'
    if not t91.is_dir():
        pytest.skip(f'training images not found at {t91}')
    folder = tmp_path / 'GT'
    folder.mkdir()
    for name in ('t1.png', 't10.png', 't12.png', 't2.png'):
        os.symlink(t91 / name, folder / name)
    ds = ImageNetPairedDataset(imagenet_opt(folder, gt_size=64))
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False)
    batch = next(iter(loader))
    assert batch['gt'].shape == (4, 3, 64, 64) and batch['lq'].shape == (4, 3, 16, 16)
    for gt, lq in zip(batch['gt'], batch['lq']):
        np.testing.assert_array_equal(to_hwc(lq), expected_lq(gt, 4))
        assert gt.std() > 0.01, 'a real image patch is not flat'


# ---------------------------------------------------------------- RealESRGANDataset


def test_realesrgan_sample_shapes_and_kernels(gt_folder):
    ds = RealESRGANDataset(realesrgan_opt(gt_folder))
    assert len(ds) == 4
    smaller = 0
    for seed in range(25):
        item = seeded(ds, seed % 4, seed)
        assert set(item) == {'gt', 'kernel1', 'kernel2', 'sinc_kernel', 'gt_path'}
        assert item['gt'].shape == (3, 400, 400) and item['gt'].dtype == torch.float32
        for key in ('kernel1', 'kernel2', 'sinc_kernel'):
            kernel = item[key]
            assert kernel.shape == (21, 21) and kernel.dtype == torch.float32
            assert kernel.sum().item() == pytest.approx(1.0, abs=1e-5)
            # Every kernel family is point-symmetric: a centred kernel equals itself rotated by 180 degrees.
            assert torch.allclose(kernel, kernel.flip(0, 1), atol=1e-6)
            smaller += int(kernel[0].abs().sum() == 0 and kernel[:, 0].abs().sum() == 0)
    assert smaller > 0, 'kernels drawn smaller than 21 are zero-padded'


def test_realesrgan_kernel_size_option_and_padding(gt_folder):
    ds = RealESRGANDataset(realesrgan_opt(gt_folder, blur_kernel_size=11, blur_kernel_size2=9))
    item = seeded(ds, 0)
    assert item['kernel1'].shape == (11, 11) and item['sinc_kernel'].shape == (11, 11)
    assert item['kernel2'].shape == (9, 9)
    k = np.ones((7, 7)) / 49
    padded = pad_kernel(k, 21)
    assert padded.shape == (21, 21) and padded.sum() == pytest.approx(1.0)
    np.testing.assert_array_equal(padded[7:14, 7:14], k)
    with pytest.raises(ValueError, match='blur_kernel_size must be odd'):
        RealESRGANDataset(realesrgan_opt(gt_folder, blur_kernel_size=20))


def test_realesrgan_matches_basicsr_contract(gt_folder, tmp_path):
    """Same seed, same sample as basicsr's RealESRGANDataset: GT patch and all three kernels."""
    meta = tmp_path / 'meta.txt'
    meta.write_text(''.join(f'{p} (1,1,3)\n' for p in ['img0.png', 'img2.png', 'sub/img3.png']))
    ours = RealESRGANDataset(realesrgan_opt(gt_folder, meta_info_file=str(meta), use_rot=True))
    reference = DATASET_REGISTRY.get('RealESRGANDataset_basicsr')(
        realesrgan_opt(gt_folder, meta_info=str(meta), use_rot=True))
    for index in range(3):
        for seed in range(4):
            a, b = seeded(ours, index, seed), seeded(reference, index, seed)
            assert a['gt_path'] == b['gt_path']
            for key in ('gt', 'kernel1', 'kernel2', 'sinc_kernel'):
                assert torch.equal(a[key], b[key]), (index, seed, key)


def test_realesrgan_small_image_is_reflect_padded(tmp_path):
    src = write_image(tmp_path / 'GT' / 'a.png', 50, 60, seed=3)
    ds = RealESRGANDataset(realesrgan_opt(tmp_path / 'GT', use_hflip=False))
    gt = to_hwc(seeded(ds, 0)['gt'])
    expected = cv2.copyMakeBorder(src, 0, 350, 0, 340, cv2.BORDER_REFLECT_101)[..., ::-1].astype(np.float32) / 255
    np.testing.assert_array_equal(gt, expected)


def test_realesrgan_large_image_is_cropped(tmp_path):
    src = write_image(tmp_path / 'GT' / 'a.png', 420, 410, seed=4)
    ds = RealESRGANDataset(realesrgan_opt(tmp_path / 'GT', use_hflip=False))
    gt = to_hwc(seeded(ds, 0, 1)['gt'])
    src_rgb = src[..., ::-1].astype(np.float32) / 255
    assert any(np.array_equal(gt, src_rgb[top:top + 400, left:left + 400]) for top in range(21) for left in range(11))


def test_realesrgan_meta_info_honoured(gt_folder, tmp_path):
    meta = tmp_path / 'meta.txt'
    meta.write_text('img2.png (41,70,3)\n')
    for key in ('meta_info_file', 'meta_info'):
        ds = RealESRGANDataset(realesrgan_opt(gt_folder, **{key: str(meta)}))
        assert ds.paths == [str(gt_folder / 'img2.png')]
    with pytest.raises(ValueError, match='both meta_info_file .* and meta_info'):
        RealESRGANDataset(realesrgan_opt(gt_folder, meta_info_file=str(meta), meta_info=str(tmp_path / 'x.txt')))
    meta.write_text('gone.png (1,1,3)\n')
    with pytest.raises(FileNotFoundError, match='gone.png'):
        RealESRGANDataset(realesrgan_opt(gt_folder, meta_info_file=str(meta)))


def test_realesrgan_missing_option_is_named(gt_folder):
    opt = realesrgan_opt(gt_folder)
    del opt['sinc_prob2']
    with pytest.raises(KeyError, match='sinc_prob2'):
        RealESRGANDataset(opt)
    with pytest.raises(ValueError, match='unknown kernels'):
        RealESRGANDataset(realesrgan_opt(gt_folder, kernel_list=['iso', 'gauss'], kernel_prob=[0.5, 0.5]))


@requires_lmdb
def test_realesrgan_lmdb_and_batching(gt_folder, tmp_path):
    create_lmdb = load_script('create_lmdb')
    db = tmp_path / 'GT.lmdb'
    assert create_lmdb.main(['--gt', str(gt_folder), '--gt-lmdb', str(db)]) == 0
    from_disk = RealESRGANDataset(realesrgan_opt(gt_folder))
    from_lmdb = RealESRGANDataset(realesrgan_opt(db, io_backend={'type': 'lmdb'}))
    a, b = seeded(from_disk, 3, 7), seeded(from_lmdb, 3, 7)
    for key in ('gt', 'kernel1', 'kernel2', 'sinc_kernel'):
        assert torch.equal(a[key], b[key])
    assert b['gt_path'] == 'sub/img3'
    batch = next(iter(torch.utils.data.DataLoader(from_lmdb, batch_size=2)))
    assert batch['gt'].shape == (2, 3, 400, 400) and batch['kernel1'].shape == (2, 21, 21)
    assert batch['sinc_kernel'].shape == (2, 21, 21) and batch['gt_path'] == ['img0', 'img1']


# ---------------------------------------------------------------- scripts


def test_extract_subimages_counts_sizes_and_content(tmp_path):
    extract = load_script('extract_subimages')
    src = write_image(tmp_path / 'in' / 'pic.png', 100, 130, seed=1)
    write_image(tmp_path / 'in' / 'tiny.png', 30, 200, seed=2)  # shorter than the crop: skipped
    out = tmp_path / 'out'
    assert extract.main(['--input', str(tmp_path / 'in'), '--output', str(out), '--crop-size', '48', '--step', '24',
                         '--thresh-size', '0', '--n-thread', '1']) == 0
    # rows start at 0, 24, 48 and 52 (flush); columns at 0, 24, 48, 72 and 82 (flush)
    tops, lefts = [0, 24, 48, 52], [0, 24, 48, 72, 82]
    files = sorted(p.name for p in out.iterdir())
    assert files == [f'pic_s{i:03d}.png' for i in range(1, 21)]
    for i, (top, left) in enumerate([(top, left) for top in tops for left in lefts], start=1):
        tile = cv2.imread(str(out / f'pic_s{i:03d}.png'), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(tile, src[top:top + 48, left:left + 48])
    # A threshold leaves thin uncovered borders alone: 4 and 10 pixels <= 10.
    assert extract.tile_starts(100, 48, 24, 10) == [0, 24, 48]
    assert extract.tile_starts(130, 48, 24, 10) == [0, 24, 48, 72]
    assert extract.tile_starts(30, 48, 24, 0) == []
    # An existing, non-empty output folder is refused.
    assert extract.main(['--input', str(tmp_path / 'in'), '--output', str(out)]) == 1


def test_extract_subimages_hr_and_lr_tiles_pair_up(tmp_path):
    extract = load_script('extract_subimages')
    hr = write_image(tmp_path / 'HR' / 'a' / '0001.png', 96, 120, seed=3)
    lr = cv2.resize(hr, (30, 24), interpolation=cv2.INTER_AREA)
    (tmp_path / 'LR' / 'a').mkdir(parents=True)
    assert cv2.imwrite(str(tmp_path / 'LR' / 'a' / '0001x4.png'), lr)
    assert extract.main(['--input', str(tmp_path / 'HR'), '--output', str(tmp_path / 'HR_sub'), '--crop-size', '40',
                         '--step', '20', '--n-thread', '2']) == 0
    assert extract.main(['--input', str(tmp_path / 'LR'), '--output', str(tmp_path / 'LR_sub'), '--crop-size', '10',
                         '--step', '5', '--strip-suffix', 'x4', '--n-thread', '1']) == 0
    hr_tiles = sorted(p.relative_to(tmp_path / 'HR_sub') for p in (tmp_path / 'HR_sub').rglob('*.png'))
    lr_tiles = sorted(p.relative_to(tmp_path / 'LR_sub') for p in (tmp_path / 'LR_sub').rglob('*.png'))
    assert hr_tiles == lr_tiles and len(hr_tiles) == 4 * 5
    assert str(hr_tiles[0]) == os.path.join('a', '0001_s001.png')
    # The DF2K presets keep HR and LR tiles aligned on DIV2K's sizes (2040x1356 HR, 510x339 LR x4).
    for scale in (2, 3, 4):
        crop, step, thresh = extract.PRESETS[f'lrx{scale}']
        hr_crop, hr_step, hr_thresh = extract.PRESETS['hr']
        for length in (2040, 1356, 2040 - 2040 % (scale * 8)):
            lr_starts = extract.tile_starts(length // scale, crop, step, thresh)
            hr_starts = extract.tile_starts(length // scale * scale, hr_crop, hr_step, hr_thresh)
            assert [s * scale for s in lr_starts] == hr_starts


def test_generate_meta_info_lines_match_images(tmp_path):
    gen = load_script('generate_meta_info')
    folder = tmp_path / 'GT'
    write_image(folder / 'b.png', 30, 40, seed=1)
    write_image(folder / 'a.png', 25, 17, seed=2, channels=1)
    write_image(folder / 'deep' / 'c.png', 12, 9, seed=3, channels=4)
    (folder / 'notes.txt').write_text('not an image')
    out = tmp_path / 'meta' / 'meta_info.txt'
    assert gen.main(['--input', str(folder), '--output', str(out)]) == 0
    lines = out.read_text().splitlines()
    assert [line.split()[0] for line in lines] == ['a.png', 'b.png', 'deep/c.png']
    for line in lines:
        name, shape = line.split()
        img = cv2.imread(str(folder / name), cv2.IMREAD_UNCHANGED)
        h, w = img.shape[:2]
        c = 1 if img.ndim == 2 else img.shape[2]
        assert shape == f'({h},{w},{c})'
    # The file drives a dataset directly.
    assert len(ImageNetPairedDataset(imagenet_opt(folder, phase='val', meta_info_file=str(out)))) == 3
    assert gen.main(['--input', str(tmp_path / 'absent'), '--output', str(out)]) == 1


@requires_lmdb
def test_create_lmdb_round_trip_gt_and_pairs(tmp_path):
    create_lmdb = load_script('create_lmdb')
    gt_dir, lq_dir = tmp_path / 'HR_sub', tmp_path / 'LR_sub'
    originals = {}
    for i, (h, w) in enumerate([(40, 48), (36, 44), (48, 48)]):
        name = f'{i:04d}_s001'
        originals[name] = write_image(gt_dir / f'{name}.png', h, w, seed=i)
        write_image(lq_dir / f'{name}.png', h // 4, w // 4, seed=10 + i)
    gt_db, lq_db = tmp_path / 'HR_sub.lmdb', tmp_path / 'LR_sub.lmdb'
    assert create_lmdb.main(['--gt', str(gt_dir), '--lq', str(lq_dir)]) == 0
    for db in (gt_db, lq_db):
        assert sorted(p.name for p in db.iterdir()) == ['data.mdb', 'lock.mdb', 'meta_info.txt']
    lines = (gt_db / 'meta_info.txt').read_text().splitlines()
    assert lines == [f'{k}.png ({v.shape[0]},{v.shape[1]},3) 1' for k, v in sorted(originals.items())]
    import lmdb
    env = lmdb.open(str(gt_db), readonly=True, lock=False)
    with env.begin() as txn:
        assert txn.stat()['entries'] == 3
        for key, img in originals.items():
            stored = cv2.imdecode(np.frombuffer(txn.get(key.encode('ascii')), np.uint8), cv2.IMREAD_UNCHANGED)
            np.testing.assert_array_equal(stored, img)
    env.close()
    # basicsr's PairedImageDataset reads the pair as it is.
    paired = PairedImageDataset({'dataroot_gt': str(gt_db), 'dataroot_lq': str(lq_db), 'io_backend': {'type': 'lmdb'},
                                 'phase': 'val', 'scale': 4})
    item = paired[0]
    assert item['gt_path'] == '0000_s001' and item['gt'].shape == (3, 40, 48) and item['lq'].shape == (3, 10, 12)
    # Refusals: existing output, mismatched pairs, names that cannot be keys.
    assert create_lmdb.main(['--gt', str(gt_dir)]) == 1
    write_image(tmp_path / 'LR2' / 'other.png', 10, 12, seed=9)
    assert create_lmdb.main(['--gt', str(gt_dir), '--gt-lmdb', str(tmp_path / 'x.lmdb'), '--lq', str(tmp_path / 'LR2'),
                             '--lq-lmdb', str(tmp_path / 'y.lmdb')]) == 1
    assert not (tmp_path / 'x.lmdb').exists()
    write_image(tmp_path / 'dots' / 'a.b.png', 8, 8, seed=1)
    assert create_lmdb.main(['--gt', str(tmp_path / 'dots')]) == 1

"""hat-upscale (hat/upscale.py): formats, bit depths, channels, orientation, failures, tiles and memory, self-ensemble.

Two tiny checkpoints: a random HAT x2 (any output, checked for sizes, depths and channels) and an SRVGGNetCompact
x2 with zero weights, which is exactly a nearest-neighbour enlargement: a stand-in network whose every output pixel
is known, for the checks of values (16-bit precision, grey, alpha, orientation, tiling).
"""
from __future__ import annotations

import io
import logging
import math
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image, ImageOps

from conftest import tiny_hat_config
from hat.archs.hat_arch import HAT
from hat.archs.srvgg_arch import SRVGGNetCompact
from hat.test import test_pipeline as run_test_pipeline
from hat.archs.detect import build_from_checkpoint
from hat.archs.hat_arch import RECONSTRUCTION_BAND, RECONSTRUCTION_HALO
from hat.inference import precision as precision_policy
from hat.inference.memory import MemoryModel, TensorPeakMemory, measure_peak_memory
from hat.inference.upscaler import Upscaler, all_finite
from hat.io.images import apply_exif_orientation
from hat.upscale import main
from hat.utils.ensemble import self_ensemble

SCALE = 2
TINY_HAT = tiny_hat_config(upscale=SCALE)
H, W = 12, 20  # input size of the test images (landscape, so that a rotation shows)



@pytest.fixture(scope='module')
def hat_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp('hat') / 'tiny_hat_x2.pth'
    torch.save({'params_ema': HAT(**TINY_HAT).state_dict()}, path)
    return path


@pytest.fixture(scope='module')
def nearest_checkpoint(tmp_path_factory) -> Path:
    net = SRVGGNetCompact(num_in_ch=3, num_out_ch=3, num_feat=4, num_conv=1, upscale=SCALE, act_type='prelu')
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
    path = tmp_path_factory.mktemp('srvgg') / 'nearest_x2.pth'
    torch.save({'params': net.state_dict()}, path)
    return path


def nearest(img: np.ndarray, scale: int = SCALE) -> np.ndarray:
    return np.repeat(np.repeat(img, scale, axis=0), scale, axis=1)


def read(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert img is not None, f'{path} was not written or cannot be read'
    return img


def with_orientation(rgb: np.ndarray, orientation: int, fmt: str) -> bytes:
    """Encode an RGB uint8 image with an EXIF orientation tag."""
    img = Image.fromarray(rgb)
    exif = img.getexif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, exif=exif, **({'quality': 95} if fmt == 'JPEG' else {}))
    return buffer.getvalue()


@pytest.fixture(scope='module')
def mixed_folder(tmp_path_factory) -> Path:
    """Every kind of input, two of them broken, one in a sub-folder."""
    root = tmp_path_factory.mktemp('mixed')
    (root / 'sub').mkdir()
    rng = np.random.default_rng(0)
    bgr = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    cv2.imwrite(str(root / 'rgb8.png'), bgr)
    cv2.imwrite(str(root / 'sub' / 'rgb16.png'), rng.integers(0, 65536, (H, W, 3), dtype=np.uint16))
    cv2.imwrite(str(root / 'grey.jpg'), bgr[..., 0])
    cv2.imwrite(str(root / 'rgba.png'), np.dstack([bgr, bgr[..., 1]]))
    cv2.imwrite(str(root / 'photo.webp'), bgr)
    cv2.imwrite(str(root / 'sub' / 'scan.tiff'), bgr)
    (root / 'rotated.jpg').write_bytes(with_orientation(bgr[..., ::-1].copy(), 6, 'JPEG'))
    (root / 'corrupt.png').write_bytes(rng.bytes(700))
    png = (root / 'rgb8.png').read_bytes()
    (root / 'truncated.png').write_bytes(png[:len(png) // 2])
    (root / 'notes.txt').write_text('not an image, not an image extension: ignored')
    return root


# ---------------------------------------------------------------------------------------------------------------
# A folder of mixed files
# ---------------------------------------------------------------------------------------------------------------


def test_mixed_folder(hat_checkpoint, mixed_folder, tmp_path, caplog):
    out = tmp_path / 'out'
    with caplog.at_level(logging.INFO):
        status = main(['-i', str(mixed_folder), '-o', str(out), '-m', str(hat_checkpoint), '-q'])
    assert status == 1  # two inputs failed

    expected = {  # output -> (shape, dtype): x2, upright, depth and channels of the input
        'rgb8_x2.png': ((2 * H, 2 * W, 3), np.uint8),
        'sub/rgb16_x2.png': ((2 * H, 2 * W, 3), np.uint16),
        'grey_x2.png': ((2 * H, 2 * W), np.uint8),
        'rgba_x2.png': ((2 * H, 2 * W, 4), np.uint8),
        'photo_x2.png': ((2 * H, 2 * W, 3), np.uint8),
        'sub/scan_x2.png': ((2 * H, 2 * W, 3), np.uint8),
        'rotated_x2.png': ((2 * W, 2 * H, 3), np.uint8),  # EXIF orientation 6: the upright image is portrait
    }
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob('*') if p.is_file())
    assert written == sorted(expected)  # nothing for the broken files, no temporary files left
    for name, (shape, dtype) in expected.items():
        img = read(out / name)
        assert img.shape == shape and img.dtype == dtype, name

    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    corrupt = [m for m in errors if str(mixed_folder / 'corrupt.png') in m]
    truncated = [m for m in errors if str(mixed_folder / 'truncated.png') in m]
    assert corrupt and 'not an image' in corrupt[0]
    assert truncated and 'truncated' in truncated[0]
    assert '7 written, 2 failed' in errors[-1]


def test_ext_auto_keeps_each_format_and_16_bits(nearest_checkpoint, mixed_folder, tmp_path):
    out = tmp_path / 'out'
    assert main(['-i', str(mixed_folder), '-o', str(out), '-m', str(nearest_checkpoint), '--ext', 'auto',
                 '--suffix', '', '-q']) == 1
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob('*') if p.is_file()) == [
        'grey.jpg', 'photo.webp', 'rgb8.png', 'rgba.png', 'rotated.jpg', 'sub/rgb16.png', 'sub/scan.tiff']
    # 16 bits in, 16 bits out, computed in float: a nearest-neighbour network reproduces every sample exactly.
    source16 = read(mixed_folder / 'sub' / 'rgb16.png')
    assert np.array_equal(read(out / 'sub' / 'rgb16.png'), nearest(source16))
    assert np.array_equal(read(out / 'sub' / 'scan.tiff'), nearest(read(mixed_folder / 'sub' / 'scan.tiff')))
    assert read(out / 'grey.jpg').shape == (2 * H, 2 * W)


# ---------------------------------------------------------------------------------------------------------------
# Values, with the nearest-neighbour stand-in
# ---------------------------------------------------------------------------------------------------------------


def bicubic_alpha(alpha: np.ndarray) -> np.ndarray:
    """uint8 alpha [H, W] -> bicubic x2, as integers."""
    up = F.interpolate(torch.from_numpy(alpha / 255.0).float()[None, None], scale_factor=SCALE, mode='bicubic',
                       align_corners=False)[0, 0].clamp(0, 1).numpy()
    return np.rint(up * 255).astype(int)


def test_grey_alpha_and_16_bit_values_are_exact(nearest_checkpoint, tmp_path):
    rng = np.random.default_rng(1)
    src = tmp_path / 'in'
    src.mkdir()
    grey16 = rng.integers(0, 65536, (H, W), dtype=np.uint16)
    grey8 = rng.integers(0, 256, (H, W), dtype=np.uint8)
    bgr = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    alpha = np.tile(np.linspace(0, 255, W).round().astype(np.uint8), (H, 1))
    cv2.imwrite(str(src / 'grey16.png'), grey16)
    cv2.imwrite(str(src / 'grey8.png'), grey8)
    cv2.imwrite(str(src / 'rgba.png'), np.dstack([bgr, alpha]))
    palette = Image.fromarray(grey8 % 4, mode='L').convert('P')
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] * 64)
    palette.save(src / 'palette.png', transparency=0)
    out = tmp_path / 'out'
    assert main(['-i', str(src), '-o', str(out), '-m', str(nearest_checkpoint), '--tile', '0', '-q']) == 0

    # grey through a 3-channel network: repeated, upscaled, and converted back with luma weights that sum to 1
    assert np.array_equal(read(out / 'grey16_x2.png'), nearest(grey16))
    assert np.array_equal(read(out / 'grey8_x2.png'), nearest(grey8))
    rgba = read(out / 'rgba_x2.png')
    assert np.array_equal(rgba[..., :3], nearest(bgr))
    # alpha: bicubic, not the network
    assert np.abs(rgba[..., 3].astype(int) - bicubic_alpha(alpha)).max() <= 1
    assert not np.array_equal(rgba[..., 3], nearest(alpha))
    # a palette image with a transparent index becomes RGBA
    indexed = read(out / 'palette_x2.png')
    assert indexed.shape == (2 * H, 2 * W, 4)
    assert np.array_equal(indexed[..., 2] == 255, nearest(grey8 % 4 == 1))
    transparent = np.where(grey8 % 4 == 0, 0, 255).astype(np.uint8)
    assert np.abs(indexed[..., 3].astype(int) - bicubic_alpha(transparent)).max() <= 1


@pytest.mark.parametrize('orientation', range(1, 9))
def test_exif_orientation_matches_pillow(orientation):
    rgb = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    with Image.open(io.BytesIO(with_orientation(rgb, orientation, 'PNG'))) as img:
        upright = np.asarray(ImageOps.exif_transpose(img))
    assert np.array_equal(apply_exif_orientation(rgb, orientation), upright)


def test_exif_orientation_is_applied_once(nearest_checkpoint, tmp_path):
    """A PNG with orientation 6 (lossless, so exact): the output is the upright image, enlarged."""
    rgb = np.random.default_rng(2).integers(0, 256, (H, W, 3), dtype=np.uint8)
    (tmp_path / 'in').mkdir()
    (tmp_path / 'in' / 'rotated.png').write_bytes(with_orientation(rgb, 6, 'PNG'))
    assert main(['-i', str(tmp_path / 'in' / 'rotated.png'), '-o', str(tmp_path / 'out'), '-m',
                 str(nearest_checkpoint), '--tile', '0', '-q']) == 0
    upright = np.rot90(rgb, -1)  # orientation 6: the stored image is shown turned 90 degrees clockwise
    assert np.array_equal(read(tmp_path / 'out' / 'rotated_x2.png')[..., ::-1], nearest(upright))


def png_with_exif_orientation(png: bytes, orientation: int) -> bytes:
    """Insert an eXIf chunk (orientation only) after IHDR: how a 16-bit colour PNG carries its orientation."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    payload = exif.tobytes()[len(b'Exif\x00\x00'):]  # PNG stores the TIFF structure without the JPEG header
    chunk = len(payload).to_bytes(4, 'big') + b'eXIf' + payload + \
        zlib.crc32(b'eXIf' + payload).to_bytes(4, 'big')
    end_of_ihdr = 8 + 8 + 13 + 4
    return png[:end_of_ihdr] + chunk + png[end_of_ihdr:]


def test_16_bit_images_are_turned_upright_exactly(nearest_checkpoint, tmp_path):
    """16-bit colour is decoded by OpenCV (Pillow keeps 8 of its bits), 16-bit grey by Pillow: both turned upright."""
    rng = np.random.default_rng(6)
    src = tmp_path / 'in'
    src.mkdir()
    bgr16 = rng.integers(0, 65536, (H, W, 3), dtype=np.uint16)
    (src / 'colour16.png').write_bytes(png_with_exif_orientation(cv2.imencode('.png', bgr16)[1].tobytes(), 6))
    grey16 = rng.integers(0, 65536, (H, W), dtype=np.uint16)
    grey = Image.fromarray(grey16)
    exif = grey.getexif()
    exif[0x0112] = 8
    grey.save(src / 'grey16.png', exif=exif)
    rgba = rng.integers(0, 256, (H, W, 4), dtype=np.uint8)
    Image.fromarray(rgba).save(src / 'rgba.tiff', tiffinfo={0x0112: 3})  # unassociated alpha, turned 180 degrees
    out = tmp_path / 'out'
    assert main(['-i', str(src), '-o', str(out), '-m', str(nearest_checkpoint), '--tile', '0', '-q']) == 0

    assert np.array_equal(read(out / 'colour16_x2.png'), nearest(np.rot90(bgr16, -1)))
    assert np.array_equal(read(out / 'grey16_x2.png'), nearest(np.rot90(grey16, 1)))
    # colour samples as stored, not multiplied by alpha
    assert np.array_equal(read(out / 'rgba_x2.png')[..., 2::-1], nearest(rgba[::-1, ::-1, :3]))


def test_tiled_equals_whole_image_for_a_per_pixel_network(nearest_checkpoint, tmp_path):
    """The CLI's tiles blend back to the whole-image result (seams would show with a per-pixel network)."""
    bgr = np.random.default_rng(3).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / 'big.png'), bgr)
    for tile in ('0', '16'):
        assert main(['-i', str(tmp_path / 'big.png'), '-o', str(tmp_path / f'tile{tile}'), '-m',
                     str(nearest_checkpoint), '--tile', tile, '--tile-pad', '4', '-q']) == 0
    whole, tiled = read(tmp_path / 'tile0' / 'big_x2.png'), read(tmp_path / 'tile16' / 'big_x2.png')
    assert np.array_equal(whole, nearest(bgr))
    assert np.array_equal(tiled, whole)


# ---------------------------------------------------------------------------------------------------------------
# Inputs are never overwritten; bad arguments
# ---------------------------------------------------------------------------------------------------------------


def test_refuses_to_write_onto_an_input(nearest_checkpoint, tmp_path, caplog):
    src = tmp_path / 'photos'
    src.mkdir()
    cv2.imwrite(str(src / 'a.png'), np.zeros((8, 8, 3), np.uint8))
    before = (src / 'a.png').read_bytes()
    with caplog.at_level(logging.ERROR):
        status = main(['-i', str(src), '-o', str(src), '-m', str(nearest_checkpoint), '--suffix', '', '--ext',
                       'auto', '-q'])
    assert status == 2
    assert (src / 'a.png').read_bytes() == before
    assert any('refusing to overwrite' in r.getMessage() for r in caplog.records)


def test_output_folder_inside_the_input_is_not_searched(nearest_checkpoint, tmp_path):
    src = tmp_path / 'photos'
    src.mkdir()
    cv2.imwrite(str(src / 'a.png'), np.zeros((8, 8, 3), np.uint8))
    for _ in range(2):  # the second run must not pick up the first run's output
        assert main(['-i', str(src), '-o', str(src / 'up'), '-m', str(nearest_checkpoint), '-q']) == 0
    assert sorted(p.name for p in (src / 'up').iterdir()) == ['a_x2.png']


def test_same_output_for_two_inputs_is_reported(nearest_checkpoint, tmp_path, caplog):
    src = tmp_path / 'in'
    src.mkdir()
    cv2.imwrite(str(src / 'a.png'), np.zeros((8, 8, 3), np.uint8))
    cv2.imwrite(str(src / 'a.bmp'), np.full((8, 8, 3), 255, np.uint8))
    with caplog.at_level(logging.ERROR):
        assert main(['-i', str(src), '-o', str(tmp_path / 'out'), '-m', str(nearest_checkpoint), '-q']) == 1
    assert read(tmp_path / 'out' / 'a_x2.png').max() == 255  # a.bmp sorts first and is written
    assert any(str(src / 'a.png') in r.getMessage() and '--ext auto' in r.getMessage() for r in caplog.records)


def test_bad_arguments_exit_with_status_2(nearest_checkpoint, mixed_folder, tmp_path):
    common = ['-i', str(mixed_folder), '-o', str(tmp_path / 'out')]
    assert main([*common, '-m', str(tmp_path / 'missing.pth')]) == 2
    (tmp_path / 'garbage.pth').write_bytes(b'not a checkpoint')
    assert main([*common, '-m', str(tmp_path / 'garbage.pth')]) == 2
    torch.save({'params': {'foo.weight': torch.zeros(3)}}, tmp_path / 'other.pth')
    assert main([*common, '-m', str(tmp_path / 'other.pth')]) == 2  # not HAT nor SRVGGNetCompact
    assert main([*common, '-m', str(nearest_checkpoint), '--device', 'cpu', '--precision', 'fp16']) == 2
    assert main(['-i', str(tmp_path / 'nowhere'), '-o', str(tmp_path / 'out'), '-m', str(nearest_checkpoint)]) == 2
    assert main([*common, '-m', str(nearest_checkpoint), '--tile', 'big']) == 2
    for device in ('foo', 'vulkan', 'cuda:x'):  # torch does not parse it / HAT does not run there
        assert main([*common, '-m', str(nearest_checkpoint), '--device', device]) == 2
    assert not (tmp_path / 'out').exists()


# Not in the decorator: gpu_check.py takes a test whose decorators name CUDA for one that needs a GPU.
DEVICES_ABSENT = ['cuda', 'cuda:0', 'mps', 'xpu']


@pytest.mark.parametrize('device', DEVICES_ABSENT)
def test_a_device_this_machine_lacks_is_refused_before_anything_is_written(device, nearest_checkpoint, mixed_folder,
                                                                           tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(precision_policy, '_backend_available', lambda device_type: device_type == 'cpu')
    out = tmp_path / 'out'
    with caplog.at_level(logging.ERROR):
        assert main(['-i', str(mixed_folder), '-o', str(out), '-m', str(nearest_checkpoint), '-q',
                     '--device', device]) == 2
    assert any(r.getMessage().startswith(f'--device {device}: ') and r.getMessage().endswith('use --device cpu')
               for r in caplog.records)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# Precision and self-ensemble
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def lr_image(tmp_path_factory) -> tuple[Path, np.ndarray]:
    yy, xx = np.mgrid[0:H, 0:W] / 8.0
    rgb = np.stack([0.5 + 0.4 * np.sin(xx + 2 * c) * np.cos(yy) for c in range(3)], axis=2)
    rgb8 = np.rint(rgb * 255).astype(np.uint8)
    path = tmp_path_factory.mktemp('lr') / 'smooth.png'
    cv2.imwrite(str(path), rgb8[..., ::-1])
    return path, rgb8


def test_self_ensemble_flag(hat_checkpoint, lr_image, tmp_path):
    path, rgb8 = lr_image
    for name, extra in (('plain', []), ('ensemble', ['--self-ensemble'])):
        assert main(['-i', str(path), '-o', str(tmp_path / name), '-m', str(hat_checkpoint), '--tile', '0', '-q',
                     *extra]) == 0
    plain, ensembled = (read(tmp_path / n / 'smooth_x2.png')[..., ::-1].astype(int) for n in ('plain', 'ensemble'))
    assert np.abs(plain - ensembled).mean() > 1  # HAT is not flip/rotation-equivariant: the average differs

    net = build_from_checkpoint(hat_checkpoint)
    x = torch.from_numpy(rgb8.transpose(2, 0, 1) / 255.0).float()[None]
    with torch.no_grad():
        expected = self_ensemble(net, x)[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255
    assert np.abs(ensembled - np.rint(expected)).max() <= 1


def test_bf16_on_the_cpu_is_close_to_fp32(hat_checkpoint, lr_image, tmp_path):
    path, _ = lr_image
    for precision in ('fp32', 'bf16'):
        assert main(['-i', str(path), '-o', str(tmp_path / precision), '-m', str(hat_checkpoint), '--tile', '0',
                     '--precision', precision, '-q']) == 0
    fp32, bf16 = (read(tmp_path / p / 'smooth_x2.png').astype(float) for p in ('fp32', 'bf16'))
    assert fp32.shape == bf16.shape
    assert np.abs(fp32 - bf16).mean() < 8  # bf16 keeps 8 bits of mantissa: a few grey levels


def test_self_ensemble_option_in_the_test_pipeline(hat_checkpoint, lr_image, tmp_path):
    """``val: self_ensemble: true`` of an option file goes through hat/test.py and changes the output."""
    path, rgb8 = lr_image
    (tmp_path / 'lq').mkdir()
    cv2.imwrite(str(tmp_path / 'lq' / 'smooth.png'), rgb8[..., ::-1])
    outputs = {}
    for ensemble in (False, True):
        name = f'tiny_ensemble_{ensemble}'
        opt = {
            'name': name, 'model_type': 'HATModel', 'scale': SCALE, 'num_gpu': 0,
            'datasets': {'test_1': {'name': 'lr', 'type': 'SingleImageDataset', 'dataroot_lq': str(tmp_path / 'lq'),
                                    'io_backend': {'type': 'disk'}}},
            'network_g': {'type': 'HAT', **TINY_HAT},
            'path': {'pretrain_network_g': str(hat_checkpoint), 'param_key_g': 'params_ema', 'strict_load_g': True},
            'val': {'save_img': True, 'suffix': 'sr', 'self_ensemble': ensemble},
        }
        option_file = tmp_path / f'{name}.yml'
        option_file.write_text(yaml.safe_dump(opt))
        run_test_pipeline(str(tmp_path), ['-opt', str(option_file)])
        outputs[ensemble] = read(tmp_path / 'results' / name / 'visualization' / 'lr' / 'smooth_sr.png')
    assert outputs[True].shape == outputs[False].shape == (2 * H, 2 * W, 3)
    assert np.abs(outputs[True].astype(int) - outputs[False]).mean() > 1
    # the pipeline's ensemble is the CLI's ensemble
    assert main(['-i', str(path), '-o', str(tmp_path / 'cli'), '-m', str(hat_checkpoint), '--tile', '0', '-q',
                 '--self-ensemble']) == 0
    assert np.abs(read(tmp_path / 'cli' / 'smooth_x2.png').astype(int) - outputs[True]).max() <= 1


# ---------------------------------------------------------------------------------------------------------------
# Memory: the estimate, --tile auto, and the bound
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def hat_net(hat_checkpoint):
    return build_from_checkpoint(hat_checkpoint)


def test_tensor_peak_memory_counts_live_tensors():
    known = torch.zeros(1000)
    with TensorPeakMemory([known]) as tracker:
        a = known + 1  # 4000 bytes
        b = a * 2  # 8000 live
        del a
        c = b + 1  # a freed: 8000 live again
        view = c.view(10, 100)  # a view costs nothing
    assert tracker.peak == 8000 and view.shape == (10, 100)
    with TensorPeakMemory() as tracker:  # views of storages made before (a cached bias) allocate nothing
        cache = known.view(10, 100).expand(3, 10, 100)
        known.add_(1)
    assert tracker.peak == 0 and cache.shape == (3, 10, 100)
    assert measure_peak_memory(lambda: known * 3, device=torch.device('cpu'), known=[known]) == 4000


def test_memory_model_predicts_a_larger_tile(hat_net):
    upscaler = Upscaler(hat_net, tile='auto', progress=False)
    model = upscaler.memory_model()  # measured on 32 and 48 pixel tiles
    for side in (64, 96):
        x = torch.rand(1, 3, side, side)
        measured = measure_peak_memory(lambda: upscaler.forward(x), device=torch.device('cpu'),  # noqa: B023
                                       known=[*hat_net.parameters(), *hat_net.buffers(), x])
        if side <= RECONSTRUCTION_BAND + 2 * RECONSTRUCTION_HALO:
            assert abs(model.peak(side, side) - measured) / measured < 0.2
        else:  # the upsampling head runs in bands there: the estimate becomes an upper bound
            assert measured <= model.peak(side, side) < 2 * measured


def test_auto_tile_keeps_the_whole_run_within_the_budget(hat_net):
    upscaler = Upscaler(hat_net, tile='auto', progress=False)
    model = upscaler.memory_model()
    size = 64
    # Room for the output canvas and one 32-pixel tile, not for a 40-pixel one.
    budget = upscaler._host_bytes(size, size, 3) + (model.peak(32, 32) + model.peak(36, 36)) / 2
    upscaler.max_memory = budget
    assert upscaler.tile_for(size, size) == 32
    image = np.random.default_rng(4).random((size, size, 3), dtype=np.float32)
    with TensorPeakMemory() as tracker:
        out = upscaler.upscale(image)
    assert out.shape == (2 * size, 2 * size, 3)
    assert tracker.peak <= budget
    upscaler.max_memory = 2**40
    assert upscaler.tile_for(size, size) is None  # everything fits: one piece


def test_tiled_peak_memory_is_far_below_the_whole_image(hat_net):
    size = 192
    image = np.random.default_rng(5).random((size, size, 3), dtype=np.float32)
    peaks = {}
    for tile in (None, 32):
        upscaler = Upscaler(hat_net, tile=tile, tile_pad=4, progress=False)
        with TensorPeakMemory() as tracker:
            upscaler.upscale(image)
        peaks[tile] = tracker.peak
    # Whole image: every activation of the 192x192 map; tiled: the output canvas and one tile's activations.
    assert peaks[32] < peaks[None] / 4


def test_large_tiled_image_needs_its_canvas_and_one_tile():
    """A 1024x1024 image through a cheap x4 network in 128-pixel tiles: the peak is the 16x16-fold output canvas with
    its blend weights, plus a tile's share; no full-size temporary (division, NaN check) on top."""
    net = SRVGGNetCompact(num_in_ch=3, num_out_ch=3, num_feat=4, num_conv=1, upscale=4).eval()
    image = np.random.default_rng(6).random((1024, 1024, 3), dtype=np.float32)
    upscaler = Upscaler(net, tile=128, tile_pad=8, progress=False)
    with TensorPeakMemory([*net.parameters(), *net.buffers()]) as tracker:
        out = upscaler.upscale(image)
    assert out.shape == (4096, 4096, 3)
    canvas = 4096 * 4096 * 4 * (3 + 1)  # float32 RGB canvas and one-channel weight sum
    assert canvas <= tracker.peak < 1.1 * canvas


def test_all_finite_looks_at_every_band():
    t = torch.zeros(1, 3, 600, 7)
    assert all_finite(t)
    for value, row in ((float('nan'), 599), (float('inf'), 0), (-float('inf'), 300)):
        bad = t.clone()
        bad[0, 2, row, 6] = value
        assert not all_finite(bad, rows=256)


def test_memory_model_largest_side():
    model = MemoryModel(fixed=1000, per_pixel=10)
    assert model.largest_side(1000 + 10 * 50 * 50, 16) == 48
    assert model.largest_side(900, 16) == 0
    assert math.isclose(model.peak(4, 8), 1320)

"""MATLAB-exact bicubic resizing and the benchmark preparation script.

The Set5/Set14 LR files in the shared datasets are MATLAB's own ``imresize(modcrop(HR, s), 1/s, 'bicubic')``, so they
are a bit-exact reference for :func:`imresize_uint8`.
"""
from __future__ import annotations

import importlib.util
import logging

import cv2
import numpy as np
import pytest
from basicsr.utils.matlab_functions import imresize as basicsr_imresize

from conftest import REPO, SHARED_DATASETS, requires_shared_datasets
from hat.utils.matlab_resize import imresize, imresize_uint8, output_size

SET_SIZES = {'Set5': 5, 'Set14': 14}
SCALES = (2, 3, 4)


def read(path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert img is not None, f'cannot read {path}'
    return img


def modcrop(img: np.ndarray, scale: int) -> np.ndarray:
    return img[:img.shape[0] // scale * scale, :img.shape[1] // scale * scale]


@pytest.fixture(scope='module')
def script():
    """scripts/prepare_benchmark.py loaded as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location('prepare_benchmark', REPO / 'scripts' / 'prepare_benchmark.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------------------------
# Bit-exact against MATLAB's own files


@requires_shared_datasets
@pytest.mark.parametrize('scale', SCALES)
@pytest.mark.parametrize('set_name', sorted(SET_SIZES))
def test_matches_matlab_lr_files(set_name, scale):
    hr_paths = sorted((SHARED_DATASETS / set_name / 'HR').glob('*.png'))
    assert len(hr_paths) == SET_SIZES[set_name]
    mismatches = []
    for hr_path in hr_paths:
        expected = read(SHARED_DATASETS / set_name / 'LR_bicubic' / f'X{scale}' / hr_path.name)
        out = imresize_uint8(modcrop(read(hr_path), scale), 1 / scale)
        assert out.dtype == np.uint8
        if out.shape != expected.shape:
            mismatches.append(f'{hr_path.name}: shape {out.shape} != {expected.shape}')
        elif not np.array_equal(out, expected):
            mismatches.append(f'{hr_path.name}: {np.count_nonzero(out != expected)} pixels differ')
    assert not mismatches, mismatches


@requires_shared_datasets
def test_grey_image_stays_grey():
    hr = read(SHARED_DATASETS / 'Set14' / 'HR' / 'bridge.png')
    assert hr.ndim == 2
    out = imresize_uint8(modcrop(hr, 4), 1 / 4)
    assert out.ndim == 2
    assert np.array_equal(out, read(SHARED_DATASETS / 'Set14' / 'LR_bicubic' / 'X4' / 'bridge.png'))


@requires_shared_datasets
@pytest.mark.parametrize('scale', SCALES)
def test_float_end_to_end_is_not_matlab(scale):
    """Rounding only at the end (basicsr's way) misses MATLAB's file on many pixels; rounding between passes not."""
    gt = modcrop(read(SHARED_DATASETS / 'Set5' / 'HR' / 'baby.png'), scale)
    expected = read(SHARED_DATASETS / 'Set5' / 'LR_bicubic' / f'X{scale}' / 'baby.png')
    float_lr = basicsr_imresize(gt.astype(np.float32) / 255.0, 1 / scale)
    float_lr = np.clip(np.round(float_lr * 255.0), 0, 255).astype(np.uint8)
    assert np.mean(float_lr != expected) > 0.05
    assert np.abs(float_lr.astype(int) - expected).max() == 1
    assert np.array_equal(imresize_uint8(gt, 1 / scale), expected)


# ----------------------------------------------------------------------------------------------------------------
# Hand-computed values
#
# Shrinking by 2 with antialiasing, output pixel 1 (1-based) samples the input at u = 1.5 with the kernel stretched to
# width 8: taps at distances +-0.25, +-0.75, +-1.25, +-1.75 (times 1/2) get weights [-3, -9, 29, 111, 111, 29, -9, -3] /
# 256 on input pixels -2..5. Mirroring with the edge repeated (-2 -> 3, -1 -> 2, 0 -> 1, 5 -> 4), a length-4 signal
# p shrinks to [140 p1 + 102 p2 + 26 p3 - 12 p4, -12 p1 + 26 p2 + 102 p3 + 140 p4] / 256.
SHRINK2_ROWS = ((140, 102, 26, -12), (-12, 26, 102, 140))


def round_half_up_div(numerator: int, denominator: int) -> int:
    """round(numerator / denominator), halves up, saturated to uint8: exact integer arithmetic."""
    return min(255, max(0, (2 * numerator + denominator) // (2 * denominator)))


def shrink2_by_hand(img: list[list[int]]) -> list[list[int]]:
    """MATLAB's uint8 two-pass x1/2 resize of a 4x4 image: columns (height) first, rounding in between."""
    cols = list(zip(*img))
    mid = [[round_half_up_div(sum(w * v for w, v in zip(row, col)), 256) for col in cols] for row in SHRINK2_ROWS]
    return [[round_half_up_div(sum(w * v for w, v in zip(row, line)), 256) for row in SHRINK2_ROWS] for line in mid]


def test_shrink_matches_hand_computation_and_differs_from_float():
    img = [[195, 4, 203, 247], [138, 3, 206, 135], [19, 110, 16, 67], [153, 227, 253, 87]]
    expected = shrink2_by_hand(img)
    assert expected == [[96, 171], [132, 116]]
    arr = np.array(img, dtype=np.uint8)
    assert imresize_uint8(arr, 0.5).tolist() == expected
    # Without the intermediate rounding the exact values are 96.67, 170.70, 131.81, 116.56: two pixels land on the
    # other side of a half.
    float_out = imresize(arr.astype(np.float32), 0.5)
    np.testing.assert_allclose(float_out, [[96.67206, 170.70294], [131.81232, 116.56268]], atol=1e-4)
    basicsr_out = basicsr_imresize(arr.astype(np.float32), 0.5)
    np.testing.assert_allclose(float_out, basicsr_out, atol=1e-4)
    assert np.count_nonzero(np.round(float_out) != np.array(expected)) == 2


def test_half_rounds_up():
    # Every column [0, 1, 1, 0] gives exactly (102 + 26) / 256 = 0.5 in the first pass: half up makes it 1
    # (round-half-to-even would give 0), and the second pass keeps 1.
    img = np.array([[0] * 4, [1] * 4, [1] * 4, [0] * 4], dtype=np.uint8)
    assert imresize_uint8(img, 0.5).tolist() == [[1, 1], [1, 1]]
    assert imresize(img.astype(np.float32), 0.5) == pytest.approx(np.full((2, 2), 0.5), abs=1e-7)


def test_enlarge_matches_hand_computation():
    # Enlarging by 2 (no antialiasing): output pixel 1 samples u = 0.75 with weights [-3, 29, 111, -9] / 128 on pixels
    # -1..2 and output pixel 2 samples u = 1.25 with [-9, 111, 29, -3] / 128 on pixels 0..3; with mirroring the ends
    # are 140 p1 - 12 p2 and 102 p1 + 29 p2 - 3 p3 (over 128), symmetric at the right end. One row: the height pass
    # only copies it. The second channel's first pixel goes negative and saturates to 0.
    rows = [[100, 60, 30, 200], [10, 200, 50, 90]]
    img = np.array(rows, dtype=np.uint8).T[None]  # [1, 4, 2]
    out = imresize_uint8(img, 2)
    assert out.shape == (2, 8, 2)
    assert np.array_equal(out[0], out[1])
    for channel, (p1, p2, p3, p4) in enumerate(rows):
        numerators = [140 * p1 - 12 * p2, 102 * p1 + 29 * p2 - 3 * p3, 102 * p4 + 29 * p3 - 3 * p2, 140 * p4 - 12 * p3]
        expected_ends = [round_half_up_div(n, 128) for n in numerators]
        got = out[0, :, channel].tolist()
        assert [got[0], got[1], got[6], got[7]] == expected_ends
    assert out[0, :, 0].tolist()[:2] == [104, 93]
    assert out[0, 0, 1] == 0


# ----------------------------------------------------------------------------------------------------------------
# Float version, shapes and argument checks


@pytest.mark.parametrize('scale', [1 / 2, 1 / 3, 1 / 4, 0.7, 1.5, 2, 3, 4])
@pytest.mark.parametrize('shape', [(24, 20, 3), (25, 19), (33, 41, 1)])
def test_float_matches_basicsr(shape, scale):
    img = np.random.default_rng(0).random(shape, dtype=np.float32)
    ours = imresize(img, scale)
    reference = basicsr_imresize(img, scale)
    assert ours.dtype == np.float32
    assert ours.shape == reference.shape
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-5)


def test_output_size_rules():
    # A mod-cropped length shrinks to exactly length / s, also for 1/3, which is not exact in binary.
    for scale in SCALES:
        assert all(output_size(k * scale, 1 / scale) == k for k in range(1, 3000))
    # Otherwise MATLAB rounds the size up.
    assert output_size(10, 1 / 4) == 3
    assert output_size(7, 1 / 2) == 4
    assert output_size(5, 1.5) == 8
    assert output_size(3, 1 / 4) == 1
    img = np.zeros((10, 7, 3), dtype=np.uint8)
    assert imresize_uint8(img, 1 / 4).shape == (3, 2, 3)
    assert imresize(img.astype(np.float32), 1.5).shape == (15, 11, 3)
    assert imresize_uint8(np.zeros((10, 7), dtype=np.uint8), 1 / 2).shape == (5, 4)
    assert imresize_uint8(np.zeros((10, 7, 1), dtype=np.uint8), 3).shape == (30, 21, 1)


def test_identity_and_constants():
    img = np.random.default_rng(1).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    assert np.array_equal(imresize_uint8(img, 1), img)
    flat = np.full((12, 12), 77, dtype=np.uint8)
    for scale in (1 / 2, 1 / 3, 1 / 4, 2, 3):
        out = imresize_uint8(flat, scale)
        assert out.shape == (output_size(12, scale), ) * 2
        assert (out == 77).all()


def test_rejects_bad_input():
    with pytest.raises(TypeError, match='uint8'):
        imresize_uint8(np.zeros((4, 4), dtype=np.uint16), 0.5)
    with pytest.raises(TypeError, match='imresize_uint8'):
        imresize(np.zeros((4, 4), dtype=np.uint8), 0.5)
    with pytest.raises(ValueError, match='scale'):
        imresize_uint8(np.zeros((4, 4), dtype=np.uint8), 0)
    with pytest.raises(ValueError, match='shape'):
        imresize(np.zeros((1, 4, 4, 3), dtype=np.float32), 0.5)


# ----------------------------------------------------------------------------------------------------------------
# scripts/prepare_benchmark.py


@requires_shared_datasets
def test_prepare_benchmark_set5_is_matlab_exact(script, tmp_path):
    hr_dir = SHARED_DATASETS / 'Set5' / 'HR'
    out = tmp_path / 'Set5'
    assert script.main(['--hr', str(hr_dir), '--out', str(out), '--scales', '2', '3', '4']) == 0
    names = sorted(p.name for p in hr_dir.glob('*.png'))
    assert len(names) == 5
    for scale in SCALES:
        assert sorted(p.name for p in (out / f'GTmod{scale}').iterdir()) == names
        assert sorted(p.name for p in (out / f'LRbicx{scale}').iterdir()) == names
        for name in names:
            hr = read(hr_dir / name)
            gt = read(out / f'GTmod{scale}' / name)
            assert gt.shape[:2] == (hr.shape[0] // scale * scale, hr.shape[1] // scale * scale)
            assert np.array_equal(gt, modcrop(hr, scale))
            lr = read(out / f'LRbicx{scale}' / name)
            assert np.array_equal(lr, read(SHARED_DATASETS / 'Set5' / 'LR_bicubic' / f'X{scale}' / name)), name


def test_prepare_benchmark_keeps_channels_and_names(script, tmp_path):
    rng = np.random.default_rng(2)
    hr_dir = tmp_path / 'HR'
    hr_dir.mkdir()
    grey = rng.integers(0, 256, (13, 10), dtype=np.uint8)
    colour = rng.integers(0, 256, (9, 14, 3), dtype=np.uint8)
    assert cv2.imwrite(str(hr_dir / 'grey.png'), grey)
    assert cv2.imwrite(str(hr_dir / 'colour.bmp'), colour)
    (hr_dir / 'notes.txt').write_text('not an image')
    out = tmp_path / 'out'
    assert script.main(['--hr', str(hr_dir), '--out', str(out), '--scales', '3']) == 0
    assert sorted(p.name for p in out.iterdir()) == ['GTmod3', 'LRbicx3']
    assert sorted(p.name for p in (out / 'LRbicx3').iterdir()) == ['colour.png', 'grey.png']
    assert np.array_equal(read(out / 'GTmod3' / 'grey.png'), grey[:12, :9])
    assert np.array_equal(read(out / 'LRbicx3' / 'grey.png'), imresize_uint8(grey[:12, :9], 1 / 3))
    assert np.array_equal(read(out / 'GTmod3' / 'colour.png'), colour[:9, :12])
    assert np.array_equal(read(out / 'LRbicx3' / 'colour.png'), imresize_uint8(colour[:9, :12], 1 / 3))
    assert read(out / 'LRbicx3' / 'colour.png').shape == (3, 4, 3)


def test_prepare_benchmark_errors(script, tmp_path, caplog):
    missing = tmp_path / 'missing'
    with caplog.at_level(logging.ERROR):
        assert script.main(['--hr', str(missing), '--out', str(tmp_path / 'out')]) == 1
    assert 'HR folder not found' in caplog.text and str(missing) in caplog.text
    with pytest.raises(FileNotFoundError):
        script.prepare_benchmark(missing, tmp_path / 'out')

    empty = tmp_path / 'empty'
    empty.mkdir()
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert script.main(['--hr', str(empty), '--out', str(tmp_path / 'out')]) == 1
    assert 'no images' in caplog.text

    deep = tmp_path / 'deep'
    deep.mkdir()
    assert cv2.imwrite(str(deep / 'sixteen.png'), np.full((8, 8, 3), 40000, dtype=np.uint16))
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert script.main(['--hr', str(deep), '--out', str(tmp_path / 'out')]) == 1
    assert '16-bit' in caplog.text and 'sixteen.png' in caplog.text
    assert not list((tmp_path / 'out' / 'LRbicx4').glob('*'))


def test_prepare_benchmark_help(script, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.main(['--help'])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert '--hr' in help_text and '--out' in help_text and '--scales' in help_text

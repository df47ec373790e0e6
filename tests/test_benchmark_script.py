"""scripts/benchmark.py: the paper's table for a checkpoint, with the bicubic baseline and missing sets listed."""
from __future__ import annotations

import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from conftest import REPO, SHARED_DATASETS, requires_shared_datasets
from hat.archs.hat_arch import HAT

SCALE = 4
TINY_HAT_X4 = dict(upscale=SCALE, in_chans=3, img_size=16, window_size=4, embed_dim=12, depths=[1], num_heads=[2],
                   compress_ratio=3, squeeze_factor=6, mlp_ratio=2.0)
# Bicubic baselines of the benchmark protocol (Y channel, crop = scale, BasicSR convention; shared/datasets/README.md)
BICUBIC = {('Set5', 2): 33.67, ('Set5', 3): 30.40, ('Set5', 4): 28.43, ('Set14', 4): 26.09}


def load_script(name: str):
    """A file of scripts/ as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / 'scripts' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def benchmark():
    return load_script('benchmark')



@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp('ckpt') / 'tiny_hat_x4.pth'
    torch.save({'params_ema': HAT(**TINY_HAT_X4).state_dict()}, path)
    return path


@pytest.fixture(scope='module')
def datasets_root(tmp_path_factory) -> Path:
    """Set5 prepared from the shared HR images (if present), and a synthetic set spelled like the option files."""
    prepare = load_script('prepare_benchmark')
    root = tmp_path_factory.mktemp('datasets')
    if SHARED_DATASETS.is_dir():
        assert prepare.main(['--hr', str(SHARED_DATASETS / 'Set5' / 'HR'), '--out', str(root / 'Set5'), '--scales',
                             '2', '3', '4']) == 0
    hr = tmp_path_factory.mktemp('urban_hr')
    yy, xx = np.mgrid[0:50, 0:66] / 9.0
    for i in range(2):
        img = np.stack([127 + 100 * np.sin(xx * (i + 1) + c) * np.cos(yy) for c in range(3)], axis=2)
        cv2.imwrite(str(hr / f'img_{i:03d}.png'), np.rint(img).astype(np.uint8))
    assert prepare.main(['--hr', str(hr), '--out', str(root / 'urban100'), '--scales', str(SCALE)]) == 0
    return root


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline='', encoding='utf-8') as handle:
        return {row['set']: row for row in csv.DictReader(handle)}


@requires_shared_datasets
def test_benchmark_table(benchmark, checkpoint, datasets_root, tmp_path):
    out = tmp_path / 'out'
    status = benchmark.main(['-m', str(checkpoint), '--sets', 'Set5', 'urban100', 'B100', '--datasets-root',
                             str(datasets_root), '--out', str(out), '--published', 'HAT', '--device', 'cpu'])
    assert status == 0
    rows = read_csv(out / 'benchmark_tiny_hat_x4.csv')
    assert list(rows) == ['Set5', 'Urban100', 'B100']  # the paper's names, in the order asked

    set5 = rows['Set5']
    assert set5['status'] == 'ok' and set5['images'] == '5' and set5['scale'] == '4'
    assert abs(float(set5['bicubic_psnr']) - BICUBIC[('Set5', 4)]) < 0.01
    assert 0.7 < float(set5['bicubic_ssim']) < 0.9
    # the paper's HAT x4 row and the difference
    assert (float(set5['paper_psnr']), float(set5['paper_ssim'])) == (33.04, 0.9056)
    assert math.isclose(float(set5['diff_psnr']), float(set5['psnr']) - 33.04, abs_tol=2e-6)
    assert 5 < float(set5['psnr']) < 40  # a random tiny network: measured, far from the paper

    urban = rows['Urban100']  # found under the option files' spelling, datasets/urban100
    assert urban['status'] == 'ok' and urban['images'] == '2' and urban['paper_psnr'] == '27.970000'
    assert float(urban['bicubic_psnr']) > 20

    b100 = rows['B100']
    assert b100['status'] == 'not found' and b100['psnr'] == '' and b100['bicubic_psnr'] == ''

    table = (out / 'benchmark_tiny_hat_x4.md').read_text()
    assert '| Method | Set5 | Urban100 | B100 |' in table
    bicubic_row = next(line for line in table.splitlines() if line.startswith('| Bicubic |'))
    assert bicubic_row.split(' | ')[1].startswith('28.43 / ') and bicubic_row.endswith('not found |')
    assert '| HAT x4 (paper) | 33.04 / 0.9056 | 27.97 / 0.8368 | 28.00 / 0.7517 |' in table
    assert 'B100: no GTmod4/ and LRbicx4/' in table and 'BSDS100' in table
    # the test pipeline ran and logged the same PSNR
    log = next((out / 'results' / 'benchmark_tiny_hat_x4').glob('test_*.log')).read_text()
    assert f'# psnr: {float(set5["psnr"]):.4f}' in log


@requires_shared_datasets
@pytest.mark.parametrize('scale', [2, 3])
def test_bicubic_baseline_of_set5(benchmark, datasets_root, scale):
    scores = benchmark.bicubic_scores(datasets_root / 'Set5' / f'GTmod{scale}', datasets_root / 'Set5' /
                                      f'LRbicx{scale}', scale)
    assert abs(scores['psnr'] - BICUBIC[('Set5', scale)]) < 0.01


@requires_shared_datasets
def test_bicubic_baseline_of_set14_with_its_grey_image(benchmark, tmp_path):
    """Set14's grey bridge.png is read as three channels, as the test pipeline reads it."""
    prepare = load_script('prepare_benchmark')
    assert prepare.main(['--hr', str(SHARED_DATASETS / 'Set14' / 'HR'), '--out', str(tmp_path), '--scales',
                         '4']) == 0
    scores = benchmark.bicubic_scores(tmp_path / 'GTmod4', tmp_path / 'LRbicx4', 4)
    assert abs(scores['psnr'] - BICUBIC[('Set14', 4)]) < 0.01


def test_no_set_found_and_custom_model_without_paper_numbers(benchmark, checkpoint, tmp_path):
    out = tmp_path / 'out'
    status = benchmark.main(['-m', str(checkpoint), '--sets', 'Set5', 'manga109', '--datasets-root',
                             str(tmp_path / 'empty'), '--out', str(out)])
    assert status == 1
    rows = read_csv(out / 'benchmark_tiny_hat_x4.csv')
    assert [(name, row['status'], row['paper_psnr']) for name, row in rows.items()] == [
        ('Set5', 'not found', ''), ('Manga109', 'not found', '')]  # a custom HAT has no row in the paper
    table = (out / 'benchmark_tiny_hat_x4.md').read_text()
    assert '- Manga109: no GTmod4/ and LRbicx4/' in table and 'manga109' in table


def test_paper_row_with_psnr_only(benchmark, checkpoint, datasets_root, tmp_path):
    """HAT-S x4 is published with PSNR only: the SSIM half of the paper row and of the difference read n/a."""
    out = tmp_path / 'out'
    assert benchmark.main(['-m', str(checkpoint), '--sets', 'Urban100', '--datasets-root', str(datasets_root),
                           '--out', str(out), '--published', 'HAT-S', '--device', 'cpu']) == 0
    urban = read_csv(out / 'benchmark_tiny_hat_x4.csv')['Urban100']
    assert (urban['paper_psnr'], urban['paper_ssim'], urban['diff_ssim']) == ('27.870000', '', '')
    assert math.isclose(float(urban['diff_psnr']), float(urban['psnr']) - 27.87, abs_tol=2e-6)
    table = (out / 'benchmark_tiny_hat_x4.md').read_text()
    assert '| HAT-S x4 (paper) | 27.87 / n/a |' in table
    difference = next(line for line in table.splitlines() if line.startswith('| Difference |'))
    assert difference.endswith(' / n/a |') and difference.split(' | ')[1].startswith('-')
    assert "Source of the HAT-S row: x4 PSNR from the authors' README table" in table


def test_bad_arguments(benchmark, checkpoint, tmp_path):
    assert benchmark.main(['-m', str(tmp_path / 'missing.pth'), '--out', str(tmp_path)]) == 2
    assert benchmark.main(['-m', str(checkpoint), '--scale', '2', '--out', str(tmp_path)]) == 2
    assert benchmark.main(['-m', str(checkpoint), '--published', 'HAT-XL', '--out', str(tmp_path)]) == 2


def test_published_results_file():
    """The data file: one source, every variant x scale x set present, values either null or PSNR/SSIM pairs."""
    published = json.loads((REPO / 'hat' / 'data' / 'published_results.json').read_text())
    assert '2205.04437' in published['source']['arxiv']
    for variant in ('HAT-S', 'HAT', 'HAT-L'):
        for scale in (2, 3, 4):
            entries = published['psnr_ssim'][variant][f'x{scale}']
            assert list(entries) == published['sets']
            for value in entries.values():
                assert value is None or (20 < value['psnr'] < 45 and (value['ssim'] is None or
                                                                      0.5 < value['ssim'] < 1))
        assert published['psnr_ssim'][variant]['source']  # where this variant's values come from
    assert published['psnr_ssim']['HAT']['x4']['Urban100'] == {'psnr': 27.97, 'ssim': 0.8368}
    assert [v['psnr'] for v in published['psnr_ssim']['HAT-S']['x4'].values()] == [32.92, 29.15, 27.97, 27.87,
                                                                                    32.35]
    assert 'XPixelGroup/HAT' in published['source']['readme']

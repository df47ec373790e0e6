"""scripts/benchmark.py: the paper's table for a checkpoint, with the bicubic baseline and missing sets listed."""
from __future__ import annotations

import csv
import importlib.util
import math
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from conftest import REPO, SHARED_DATASETS, requires_shared_datasets, tiny_hat_config
from hat.archs.hat_arch import HAT

SCALE = 4
TINY_HAT_X4 = tiny_hat_config(upscale=SCALE)
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
    """Set5 and Set14 prepared from the shared HR images (if present), and a synthetic set spelled like the option
    files."""
    prepare = load_script('prepare_benchmark')
    root = tmp_path_factory.mktemp('datasets')
    if SHARED_DATASETS.is_dir():
        assert prepare.main(['--hr', str(SHARED_DATASETS / 'Set5' / 'HR'), '--out', str(root / 'Set5'), '--scales',
                             '2', '3', '4']) == 0
        assert prepare.main(['--hr', str(SHARED_DATASETS / 'Set14' / 'HR'), '--out', str(root / 'Set14'),
                             '--scales', str(SCALE)]) == 0
    hr = write_synthetic_hr(tmp_path_factory.mktemp('urban_hr'))
    assert prepare.main(['--hr', str(hr), '--out', str(root / 'urban100'), '--scales', str(SCALE)]) == 0
    return root


def write_synthetic_hr(folder: Path) -> Path:
    """Two 66x50 colour images: not a multiple of the scale, as many HR images are."""
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:50, 0:66] / 9.0
    for i in range(2):
        img = np.stack([127 + 100 * np.sin(xx * (i + 1) + c) * np.cos(yy) for c in range(3)], axis=2)
        cv2.imwrite(str(folder / f'img_{i:03d}.png'), np.rint(img).astype(np.uint8))
    return folder


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
    # unmarked: the authors' PSNR; SSIM from two sources (‡) or one (†)
    assert '| HAT x4 (published) | 33.04 / 0.9056‡ | 27.97 / 0.8368‡ | 28.00 / 0.7517† |' in table
    assert (set5['paper_row'], set5['paper_psnr_trust'], set5['paper_ssim_trust']) == ('HAT', 'authors', 'two sources')
    assert (set5['paper_psnr_sources'], set5['paper_ssim_sources']) == ('A', 'B1 B2')
    assert b100['paper_ssim_trust'] == 'one source'
    assert '- B100: PSNR 28.00 [A], authors; SSIM 0.7517† [B1], one source' in table
    assert 'B100: no GTmod4/ and LRbicx4/ (nor HR/ and LR_bicubic/X4/)' in table and 'BSDS100' in table
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


def scores_of(rows: dict[str, dict[str, str]], name: str) -> tuple[str, ...]:
    row = rows[name]
    return row['status'], row['images'], row['psnr'], row['ssim'], row['bicubic_psnr'], row['bicubic_ssim']


@requires_shared_datasets
def test_archive_layout_gives_the_numbers_of_the_prepared_sets(benchmark, checkpoint, datasets_root, tmp_path):
    """HR/ + LR_bicubic/X4/ read as they are (the shared sets: MATLAB LR files; Set14's comic.png and others are
    not a multiple of 4) give the numbers of the GTmod4/LRbicx4 folders prepared from the same HR images."""
    assert any(cv2.imread(str(p)).shape[0] % SCALE for p in (SHARED_DATASETS / 'Set14' / 'HR').iterdir())
    tables = {}
    for layout, root in (('prepared', datasets_root), ('archive', SHARED_DATASETS)):
        out = tmp_path / layout
        assert benchmark.main(['-m', str(checkpoint), '--sets', 'Set5', 'Set14', '--datasets-root', str(root),
                               '--out', str(out), '--device', 'cpu']) == 0
        tables[layout] = read_csv(out / 'benchmark_tiny_hat_x4.csv')
    for name, images in (('Set5', '5'), ('Set14', '14')):
        assert scores_of(tables['archive'], name) == scores_of(tables['prepared'], name)
        assert tables['archive'][name]['status'] == 'ok' and tables['archive'][name]['images'] == images
        assert abs(float(tables['archive'][name]['bicubic_psnr']) - BICUBIC[(name, 4)]) < 0.01


def test_archive_layout_with_edsr_names(benchmark, checkpoint, datasets_root, tmp_path):
    """An archive whose HR images are not mod-cropped and whose LR files are named ``<name>x4.png`` (EDSR's
    benchmark archives), under another spelling of a set (BSD100): the numbers of the prepared set."""
    hr = write_synthetic_hr(tmp_path / 'BSD100' / 'HR')  # the same images as the prepared urban100 set
    lr = tmp_path / 'BSD100' / 'LR_bicubic' / 'X4'
    lr.mkdir(parents=True)
    for gt_path in sorted((datasets_root / 'urban100' / 'LRbicx4').iterdir()):
        (lr / f'{gt_path.stem}x4.png').write_bytes(gt_path.read_bytes())
    assert cv2.imread(str(hr / 'img_000.png')).shape == (50, 66, 3)  # 2 extra rows and columns at x4

    located = benchmark.locate_set(tmp_path, 'B100', SCALE)
    assert (located.gt_dir, located.lq_dir, located.filename_tmpl, located.images) == (hr, lr, '{}x4', 2)
    status = [benchmark.main(['-m', str(checkpoint), '--sets', name, '--datasets-root', str(root), '--out',
                              str(tmp_path / f'out_{name}'), '--device', 'cpu'])
              for name, root in (('B100', tmp_path), ('Urban100', datasets_root))]
    assert status == [0, 0]
    archive = read_csv(tmp_path / 'out_B100' / 'benchmark_tiny_hat_x4.csv')
    prepared = read_csv(tmp_path / 'out_Urban100' / 'benchmark_tiny_hat_x4.csv')
    assert scores_of(archive, 'B100') == scores_of(prepared, 'Urban100')
    assert archive['B100']['status'] == 'ok' and float(archive['B100']['psnr']) > 5


def test_lr_images_of_another_scale_are_refused(benchmark, checkpoint, datasets_root, tmp_path, caplog):
    """A GT far larger than the upscaled LR (the LR folder of another scale) is an error, not a silent crop; the
    script says which files and stops with status 2 before measuring anything."""
    with pytest.raises(ValueError, match='must be the GT downscaled x2'):
        benchmark.bicubic_scores(datasets_root / 'urban100' / 'GTmod4', datasets_root / 'urban100' / 'LRbicx4', 2)
    wrong = tmp_path / 'Urban100'
    (wrong / 'HR').mkdir(parents=True)
    (wrong / 'LR_bicubic').mkdir()
    for name in ('img_000.png', 'img_001.png'):
        (wrong / 'HR' / name).write_bytes((datasets_root / 'urban100' / 'GTmod4' / name).read_bytes())
    # LR files of half the size they should have: the x8 images of a x4 set
    (wrong / 'LR_bicubic' / 'X4').mkdir()
    for name in ('img_000.png', 'img_001.png'):
        half = cv2.imread(str(datasets_root / 'urban100' / 'LRbicx4' / name))[::2, ::2]
        cv2.imwrite(str(wrong / 'LR_bicubic' / 'X4' / name), half)
    out = tmp_path / 'out'
    assert benchmark.main(['-m', str(checkpoint), '--sets', 'Urban100', '--datasets-root', str(tmp_path), '--out',
                           str(out), '--device', 'cpu']) == 2
    assert 'upscaled x4 is 32x24, but' in caplog.text and 'img_000.png' in caplog.text
    assert not out.exists() or not list(out.glob('*.csv'))  # no table of numbers that were not measured


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
    """HAT-ImageNet is published with PSNR only, from one source: the SSIM half of the published row and of the
    difference read n/a, and the PSNR carries the one-source dagger."""
    out = tmp_path / 'out'
    assert benchmark.main(['-m', str(checkpoint), '--sets', 'Urban100', '--datasets-root', str(datasets_root),
                           '--out', str(out), '--published', 'HAT-ImageNet', '--device', 'cpu']) == 0
    urban = read_csv(out / 'benchmark_tiny_hat_x4.csv')['Urban100']
    assert (urban['paper_psnr'], urban['paper_ssim'], urban['diff_ssim']) == ('28.370000', '', '')
    assert (urban['paper_psnr_trust'], urban['paper_ssim_trust'], urban['paper_psnr_sources']) == ('one source', '',
                                                                                                   'E')
    assert math.isclose(float(urban['diff_psnr']), float(urban['psnr']) - 28.37, abs_tol=2e-6)
    table = (out / 'benchmark_tiny_hat_x4.md').read_text()
    assert '| HAT-ImageNet x4 (published) | 28.37† / n/a |' in table
    difference = next(line for line in table.splitlines() if line.startswith('| Difference |'))
    assert difference.endswith(' / n/a |') and difference.split(' | ')[1].startswith('-')
    assert 'Source of the HAT-ImageNet row: PSNR only, one source each' in table
    assert '- [E] github.com/Zdafeng/SwinFIR, README.md' in table


def test_bad_arguments(benchmark, checkpoint, tmp_path):
    assert benchmark.main(['-m', str(tmp_path / 'missing.pth'), '--out', str(tmp_path)]) == 2
    assert benchmark.main(['-m', str(checkpoint), '--scale', '2', '--out', str(tmp_path)]) == 2
    assert benchmark.main(['-m', str(checkpoint), '--published', 'HAT-XL', '--out', str(tmp_path)]) == 2


def test_plot_of_psnr_against_cost(benchmark, checkpoint, datasets_root, tmp_path):
    """--plot writes a PNG beside the table: the published points of the measured set, and the checkpoint."""
    pytest.importorskip('matplotlib')
    out = tmp_path / 'out'
    assert benchmark.main(['-m', str(checkpoint), '--sets', 'urban100', '--datasets-root', str(datasets_root),
                           '--out', str(out), '--device', 'cpu', '--plot', '--plot-x', 'params']) == 0
    png = out / 'benchmark_tiny_hat_x4.png'
    data = png.read_bytes()
    assert data.startswith(b'\x89PNG\r\n\x1a\n') and len(data) > 10_000
    assert (out / 'benchmark_tiny_hat_x4.md').is_file()


def test_plot_points(benchmark):
    """The published points of a set: HAT-ImageNet at HAT's published cost, HAT-L's Multi-Adds counted here."""
    published = benchmark.load_published()
    points = {p.label: p for p in benchmark.published_points(published, 'Urban100', 4, 'multi-adds')}
    assert set(points) == {'HAT-S', 'HAT', 'HAT-ImageNet', 'HAT-L', 'SwinIR'}
    assert (points['HAT-ImageNet'].cost, points['HAT-ImageNet'].psnr) == (102.4, 28.37)
    assert points['HAT-ImageNet'].psnr_trust == 'one source' and not points['HAT-ImageNet'].cost_counted
    assert points['HAT-L'].cost_counted and round(points['HAT-L'].cost, 1) == 203.0
    assert points['HAT-L'].psnr_trust == 'two sources'
    params = {p.label: p for p in benchmark.published_points(published, 'Urban100', 4, 'params')}
    assert (params['HAT-L'].cost, params['HAT-L'].cost_counted) == (40.84, False)
    # x3 Set5: only the ImageNet-pretrained HAT has a published figure
    assert [p.label for p in benchmark.published_points(published, 'Set5', 3, 'params')] == ['HAT-ImageNet']


def test_default_plot_set(benchmark):
    """The set with the most published points; Urban100, then Set5, on a tie; among the measured sets if any."""
    published = benchmark.load_published()
    assert benchmark.default_plot_set(published, 4, []) == 'Urban100'
    assert benchmark.default_plot_set(published, 4, ['Set14', 'B100', 'Set5']) == 'Set5'
    assert benchmark.default_plot_set(published, 2, ['Set5', 'Urban100']) == 'Urban100'
    assert benchmark.default_plot_set(published, 3, ['Set14', 'B100']) == 'Set14'
    assert benchmark.default_plot_set(published, 4, ['MySet']) == 'MySet'


def test_plot_without_matplotlib(benchmark, checkpoint, datasets_root, tmp_path, monkeypatch, caplog):
    """Without matplotlib, --plot says what to install and stops with status 2, after writing the tables."""
    monkeypatch.setitem(sys.modules, 'matplotlib', None)  # makes `import matplotlib` raise ImportError
    out = tmp_path / 'out'
    status = benchmark.main(['-m', str(checkpoint), '--sets', 'urban100', '--datasets-root', str(datasets_root),
                             '--out', str(out), '--device', 'cpu', '--plot'])
    assert status == 2
    assert 'pip install matplotlib' in caplog.text
    assert read_csv(out / 'benchmark_tiny_hat_x4.csv')['Urban100']['status'] == 'ok'  # measured and written
    assert (out / 'benchmark_tiny_hat_x4.md').is_file() and not (out / 'benchmark_tiny_hat_x4.png').exists()

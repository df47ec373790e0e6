"""The shipped HAT-demo checkpoint: released format, matches its option file, beats bicubic on the demo set."""
from __future__ import annotations

import re
import sys

import pytest
import torch
import yaml

from conftest import REPO
from hat.archs.detect import detect_architecture
from hat.archs.hat_arch import HAT
from hat.test import test_pipeline as run_test_pipeline

sys.path.insert(0, str(REPO / 'scripts'))
from demo import report_table  # noqa: E402
from prepare_demo import DEMO_PHOTOS, prepare_demo  # noqa: E402

CHECKPOINT = REPO / 'experiments' / 'pretrained_models' / 'HAT-demo_SRx4.pth'
TEST_OPTIONS = REPO / 'options' / 'test' / 'HAT-demo_SRx4.yml'
TRAIN_OPTIONS = REPO / 'options' / 'train' / 'train_HAT-demo_SRx4.yml'


def network_options(path) -> dict:
    cfg = dict(yaml.safe_load(path.read_text())['network_g'])
    cfg.pop('type')
    return cfg


def test_checkpoint_is_small_and_in_the_released_format():
    assert CHECKPOINT.stat().st_size <= 5 * 1024 * 1024
    checkpoint = torch.load(CHECKPOINT, weights_only=True)
    assert list(checkpoint) == ['params_ema']


def test_checkpoint_matches_its_option_files():
    assert network_options(TEST_OPTIONS) == network_options(TRAIN_OPTIONS)
    state_dict = torch.load(CHECKPOINT, weights_only=True)['params_ema']
    net = HAT(**network_options(TEST_OPTIONS))
    net.load_state_dict(state_dict, strict=True)
    detected = detect_architecture(state_dict)
    assert detected.type == 'HAT' and detected.variant == 'custom'
    cfg = network_options(TEST_OPTIONS)
    for key in ('upscale', 'in_chans', 'window_size', 'compress_ratio', 'squeeze_factor', 'overlap_ratio',
                'depths', 'embed_dim', 'num_heads', 'mlp_ratio', 'resi_connection'):
        assert detected.kwargs[key] == cfg[key], key


@pytest.fixture(scope='module')
def demo_table(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp('demo')
    prepare_demo(root / 'datasets' / 'demo')
    run_test_pipeline(str(root), ['-opt', str(TEST_OPTIONS), '--force_yml',
                                  f'path:pretrain_network_g={CHECKPOINT}'])
    return report_table(root / 'datasets' / 'demo', root / 'results' / 'HAT-demo_SRx4' / 'visualization' / 'demo')


def test_demo_beats_bicubic(demo_table):
    """Every demo photo is better than bicubic, and the set by the 1.5 dB the shipped model is promised to gain."""
    rows = [line for line in demo_table.splitlines() if line.startswith('| ') and 'PSNR' not in line]
    assert [row.split('|')[1].strip() for row in rows] == [*DEMO_PHOTOS, '**average**']
    gains = {row.split('|')[1].strip(): float(row.split('|')[4]) for row in rows}
    assert all(gain > 0.5 for gain in gains.values()), demo_table
    assert gains['astronaut'] > 2.0, demo_table
    assert gains['**average**'] >= 1.5, demo_table
    for row in rows:
        psnr_values = [float(v) for v in re.findall(r'(\d+\.\d\d) /', row)]
        assert len(psnr_values) == 2 and all(20 < v < 45 for v in psnr_values)

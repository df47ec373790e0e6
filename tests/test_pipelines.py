"""The training and test pipelines end to end, on the CPU, with a tiny HAT and a synthetic image set."""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from conftest import REPO, tiny_hat_config
from benchmarks.gpu_check import tiny_training_options, torchrun_command
from hat.archs.hat_arch import HAT
from hat.test import test_pipeline as run_test_pipeline
from hat.train import train_pipeline

SCALE = 2  # the scale of the conftest image_set
TINY_HAT = {'type': 'HAT', **tiny_hat_config(upscale=SCALE, depths=(1, 1))}
METRICS = {
    'psnr': {'type': 'calculate_psnr', 'crop_border': SCALE, 'test_y_channel': True},
    'ssim': {'type': 'calculate_ssim', 'crop_border': SCALE, 'test_y_channel': True},
}


def train_options(image_set: Path, name: str, total_iter: int = 20) -> dict:
    """gpu_check's tiny training options (the same tiny x2 HAT, data and optimiser) with a learning-rate step
    inside the run, a validation and a state every 10 iterations, saved images and PSNR/SSIM."""
    opt = tiny_training_options(image_set, name, total_iter)
    assert opt['network_g'] == TINY_HAT and opt['scale'] == SCALE
    opt['train']['scheduler']['milestones'] = [15, 30]
    opt['val'] = {'val_freq': 10, 'save_img': True, 'metrics': METRICS}
    opt['logger']['save_checkpoint_freq'] = 10
    return opt


def write_yaml(path: Path, opt: dict) -> str:
    path.write_text(yaml.safe_dump(opt, sort_keys=False))
    return str(path)


def load_net(path: Path, key: str = 'params_ema') -> HAT:
    net = HAT(**tiny_hat_config(upscale=SCALE, depths=(1, 1)))
    net.load_state_dict(torch.load(path, weights_only=True)[key], strict=True)
    return net.eval()


@pytest.fixture(scope='module')
def trained(image_set, tmp_path_factory):
    """20 iterations, then --auto_resume to 40 with a different working directory."""
    root = tmp_path_factory.mktemp('project')
    opt_file = write_yaml(root / 'train_tiny.yml', train_options(image_set, 'tiny_x2'))
    with pytest.warns(UserWarning, match='running on the CPU'):
        train_pipeline(str(root), ['-opt', opt_file])
    first_run = {p.name for p in (root / 'experiments/tiny_x2/training_states').iterdir()}

    elsewhere = tmp_path_factory.mktemp('elsewhere')
    cwd = os.getcwd()
    os.chdir(elsewhere)
    try:
        train_pipeline(str(root), ['-opt', opt_file, '--auto_resume', '--force_yml', 'train:total_iter=40'])
    finally:
        os.chdir(cwd)
    return root, first_run


def test_training_writes_checkpoints_states_and_logs(trained):
    root, first_run = trained
    exp = root / 'experiments' / 'tiny_x2'
    assert first_run == {'10.state', '20.state'}
    assert {p.name for p in (exp / 'models').iterdir()} >= {'net_g_10.pth', 'net_g_20.pth', 'net_g_40.pth',
                                                             'net_g_latest.pth'}
    copied = (exp / 'train_tiny.yml').read_text()
    assert copied.startswith('# GENERATE TIME') and '--auto_resume' in copied
    assert (exp / 'visualization' / 'img0' / 'img0_10.png').is_file()
    logs = sorted(exp.glob('train_tiny_x2_*.log'))
    assert logs, 'no training log written'
    assert any('Validation tinyval' in log.read_text() for log in logs)


def test_auto_resume_continues_from_the_newest_state(trained):
    root, _ = trained
    exp = root / 'experiments' / 'tiny_x2'
    log_text = '\n'.join(p.read_text() for p in exp.glob('train_tiny_x2_*.log'))
    assert 'Resuming training from' in log_text and 'iter 20' in log_text
    assert {p.name for p in (exp / 'training_states').iterdir()} == {'10.state', '20.state', '30.state',
                                                                      '40.state'}
    state = torch.load(exp / 'training_states' / '40.state', weights_only=False)
    assert state['iter'] == 40
    # the MultiStepLR milestones (15, 30) applied across the resume: 2e-4 * 0.5 * 0.5
    assert math.isclose(state['optimizers'][0]['param_groups'][0]['lr'], 5e-5, rel_tol=1e-6)
    # the latest weights are those of iter 40, and training changed them after the resume
    latest, at_40, at_20 = (torch.load(exp / 'models' / f, weights_only=True)['params']
                            for f in ('net_g_latest.pth', 'net_g_40.pth', 'net_g_20.pth'))
    assert all(torch.equal(latest[k], at_40[k]) for k in latest)
    assert any(not torch.equal(at_40[k], at_20[k]) for k in at_40 if at_40[k].is_floating_point())


def test_released_layout_of_saved_checkpoints(trained):
    root, _ = trained
    checkpoint = torch.load(root / 'experiments/tiny_x2/models/net_g_latest.pth', weights_only=True)
    assert set(checkpoint) == {'params', 'params_ema'}
    assert 'relative_position_index_SA' in checkpoint['params_ema']
    assert not any(k.startswith('module.') for k in checkpoint['params_ema'])


def test_test_pipeline_measures_the_trained_model(trained, image_set):
    root, _ = trained
    model_path = root / 'experiments/tiny_x2/models/net_g_latest.pth'
    opt = {
        'name': 'tiny_test', 'model_type': 'HATModel', 'scale': SCALE, 'num_gpu': 'auto', 'manual_seed': 0,
        'datasets': {'test_1': {'name': 'tiny', 'type': 'PairedImageDataset', 'dataroot_gt': str(image_set / 'gt'),
                                'dataroot_lq': str(image_set / 'lq'), 'io_backend': {'type': 'disk'}}},
        'network_g': dict(TINY_HAT),
        'path': {'pretrain_network_g': str(model_path), 'strict_load_g': True, 'param_key_g': 'params_ema'},
        'val': {'save_img': True, 'suffix': None, 'metrics': METRICS},
    }
    with pytest.warns(UserWarning, match='running on the CPU'):
        results = run_test_pipeline(str(root), ['-opt', write_yaml(root / 'test_tiny.yml', opt)])
    out_dir = root / 'results/tiny_test/visualization/tiny'
    assert sorted(p.name for p in out_dir.iterdir()) == [f'img{i}_tiny_test.png' for i in range(4)]

    # The logged PSNR is BasicSR's metric on the EMA network's output.
    from basicsr.metrics import calculate_psnr
    net = load_net(model_path)
    expected = []
    for i in range(4):
        # As the pipeline's data loader gives it: float32 / 255 (basicsr's imfrombytes) in a contiguous batch (its
        # collate), so that the network computes the same sums in the same order. A permuted view can make the first
        # convolution take a channels-last kernel (it did on torch 2.11), whose rounding can flip a pixel.
        lq = cv2.imread(str(image_set / 'lq' / f'img{i}.png'))[:, :, ::-1].astype(np.float32) / 255.0
        with torch.no_grad():
            sr = net(torch.from_numpy(lq.copy()).permute(2, 0, 1)[None].contiguous())
        sr_img = (sr[0].clamp(0, 1).permute(1, 2, 0).numpy()[:, :, ::-1] * 255.0).round().astype(np.uint8)
        assert np.array_equal(sr_img, cv2.imread(str(out_dir / f'img{i}_tiny_test.png')))
        gt = cv2.imread(str(image_set / 'gt' / f'img{i}.png'))
        expected.append(calculate_psnr(sr_img, gt, crop_border=SCALE, test_y_channel=True))
    assert math.isclose(results['tiny']['psnr'], float(np.mean(expected)), rel_tol=1e-9)
    assert 10 < results['tiny']['psnr'] < 60


def test_set_without_ground_truth_writes_images_and_skips_metrics(trained, image_set):
    root, _ = trained
    opt = {
        'name': 'tiny_nogt', 'model_type': 'HATModel', 'scale': SCALE, 'num_gpu': 0,
        'datasets': {'test_1': {'name': 'photos', 'type': 'SingleImageDataset', 'dataroot_lq': str(image_set / 'lq'),
                                'io_backend': {'type': 'disk'}}},
        'network_g': dict(TINY_HAT),
        'path': {'pretrain_network_g': str(root / 'experiments/tiny_x2/models/net_g_latest.pth'),
                 'param_key_g': 'params_ema'},
        'val': {'save_img': True, 'suffix': 'SR', 'metrics': METRICS},
    }
    results = run_test_pipeline(str(root), ['-opt', write_yaml(root / 'test_nogt.yml', opt)])
    out_dir = root / 'results/tiny_nogt/visualization/photos'
    assert sorted(p.name for p in out_dir.iterdir()) == [f'img{i}_SR.png' for i in range(4)]
    assert cv2.imread(str(out_dir / 'img1_SR.png')).shape == (48, 48, 3)
    assert results == {'photos': {}}
    log_text = next((root / 'results/tiny_nogt').glob('test_tiny_nogt_*.log')).read_text()
    assert 'WARNING: Dataset photos has no ground truth: metrics (psnr, ssim) skipped' in log_text


def test_wrong_variant_checkpoint_names_the_mismatch(trained, image_set):
    root, _ = trained
    bigger = dict(TINY_HAT, embed_dim=24)
    opt = {
        'name': 'tiny_wrong', 'model_type': 'HATModel', 'scale': SCALE, 'num_gpu': 0,
        'datasets': {'test_1': {'name': 'photos', 'type': 'SingleImageDataset', 'dataroot_lq': str(image_set / 'lq'),
                                'io_backend': {'type': 'disk'}}},
        'network_g': bigger,
        'path': {'pretrain_network_g': str(root / 'experiments/tiny_x2/models/net_g_latest.pth')},
        'val': {'save_img': False},
    }
    with pytest.raises(ValueError, match='conv_first.weight'):
        run_test_pipeline(str(root), ['-opt', write_yaml(root / 'test_wrong.yml', opt)])


@pytest.mark.slow
def test_two_process_torchrun_on_the_cpu(image_set, tmp_path):
    """``torchrun --nproc_per_node=2 hat/train.py --launcher pytorch`` with the nccl option falls back to gloo."""
    name = f'pytest_ddp_{uuid.uuid4().hex[:8]}'
    exp = REPO / 'experiments' / name
    opt = train_options(image_set, name, total_iter=4)
    opt['val'] = None
    opt.pop('val')
    opt['logger']['save_checkpoint_freq'] = 4
    opt_file = write_yaml(image_set / f'{name}.yml', opt)
    env = dict(os.environ, OMP_NUM_THREADS='1', TMPDIR=str(tmp_path))  # torchrun's log folders: not in /tmp
    try:
        proc = subprocess.run(torchrun_command(opt_file, processes=2), cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (exp / 'models' / 'net_g_4.pth').is_file()
        log_text = next(exp.glob('train_*.log')).read_text()
        assert 'world size 2' in log_text and '2 processes' in log_text
        state = torch.load(exp / 'training_states' / '4.state', weights_only=False)
        assert state['iter'] == 4
    finally:
        shutil.rmtree(exp, ignore_errors=True)


def test_unreadable_image_is_skipped_in_testing(trained, image_set, tmp_path):
    """One broken file in a test set is reported and skipped; the other images are still evaluated."""
    root, _ = trained
    for sub in ('gt', 'lq'):
        shutil.copytree(image_set / sub, tmp_path / sub)
    (tmp_path / 'lq' / 'img2.png').write_bytes((image_set / 'lq' / 'img2.png').read_bytes()[:60])  # truncated
    opt = {
        'name': 'tiny_broken', 'model_type': 'HATModel', 'scale': SCALE, 'num_gpu': 0,
        'datasets': {'test_1': {'name': 'broken', 'type': 'PairedImageDataset', 'dataroot_gt': str(tmp_path / 'gt'),
                                'dataroot_lq': str(tmp_path / 'lq'), 'io_backend': {'type': 'disk'}}},
        'network_g': dict(TINY_HAT),
        'path': {'pretrain_network_g': str(root / 'experiments/tiny_x2/models/net_g_latest.pth')},
        'val': {'save_img': True, 'suffix': None, 'metrics': METRICS},
    }
    results = run_test_pipeline(str(root), ['-opt', write_yaml(tmp_path / 'broken.yml', opt)])
    out_dir = root / 'results/tiny_broken/visualization/broken'
    assert sorted(p.name for p in out_dir.iterdir()) == [f'img{i}_tiny_broken.png' for i in (0, 1, 3)]
    assert 10 < results['broken']['psnr'] < 60
    log_text = next((root / 'results/tiny_broken').glob('test_tiny_broken_*.log')).read_text()
    assert 'img2.png' in log_text and '1 unreadable image(s) skipped' in log_text


def test_training_reaches_total_iter_when_batches_do_not_divide_the_set(image_set, tmp_path):
    """4 images in batches of 3: one batch per epoch (the last incomplete one is dropped), 4 epochs for 4 iters."""
    opt = train_options(image_set, 'uneven', total_iter=4)
    opt['datasets']['train']['batch_size_per_gpu'] = 3
    opt['logger']['save_checkpoint_freq'] = 4
    opt.pop('val')
    train_pipeline(str(tmp_path), ['-opt', write_yaml(tmp_path / 'uneven.yml', opt)])
    assert (tmp_path / 'experiments/uneven/training_states/4.state').is_file()

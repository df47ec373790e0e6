"""Nothing lost: kill -9 and resume gives the same weights, signals save a state, partial files are ignored."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from basicsr.utils.registry import LOSS_REGISTRY

from conftest import REPO
from hat.train import train_pipeline
from hat.utils.atomic import atomic_torch_save
from hat.utils.resume import find_auto_resume_state
from test_pipelines import train_options

TOTAL_ITER = 40


def write_options(path: Path, image_set: Path, name: str, **train_overrides) -> str:
    opt = train_options(image_set, name, total_iter=TOTAL_ITER)
    opt['logger'].update(save_checkpoint_freq=5, print_freq=5)
    opt['val']['val_freq'] = 10
    opt['val']['save_img'] = False
    opt['train'].update(train_overrides)
    path.write_text(yaml.safe_dump(opt, sort_keys=False))
    return str(path)


def start_training(root: Path, opt_file: str, *extra: str) -> subprocess.Popen:
    code = ('import sys; from hat.train import train_pipeline; '
            'train_pipeline(sys.argv[1], sys.argv[2:])')
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
    return subprocess.Popen([sys.executable, '-c', code, str(root), '-opt', opt_file, *extra], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_state(states: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if states.is_dir() and any(p.suffix == '.state' for p in states.iterdir()):
            return
        if proc.poll() is not None:
            raise AssertionError(f'training ended before saving a state: {proc.stderr.read()[-2000:]}')
        time.sleep(0.05)
    raise AssertionError('no training state within the timeout')


def final_weights(root: Path, name: str) -> dict:
    checkpoint = torch.load(root / 'experiments' / name / 'models' / 'net_g_latest.pth', weights_only=True)
    return {**{f'params.{k}': v for k, v in checkpoint['params'].items()},
            **{f'params_ema.{k}': v for k, v in checkpoint['params_ema'].items()}}


@pytest.fixture(scope='module')
def uninterrupted(image_set, tmp_path_factory):
    root = tmp_path_factory.mktemp('uninterrupted')
    opt_file = write_options(root / 'opt.yml', image_set, 'run')
    proc = start_training(root, opt_file)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return final_weights(root, 'run')


@pytest.mark.slow
@pytest.mark.parametrize('how', ['SIGKILL', 'SIGTERM'])
def test_interrupted_run_resumes_to_the_same_weights(how, image_set, uninterrupted, tmp_path):
    opt_file = write_options(tmp_path / 'opt.yml', image_set, 'run')
    proc = start_training(tmp_path, opt_file)
    states = tmp_path / 'experiments' / 'run' / 'training_states'
    wait_for_state(states, proc)
    time.sleep(0.3)  # somewhere after the first checkpoint, mid-iteration or mid-save
    proc.send_signal(getattr(signal, how))
    _, err = proc.communicate(timeout=120)
    if how == 'SIGKILL':
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 0, err[-3000:]
        log_text = '\n'.join(p.read_text() for p in (tmp_path / 'experiments/run').glob('train_*.log'))
        assert 'Stopped by SIGTERM' in log_text
        stopped_at = max(int(p.stem) for p in states.glob('*.state'))
        assert stopped_at < TOTAL_ITER  # a state of the iteration it stopped at (saved then, or on schedule)
    assert not (tmp_path / 'experiments/run/models/net_g_latest.pth').exists()

    resumed = start_training(tmp_path, opt_file, '--auto_resume')
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    weights = final_weights(tmp_path, 'run')
    assert weights.keys() == uninterrupted.keys()
    different = [k for k in weights if not torch.equal(weights[k], uninterrupted[k])]
    assert not different, f'{len(different)} tensors differ from the uninterrupted run, e.g. {different[:3]}'


def test_auto_resume_skips_a_damaged_newest_state(image_set, tmp_path, caplog):
    opt = {'path': {'training_states': str(tmp_path / 'states'), 'models': str(tmp_path / 'models')},
           'network_g': {}}
    (tmp_path / 'states').mkdir()
    (tmp_path / 'models').mkdir()
    atomic_torch_save({'epoch': 0, 'iter': 5, 'optimizers': [], 'schedulers': []}, tmp_path / 'states/5.state')
    atomic_torch_save({'params': {}}, tmp_path / 'models/net_g_5.pth')
    good = (tmp_path / 'states/5.state').read_bytes()
    (tmp_path / 'states/10.state').write_bytes(good[:len(good) // 2])  # a truncated newer state
    atomic_torch_save({'params': {}}, tmp_path / 'models/net_g_10.pth')
    atomic_torch_save({'epoch': 0, 'iter': 15, 'optimizers': [], 'schedulers': []}, tmp_path / 'states/15.state')
    # no net_g_15.pth: the crash came between the two saves
    with caplog.at_level('WARNING', logger='basicsr'):
        path, state = find_auto_resume_state(opt)
    assert path.endswith('5.state') and state['iter'] == 5
    messages = ' '.join(r.getMessage() for r in caplog.records)
    assert '15.state' in messages and 'missing' in messages
    assert '10.state' in messages and 'unreadable' in messages


def test_atomic_save_never_leaves_a_truncated_file(tmp_path, monkeypatch):
    target = tmp_path / 'net_g_latest.pth'
    atomic_torch_save({'params': {'w': torch.ones(3)}}, target)
    before = target.read_bytes()

    def crash(obj, handle, *args, **kwargs):
        handle.write(b'PK\x03\x04 partial')
        raise OSError('disk full')

    monkeypatch.setattr(torch, 'save', crash)
    with pytest.raises(OSError, match='disk full'):
        atomic_torch_save({'params': {'w': torch.zeros(3)}}, target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ['net_g_latest.pth']


@LOSS_REGISTRY.register()
class NaNAtIterFiveLoss(torch.nn.Module):
    """An L1 loss that turns NaN on its fifth call (a diverging run)."""

    def __init__(self, loss_weight: float = 1.0, reduction: str = 'mean') -> None:
        super().__init__()
        self.calls = 0

    def forward(self, pred, target, weight=None):
        self.calls += 1
        loss = (pred - target).abs().mean()
        return loss * float('nan') if self.calls >= 5 else loss


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(image_set, tmp_path):
    opt = train_options(image_set, 'diverging', total_iter=20)
    opt['train']['pixel_opt'] = {'type': 'NaNAtIterFiveLoss'}
    opt['logger']['save_checkpoint_freq'] = 4
    opt.pop('val')
    opt_file = tmp_path / 'opt.yml'
    opt_file.write_text(yaml.safe_dump(opt, sort_keys=False))
    with pytest.raises(FloatingPointError, match='iter 5'):
        train_pipeline(str(tmp_path), ['-opt', str(opt_file)])
    models = tmp_path / 'experiments/diverging/models'
    assert sorted(p.name for p in models.iterdir()) == ['net_g_4.pth']
    saved = torch.load(models / 'net_g_4.pth', weights_only=True)
    assert all(torch.isfinite(v).all() for part in saved.values() for v in part.values() if v.is_floating_point())

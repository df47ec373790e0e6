"""User errors end train.py, test.py and hat-upscale with the message and exit status 2, no traceback; --debug
shows the traceback; bugs keep theirs."""
from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from hat import __version__
from hat.utils.cli import run_command

pytestmark = pytest.mark.slow  # starts Python subprocesses


def demo_options_with_missing_dataset(tmp_path: Path) -> Path:
    opt = yaml.safe_load((REPO / 'options' / 'test' / 'HAT-demo_SRx4.yml').read_text())
    opt['name'] = f'missing_dataset_{uuid.uuid4().hex[:12]}'  # no results/<name> of a real run is at stake
    opt['datasets']['test_1']['dataroot_gt'] = str(tmp_path / 'no_such_set' / 'GTmod4')
    opt['datasets']['test_1']['dataroot_lq'] = str(tmp_path / 'no_such_set' / 'LRbicx4')
    opt['num_gpu'] = 0
    path = tmp_path / 'missing_dataset.yml'
    path.write_text(yaml.safe_dump(opt))
    return path


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_test_py_with_a_missing_dataset_says_so_without_a_traceback(tmp_path):
    options = demo_options_with_missing_dataset(tmp_path)
    result = run(str(REPO / 'hat' / 'test.py'), '-opt', str(options), cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert 'test.py: error:' in result.stderr and 'no_such_set' in result.stderr
    assert 'Traceback' not in result.stderr
    debug = run(str(REPO / 'hat' / 'test.py'), '-opt', str(options), '--debug', cwd=tmp_path)
    assert debug.returncode != 0 and 'Traceback' in debug.stderr
    # Stopped before any folder was made (or an earlier run's folder of that name archived).
    name = yaml.safe_load(options.read_text())['name']
    assert not list((REPO / 'results').glob(f'*{name}*'))


def test_train_py_with_a_missing_option_file_exits_2(tmp_path):
    result = run(str(REPO / 'hat' / 'train.py'), '-opt', str(tmp_path / 'nothing.yml'), cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert 'nothing.yml' in result.stderr and 'Traceback' not in result.stderr


def test_train_py_with_a_missing_dataset_stops_before_making_its_folders(tmp_path):
    """A run that cannot start makes no experiments/<name> (nor archives an earlier run's folder of that name)."""
    opt = yaml.safe_load((REPO / 'options' / 'train' / 'train_HAT-demo_SRx4.yml').read_text())
    opt['name'] = f'missing_dataset_{uuid.uuid4().hex[:12]}'
    opt['datasets']['train']['dataroot_gt'] = str(tmp_path / 'no_such_set')
    opt['num_gpu'] = 0
    options = tmp_path / 'missing_dataset.yml'
    options.write_text(yaml.safe_dump(opt))
    result = run(str(REPO / 'hat' / 'train.py'), '-opt', str(options), cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert 'no_such_set' in result.stderr and 'Traceback' not in result.stderr
    for folder in ('experiments', 'tb_logger'):
        assert not list((REPO / folder).glob(f'*{opt["name"]}*'))


def test_hat_upscale_version_and_missing_model(tmp_path):
    version = run('-m', 'hat.upscale', '--version', cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.strip() == f'hat-upscale {__version__}'
    (tmp_path / 'in').mkdir()
    missing = run('-m', 'hat.upscale', '-i', str(tmp_path / 'in'), '-o', str(tmp_path / 'out'), '-m',
                  str(tmp_path / 'model.pth'), cwd=tmp_path)
    assert missing.returncode == 2 and 'model.pth' in missing.stderr and 'Traceback' not in missing.stderr


def test_run_command_keeps_tracebacks_of_bugs_and_shows_user_errors_plainly(capsys):
    def user_mistake():
        raise KeyError('datasets: no test set in the option file')

    assert run_command(user_mistake, prog='tool', argv=[]) == 2
    assert capsys.readouterr().err.startswith('tool: error: datasets: no test set in the option file\n')
    with pytest.raises(KeyError):
        run_command(user_mistake, prog='tool', argv=['--debug'])

    def bug():
        raise ZeroDivisionError('a bug')

    with pytest.raises(ZeroDivisionError):
        run_command(bug, prog='tool', argv=[])

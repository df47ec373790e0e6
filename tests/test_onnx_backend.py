"""The ONNX Runtime backend of the engine: an exported file runs through the Upscaler and hat-upscale like its
checkpoint (same image handling, tiles and exit codes); without onnxruntime the message says what to install."""
from __future__ import annotations

import builtins
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from conftest import tiny_hat_config
from hat.archs.hat_arch import HAT
from hat.inference import Upscaler, load_model
from hat.upscale import main

pytest.importorskip('onnxruntime', reason='the ONNX backend needs onnxruntime (pip install -e ".[onnx]")')
pytest.importorskip('onnx', reason='exporting needs onnx (pip install -e ".[onnx]")')


@pytest.fixture(scope='module')
def exported(tmp_path_factory) -> tuple[Path, Path, HAT]:
    """A tiny HAT x2: its checkpoint and its exported ONNX file."""
    from hat.export import export_checkpoint
    torch.manual_seed(0)
    net = HAT(**tiny_hat_config()).eval()
    folder = tmp_path_factory.mktemp('onnx')
    checkpoint = folder / 'tiny.pth'
    torch.save({'params_ema': net.state_dict()}, checkpoint)
    export_checkpoint(checkpoint, folder / 'tiny.onnx')
    return checkpoint, folder / 'tiny.onnx', net


def test_descriptor_of_an_onnx_file(exported):
    _, onnx_path, net = exported
    model = load_model(onnx_path)
    assert (model.architecture, model.scale, model.size_multiple) == ('HAT', 2, net.window_size)
    assert (model.in_channels, model.out_channels, model.precisions) == (3, 3, ('fp32', ))
    assert model.module is None and model.source == str(onnx_path)


def test_upscaler_runs_the_onnx_file_like_the_network(exported):
    _, onnx_path, net = exported
    upscaler = Upscaler(load_model(onnx_path), precision='auto', tile=None, progress=False)
    assert upscaler.precision == 'fp32'
    x = torch.rand(1, 3, 13, 18)  # not a window multiple
    with torch.no_grad():
        reference = net(x)
    assert (upscaler.upscale_tensor(x) - reference).abs().max() <= 1e-4
    tiled = Upscaler(load_model(onnx_path), precision='fp32', tile=8, tile_pad=2, progress=False)
    assert tiled.upscale_tensor(x).shape == reference.shape
    with pytest.raises(ValueError, match='runs in fp32 only'):
        Upscaler(load_model(onnx_path), precision='fp16', device='cuda', progress=False)


def test_hat_upscale_takes_an_onnx_file(exported, tmp_path):
    checkpoint, onnx_path, _ = exported
    rng = np.random.default_rng(0)
    cv2.imwrite(str(tmp_path / 'photo.png'), rng.integers(0, 256, (14, 22, 3), dtype=np.uint8))
    outputs = {}
    for name, model in (('pth', checkpoint), ('onnx', onnx_path)):
        assert main(['-i', str(tmp_path / 'photo.png'), '-o', str(tmp_path / name), '-m', str(model), '-q',
                     '--device', 'cpu', '--precision', 'fp32']) == 0
        outputs[name] = cv2.imread(str(tmp_path / name / 'photo_x2.png')).astype(int)
    assert outputs['onnx'].shape == (28, 44, 3)
    assert np.abs(outputs['onnx'] - outputs['pth']).max() <= 1  # rounding of values within 1e-4


def test_without_onnxruntime_the_message_says_what_to_install(exported, monkeypatch, tmp_path, caplog):
    _, onnx_path, _ = exported
    real_import = builtins.__import__

    def no_onnxruntime(name, *args, **kwargs):
        if name == 'onnxruntime':
            raise ImportError('No module named onnxruntime')
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, '__import__', no_onnxruntime)
    with pytest.raises(ImportError, match='pip install onnxruntime'):
        load_model(onnx_path)
    (tmp_path / 'in').mkdir()
    cv2.imwrite(str(tmp_path / 'in' / 'a.png'), np.zeros((8, 8, 3), np.uint8))
    assert main(['-i', str(tmp_path / 'in'), '-o', str(tmp_path / 'out'), '-m', str(onnx_path), '-q']) == 2
    assert 'pip install onnxruntime' in caplog.text


def test_an_onnx_file_without_metadata_is_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper
    graph = helper.make_graph([helper.make_node('Identity', ['x'], ['y'])], 'plain',
                              [helper.make_tensor_value_info('x', TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info('y', TensorProto.FLOAT, [1, 3, 4, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)]), tmp_path / 'plain.onnx')
    with pytest.raises(ValueError, match='no scale in its metadata.*python -m hat.export'):
        load_model(tmp_path / 'plain.onnx')
    (tmp_path / 'broken.onnx').write_bytes(b'not a model')
    with pytest.raises(ValueError, match='not a readable ONNX model'):
        load_model(tmp_path / 'broken.onnx')

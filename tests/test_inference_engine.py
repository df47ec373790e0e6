"""The inference engine: the model descriptor (hat.inference.descriptor) and the Upscaler's contract with the
network: padding happens once, outputs match the network's own padding, and gradients still work afterwards."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from conftest import GOLDEN, golden_config, golden_state_dict
from hat.archs.hat_arch import HAT
from hat.archs.srvgg_arch import SRVGGNetCompact
from hat.inference import ModelDescriptor, Upscaler, load_model


def golden_checkpoint() -> Path:
    return GOLDEN / 'hat_tiny_x2.pth'


def test_descriptor_of_a_checkpoint_says_what_the_model_is():
    model = load_model(golden_checkpoint())
    cfg = golden_config('hat_tiny_x2')
    assert (model.architecture, model.variant, model.scale) == ('HAT', 'custom', cfg['upscale'])
    assert (model.in_channels, model.out_channels, model.size_multiple) == (3, 3, cfg['window_size'])
    assert model.source == str(golden_checkpoint()) and model.options['type'] == 'HAT'
    assert any('img_range' in note for note in model.notes)
    assert not model.network.training


def test_descriptor_of_an_option_file_takes_the_scale_from_the_options(tmp_path):
    net = SRVGGNetCompact(num_in_ch=3, num_out_ch=3, num_feat=4, num_conv=1, upscale=3, act_type='prelu')
    torch.save({'params': net.state_dict()}, tmp_path / 'srvgg.pth')
    options = {'network_g': {'type': 'SRVGGNetCompact', 'num_in_ch': 3, 'num_out_ch': 3, 'num_feat': 4,
                             'num_conv': 1, 'upscale': 3, 'act_type': 'prelu'},
               'path': {'pretrain_network_g': str(tmp_path / 'srvgg.pth'), 'param_key_g': 'params'}}
    (tmp_path / 'srvgg.yml').write_text(yaml.safe_dump(options))
    model = load_model(tmp_path / 'srvgg.yml')
    assert (model.architecture, model.scale, model.size_multiple) == ('SRVGGNetCompact', 3, 1)
    assert model.options['num_feat'] == 4


def test_missing_model_names_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match=r'nothing\.pth does not exist.*\.onnx'):
        load_model(tmp_path / 'nothing.pth')


class SizeRecorder(torch.nn.Module):
    """Wraps a network and records the input sizes it is called with."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net
        self.sizes: list[tuple[int, int]] = []

    def forward(self, x):
        self.sizes.append(tuple(x.shape[-2:]))
        return self.net(x)


@pytest.mark.parametrize('tile', [None, 8])
def test_padding_happens_once_in_the_upscaler_and_matches_the_network(tile):
    net = HAT(**golden_config('hat_tiny_x2')).eval()
    net.load_state_dict(golden_state_dict('hat_tiny_x2'))
    recorder = SizeRecorder(net)
    model = ModelDescriptor.from_network(net)
    model.network = recorder
    x = torch.rand(1, 3, 13, 19)  # no side a multiple of the window
    out = Upscaler(model, precision='fp32', tile=tile, tile_pad=2, progress=False).upscale_tensor(x)
    multiple = model.size_multiple
    assert recorder.sizes and all(h % multiple == 0 and w % multiple == 0 for h, w in recorder.sizes)
    assert out.shape == (1, 3, 26, 38)
    if tile is None:
        with torch.no_grad():
            assert torch.allclose(out, net(x), atol=1e-6)  # the network's own padding: the same function


def test_training_works_after_upscaling_at_the_same_size():
    """Cached index tensors made while upscaling must not be inference tensors: a backward at the same size (training
    after validation, LAM after a preview) has to work."""
    net = HAT(**golden_config('hat_tiny_x2')).eval()
    x = torch.rand(1, 3, 16, 16)
    Upscaler(net, precision='fp32', tile=None, progress=False).upscale_tensor(x)
    net.train()
    loss = net(x.requires_grad_()).mean()
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()

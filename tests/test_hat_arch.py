"""The HAT network is the official one: golden outputs, released state-dict layouts, fused == reference."""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import GOLDEN, GOLDEN_CASES, golden_config, golden_io, golden_net, golden_state_dict, tiny_hat_config
from hat.archs.hat_arch import HAT, DropPath

RELEASED = [f'{variant}_SRx{scale}' for variant in ('HAT-S', 'HAT', 'HAT-L') for scale in (2, 3, 4)]
TOLERANCE = 1e-5


@pytest.mark.parametrize('fused', [True, False], ids=['fused', 'reference'])
@pytest.mark.parametrize('case', GOLDEN_CASES)
def test_golden_output(case, fused):
    net = golden_net(case, fused_attn=fused)
    io = golden_io(case)
    with torch.no_grad():
        out = net(io['input'])
    assert out.shape == io['output'].shape
    assert (out - io['output']).abs().max().item() <= TOLERANCE


def test_every_golden_case_is_tested():
    on_disk = sorted(path.name.removesuffix('_io.pt') for path in GOLDEN.glob('*_io.pt'))
    assert on_disk == sorted([*GOLDEN_CASES, 'hat_tiny_x2_padded'])


def test_golden_padded_input_is_padded_and_cropped():
    io = golden_io('hat_tiny_x2_padded')
    net = golden_net(io['checkpoint'].removesuffix('.pth'))
    with torch.no_grad():
        out = net(io['input'])
    assert out.shape == (1, 3, 42, 70)
    assert (out - io['output']).abs().max().item() <= TOLERANCE


def test_golden_catches_a_wrong_weight():
    """The golden check is sensitive: a 10% change of one bias table moves the output far beyond the tolerance."""
    net = golden_net('hat_tiny_x2')
    with torch.no_grad():
        net.layers[0].residual_group.overlap_attn.relative_position_bias_table.mul_(1.1)
    io = golden_io('hat_tiny_x2')
    with torch.no_grad():
        assert (net(io['input']) - io['output']).abs().max().item() > 1e-3


@pytest.mark.parametrize('name', RELEASED)
def test_released_state_dict_layout(name):
    manifest = json.loads((GOLDEN / f'manifest_{name}.json').read_text())
    cfg = dict(manifest['network_g'])
    cfg.pop('type')
    with torch.device('meta'):
        net = HAT(**cfg)
    shapes = {key: list(value.shape) for key, value in net.state_dict().items()}
    assert shapes == manifest['state_dict']
    assert sum(p.numel() for p in net.parameters()) == manifest['num_params']


def test_released_buffers_match_golden_checkpoint():
    """The relative position indices we compute equal those stored in a checkpoint of the official code."""
    sd = golden_state_dict('hat_tiny_x4_window16')
    net = HAT(**golden_config('hat_tiny_x4_window16'))
    assert torch.equal(net.relative_position_index_SA, sd['relative_position_index_SA'])
    assert torch.equal(net.relative_position_index_OCA, sd['relative_position_index_OCA'])


def test_parameter_counts_of_x4_models():
    expected = {'HAT-S_SRx4': 9_621_183, 'HAT_SRx4': 20_772_507, 'HAT-L_SRx4': 40_846_575}
    for name, count in expected.items():
        cfg = dict(json.loads((GOLDEN / f'manifest_{name}.json').read_text())['network_g'])
        cfg.pop('type')
        with torch.device('meta'):
            net = HAT(**cfg)
        assert sum(p.numel() for p in net.parameters()) == count, name


def test_fused_and_reference_agree_on_a_large_shifted_grid():
    """Several window rows and columns exercise every group of the shifted-window mask."""
    torch.manual_seed(0)
    net = golden_net('hat_tiny_x2')
    x = torch.rand(2, 3, 40, 56)
    with torch.no_grad():
        fused = net(x)
        net.set_fused_attn(False)
        reference = net(x)
    assert (fused - reference).abs().max().item() <= TOLERANCE


def test_fused_and_reference_gradients_agree():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 16, 24)
    grads = []
    for fused in (True, False):
        torch.manual_seed(1)  # same stochastic-depth draws in both runs
        net = golden_net('hat_tiny_x2', fused_attn=fused).train()
        net(x).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters()})
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-4, rtol=1e-3), name


def test_save_load_round_trip_in_released_format(tmp_path):
    net = golden_net('hat_tiny_x3_batch2')
    path = tmp_path / 'net_g.pth'
    torch.save({'params_ema': net.state_dict()}, path)
    loaded = torch.load(path, weights_only=True)
    assert set(loaded['params_ema']) == set(golden_state_dict('hat_tiny_x3_batch2'))
    fresh = HAT(**golden_config('hat_tiny_x3_batch2')).eval()
    fresh.load_state_dict(loaded['params_ema'], strict=True)
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(fresh(x), net(x))


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 16)
    grads = []
    for use_checkpoint in (False, True):
        torch.manual_seed(1)  # same stochastic-depth draws; checkpointing replays them in the recomputation
        net = golden_net('hat_tiny_x2', use_checkpoint=use_checkpoint).train()
        net(x).abs().mean().backward()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters()})
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5), name


def test_gradient_checkpointing_really_recomputes():
    """With checkpointing, the blocks run again during backward (the official flag was a no-op)."""
    calls = {'n': 0}

    def count(*_):  # a pre-hook: the recomputation may stop early, before a block's forward returns
        calls['n'] += 1

    for use_checkpoint, expected_factor in ((False, 1), (True, 2)):
        net = golden_net('hat_tiny_x2', use_checkpoint=use_checkpoint).train()
        calls['n'] = 0
        handle = net.layers[0].residual_group.blocks[0].register_forward_pre_hook(count)
        net(torch.rand(1, 3, 16, 16)).mean().backward()
        handle.remove()
        assert calls['n'] == expected_factor


def test_bf16_autocast_is_finite_and_close():
    net = golden_net('hat_tiny_x2')
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 48), indexing='ij')
    smooth = torch.stack([0.5 + 0.3 * torch.sin(3 * xx + c) * torch.cos(2 * yy) for c in range(3)])[None]
    with torch.no_grad():
        ref = net(smooth)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            low = net(smooth)
    assert torch.isfinite(low).all()
    mse = (low.float() - ref).square().mean().item()
    peak = (ref.max() - ref.min()).item()
    psnr = 10 * math.log10(peak**2 / mse)
    assert psnr >= 50, psnr


def test_any_input_size_including_smaller_than_a_window():
    net = golden_net('hat_tiny_x2')
    with torch.no_grad():
        assert net(torch.rand(1, 3, 5, 11)).shape == (1, 3, 10, 22)
        assert net(torch.rand(1, 3, 17, 9)).shape == (1, 3, 34, 18)


def test_bias_cache_follows_weight_updates():
    """The cached gathered bias must not outlive a change of the table (load_state_dict, optimiser step)."""
    net = golden_net('hat_tiny_x2')
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        before = net(x)
        # a factor, not an added constant: softmax ignores constants
        net.layers[0].residual_group.blocks[0].attn.relative_position_bias_table.mul_(1.5)
        after = net(x)
        net.load_state_dict(golden_state_dict('hat_tiny_x2'))
        restored = net(x)
    assert (after - before).abs().max() > 1e-3
    assert torch.equal(restored, before)


def test_drop_path_drops_whole_samples_and_scales_the_kept_ones():
    torch.manual_seed(0)
    drop = DropPath(0.25).train()
    x = torch.rand(4000, 3, 5).add_(0.5).requires_grad_()
    out = drop(x)
    kept = out.detach().flatten(1).ne(0).all(1)
    dropped = out.detach().flatten(1).eq(0).all(1)
    assert torch.equal(kept, ~dropped)  # a sample is kept or dropped as a whole
    assert abs(kept.float().mean().item() - 0.75) < 0.03
    torch.testing.assert_close(out[kept], x[kept] / 0.75)
    out.sum().backward()
    torch.testing.assert_close(x.grad, kept.float().div(0.75).view(-1, 1, 1).expand_as(x))
    assert drop.eval()(x) is x and DropPath(0.0).train()(x) is x


@pytest.mark.parametrize('kwargs, message', [
    ({'upsampler': 'pixelshuffledirect'}, 'pixelshuffle'),
    ({'resi_connection': '3conv'}, '1conv'),
    ({'upscale': 5}, 'upscale=5'),
    ({'patch_size': 4}, 'patch_size'),
    ({'depths': [2, 2], 'num_heads': [2]}, 'same length'),
    ({'img_size': 4}, 'window_size'),
    ({'overlap_ratio': 0.4}, 'even'),
])
def test_unsupported_options_raise(kwargs, message):
    cfg = golden_config('hat_tiny_x2')
    cfg.update(kwargs)
    with pytest.raises(ValueError, match=message):
        HAT(**cfg)


def test_unknown_keyword_is_an_error():
    with pytest.raises(TypeError, match='window_szie'):
        HAT(**golden_config('hat_tiny_x2'), window_szie=8)


@pytest.mark.parametrize('scale', [2, 3, 4])
def test_banded_reconstruction_equals_one_piece(scale, monkeypatch):
    """Inference runs the upsampling head in bands with a halo; every output pixel sees the same neighbourhood."""
    from hat.archs import hat_arch
    torch.manual_seed(0)
    net = HAT(**tiny_hat_config(upscale=scale)).eval()
    x = torch.rand(1, 3, 2 * hat_arch.RECONSTRUCTION_BAND + 11, 12)
    calls = []
    original = hat_arch.Upsample.forward
    monkeypatch.setattr(hat_arch.Upsample, 'forward', lambda self, t: calls.append(t.shape[-2]) or original(self, t))
    with torch.no_grad():
        banded = net(x)
        assert len(calls) == 3  # three bands of at most RECONSTRUCTION_BAND + 2 * halo rows
        assert max(calls) <= hat_arch.RECONSTRUCTION_BAND + 2 * hat_arch.RECONSTRUCTION_HALO
        monkeypatch.setattr(hat_arch, 'RECONSTRUCTION_BAND', 10**6)
        whole = net(x)
    assert banded.shape == whole.shape == (1, 3, x.shape[-2] * scale, 12 * scale)
    assert (banded - whole).abs().max() < 1e-5

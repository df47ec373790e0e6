"""Local attribution maps, the diffusion index and feature maps: closed forms on linear networks, locality, the CLIs."""
from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
import torch.nn as nn
import yaml

from basicsr.utils.registry import ARCH_REGISTRY
from conftest import REPO, tiny_hat_config
from hat.analysis import compare, features, lam
from hat.analysis.lam import GRADIENT_EPS, Window, diffusion_index, gini, local_attribution_map
from hat.archs.hat_arch import HAT

TINY_EDSR = dict(num_in_ch=3, num_out_ch=3, num_feat=8, num_block=2, upscale=2)
TINY_HAT = tiny_hat_config(upscale=2, depths=(1, 1), squeeze_factor=4)


class LocalNet(nn.Module):
    """3x3 conv -> pixel shuffle x2: each output pixel sees a 3x3 LR neighbourhood."""

    def __init__(self, *, bias: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, 1, 1, bias=bias)
        self.shuffle = nn.PixelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.conv(x))


class GlobalNet(LocalNet):
    """LocalNet with a per-channel gain from a global average pool: every output pixel depends on every input pixel
    (a spatially constant added term would not do: the detector only sees differences of neighbouring pixels)."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Conv2d(3, 12, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.conv(x) * (1.0 + 4.0 * torch.tanh(self.gain(x.mean(dim=(2, 3), keepdim=True)))))


def seeded(module: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    for p in module.parameters():
        nn.init.normal_(p, std=0.5)
    return module.eval()


def texture(h: int, w: int, *, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# Independent reference: the blur path with numpy kernels and OpenCV filtering (reflect-101 borders).


def np_gaussian(size: int, sigma: float) -> np.ndarray:
    if sigma == 0:
        k = np.zeros((size, size))
        k[size // 2, size // 2] = 1.0
        return k
    r = np.arange(size) - size // 2
    k = np.exp(-(r[:, None]**2 + r[None, :]**2) / (2 * sigma**2))
    return k / k.sum()


def cv_filter(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """[C, H, W] float64 -> [C, H, W], OpenCV's default border (reflect-101)."""
    return np.stack([cv2.filter2D(ch, -1, kernel) for ch in image])


def np_path(image: np.ndarray, *, sigma: float, fold: int, size: int) -> tuple[list, list]:
    kernels = [np_gaussian(size, s) for s in np.linspace(sigma, 0, fold + 1)]
    points = [cv_filter(image, kernels[k + 1]) for k in range(fold)]
    derivatives = [cv_filter(image, (kernels[k + 1] - kernels[k]) * fold) for k in range(fold)]
    return points, derivatives


def jacobian(net: nn.Module, shape: tuple) -> tuple[np.ndarray, np.ndarray]:
    """(J [Nout, Nin], b [Nout]) of an affine network from its response to each basis image, no autograd."""
    n_in = int(np.prod(shape))
    with torch.no_grad():
        basis = torch.eye(n_in, dtype=torch.float64).view(n_in, *shape)
        offset = net(torch.zeros(1, *shape, dtype=torch.float64)).flatten()
        response = net(basis).flatten(1) - offset
    return response.T.numpy(), offset.numpy()


def normalised(raw: np.ndarray) -> np.ndarray:
    m = np.abs(raw.sum(axis=0))
    return m / m.max()


# Gini and DI


def test_gini_of_constant_and_one_hot_maps():
    assert abs(gini(np.full((8, 8), 0.3))) < 1e-12
    assert diffusion_index(np.full((8, 8), 0.3)) == pytest.approx(100.0, abs=1e-9)
    one_hot = np.zeros((16, 16))
    one_hot[3, 5] = 1.0
    n = one_hot.size
    # sum (2i - n - 1) x_i = n - 1 (the offsets cancel), n sum x = n (1 + n 1e-7)
    assert gini(one_hot) == pytest.approx((n - 1) / (n * (1 + n * 1e-7)), abs=1e-12)
    assert gini(one_hot) > 0.99
    assert diffusion_index(one_hot) < 0.5


def test_gini_formula_and_shift_to_zero_minimum():
    # [0, 1, 2, 3]: sum (2i - n - 1) x_i = -1 + 2 + 9 = 10, n sum x = 24 (up to the 1e-7 offset).
    assert gini(np.array([3.0, 0.0, 2.0, 1.0])) == pytest.approx(10 / 24, abs=1e-6)
    assert gini(np.array([8.0, 5.0, 7.0, 6.0])) == pytest.approx(gini(np.array([3.0, 0.0, 2.0, 1.0])), abs=1e-12)
    assert gini(np.array([-2.0, 1.0])) == pytest.approx(gini(np.array([0.0, 3.0])), abs=1e-12)


# Attribution maps


def test_hat_attribution_shape_normalisation_and_di():
    torch.manual_seed(0)
    net = HAT(**TINY_HAT).eval()
    image = texture(12, 16)
    result = local_attribution_map(net, image, Window(12, 8, 8), fold=6, batch=4)
    assert result.attribution.shape == (12, 16)
    assert result.attribution.max() == pytest.approx(1.0, abs=1e-12)
    assert result.attribution.min() >= 0.0
    assert 0.0 <= result.di <= 100.0
    assert result.sr.shape == (3, 24, 32)
    assert np.isfinite(result.path_gradient).all()


def test_batching_does_not_change_the_map():
    torch.manual_seed(0)
    net = HAT(**TINY_HAT).eval()
    image = texture(8, 8)
    one = local_attribution_map(net, image, Window(4, 4, 6), fold=5, batch=1)
    all_at_once = local_attribution_map(net, image, Window(4, 4, 6), fold=5, batch=5)
    np.testing.assert_allclose(one.attribution, all_at_once.attribution, rtol=1e-4, atol=1e-6)


def test_local_network_attributes_only_its_receptive_field_and_diffuses_less_than_a_global_one():
    image = texture(16, 16, seed=1)
    window = Window(12, 12, 8)  # HR rows/cols 12..19; with the forward difference the detector reads 12..20
    local = local_attribution_map(seeded(LocalNet()), image, window, fold=10, batch=5)
    # HR 12..20 come from LR 6..10; the 3x3 conv widens that to LR 5..11. Nothing outside may contribute.
    outside = np.ones((16, 16), bool)
    outside[5:12, 5:12] = False
    assert np.all(local.attribution[outside] == 0.0)
    assert local.attribution[~outside].max() == pytest.approx(1.0)

    global_ = local_attribution_map(seeded(GlobalNet()), image, window, fold=10, batch=5)
    assert np.all(global_.attribution[outside] > 0.0)
    assert global_.di > local.di + 10.0, (local.di, global_.di)


def test_linear_objective_matches_the_integrated_gradient_closed_form():
    """F(x) = w . x + b telescopes along the path: P = w . (I - I * G(sigma))."""
    sigma, fold, size = 1.5, 7, 7
    net = seeded(LocalNet()).double()
    image = texture(10, 10, seed=2, dtype=torch.float64)
    window = Window(6, 4, 8)

    def window_sum(y: torch.Tensor) -> torch.Tensor:
        return y[..., window.y:window.y + window.size, window.x:window.x + window.size].sum(dim=(1, 2, 3))

    result = local_attribution_map(net, image, window, sigma=sigma, fold=fold, kernel_size=size, batch=3,
                                   objective=window_sum)
    jac, _ = jacobian(net, (3, 10, 10))
    mask = np.zeros((3, 20, 20))
    mask[:, window.y:window.y + window.size, window.x:window.x + window.size] = 1.0
    w = (jac.T @ mask.ravel()).reshape(3, 10, 10)
    img = image.numpy()
    expected = w * (img - cv_filter(img, np_gaussian(size, sigma)))
    np.testing.assert_allclose(result.path_gradient, expected, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(result.attribution, normalised(expected), rtol=1e-5, atol=1e-12)


def test_gradient_detector_on_a_linear_network_matches_the_closed_form():
    """For y = J x + b the gradient of the detector is J^T g(y), with g the hand-derived gradient of the summed
    magnitudes sqrt(dy^2 + dx^2 + eps); summed over an independently built blur path."""
    sigma, fold, size = 1.2, 6, 9
    net = seeded(LocalNet(), seed=3).double()
    image = texture(8, 8, seed=4, dtype=torch.float64)
    window = Window(5, 7, 9)  # touches the last row/column of the 16x16 output: the border rule matters
    result = local_attribution_map(net, image, window, sigma=sigma, fold=fold, kernel_size=size, batch=4)

    jac, offset = jacobian(net, (3, 8, 8))
    inside = np.zeros((3, 16, 16))
    inside[:, window.y:window.y + window.size, window.x:window.x + window.size] = 1.0

    def detector_gradient(y: np.ndarray) -> np.ndarray:
        dy = np.zeros_like(y)
        dx = np.zeros_like(y)
        dy[:, :-1] = y[:, 1:] - y[:, :-1]
        dx[:, :, :-1] = y[:, :, 1:] - y[:, :, :-1]
        m = np.sqrt(dy**2 + dx**2 + GRADIENT_EPS)
        gy, gx = inside * dy / m, inside * dx / m
        g = -(gy + gx)
        g[:, 1:] += gy[:, :-1]
        g[:, :, 1:] += gx[:, :, :-1]
        return g

    points, derivatives = np_path(image.numpy(), sigma=sigma, fold=fold, size=size)
    expected = np.zeros((3, 8, 8))
    for x, d in zip(points, derivatives):
        y = (jac @ x.ravel() + offset).reshape(3, 16, 16)
        expected += (jac.T @ detector_gradient(y).ravel()).reshape(3, 8, 8) * d
    expected /= fold
    np.testing.assert_allclose(result.path_gradient, expected, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(result.attribution, normalised(expected), rtol=1e-5, atol=1e-12)


def test_detector_gradient_is_finite_on_a_flat_output():
    y = torch.full((1, 3, 6, 6), 0.5, requires_grad=True)
    lam.window_gradient_objective(Window(0, 0, 6))(y).sum().backward()
    assert torch.equal(y.grad, torch.zeros_like(y))


def test_window_outside_the_output_is_refused():
    with pytest.raises(ValueError, match='does not fit'):
        local_attribution_map(seeded(LocalNet()), texture(8, 8), Window(10, 0, 8), fold=2)


# Command lines


@pytest.fixture(scope='module')
def tiny_models(tmp_path_factory):
    """Two tiny HAT checkpoints in the released format, an option file for the first, and an LR image."""
    root = tmp_path_factory.mktemp('analysis')
    paths = {}
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = HAT(**TINY_HAT)
        paths[f'ckpt{seed}'] = root / f'tiny_hat_{seed}.pth'
        torch.save({'params_ema': net.state_dict()}, paths[f'ckpt{seed}'])
    paths['options'] = root / 'tiny_hat.yml'
    network_g = {'type': 'HAT', **TINY_HAT}
    paths['options'].write_text(yaml.safe_dump({'network_g': network_g, 'path': {
        'pretrain_network_g': str(paths['ckpt0']), 'param_key_g': 'params_ema', 'strict_load_g': True}}))
    torch.manual_seed(2)
    paths['edsr_weights'] = root / 'tiny_edsr.pth'
    torch.save({'params': ARCH_REGISTRY.get('EDSR')(**TINY_EDSR).state_dict()}, paths['edsr_weights'])
    paths['edsr_options'] = root / 'tiny_edsr.yml'
    paths['edsr_options'].write_text(yaml.safe_dump({'network_g': {'type': 'EDSR', **TINY_EDSR}, 'path': {
        'pretrain_network_g': str(paths['edsr_weights'])}}))
    rng = np.random.default_rng(0)
    lr = cv2.GaussianBlur(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8), (3, 3), 0)
    paths['image'] = root / 'lr.png'
    cv2.imwrite(str(paths['image']), lr)
    return paths


@pytest.mark.slow
def test_lam_cli_with_a_checkpoint_prints_json_and_writes_its_files(tiny_models, tmp_path):
    out = tmp_path / 'lam'
    cmd = [sys.executable, '-m', 'hat.analysis.lam', '-m', str(tiny_models['ckpt0']), '-i', str(tiny_models['image']),
           '--window', '10', '6', '8', '--out', str(out), '--fold', '4', '--batch', '2', '--device', 'cpu', '--json']
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert 0.0 <= summary['di'] <= 100.0
    assert summary['arch'] == 'HAT'
    attribution = np.load(out / 'lam.npy')
    assert attribution.shape == (12, 16) and attribution.dtype == np.float32
    assert attribution.max() == pytest.approx(1.0) and attribution.min() >= 0.0
    assert summary['di'] == pytest.approx(diffusion_index(attribution), abs=1e-3)
    assert cv2.imread(str(out / 'lam.png')).shape == (24, 32, 3)
    assert cv2.imread(str(out / 'window.png')).shape == (24, 32, 3)


def test_lam_cli_option_file_gives_the_same_map_as_the_checkpoint(tiny_models, tmp_path):
    common = ['-i', str(tiny_models['image']), '--window', '10', '6', '8', '--fold', '4', '--device', 'cpu']
    from_options = lam.main(['-m', str(tiny_models['options']), '--out', str(tmp_path / 'a'), *common])
    from_checkpoint = lam.main(['-m', str(tiny_models['ckpt0']), '--out', str(tmp_path / 'b'), *common])
    assert from_options['arch'] == 'HAT'
    np.testing.assert_allclose(np.load(tmp_path / 'a' / 'lam.npy'), np.load(tmp_path / 'b' / 'lam.npy'), atol=1e-5)
    assert from_options['di'] == pytest.approx(from_checkpoint['di'], abs=1e-3)


def test_compare_cli_writes_the_figure_and_one_entry_per_model(tiny_models, tmp_path):
    """A HAT checkpoint (detected) beside an EDSR option file (basicsr's registry, weights under params)."""
    report = compare.main(['-m', str(tiny_models['ckpt0']), str(tiny_models['edsr_options']), '--names', 'HAT',
                           'EDSR baseline', '-i', str(tiny_models['image']), '--window', '10', '6', '8', '--out',
                           str(tmp_path), '--fold', '3', '--device', 'cpu'])
    written = json.loads((tmp_path / 'compare.json').read_text())
    assert [(m['name'], m['arch'], m['folder']) for m in written['models']] == [('HAT', 'HAT', 'HAT'),
                                                                                ('EDSR baseline', 'EDSR',
                                                                                 'EDSR_baseline')]
    assert all(0.0 <= m['di'] <= 100.0 for m in written['models'])
    assert written['models'][0]['di'] != written['models'][1]['di']
    assert written == json.loads(json.dumps(report))
    figure = cv2.imread(str(tmp_path / 'compare.png'))
    assert figure.shape[1] == 3 * 32 + 2 * 4 and figure.shape[0] > 24  # three panels and captions below
    for name in ('HAT', 'EDSR_baseline'):
        assert (tmp_path / name / 'lam.npy').is_file() and (tmp_path / name / 'lam.png').is_file()


def test_compare_names_are_made_unique():
    assert compare.model_names(['a/x.pth', 'b/x.pth', 'y.yml'], None) == ['x', 'x_2', 'y']


# Feature maps


def test_features_cli_writes_one_image_per_stage(tiny_models, tmp_path):
    summary = features.main(['-m', str(tiny_models['ckpt0']), '-i', str(tiny_models['image']), '--out',
                             str(tmp_path), '--channels', '3', '--device', 'cpu'])
    names = [s['name'] for s in summary['stages']]
    assert names == ['conv_first', 'layers.0', 'layers.1', 'conv_after_body']
    for stage in summary['stages']:
        assert stage['shape'] == [12, 12, 16]  # embed_dim x LR size (the padding to the window is cropped)
        assert cv2.imread(stage['file']) is not None
    assert sorted(p.name for p in tmp_path.glob('*.png')) == [
        '00_conv_first.png', '01_layers.0.png', '02_layers.1.png', '03_conv_after_body.png', 'overview.png']


def test_rhag_tokens_are_reshaped_to_the_map_the_network_computes():
    """The hooked RHAG output, reshaped, equals the token map computed by hand from the same layers."""
    torch.manual_seed(0)
    net = HAT(**TINY_HAT).eval()
    image = texture(8, 12)
    stages = {s.name: s.features for s in features.collect_features(net, image)}
    with torch.no_grad():
        x = net.conv_first((image[None] - net.mean) * net.img_range)
        params = {'shift_patterns': net._shift_masks(x.device), 'rpi_sa': net.relative_position_index_SA,
                  'rpi_oca': net.relative_position_index_OCA}
        tokens = net.layers[0](net.patch_embed(x), (8, 12), params)
    torch.testing.assert_close(stages['conv_first'], x[0])
    torch.testing.assert_close(stages['layers.0'], tokens[0].transpose(0, 1).reshape(12, 8, 12))


@pytest.mark.parametrize('arch, cfg', [
    ('SwinIR', dict(upscale=2, img_size=16, window_size=4, depths=[1, 1], embed_dim=12, num_heads=[2, 2],
                    mlp_ratio=2.0, upsampler='pixelshuffle')),
    ('RCAN', dict(num_in_ch=3, num_out_ch=3, num_feat=8, num_group=2, num_block=1, squeeze_factor=4, upscale=2)),
    ('EDSR', TINY_EDSR),
])
def test_basicsr_architectures_get_feature_maps_and_attribution(arch, cfg):
    torch.manual_seed(0)
    net = ARCH_REGISTRY.get(arch)(**cfg).eval()
    image = texture(8, 12)
    stages = features.collect_features(net, image)
    body = 'layers' if arch == 'SwinIR' else 'body'
    assert [s.name for s in stages] == ['conv_first', f'{body}.0', f'{body}.1', 'conv_after_body']
    assert all(s.features.shape[1:] == (8, 12) for s in stages)
    result = local_attribution_map(net, image, Window(4, 4, 8), fold=3)
    assert result.attribution.shape == (8, 12) and 0.0 <= result.di <= 100.0


def test_features_of_a_network_without_stages_are_refused():
    with pytest.raises(ValueError, match='layers.*body'):
        features.feature_stages(LocalNet())


def test_lam_cli_reports_a_window_outside_the_output_without_a_traceback(tiny_models, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        lam.main(['-m', str(tiny_models['ckpt0']), '-i', str(tiny_models['image']), '--window', '28', '0', '8',
                  '--out', str(tmp_path), '--fold', '2', '--device', 'cpu'])
    assert exit_info.value.code == 2
    assert 'does not fit in the SR output of 32x24' in capsys.readouterr().err

"""Tiled inference equals whole-image inference (no seams), for any tile size; errors are never swallowed."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

from conftest import SHARED_DATASETS, golden_net, requires_shared_datasets
from hat.archs.hat_arch import HAT
from hat.utils.ensemble import self_ensemble
from hat.utils.tiling import tile_starts, tiled_forward


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a.clamp(0, 1) - b.clamp(0, 1)).square().mean().item()
    return float('inf') if mse == 0 else 10 * math.log10(1 / mse)


@pytest.fixture(scope='module')
def tiny_golden_net() -> HAT:
    return golden_net('hat_tiny_x2')


@pytest.fixture(scope='module')
def sr_like_net(tiny_golden_net):
    """A stand-in for a trained x2 network: bicubic plus a small correction by the tiny golden HAT.

    The golden weights are random, so the raw network mixes the whole image with large weights; a trained
    network's output depends mostly on nearby pixels, like this one.
    """
    def net(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(t, scale_factor=2, mode='bicubic') + 0.01 * tiny_golden_net(t)

    return net


def test_tile_starts_cover_the_length_with_the_overlap():
    assert tile_starts(100, 40, 8) == [0, 32, 60]
    assert tile_starts(30, 40, 8) == [0]
    for length, tile, overlap in [(97, 16, 4), (64, 16, 0), (50, 24, 10)]:
        starts = tile_starts(length, tile, overlap)
        assert starts[0] == 0 and starts[-1] + tile == length
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))


def test_a_linear_network_is_reproduced_exactly_by_the_blend():
    """For a per-pixel network the blend of overlapping tiles is the whole-image output, to rounding."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 12, 1), torch.nn.PixelShuffle(2))
    x = torch.rand(1, 3, 37, 53)
    with torch.no_grad():
        whole = net(x)
        tiled = tiled_forward(net, x, scale=2, tile_size=16, tile_pad=4, progress=False)
    assert tiled.shape == whole.shape
    assert (tiled - whole).abs().max().item() < 1e-6


@pytest.mark.parametrize('tile_size, tile_pad', [(16, 4), (20, 6), (13, 2), (64, 8)])
def test_tiled_hat_is_close_to_whole_image(sr_like_net, tile_size, tile_pad):
    torch.manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 40), torch.linspace(0, 1, 56), indexing='ij')
    x = torch.stack([0.5 + 0.4 * torch.sin(5 * xx + 3 * yy + c) for c in range(3)])[None]
    with torch.no_grad():
        whole = sr_like_net(x)
        tiled = tiled_forward(sr_like_net, x, scale=2, tile_size=tile_size, tile_pad=tile_pad, multiple=8,
                              progress=False)
    assert tiled.shape == whole.shape
    assert psnr(tiled, whole) > 50


@requires_shared_datasets
def test_tiled_psnr_matches_whole_image_psnr_on_set5(sr_like_net):
    """Against the ground truth, tiling costs less than 0.01 dB (the official tiling loses about 0.15 dB)."""
    from basicsr.metrics import calculate_psnr
    scores = {'whole': [], 'tiled': []}
    for name in ('baby', 'butterfly'):
        gt = cv2.imread(str(SHARED_DATASETS / 'Set5/HR' / f'{name}.png'))
        lq = cv2.imread(str(SHARED_DATASETS / 'Set5/LR_bicubic/X2' / f'{name}.png'))
        x = torch.from_numpy(lq[:, :, ::-1].copy()).permute(2, 0, 1)[None].float() / 255
        with torch.no_grad():
            tiled = tiled_forward(sr_like_net, x, scale=2, tile_size=48, tile_pad=8, multiple=8, progress=False)
            outputs = {'whole': sr_like_net(x), 'tiled': tiled}
        for key, out in outputs.items():
            img = (out[0].clamp(0, 1).permute(1, 2, 0).numpy()[:, :, ::-1] * 255).round().astype(np.uint8)
            scores[key].append(calculate_psnr(img, gt[:img.shape[0], :img.shape[1]], crop_border=2,
                                              test_y_channel=True))
    assert abs(np.mean(scores['whole']) - np.mean(scores['tiled'])) < 0.01


def test_memory_is_the_canvas_and_one_tile():
    """The blend needs the output canvas and its one-channel weight sum, plus one tile's temporaries; the final
    normalisation is done in place (a second canvas would add most of the peak for a large image)."""
    from hat.inference.memory import TensorPeakMemory

    def net(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(t, scale_factor=4, mode='nearest')

    x = torch.rand(1, 3, 64, 64)
    canvas = 3 * 256 * 256 * 4
    weights = 256 * 256 * 4
    with TensorPeakMemory(known=[x]) as tracker:
        tiled = tiled_forward(net, x, scale=4, tile_size=16, tile_pad=2, progress=False)
    assert (tiled - net(x)).abs().max().item() < 1e-6
    assert canvas + weights <= tracker.peak < canvas + weights + canvas / 4  # a tile: 1/16 of the canvas


def test_errors_in_a_tile_propagate():
    calls = {'n': 0}

    def flaky(t: torch.Tensor) -> torch.Tensor:
        calls['n'] += 1
        if calls['n'] == 3:
            raise RuntimeError('out of memory in tile 3')
        return t.repeat_interleave(2, -1).repeat_interleave(2, -2)

    with pytest.raises(RuntimeError, match='tile 3'):
        tiled_forward(flaky, torch.rand(1, 3, 40, 40), scale=2, tile_size=16, tile_pad=2, progress=False)


def test_invalid_tile_options():
    with pytest.raises(ValueError, match='tile_size'):
        tiled_forward(lambda t: t, torch.rand(1, 3, 8, 8), scale=1, tile_size=0, tile_pad=0)
    with pytest.raises(ValueError, match='tile_pad'):
        tiled_forward(lambda t: t, torch.rand(1, 3, 8, 8), scale=1, tile_size=4, tile_pad=-1)


def test_self_ensemble_of_an_equivariant_network_is_the_network():
    net = torch.nn.Upsample(scale_factor=2, mode='nearest')
    x = torch.rand(1, 3, 10, 14)
    assert torch.allclose(self_ensemble(net, x), net(x), atol=1e-7)


def test_self_ensemble_averages_the_eight_transforms(tiny_golden_net):
    x = torch.rand(1, 3, 16, 24)
    with torch.no_grad():
        ensembled = self_ensemble(tiny_golden_net, x)
        single = tiny_golden_net(x)
        flipped = tiny_golden_net(x.flip(-1)).flip(-1)
    assert ensembled.shape == single.shape
    assert not torch.allclose(ensembled, single, atol=1e-3)
    assert not torch.allclose(single, flipped, atol=1e-3)  # HAT is not flip-equivariant: the average matters

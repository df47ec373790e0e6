"""The benchmarks' baseline is the official computation: it reproduces the golden outputs of the official code."""
from __future__ import annotations

import sys

import pytest
import torch

from conftest import GOLDEN_CASES, REPO, golden_config, golden_io, golden_state_dict

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.official_baseline import OfficialHAT, official_calculate_mask  # noqa: E402
from hat.archs.hat_arch import HAT  # noqa: E402
from hat.archs.window import shift_mask_patterns  # noqa: E402

TOLERANCE = 1e-5


def load_baseline(case: str) -> OfficialHAT:
    net = OfficialHAT(**golden_config(case))
    net.load_state_dict(golden_state_dict(case), strict=True)
    return net.eval()


@pytest.mark.parametrize('case', GOLDEN_CASES)
def test_baseline_reproduces_golden_output(case):
    io = golden_io(case)
    with torch.no_grad():
        out = load_baseline(case)(io['input'])
    assert out.shape == io['output'].shape
    assert (out - io['output']).abs().max().item() <= TOLERANCE


def test_baseline_pads_like_the_official_model():
    io = golden_io('hat_tiny_x2_padded')
    with torch.no_grad():
        out = load_baseline(io['checkpoint'].removesuffix('.pth'))(io['input'])
    assert out.shape == (1, 3, 42, 70)
    assert (out - io['output']).abs().max().item() <= TOLERANCE


def test_baseline_has_the_state_dict_of_our_hat():
    cfg = golden_config('hat_tiny_x2')
    ours, baseline = HAT(**cfg).state_dict(), OfficialHAT(**cfg).state_dict()
    assert list(ours) == list(baseline)
    assert all(ours[k].shape == baseline[k].shape for k in ours)


def test_baseline_is_sensitive_to_the_weights():
    """A wrong bias table moves its output far beyond the tolerance: the golden match is not an accident."""
    net = load_baseline('hat_tiny_x2')
    io = golden_io('hat_tiny_x2')
    with torch.no_grad():
        net.layers[1].residual_group.blocks[1].attn.relative_position_bias_table.mul_(1.1)
        assert (net(io['input']) - io['output']).abs().max().item() > 1e-3


def test_baseline_does_not_use_our_fast_kernels(monkeypatch):
    """The baseline must measure the official computation: no scaled_dot_product_attention, no oneDNN linear."""
    calls = []
    monkeypatch.setattr(torch.nn.functional, 'scaled_dot_product_attention',
                        lambda *a, **k: calls.append('sdpa'))
    monkeypatch.setattr(HAT, 'forward', lambda *a, **k: calls.append('HAT.forward'))
    net = load_baseline('hat_tiny_x2')
    for module in net.modules():
        if hasattr(module, 'uses_cpu_kernels'):
            monkeypatch.setattr(module, 'forward', lambda *a, **k: calls.append('Linear.forward'))
    with torch.no_grad():
        out = net(torch.rand(1, 3, 16, 16))
    assert calls == []
    assert out.shape == (1, 3, 32, 32)


def test_official_mask_is_the_full_per_window_mask():
    """[nW, N, N], rebuilt per call; each window's mask is one of the four patterns our HAT uses."""
    mask = official_calculate_mask((32, 48), window_size=8, shift_size=4)
    assert mask.shape == (4 * 6, 64, 64)
    patterns = shift_mask_patterns(8, 4)
    for index in range(mask.shape[0]):
        row, col = divmod(index, 6)
        assert torch.equal(mask[index], patterns[int(row == 3), int(col == 5)])

"""benchmarks/profile_forward.py: the time of a forward by kind of step, timed around the calls that do them."""
from __future__ import annotations

import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import REPO, tiny_hat_config

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import bench_inference, profile_forward  # noqa: E402
from hat.archs import hat_arch  # noqa: E402
from hat.archs import linear as token_linear  # noqa: E402
from hat.archs.attention import attention  # noqa: E402
from hat.archs.hat_arch import HAT  # noqa: E402
from hat.archs.window import WindowOrder  # noqa: E402


@pytest.fixture
def tiny_net() -> HAT:
    torch.manual_seed(0)
    return HAT(**tiny_hat_config(upscale=2)).eval()  # one HAB (no shift) and one OCAB, window 4


def test_every_call_of_a_kind_is_counted_once_per_forward(tiny_net):
    result = profile_forward.profile(tiny_net, torch.rand(1, 3, 16, 16), repeats=2)
    modules = list(tiny_net.modules())
    assert result.calls == {
        'attention': 2,  # the HAB's 16 windows in one chunk, the OCAB's in one
        # HAB: qkv, proj, fc1, fc2; OCAB: keys/values, q, proj, fc1, fc2 (linear_into inside fresh_linear is one call)
        'linear': 9,
        'convolution': sum(isinstance(m, nn.Conv2d) for m in modules),  # each once: 10
        'layer norm': sum(isinstance(m, nn.LayerNorm) for m in modules),  # each once: 6
        'window moves': 4,  # take and put, in the HAB and in the OCAB
    }
    assert len(result.forward_times) == 2
    assert all(seconds > 0 for seconds in result.seconds.values())
    assert result.rest_s >= 0  # the kinds are timed inside the forward, never twice
    assert result.rest_s == pytest.approx(result.forward_s - sum(result.seconds.values()))


def test_a_call_inside_a_timed_call_counts_for_the_outer_one():
    clock = profile_forward.StepClock()
    inner = clock.wrap('linear', lambda: 1)
    outer = clock.wrap('attention', lambda: inner() + 1)
    assert outer() == 2 and inner() == 1
    assert clock.calls == {'attention': 1, 'linear': 1}


def test_the_call_sites_are_put_back_and_the_output_is_unchanged(tiny_net):
    x = torch.rand(1, 3, 16, 16)
    originals = (hat_arch.attention, token_linear.fresh_linear, token_linear.linear_into, F.linear,
                 nn.Conv2d.forward, nn.LayerNorm.forward, WindowOrder.take, WindowOrder.put, WindowOrder.restore)
    with torch.no_grad():
        expected = tiny_net(x)
        with profile_forward.timed_steps(profile_forward.StepClock()) as clock:
            assert hat_arch.attention is not attention
            profiled = tiny_net(x)
        assert clock.calls['attention'] == 2
    assert torch.equal(profiled, expected)
    assert (hat_arch.attention, token_linear.fresh_linear, token_linear.linear_into, F.linear, nn.Conv2d.forward,
            nn.LayerNorm.forward, WindowOrder.take, WindowOrder.put, WindowOrder.restore) == originals
    assert hat_arch.attention is attention


def test_flops_by_kind_are_the_official_count():
    by_op = bench_inference.count_flops_by_op(bench_inference.network_config('HAT'), 64)
    assert set(by_op) == {'convolution', 'addmm', 'bmm'}
    assert sum(by_op.values()) == bench_inference.count_flops(bench_inference.network_config('HAT'), 64)
    by_kind = profile_forward.flops_by_kind(by_op)
    assert by_kind == {'attention': by_op['bmm'], 'linear': by_op['addmm'], 'convolution': by_op['convolution'],
                       'rest': 0.0}
    # HAT x4 at 64x64: 37.4 GFLOP of attention products (head size 30), 89.2 of linear layers, 81.2 of convolutions
    assert (by_kind['attention'] / 1e9, by_kind['linear'] / 1e9, by_kind['convolution'] / 1e9) == pytest.approx(
        (37.37, 89.18, 81.21), abs=0.01)


def test_table_rows_and_rates():
    result = profile_forward.StepProfile(
        seconds={'attention': 1.0, 'linear': 2.0, 'convolution': 1.0, 'layer norm': 0.5, 'window moves': 0.25},
        calls={'attention': 10, 'linear': 20, 'convolution': 5, 'layer norm': 6, 'window moves': 8},
        forward_times=[5.0, 5.5])
    rows = profile_forward.table(result, {'attention': 100e9, 'linear': 400e9, 'convolution': 300e9}, rate=400.0)
    assert rows[2] == '| attention | 10 | 1.000 | 19% | 100.0 | 100 | 25% |'
    assert rows[3] == '| linear | 20 | 2.000 | 38% | 400.0 | 200 | 50% |'
    assert rows[5] == '| layer norm | 6 | 0.500 | 10% | 0.0 | - | - |'
    assert rows[7] == '| rest | - | 0.500 | 10% | 0.0 | - | - |'
    assert rows[8] == '| **forward** | 1 | 5.250 | 100% | 800.0 | 152 | 38% |'


def test_the_kernels_alone_run_the_shapes_of_the_forward(tiny_net, monkeypatch):
    monkeypatch.setattr(token_linear, 'ROW_CHUNK', 1024)  # as on CPUs without oneDNN products (2048 with them)
    rates = profile_forward.kernel_rates(tiny_net, 16, repeats=2)
    # tiny HAT: 12 channels, 2 heads, window 4 (16 tokens), MLP 24, CAB 12 -> 4; chunks of 1024 tokens = 64 windows
    assert [(name, shape) for name, shape, _ in rates] == [
        ('qkv', '[1024, 12] x [12, 36]'),
        ('attention', '64 windows x 2 heads, 16 tokens'),
        ('attention, products alone', '64 windows x 2 heads, 16 tokens, no softmax'),
        ('OCAB attention', '64 windows x 2 heads, 16 x 36 tokens'),  # overlapping windows of 6
        ('proj', '[1024, 12] x [12, 12]'),
        ('fc1 + GELU', '[1024, 12] x [12, 24]'),
        ('fc2', '[1024, 24] x [24, 12]'),
        ('CAB conv 3x3', '12 -> 4 channels, 16x16'),
        ('CAB conv 3x3', '4 -> 12 channels, 16x16'),
    ]
    assert all(speed > 0 for _, _, speed in rates)
    # Under bf16 autocast (--precision bf16) every kernel gets operands of one dtype: the same rows, all timed.
    bf16_rates = profile_forward.kernel_rates(tiny_net, 16, bf16=True, repeats=1)
    assert [name for name, _, _ in bf16_rates] == [name for name, _, _ in rates]
    assert all(speed > 0 for _, _, speed in bf16_rates)
    assert profile_forward.kernel_table([('qkv', '[1024, 12] x [12, 36]', 123.4)], rate=400.0) == [
        '| kernel alone | shape | GFLOP/s | % of matmul rate |', '|---|---|---|---|',
        '| qkv | [1024, 12] x [12, 36] | 123 | 31% |']


def test_the_script_writes_its_report(tmp_path, capsys):
    out = tmp_path / 'profile.md'
    report = profile_forward.main(['--variant', 'HAT', '--size', '16', '--repeats', '1',
                                   '--out', str(out)])
    assert out.read_text() == report + '\n'
    assert report.startswith('HAT x4 forward at 16x16, fp32, by kind of step. CPU: ')
    for kind in ('attention', 'linear', 'convolution', 'layer norm', 'window moves', 'rest', '**forward**', 'qkv',
                 'fc1 + GELU', 'CAB conv 3x3'):
        assert f'\n| {kind} | ' in report
    with pytest.raises(SystemExit):
        profile_forward.parse_args(['--repeats', '0'])

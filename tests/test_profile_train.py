"""benchmarks/profile_train.py: a training iteration's time by kind of operator, from the torch profiler."""
from __future__ import annotations

import sys

import pytest
import torch

from conftest import REPO

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import bench_inference, profile_train  # noqa: E402


@pytest.mark.parametrize('operator, kind', [
    ('aten::bmm', 'attention products'),
    ('LlgaPartition_3', 'attention products'),  # oneDNN Graph's fused attention, numbered per partition
    ('aten::_scaled_dot_product_flash_attention_for_cpu_backward', 'attention products'),
    ('mkldnn::_linear_pointwise', 'linear products'),
    ('aten::mm', 'linear products'),
    ('aten::convolution_backward', 'convolutions'),
    ('aten::_softmax_backward_data', 'softmax'),
    ('aten::native_layer_norm_backward', 'layer norm'),
    ('aten::_to_copy', 'copies and casts'),
    ('aten::scatter_add_', 'gathers'),
    ('aten::add_', 'other operators'),
    ('aten::bmm_out', 'other operators'),  # exact names match exactly: only names listed with '*' are prefixes
    ('Optimizer.step#Adam.step', 'other operators'),
])
def test_operators_are_grouped_by_kind(operator, kind):
    assert profile_train.kind_of(operator) == kind


def test_grouping_sums_seconds_and_calls_and_names_the_largest_others():
    events = [('aten::bmm', 1.5, 100), ('LlgaPartition_0', 0.5, 6), ('aten::mm', 0.75, 20), ('aten::add_', 0.25, 900),
              ('aten::mul', 0.5, 40), ('aten::sum', 0.125, 30), ('aten::fill_', 0.0625, 5)]
    seconds, calls, largest = profile_train.group_operators(events, largest=2)
    assert set(seconds) == set(calls) == set(profile_train.KINDS)
    assert seconds['attention products'] == 2.0 and calls['attention products'] == 106
    assert seconds['linear products'] == 0.75 and calls['linear products'] == 20
    assert seconds['other operators'] == 0.9375 and calls['other operators'] == 975
    assert seconds['softmax'] == 0.0 and calls['softmax'] == 0
    assert largest == [('aten::mul', 0.5), ('aten::add_', 0.25)]


def test_training_flops_are_three_official_forwards_per_sample():
    cfg = bench_inference.network_config('HAT-S')
    forward = bench_inference.count_flops_by_op(cfg, 32)
    flops = profile_train.training_flops(cfg, 32, batch=2)
    assert flops == {'attention products': 6 * forward['bmm'], 'linear products': 6 * forward['addmm'],
                     'convolutions': 6 * forward['convolution']}
    # HAT-S at 48x48: 30.7 G multiply-adds per image forward, 737 GFLOP per training iteration at batch 4
    assert sum(profile_train.training_flops(cfg, 48, batch=4).values()) / 1e9 == pytest.approx(737.4, abs=0.1)


def test_table_rows_and_rates():
    result = profile_train.IterationProfile(
        iteration_times=[4.0], profiled_s=5.0,
        seconds={'attention products': 1.0, 'linear products': 2.0, 'convolutions': 0.5, 'softmax': 0.25,
                 'layer norm': 0.0, 'copies and casts': 0.25, 'gathers': 0.0, 'other operators': 0.5},
        calls={kind: 10 for kind in profile_train.KINDS})
    rows = profile_train.table(result, {'attention products': 100e9, 'linear products': 400e9,
                                        'convolutions': 100e9}, rate=400.0)
    assert rows[2] == '| attention products | 10 | 1.000 | 20% | 100.0 | 100 | 25% |'
    assert rows[3] == '| linear products | 10 | 2.000 | 40% | 400.0 | 200 | 50% |'
    assert rows[5] == '| softmax | 10 | 0.250 | 5% | 0.0 | - | - |'
    assert rows[-2] == '| outside operators | - | 0.500 | 10% | 0.0 | - | - |'
    assert rows[-1] == '| **iteration** (profiled) | 1 | 5.000 | 100% | 600.0 | 120 | 30% |'
    assert len(rows) == 2 + len(profile_train.KINDS) + 2


def test_iterations_are_numbered_on_and_the_last_one_is_profiled():
    seen = []
    a, b = torch.rand(8, 32, 32), torch.rand(8, 32, 32)

    def run(iteration: int) -> float:
        seen.append(iteration)
        torch.bmm(a, b)
        return float(iteration)

    result = profile_train.profile_iterations(run, iters=3, warmup=2)
    assert seen == [1, 2, 3, 4, 5, 6]  # 2 untimed, 3 clocked, 1 profiled: as a training loop counts
    assert result.iteration_times == [3.0, 4.0, 5.0]
    assert result.calls['attention products'] == 1  # only the profiled iteration's bmm
    assert result.seconds['attention products'] > 0
    assert result.profiled_s >= sum(result.seconds.values()) - 1e-3
    assert result.outside_s == pytest.approx(max(0.0, result.profiled_s - sum(result.seconds.values())))


def test_the_script_writes_its_report(tmp_path):
    out = tmp_path / 'profile_train.md'
    report = profile_train.main(['--variant', 'HAT-S', '--batch', '1', '--patch', '16', '--iters', '1',
                                 '--warmup', '0', '--out', str(out)])
    assert out.read_text() == report + '\n'
    assert report.startswith('HAT-S x4 training iteration (fp32), batch 1, 16x16 LR patches, by kind of operator. '
                             'CPU: ')
    assert '0 untimed iterations, then 1 clocked' in report
    for kind in (*profile_train.KINDS, 'outside operators', '**iteration** (profiled)'):
        assert f'\n| {kind} | ' in report
    # every product of HAT-S's training ran and was counted: none of their rows is empty
    for kind in ('attention products', 'linear products', 'convolutions'):
        row = next(line for line in report.splitlines() if line.startswith(f'| {kind} | '))
        calls, seconds = row.split(' | ')[1:3]
        assert int(calls) > 0 and float(seconds) > 0


@pytest.mark.parametrize('argv', [['--iters', '0'], ['--patch', '40'], ['--batch', '0'], ['--mode', 'fp64']])
def test_bad_arguments_are_refused(argv):
    with pytest.raises(SystemExit):
        profile_train.parse_args(argv)

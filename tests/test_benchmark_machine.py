"""The benchmarks measure only what was asked, and name the machine: bf16 is timed by default only where it is
native (mocked capability, never timed here)."""
from __future__ import annotations

import sys

import pytest
import torch

from conftest import REPO

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import bench_inference, bench_train  # noqa: E402
from hat.inference import precision  # noqa: E402


def test_default_paths_leave_out_emulated_bf16(monkeypatch):
    monkeypatch.setattr(precision, 'native_cpu_bf16', lambda: None)
    assert bench_inference.parse_args([]).paths == ['official', 'fp32', 'compile']
    assert bench_inference.parse_args(['--quick']).paths == ['official', 'fp32', 'compile']
    assert bench_train.parse_args(['--quick']).modes == ['official', 'fp32']
    assert bench_train.parse_args([]).modes == ['official', 'fp32', 'fp32-ckpt']
    # asked for explicitly: measured, whatever the machine
    assert bench_inference.parse_args(['--paths', 'fp32,bf16']).paths == ['fp32', 'bf16']


def test_default_paths_include_native_bf16(monkeypatch):
    monkeypatch.setattr(precision, 'native_cpu_bf16', lambda: 'avx512_bf16')
    assert bench_inference.parse_args([]).paths == ['official', 'fp32', 'bf16', 'compile']
    assert bench_train.parse_args(['--quick']).modes == ['official', 'fp32', 'bf16']
    # native but slower than fp32 (auto runs fp32 there): still timed, and not called emulated
    monkeypatch.setattr(precision, 'cpu_bf16_speedup', lambda: 0.5)
    assert precision.resolve_precision('auto', 'cpu').name == 'fp32'
    assert bench_inference.parse_args([]).paths == ['official', 'fp32', 'bf16', 'compile']
    assert bench_inference.bf16_is_native(torch.device('cpu'))


def test_bf16_matmul_rate_is_measured_only_when_asked(monkeypatch):
    calls = []
    monkeypatch.setattr(bench_inference, 'matmul_rate', lambda dtype, device, **kw: calls.append(dtype) or 1.0)
    rates = bench_inference.matmul_rates(torch.device('cpu'), bf16=False)
    assert rates['bf16'] is None and torch.bfloat16 not in calls
    assert bench_inference.matmul_rates(torch.device('cpu'), bf16=True)['bf16'] == 1.0


def test_table_header_names_the_cpu(monkeypatch):
    monkeypatch.setattr(precision, 'cpu_model', lambda: 'AMD EPYC 7B13')
    monkeypatch.setattr(precision, 'cpu_family_model', lambda: '')
    monkeypatch.setattr(precision, 'native_cpu_bf16', lambda: None)
    monkeypatch.setattr(torch.backends.cpu, 'get_cpu_capability', lambda: 'AVX2')
    monkeypatch.setattr(torch, 'get_num_threads', lambda: 1)
    line = bench_inference.machine_line(torch.device('cpu'))
    assert line == 'CPU: AMD EPYC 7B13, 1 threads, torch capability AVX2, native bf16: no (emulated)'
    monkeypatch.setattr(precision, 'native_cpu_bf16', lambda: 'avx512_bf16')
    assert 'native bf16: yes (avx512_bf16)' in bench_inference.machine_line(torch.device('cpu'))
    monkeypatch.setattr(precision, 'cpu_model', lambda: 'AMD EPYC')  # a virtual machine's generic name
    monkeypatch.setattr(precision, 'cpu_family_model', lambda: 'family 25, model 17')
    line = bench_inference.machine_line(torch.device('cpu'))
    assert line.startswith('CPU: AMD EPYC (family 25, model 17), 1 threads')


def test_matmul_share_follows_the_rate_of_each_round():
    # 100 GFLOP: a round of 1 s at a rate of 200 is 50%, a slowed-down round of 2 s at a rate of 100 is 50% too
    res = bench_inference.PathResult(times=[1.0, 2.0, 1.0], round_rates=[200.0, 100.0, 400.0])
    rates = {'fp32': 1000.0, 'fp32-onednn': None, 'bf16': None}
    assert bench_inference.matmul_share('fp32', 100e9, res, rates) == pytest.approx(0.5)
    # rounds without a rate of their own: the median time against the run's rate (best fp32 library)
    res = bench_inference.PathResult(times=[1.0, 2.0, 4.0])
    assert bench_inference.matmul_share('fp32', 100e9, res, {'fp32': 50.0, 'fp32-onednn': 100.0}) == pytest.approx(0.5)
    assert bench_inference.peak_rate('bf16', {'fp32': 1.0, 'fp32-onednn': 2.0, 'bf16': 3.0}) == 3.0
    assert bench_inference.peak_rate('fp32', {'fp32': 1.0, 'fp32-onednn': 2.0, 'bf16': 3.0}) == 2.0

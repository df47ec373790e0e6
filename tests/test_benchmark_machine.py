"""The benchmarks measure only what was asked, and name the machine: bf16 is timed by default only where it is
native (mocked capability, never timed here)."""
from __future__ import annotations

import sys

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
    monkeypatch.setattr(precision, 'native_cpu_bf16', lambda: None)
    monkeypatch.setattr(torch.backends.cpu, 'get_cpu_capability', lambda: 'AVX2')
    monkeypatch.setattr(torch, 'get_num_threads', lambda: 1)
    line = bench_inference.machine_line(torch.device('cpu'))
    assert line == 'CPU: AMD EPYC 7B13, 1 threads, torch capability AVX2, native bf16: no (emulated)'
    monkeypatch.setattr(precision, 'native_cpu_bf16', lambda: 'avx512_bf16')
    assert 'native bf16: yes (avx512_bf16)' in bench_inference.machine_line(torch.device('cpu'))

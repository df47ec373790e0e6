"""Precision that fits the hardware (hat.inference.precision), tested by mocking the capability, never by timing.

``auto`` is bf16 where the device computes it natively and fp32 elsewhere; an explicit bf16 where it would be
emulated runs fp32 with one warning (HAT_FORCE_BF16=1 forces it); fp16 is CUDA only. The same policy holds for
hat-upscale, the Upscaler and HATModel's ``amp`` options.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from conftest import tiny_hat_config
from hat.archs import onednn_graph
from hat.archs.hat_arch import HAT
from hat.inference import precision
from hat.inference.precision import FORCE_BF16_ENV, detect_native_bf16, resolve_precision
from hat.inference.upscaler import Upscaler
from hat.models.hat_model import amp_dtype
from hat.upscale import main

TINY_HAT = tiny_hat_config()
CPU = torch.device('cpu')
CUDA = torch.device('cuda')
REAL_NATIVE_CPU_BF16, REAL_CPU_BF16_SPEEDUP = precision.native_cpu_bf16, precision.cpu_bf16_speedup


def native(monkeypatch, feature: str | None) -> None:
    monkeypatch.setattr(precision, 'native_cpu_bf16', lambda: feature)


@pytest.mark.parametrize('machine, flags, expected', [
    ('x86_64', {'avx2', 'fma'}, None),  # Zen 3, Intel before Sapphire Rapids: emulated
    ('x86_64', {'avx2', 'avx512f', 'avx512_bf16'}, 'avx512_bf16'),  # Zen 4, Cooper Lake
    ('x86_64', {'avx2', 'avx512f', 'amx_bf16', 'amx_tile'}, 'amx_bf16'),  # Sapphire Rapids
    ('aarch64', {'fp', 'asimd', 'bf16'}, 'bf16'),  # Graviton 3, Neoverse V1
    ('aarch64', {'fp', 'asimd'}, None),  # Graviton 2
    ('riscv64', {'bf16'}, None),
])
def test_native_bf16_is_read_from_the_cpu_flags(machine, flags, expected):
    assert detect_native_bf16(machine, frozenset(flags)) == expected


def test_auto_picks_bf16_only_where_it_is_native(monkeypatch):
    native(monkeypatch, None)
    chosen = resolve_precision('auto', CPU)
    assert (chosen.name, chosen.dtype) == ('fp32', None) and 'no native bf16' in chosen.reason
    native(monkeypatch, 'avx512_bf16')
    chosen = resolve_precision('auto', CPU)
    assert (chosen.name, chosen.dtype) == ('bf16', torch.bfloat16) and 'avx512_bf16' in chosen.reason


def test_auto_runs_fp32_where_native_bf16_is_slower_than_fp32(monkeypatch):
    """An AVX-512 BF16 CPU whose bf16 products run at half the fp32 rate (an Intel Xeon VM without AMX)."""
    native(monkeypatch, 'avx512_bf16')
    monkeypatch.setattr(precision, 'cpu_bf16_speedup', lambda: 0.48)
    chosen = resolve_precision('auto', CPU)
    assert (chosen.name, chosen.dtype) == ('fp32', None)
    assert 'avx512_bf16' in chosen.reason and '0.48x' in chosen.reason
    assert resolve_precision('bf16', CPU).name == 'bf16'  # an explicit request is honoured where bf16 is native
    monkeypatch.setattr(precision, 'cpu_bf16_speedup', lambda: 1.9)
    assert resolve_precision('auto', CPU).name == 'bf16' and '1.9x' in resolve_precision('auto', CPU).reason


def test_bf16_speedup_is_measured_on_this_cpu():
    # The real functions (the conftest replaces them by stand-ins during tests).
    if REAL_NATIVE_CPU_BF16() is None:
        pytest.skip('this CPU emulates bf16: the measurement would take seconds and is never made here')
    assert 0.05 < REAL_CPU_BF16_SPEEDUP() < 50


def test_auto_on_cuda_follows_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *args, **kwargs: True)
    assert resolve_precision('auto', CUDA).name == 'bf16'
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *args, **kwargs: False)
    assert resolve_precision('auto', CUDA).name == 'fp32'
    assert resolve_precision('fp16', CUDA).dtype is torch.float16  # explicit fp16 is honoured on CUDA


def test_explicit_bf16_where_emulated_warns_once_and_runs_fp32(monkeypatch, caplog):
    native(monkeypatch, None)
    with caplog.at_level(logging.WARNING):
        first = resolve_precision('bf16', CPU, where='--precision')
        second = resolve_precision('bf16', CPU, where='--precision')
    assert first.name == second.name == 'fp32'
    warnings = [r for r in caplog.records if 'bf16 requested' in r.getMessage()]
    assert len(warnings) == 1
    assert 'no native bf16' in warnings[0].getMessage() and FORCE_BF16_ENV in warnings[0].getMessage()
    native(monkeypatch, 'amx_bf16')
    assert resolve_precision('bf16', CPU).name == 'bf16'


def test_bf16_can_be_forced_where_emulated(monkeypatch):
    native(monkeypatch, None)
    monkeypatch.setenv(FORCE_BF16_ENV, '1')
    chosen = resolve_precision('bf16', CPU)
    assert chosen.dtype is torch.bfloat16 and FORCE_BF16_ENV in chosen.reason
    assert resolve_precision('auto', CPU).name == 'fp32'  # forcing applies to explicit requests only


def test_fp16_without_cuda_and_unknown_values_are_errors():
    with pytest.raises(ValueError, match=r'--precision: fp16 needs CUDA.*--precision bf16'):
        resolve_precision('fp16', CPU, where='--precision')
    with pytest.raises(ValueError, match="'fp8' is not supported; use one of auto, fp32, bf16, fp16"):
        resolve_precision('fp8', CPU)


def test_amp_options_follow_the_policy(monkeypatch):
    native(monkeypatch, None)
    assert amp_dtype('auto', 'val', CPU) is None
    assert amp_dtype('bf16', 'train', CPU) is None
    assert amp_dtype(False, 'train', CPU) is None
    native(monkeypatch, 'avx512_bf16')
    assert amp_dtype('auto', 'val', CPU) is torch.bfloat16
    assert amp_dtype('bf16', 'train', CPU) is torch.bfloat16
    with pytest.raises(ValueError, match='val: amp'):
        amp_dtype('int8', 'val', CPU)


@pytest.fixture(scope='module')
def tiny_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp('precision') / 'tiny_hat_x2.pth'
    torch.save({'params_ema': HAT(**TINY_HAT).state_dict()}, path)
    return path


@pytest.fixture(scope='module')
def photo(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp('photo') / 'photo.png'
    cv2.imwrite(str(path), rng.integers(0, 256, (12, 20, 3), dtype=np.uint8))
    return path


def run_upscale(tmp_path: Path, checkpoint: Path, image: Path, name: str, *extra: str) -> np.ndarray:
    out = tmp_path / name
    assert main(['-i', str(image), '-o', str(out), '-m', str(checkpoint), '--device', 'cpu', '-q', *extra]) == 0
    return cv2.imread(str(out / 'photo_x2.png'), cv2.IMREAD_UNCHANGED)


def test_hat_upscale_default_and_bf16_equal_fp32_where_bf16_is_emulated(monkeypatch, caplog, tmp_path,
                                                                        tiny_checkpoint, photo):
    native(monkeypatch, None)
    fp32 = run_upscale(tmp_path, tiny_checkpoint, photo, 'fp32', '--precision', 'fp32')
    default = run_upscale(tmp_path, tiny_checkpoint, photo, 'default')
    with caplog.at_level(logging.WARNING):
        bf16 = run_upscale(tmp_path, tiny_checkpoint, photo, 'bf16', '--precision', 'bf16')
    assert np.array_equal(default, fp32) and np.array_equal(bf16, fp32)
    assert any('Running in fp32 instead' in r.getMessage() for r in caplog.records)


def test_upscaler_runs_bf16_where_native(monkeypatch, tiny_checkpoint):
    from hat.archs.detect import build_from_checkpoint
    net = build_from_checkpoint(tiny_checkpoint)
    native(monkeypatch, 'avx512_bf16')
    upscaler = Upscaler(net, precision='auto', tile=None, progress=False)
    assert upscaler.precision == 'bf16' and 'bf16' in upscaler.describe()
    x = torch.rand(1, 3, 8, 8)
    out = upscaler.upscale_tensor(x)
    reference = Upscaler(net, precision='fp32', tile=None, progress=False).upscale_tensor(x)
    assert out.dtype == torch.float32 and not torch.equal(out, reference)  # really ran in bf16
    assert (out - reference).abs().max() < 0.05


def test_bf16_runs_without_autocasts_cache_of_weight_copies(monkeypatch, tiny_checkpoint):
    """The engine's autocast keeps no bf16 weight copies (made during the forward, between its large maps, they left
    the heap fragmented: hat/inference/upscaler.py); the output is the one of a run with the cache, bit for bit."""
    from hat.archs.detect import build_from_checkpoint
    net = build_from_checkpoint(tiny_checkpoint)
    native(monkeypatch, 'avx512_bf16')
    upscaler = Upscaler(net, precision='bf16', tile=None, progress=False)
    seen = []
    hook = net.register_forward_pre_hook(
        lambda module, args: seen.append((torch.is_autocast_enabled('cpu'), torch.is_autocast_cache_enabled())))
    x = torch.rand(1, 3, 2 * upscaler.multiple, 2 * upscaler.multiple)
    out = upscaler.upscale_tensor(x)
    hook.remove()
    assert seen == [(True, False)]
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        cached = net(x).float()
    assert torch.equal(out, cached)


def test_bf16_upscaling_with_auto_tiles_keeps_the_onednn_graph_attention(monkeypatch, tiny_checkpoint):
    """``tile='auto'`` measures a forward's memory under a Python dispatch mode, where TorchScript cannot trace:
    attention takes the chunked path there (a failed trace would turn the fused kernel off for the process), and
    the fused kernel for the image itself."""
    from hat.archs.detect import build_from_checkpoint
    net = build_from_checkpoint(tiny_checkpoint)
    native(monkeypatch, 'avx512_bf16')  # the fused kernel asks the same detection
    if not onednn_graph.available():
        pytest.skip('this PyTorch has no oneDNN or no TorchScript oneDNN fusion')
    upscaler = Upscaler(net, precision='bf16', tile='auto', progress=False)
    x = torch.rand(1, 3, 24, 24)
    with warnings.catch_warnings():
        warnings.simplefilter('error', RuntimeWarning)  # the fused kernel's "turned off" warning
        out = upscaler.upscale_tensor(x)
    assert onednn_graph.available() and len(onednn_graph._specialisations) > 0
    reference = Upscaler(net, precision='fp32', tile=None, progress=False).upscale_tensor(x)
    assert (out - reference).abs().max() < 0.05


def test_the_run_says_what_auto_chose(monkeypatch, caplog, tmp_path, tiny_checkpoint, photo):
    native(monkeypatch, None)
    with caplog.at_level(logging.INFO):
        assert main(['-i', str(photo), '-o', str(tmp_path / 'out'), '-m', str(tiny_checkpoint), '--device',
                     'cpu']) == 0
    text = '\n'.join(r.getMessage() for r in caplog.records)
    assert 'on cpu, fp32 (auto: this CPU has no native bf16' in text
    assert 'tile auto' in text and 'photo.png: 20x12, tile none (whole image)' in text


# ---------------------------------------------------------------------------------------------------------------
# Devices: hat-upscale, the LAM and feature-map tools check the one asked for before building anything on it


def backends(monkeypatch, *available: str, counts: dict[str, int] | None = None) -> None:
    """Make this machine's PyTorch see ``available`` device types (and ``counts`` devices of CUDA or XPU)."""
    monkeypatch.setattr(precision, '_backend_available', lambda device_type: device_type in ('cpu', *available))
    for device_type, count in (counts or {}).items():
        monkeypatch.setattr(getattr(torch, device_type), 'device_count', lambda count=count: count)


# (name, the device types this machine's PyTorch can use, what resolve_device gives), with 2 CUDA devices and 1 XPU.
# Module constants rather than decorator arguments: gpu_check.py takes a test whose decorators name CUDA for a GPU test.
DEVICES_PRESENT = [
    ('cpu', (), CPU),
    ('cuda', ('cuda', ), CUDA),
    ('cuda:1', ('cuda', ), torch.device('cuda:1')),
    ('mps', ('mps', ), torch.device('mps')),
    ('xpu:0', ('xpu', ), torch.device('xpu:0')),
]
# (name, the device types available, the start of the error message)
DEVICES_REFUSED = [
    ('cuda', (), '--device cuda: CUDA is not available on this machine (PyTorch '),
    ('mps', ('cuda', ), '--device mps: MPS is not available on this machine (PyTorch '),
    ('xpu', (), '--device xpu: XPU is not available on this machine (PyTorch '),
    ('cuda:2', ('cuda', ), '--device cuda:2: this machine has 2 CUDA devices (cuda:0, cuda:1)'),
    ('xpu:1', ('xpu', ), '--device xpu:1: this machine has 1 XPU device (xpu:0)'),
    ('vulkan', ('vulkan', ), '--device vulkan: HAT runs on cpu, cuda, mps, xpu; use --device cpu'),
    ('gpu', (), '--device gpu: '),  # torch's own message: the device types it knows
]


@pytest.mark.parametrize('name, available, expected', DEVICES_PRESENT)
def test_a_device_the_machine_has_is_taken_as_named(name, available, expected, monkeypatch):
    backends(monkeypatch, *available, counts={'cuda': 2, 'xpu': 1})
    assert precision.resolve_device(name) == expected


def test_no_device_named_is_the_default_device(monkeypatch):
    monkeypatch.setattr(precision, 'default_device', lambda: 'cpu')
    assert precision.resolve_device(None) == CPU


@pytest.mark.parametrize('name, available, message', DEVICES_REFUSED)
def test_a_device_the_machine_lacks_is_refused_with_what_to_use(name, available, message, monkeypatch):
    backends(monkeypatch, *available, counts={'cuda': 2, 'xpu': 1})
    with pytest.raises(ValueError) as error:
        precision.resolve_device(name)
    assert str(error.value).startswith(message)


def test_the_backend_check_asks_torch(monkeypatch):
    # Patched by name: gpu_check.py takes a test that reads CUDA's availability for one that needs a GPU.
    monkeypatch.setattr('torch.cuda.is_available', lambda: True)
    monkeypatch.setattr('torch.backends.mps.is_available', lambda: False)
    assert precision._backend_available('cpu') and precision._backend_available('cuda')
    assert not precision._backend_available('mps')
    monkeypatch.setattr('torch.cuda.is_available', lambda: False)
    assert not precision._backend_available('cuda')

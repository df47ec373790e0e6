"""Precision that fits the hardware: which autocast dtype a run uses, and why.

HAT runs in fp32 or under bf16 autocast; fp16 overflows in its attention logits, so it is never chosen by itself.
bf16 only pays where the hardware computes it natively:

* CUDA: bf16 where the GPU supports it (``torch.cuda.is_bf16_supported()``: Ampere and later), else fp32.
* CPU: bf16 only where it is native: AVX512-BF16 or AMX on x86 (AMD Zen 4 and later, Intel Cooper Lake / Sapphire
  Rapids and later), BF16 on Arm. Everywhere else (AVX2-only x86: Zen 2/3, Intel before Sapphire Rapids) torch
  emulates bf16: a bf16 matmul runs below 1 GFLOP/s and HAT under bf16 autocast is ~25x slower than in fp32.

Native is not always faster: on an Intel Xeon whose AVX-512 BF16 was visible but whose AMX was not (a virtual
machine), oneDNN's bf16 products ran at half the fp32 rate (186 against 385 GFLOP/s, 2 threads) and HAT under bf16
autocast took 1.7x as long as in fp32. So on the CPU ``auto`` also measures, once per process (a few ms), how much
faster a bf16 product of HAT's shape runs than an fp32 one (:func:`cpu_bf16_speedup`).

``auto`` picks bf16 where it is native (and, on the CPU, at least :data:`AUTO_BF16_MIN_SPEEDUP` times as fast as
fp32 in that measurement) and fp32 elsewhere. An explicit ``bf16`` on hardware that would emulate it is
run in fp32 with one warning that says why, so that option files and command lines stay portable between machines;
``HAT_FORCE_BF16=1`` in the environment runs it in bf16 anyway (to reproduce a bf16 result on such a machine).
``fp16`` is honoured on CUDA only.
"""
from __future__ import annotations

import functools
import logging
import os
import platform
import subprocess
import time
from typing import NamedTuple

import torch

from hat.utils.cpu import X86_BF16_FLAGS, cpu_family_model, cpu_flags, cpu_model

logger = logging.getLogger('basicsr')

PRECISION_CHOICES = ('auto', 'fp32', 'bf16', 'fp16')
DTYPES = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}
# Set to 1 to run an explicit bf16 request even where the CPU emulates bf16.
FORCE_BF16_ENV = 'HAT_FORCE_BF16'

# ``auto`` runs bf16 on a CPU only where a bf16 product measured at least this many times as fast as an fp32 one:
# bf16 autocast adds casts around every product, so an even rate would make HAT slower than in fp32.
AUTO_BF16_MIN_SPEEDUP = 1.2

_warned: set[str] = set()


class Precision(NamedTuple):
    """The precision a run uses.

    Attributes:
        name: ``'fp32'``, ``'bf16'`` or ``'fp16'``.
        dtype: the autocast dtype, None for fp32.
        reason: why this precision, for the log (``'auto: native bf16 (avx512_bf16)'``).
    """

    name: str
    dtype: torch.dtype | None
    reason: str


def _macos_arm_bf16() -> bool:
    try:
        out = subprocess.run(['sysctl', '-n', 'hw.optional.arm.FEAT_BF16'], capture_output=True, text=True,
                             timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.stdout.strip() == '1'


def detect_native_bf16(machine: str, flags: frozenset[str], *, system: str = '') -> str | None:
    """The CPU feature that computes bf16 natively, from the architecture and the feature flags, or None.

    Args:
        machine: ``platform.machine()`` (``'x86_64'``, ``'aarch64'``, ``'arm64'``).
        flags: the CPU's feature flags (:func:`cpu_flags`).
        system: ``platform.system()``; on macOS (no /proc/cpuinfo) Arm chips are asked through sysctl.
    """
    machine = machine.lower()
    if machine in ('x86_64', 'amd64', 'i386', 'i686'):
        found = next((f for f in X86_BF16_FLAGS if f in flags), None)
        if found is None and not flags:  # no /proc/cpuinfo (not Linux): ask torch, where it can tell
            probe = getattr(torch.cpu, '_is_avx512_bf16_supported', None)
            found = 'avx512_bf16' if probe is not None and probe() else None
        return found
    if machine in ('aarch64', 'arm64'):
        if 'bf16' in flags:
            return 'bf16'
        return 'bf16' if system == 'Darwin' and _macos_arm_bf16() else None
    return None


@functools.lru_cache(maxsize=1)
def native_cpu_bf16() -> str | None:
    """The feature of this machine's CPU that computes bf16 natively (``'avx512_bf16'``, ``'amx_bf16'``,
    ``'bf16'``), or None where torch would emulate bf16."""
    return detect_native_bf16(platform.machine(), cpu_flags(), system=platform.system())


@functools.lru_cache(maxsize=1)
def cpu_bf16_speedup() -> float:
    """How many times as fast a bf16 product runs as an fp32 one on this CPU, measured once per process.

    The product has the shape of HAT's qkv projection of one chunk of tokens ([1024, 192] x [192, 576], 0.23 GFLOP):
    the best of 5 runs of each precision, interleaved, after one of each (a few ms where bf16 is native; call it only
    there, where torch emulates bf16 it takes seconds).
    """
    tokens, weight = torch.randn(1024, 192), torch.randn(576, 192)
    best = {torch.float32: float('inf'), torch.bfloat16: float('inf')}
    operands = {dtype: (tokens.to(dtype), weight.to(dtype)) for dtype in best}
    for round_ in range(6):
        for dtype, (x, w) in operands.items():
            start = time.perf_counter()
            torch.nn.functional.linear(x, w)
            if round_:  # the first round warms the kernels up
                best[dtype] = min(best[dtype], time.perf_counter() - start)
    return best[torch.float32] / best[torch.bfloat16]


def default_device() -> str:
    """``'cuda'`` where a CUDA device is available, else ``'cpu'``."""
    return 'cuda' if torch.cuda.is_available() else 'cpu'


# The device types a run can be asked for, each with what tells whether this machine's PyTorch can use it.
DEVICE_TYPES = ('cpu', 'cuda', 'mps', 'xpu')


def _backend_available(device_type: str) -> bool:
    if device_type == 'cpu':
        return True
    if device_type == 'mps':  # Apple GPUs; the module is absent from some builds
        backend = getattr(torch.backends, 'mps', None)
        return bool(backend is not None and backend.is_available())
    module = getattr(torch, device_type, None)  # torch.cuda, torch.xpu
    return bool(module is not None and module.is_available())


def resolve_device(name: str | None) -> torch.device:
    """The device a user asked for (``cuda``, ``cuda:1``, ``cpu``, ``mps``, ``xpu``), or :func:`default_device`'s
    for None, checked before any model is built on it.

    Raises:
        ValueError: a name torch does not parse, a device type HAT does not run on, a device this machine's PyTorch
            cannot use (CUDA without a GPU, MPS off Apple silicon), or a device index beyond the devices present;
            each message starts with ``--device`` and the name, and says what to use instead.
    """
    asked = f'--device {name}'
    try:
        device = torch.device(name or default_device())
    except RuntimeError as error:
        raise ValueError(f'{asked}: {error}') from None
    if device.type not in DEVICE_TYPES:
        raise ValueError(f'{asked}: HAT runs on {", ".join(DEVICE_TYPES)}; use --device cpu')
    if not _backend_available(device.type):
        raise ValueError(f'{asked}: {device.type.upper()} is not available on this machine (PyTorch '
                         f'{torch.__version__}); use --device cpu')
    if device.type in ('cuda', 'xpu') and device.index is not None:
        count = getattr(torch, device.type).device_count()
        if device.index >= count:
            raise ValueError(f'{asked}: this machine has {count} {device.type.upper()} device'
                             f'{"" if count == 1 else "s"} ({", ".join(f"{device.type}:{i}" for i in range(count))})')
    return device


def cpu_description() -> str:
    """One line naming the CPU for benchmark tables and logs:
    ``AMD EPYC (family 25, model 17), 2 threads, torch capability AVX512, native bf16: yes (avx512_bf16)``."""
    capability = torch.backends.cpu.get_cpu_capability()
    native = native_cpu_bf16()
    family_model = cpu_family_model()
    name = f'{cpu_model()} ({family_model})' if family_model else cpu_model()
    return (f'{name}, {torch.get_num_threads()} threads, torch capability {capability}, '
            f'native bf16: {"yes (" + native + ")" if native else "no (emulated)"}')


def device_description(device: torch.device | str) -> str:
    """The CPU line of :func:`cpu_description`, or the GPU's name and memory."""
    device = torch.device(device)
    if device.type == 'cuda':
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return (f'{props.name} ({props.total_memory / 2**30:.0f} GiB, compute capability {props.major}.'
                f'{props.minor}, bf16: {"yes" if torch.cuda.is_bf16_supported() else "no"})')
    if device.type == 'cpu':
        return cpu_description()
    return str(device)


def native_bf16(device: torch.device | str) -> tuple[bool, str]:
    """(whether ``device`` computes bf16 natively, the reason in words). Native is not always faster than fp32 on a
    CPU: :func:`resolve_precision` measures that for ``auto``."""
    device = torch.device(device)
    if device.type == 'cuda':
        if torch.cuda.is_bf16_supported():
            return True, 'the GPU supports bf16'
        return False, 'this GPU has no bf16 support'
    if device.type == 'cpu':
        feature = native_cpu_bf16()
        if feature:
            return True, f'native bf16 on this CPU ({feature})'
        return False, ('this CPU has no native bf16 (no AVX512-BF16/AMX on x86, no BF16 on Arm): torch emulates it, '
                       'about 25x slower than fp32 for HAT')
    return False, f'bf16 is not known to be fast on {device.type}'


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def resolve_precision(requested: str | None, device: torch.device | str, *, where: str = 'precision') -> Precision:
    """The precision a run on ``device`` uses for a requested one.

    Args:
        requested: ``'auto'``, ``'fp32'``, ``'bf16'``, ``'fp16'``; None means fp32.
        device: where the network runs.
        where: the option's name for messages (``'--precision'``, ``'val: amp'``).
    Raises:
        ValueError: an unknown value, or fp16 without CUDA.
    """
    device = torch.device(device)
    if requested in (None, 'fp32'):
        return Precision('fp32', None, 'fp32 requested')
    if requested not in PRECISION_CHOICES:
        raise ValueError(f'{where}: {requested!r} is not supported; use one of {", ".join(PRECISION_CHOICES)}')
    if requested == 'fp16':
        if device.type != 'cuda':
            sep = ' ' if where.startswith('--') else ': '  # '--precision bf16', 'train: amp: bf16'
            raise ValueError(f'{where}: fp16 needs CUDA (this run uses {device.type}); use {where}{sep}bf16, auto '
                             'or fp32 instead')
        return Precision('fp16', torch.float16, 'fp16 requested (HAT\'s attention may overflow in fp16)')
    native, why = native_bf16(device)
    if requested == 'auto':
        if native and device.type == 'cpu':
            speedup = cpu_bf16_speedup()
            if speedup < AUTO_BF16_MIN_SPEEDUP:
                return Precision('fp32', None, f'auto: {why}, but a bf16 product ran at {speedup:.2f}x the fp32 '
                                               'rate here, so fp32 is faster')
            why = f'{why}, bf16 products {speedup:.1f}x as fast as fp32'
        return Precision('bf16', torch.bfloat16, f'auto: {why}') if native else \
            Precision('fp32', None, f'auto: {why}')
    if native:
        return Precision('bf16', torch.bfloat16, f'bf16 requested; {why}')
    if os.environ.get(FORCE_BF16_ENV) == '1':
        return Precision('bf16', torch.bfloat16, f'bf16 forced by {FORCE_BF16_ENV}=1 although {why}')
    _warn_once(f'{where}: bf16 requested, but {why}. Running in fp32 instead (same results within bf16 rounding, '
               f'far faster here); set {FORCE_BF16_ENV}=1 to run bf16 anyway.')
    return Precision('fp32', None, f'bf16 requested, fp32 used: {why}')

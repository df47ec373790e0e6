"""What the CPU is: its vendor, model name and feature flags, read once from ``/proc/cpuinfo``.

Other systems have no ``/proc/cpuinfo``; there the vendor and model come from ``platform`` where it says them, and
the flags are empty (callers that need a feature then ask torch).
"""
from __future__ import annotations

import functools
import platform
from pathlib import Path

VENDORS = ('GenuineIntel', 'AuthenticAMD')
# x86 /proc/cpuinfo flags that mean native bf16 arithmetic.
X86_BF16_FLAGS = ('avx512_bf16', 'amx_bf16')


@functools.lru_cache(maxsize=1)
def cpuinfo() -> dict[str, str]:
    """The fields of the first processor in ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        text = Path('/proc/cpuinfo').read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # the end of the first processor's block
            continue
        key, _, value = line.partition(':')
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (``flags`` on x86, ``Features`` on Arm; empty where unknown)."""
    fields = cpuinfo()
    return frozenset((fields.get('flags') or fields.get('Features') or '').split())


def cpu_model() -> str:
    """The CPU's model name (``AMD EPYC 9B14``), or the architecture when the system does not say."""
    return cpuinfo().get('model name') or platform.processor() or platform.machine() or 'unknown CPU'


def cpu_family_model() -> str:
    """``'family 25, model 17'`` on x86 (``cpu family`` and ``model`` of ``/proc/cpuinfo``), else ``''``. Virtual
    machines often name their CPU only ``AMD EPYC`` or ``Intel(R) Xeon(R) Processor``: these numbers tell the
    generation (AMD family 25 is Zen 3 and Zen 4, told apart by the model; family 26 is Zen 5)."""
    fields = cpuinfo()
    family, model = fields.get('cpu family'), fields.get('model')
    return f'family {family}, model {model}' if family and model else ''


def cpu_vendor() -> str:
    """``'GenuineIntel'``, ``'AuthenticAMD'`` (x86), another ``vendor_id``, or ``''`` where unknown."""
    vendor = cpuinfo().get('vendor_id', '')
    if vendor:
        return vendor
    processor = platform.processor()  # Windows: 'Intel64 Family 6 Model 85 Stepping 7, GenuineIntel'
    return next((name for name in VENDORS if name in processor), '')

"""glibc's malloc set to keep freed memory for reuse, for the command lines that run large forwards on the CPU.

glibc serves a block larger than its mmap threshold (32 MiB at most, by default) with a fresh mapping from the
kernel and gives it back when the block is freed, so each such tensor is faulted in page by page again the next
time. HAT's feature maps pass that size from about 200x200 pixels (180 channels of fp32: 47 MB at 256x256), and a
block makes two or three of them: HAT x4's fp32 forward at 256x256 took 1.3M page faults, 2.7 of its 55 CPU
seconds, and ran 11% faster with freed memory kept (AMD EPYC Zen 4, family 25 model 17, 2 threads: medians 27.6
against 25.2 s over four alternated rounds, each setting in a process of its own; the outputs identical).

The heap then keeps the memory of the largest step until something gives it back: :func:`release_freed_memory`
(glibc's ``malloc_trim``), which :class:`~hat.inference.upscaler.Upscaler` calls after each image where this module
set the heap. Between images such a process then holds no more than with glibc's defaults (HAT x4 fp32 at 256x256,
three images in one process, same machine: 997-1019 MiB resident after each image against 1057-1090 MiB, 92-152K
page faults per image against 1.31-1.67M; the peak 1432-1456 against 1296-1366 MiB, 855 with the model built), and
the trim took 24-28 ms.

The commands that upscale, test or serve (``hat-upscale``, ``hat/test.py``, the Cog server ``predict.py``) set it at
their start; the library does not, as the setting is the whole process's: a program that imports ``hat`` keeps its
allocator as it is unless it calls :func:`keep_freed_memory` itself. ``HAT_KEEP_FREED_MEMORY=0`` in the environment
turns it off (``=1`` on where a caller's default is off), and where the user has set glibc's malloc through its
environment (``MALLOC_*_`` variables or ``GLIBC_TUNABLES``), that choice is kept. Other C libraries (macOS, Windows,
musl) are left alone.

:func:`largest_reused_block` says what the heap, set or not, serves again: HAT's CPU attention sizes its calls by it
(:meth:`hat.archs.hat_arch.HeadAttention.windows_per_call`), so that no call's buffer is mapped afresh each time.
"""
from __future__ import annotations

import ctypes
import functools
import os
import re
from typing import Mapping

# mallopt's parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

# Blocks up to 1 GiB from the heap, freed memory kept unless 2 GiB lie free at its top (mallopt takes an int), the
# heap grown 64 MiB at a time.
KEEP_FREED_MEMORY = ((M_MMAP_THRESHOLD, 1 << 30), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, 1 << 26))
# The same settings as glibc reads them from the environment of a process that starts (benchmark workers).
ENVIRONMENT_NAMES = {M_MMAP_THRESHOLD: 'MALLOC_MMAP_THRESHOLD_', M_TRIM_THRESHOLD: 'MALLOC_TRIM_THRESHOLD_',
                     M_TOP_PAD: 'MALLOC_TOP_PAD_'}
KEEP_FREED_MEMORY_ENV = {ENVIRONMENT_NAMES[option]: str(value) for option, value in KEEP_FREED_MEMORY}
SWITCH = 'HAT_KEEP_FREED_MEMORY'  # '0': leave the allocator as it is; '1': set it; unset: the caller's default
# What says the user has chosen glibc malloc's settings already.
USER_MALLOC_VARIABLES = (*ENVIRONMENT_NAMES.values(), 'MALLOC_ARENA_MAX', 'MALLOC_MMAP_MAX_')
# The C library whose heap keep_freed_memory() set in this process (None: not set).
_kept_by: ctypes.CDLL | None = None
# The largest freed block glibc's malloc serves again from its heap under its defaults on 64-bit systems (the ceiling
# of its dynamic mmap threshold), less what a block takes beyond the bytes asked for (its header, the alignment that
# PyTorch asks for, the rounding of a mapping to pages).
DEFAULT_REUSED_BLOCK = (32 << 20) - (64 << 10)


def glibc() -> ctypes.CDLL | None:
    """This process's C library where it is glibc (it exports ``gnu_get_libc_version`` and ``mallopt``), else None."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version, libc.mallopt  # noqa: B018 (AttributeError where they are missing)
    except (OSError, AttributeError, TypeError):  # TypeError: Windows has no CDLL(None)
        return None
    return libc


def user_set_malloc(environment: Mapping[str, str]) -> bool:
    """Whether ``environment`` sets glibc malloc's behaviour (its ``MALLOC_*`` variables or a ``glibc.malloc``
    tunable)."""
    return (any(name in environment for name in USER_MALLOC_VARIABLES)
            or 'glibc.malloc.' in environment.get('GLIBC_TUNABLES', ''))


def largest_reused_block(environment: Mapping[str, str] | None = None) -> int:
    """Bytes of the largest tensor that malloc serves again from its heap once freed, where larger ones are mapped
    afresh and faulted in page by page: the 1 GiB of :func:`keep_freed_memory` where it set the heap, the mmap
    threshold the user gave glibc in the environment (``MALLOC_MMAP_THRESHOLD_`` or the ``glibc.malloc.
    mmap_threshold`` tunable, read as glibc read it when the process started), else :data:`DEFAULT_REUSED_BLOCK`
    (glibc's defaults; also taken for other C libraries). ``environment``: default ``os.environ`` as it was at the
    first call."""
    if _kept_by is not None:
        return dict(KEEP_FREED_MEMORY)[M_MMAP_THRESHOLD]
    if environment is None:
        return _threshold_from_start_environment()
    return _user_mmap_threshold(environment) or DEFAULT_REUSED_BLOCK


@functools.cache
def _threshold_from_start_environment() -> int:
    return _user_mmap_threshold(os.environ) or DEFAULT_REUSED_BLOCK


def _user_mmap_threshold(environment: Mapping[str, str]) -> int | None:
    tunable = re.search(r'glibc\.malloc\.mmap_threshold=(\d+)', environment.get('GLIBC_TUNABLES', ''))
    value = tunable.group(1) if tunable else environment.get('MALLOC_MMAP_THRESHOLD_', '').strip()
    return int(value) if value.isdigit() else None


def keep_freed_memory(environment: Mapping[str, str] | None = None, libc: ctypes.CDLL | None = None, *,
                      default: bool = True) -> bool:
    """Set glibc's malloc to serve blocks up to 1 GiB from its heap and to keep what is freed (see the module doc).

    Args:
        environment: where to look for :data:`SWITCH` and the user's own malloc settings (default ``os.environ``).
        libc: the C library to set (default :func:`glibc`; tests pass a stand-in).
        default: whether to set it where :data:`SWITCH` is not set (the commands and the server: True; a program
            that wants it only when its user asks passes False, so that ``HAT_KEEP_FREED_MEMORY=1`` sets it).

    Returns:
        Whether every setting was taken: False on another C library, where :data:`SWITCH` (or, unset, ``default``)
        says no, where the environment sets malloc itself, or where glibc refuses the 1 GiB mmap threshold
        (mallopt(3) gives 32 MiB as its upper limit on 64-bit systems; glibc 2.36 takes 1 GiB).
    """
    environment = os.environ if environment is None else environment
    switch = environment.get(SWITCH, '').strip()
    wanted = switch != '0' if switch else default
    if not wanted or user_set_malloc(environment):
        return False
    libc = libc or glibc()
    if libc is None:
        return False
    # The mmap threshold first: where it is refused, the others are not set either, as a fixed trim threshold
    # alone would also fix the mmap threshold at its start value (128 KiB) and map more blocks fresh, not fewer.
    global _kept_by
    taken = all(libc.mallopt(option, value) == 1 for option, value in KEEP_FREED_MEMORY)
    if taken:
        _kept_by = libc
    return taken


def release_freed_memory() -> bool:
    """Give the free memory of the heap back to the kernel (glibc's ``malloc_trim(0)``), where
    :func:`keep_freed_memory` set the heap in this process; else do nothing (glibc's defaults return large blocks
    as they are freed, and settings the user chose are theirs).

    Returns:
        Whether it was given back.
    """
    if _kept_by is None:
        return False
    _kept_by.malloc_trim(0)
    return True

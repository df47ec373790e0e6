"""hat.utils.heap: glibc's malloc kept from giving large freed blocks back within an image, for the commands."""
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import golden_config

from hat import upscale
from hat.archs.hat_arch import HAT
from hat.inference import Upscaler
from hat.utils import heap

pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')


# The start of the scripts that run in a process of their own: glibc's malloc and free, and a 64 MiB block.
MALLOC_SCRIPT = textwrap.dedent('''
    import ctypes
    from hat.utils import heap
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 << 20
''')


class FakeLibc:
    """Records mallopt's and malloc_trim's calls; refuses the parameters in ``refuse``."""

    def __init__(self, refuse=()):
        self.calls, self.trims, self.refuse = [], [], set(refuse)

    def mallopt(self, option, value):
        self.calls.append((option, value))
        return 0 if option in self.refuse else 1

    def malloc_trim(self, pad):
        self.trims.append(pad)
        return 1


@pytest.fixture(autouse=True)
def heap_not_set(monkeypatch):
    """The test session's own heap is never set: what a test sets with a stand-in C library is forgotten after it."""
    monkeypatch.setattr(heap, '_kept_by', None)


def test_sets_the_three_parameters_and_says_whether_all_were_taken():
    libc = FakeLibc()
    assert heap.keep_freed_memory({}, libc) is True
    assert libc.calls == [(heap.M_MMAP_THRESHOLD, 1 << 30), (heap.M_TRIM_THRESHOLD, 2**31 - 1),
                          (heap.M_TOP_PAD, 1 << 26)]
    # A glibc that refuses a 1 GiB mmap threshold (mallopt(3) documents 32 MiB at most): then nothing else is set
    # (a fixed trim threshold alone would also fix the mmap threshold at 128 KiB and map more blocks fresh).
    refusing = FakeLibc(refuse={heap.M_MMAP_THRESHOLD})
    assert heap.keep_freed_memory({}, refusing) is False
    assert refusing.calls == [(heap.M_MMAP_THRESHOLD, 1 << 30)]


@pytest.mark.parametrize('environment', [
    {'HAT_KEEP_FREED_MEMORY': '0'}, {'MALLOC_TRIM_THRESHOLD_': '0'}, {'MALLOC_ARENA_MAX': '2'},
    {'GLIBC_TUNABLES': 'glibc.rtld.optional_static_tls=1:glibc.malloc.tcache_count=0'}])
def test_the_off_switch_and_the_users_own_malloc_settings_are_kept(environment):
    libc = FakeLibc()
    assert heap.keep_freed_memory(environment, libc) is False
    assert libc.calls == []


def test_a_caller_whose_default_is_off_sets_it_only_when_asked():
    """default=False (a program's choice): HAT_KEEP_FREED_MEMORY=1 turns it on there."""
    quiet, asked = FakeLibc(), FakeLibc()
    assert heap.keep_freed_memory({}, quiet, default=False) is False and quiet.calls == []
    assert heap.keep_freed_memory({'HAT_KEEP_FREED_MEMORY': '1'}, asked, default=False) is True
    assert len(asked.calls) == 3


def test_unrelated_variables_change_nothing():
    libc = FakeLibc()
    environment = {'GLIBC_TUNABLES': 'glibc.rtld.optional_static_tls=1', 'PATH': '/bin', 'HAT_KEEP_FREED_MEMORY': '1'}
    assert heap.keep_freed_memory(environment, libc) is True
    assert len(libc.calls) == 3


def test_without_glibc_nothing_is_set(monkeypatch):
    monkeypatch.setattr(heap, 'glibc', lambda: None)
    assert heap.keep_freed_memory({}) is False


@pytest.mark.skipif(heap.glibc() is None, reason='needs glibc (Linux)')
def test_a_large_block_freed_and_taken_again_is_not_faulted_in_again():
    """In a process of its own (the test session's allocator stays as it is): a 64 MiB block written, freed and
    taken again costs a page fault per 4 KiB page by default (per 2 MiB page under always-on huge pages, 32), and
    none once the settings are in force."""
    script = MALLOC_SCRIPT + textwrap.dedent('''
        import resource

        def faults_of_one_round():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            block = libc.malloc(size)
            ctypes.memset(block, 1, size)
            libc.free(block)
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

        applied = heap.keep_freed_memory({})
        faults_of_one_round()  # the first round maps the memory either way
        print(applied, faults_of_one_round())
    ''')
    result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=120, check=True)
    applied, faults = result.stdout.split()
    if applied != 'True':
        pytest.skip('this glibc refused the settings (mallopt(3) documents 32 MiB at most for the mmap threshold)')
    assert int(faults) < 16


def test_the_command_sets_the_allocator_and_main_does_not(monkeypatch):
    """``hat-upscale`` (cli) keeps freed memory; main(), which programs and tests call, leaves the allocator alone."""
    calls = []
    monkeypatch.setattr(upscale, 'keep_freed_memory', lambda: calls.append('set'))
    monkeypatch.setattr(upscale, 'main', lambda: calls.append('main') or 0)
    with pytest.raises(SystemExit) as exit_info:
        upscale.cli()
    assert exit_info.value.code == 0
    assert calls == ['set', 'main']


def test_the_environment_form_holds_the_same_settings():
    """Benchmark workers get the settings through their environment (benchmarks/workers.py --heap-reuse): the values
    the commands set with mallopt."""
    assert heap.KEEP_FREED_MEMORY_ENV == {'MALLOC_MMAP_THRESHOLD_': '1073741824',
                                          'MALLOC_TRIM_THRESHOLD_': '2147483647', 'MALLOC_TOP_PAD_': '67108864'}
    assert heap.user_set_malloc(heap.KEEP_FREED_MEMORY_ENV)


def test_the_largest_reused_block_follows_the_heap_settings():
    """What HAT's attention calls stay within (hat.archs.hat_arch.CALL_BUFFER_BYTES): glibc's ceiling by default,
    the user's mmap threshold from either form of the environment, 1 GiB once this module has set the heap."""
    assert heap.largest_reused_block({}) == heap.DEFAULT_REUSED_BLOCK < 32 << 20
    assert heap.largest_reused_block({'MALLOC_MMAP_THRESHOLD_': '1048576'}) == 1 << 20
    tunables = 'glibc.malloc.trim_threshold=1:glibc.malloc.mmap_threshold=4096'
    assert heap.largest_reused_block({'GLIBC_TUNABLES': tunables}) == 4096
    assert heap.largest_reused_block({'MALLOC_MMAP_THRESHOLD_': 'lots'}) == heap.DEFAULT_REUSED_BLOCK
    assert heap.largest_reused_block(heap.KEEP_FREED_MEMORY_ENV) == 1 << 30  # the benchmarks' --heap-reuse
    assert heap.keep_freed_memory({}, FakeLibc()) is True
    assert heap.largest_reused_block({}) == 1 << 30


def test_freed_memory_is_given_back_only_where_this_module_set_the_heap():
    libc = FakeLibc()
    assert heap.release_freed_memory() is False  # glibc's defaults (or the user's settings): left alone
    assert heap.keep_freed_memory({'HAT_KEEP_FREED_MEMORY': '0'}, libc) is False
    assert heap.release_freed_memory() is False and libc.trims == []
    refusing = FakeLibc(refuse={heap.M_MMAP_THRESHOLD})
    assert heap.keep_freed_memory({}, refusing) is False
    assert heap.release_freed_memory() is False and refusing.trims == []
    assert heap.keep_freed_memory({}, libc) is True
    assert heap.release_freed_memory() is True and heap.release_freed_memory() is True
    assert libc.trims == [0, 0]


def test_the_upscaler_gives_the_memory_back_after_each_image_even_when_it_fails():
    libc = FakeLibc()
    assert heap.keep_freed_memory({}, libc)
    net = HAT(**golden_config('hat_tiny_x2')).eval()
    upscaler = Upscaler(net, precision='fp32', tile=None, progress=False)
    out = upscaler.upscale_tensor(torch.rand(1, 3, 16, 16))
    assert out.shape == (1, 3, 32, 32) and libc.trims == [0]
    upscaler.upscale_tensor(torch.rand(1, 3, 8, 8))
    assert libc.trims == [0, 0]
    with pytest.raises(RuntimeError):
        upscaler.upscale_tensor(torch.rand(1, 5, 16, 16))  # 5 channels into a 3-channel network
    assert libc.trims == [0, 0, 0]


@pytest.mark.skipif(heap.glibc() is None, reason='needs glibc (Linux)')
def test_a_kept_block_stays_resident_until_given_back():
    """In a process of its own: a 64 MiB block freed under the settings stays in the process (that is what spares
    its page faults next time) until release_freed_memory() gives it back."""
    script = MALLOC_SCRIPT + textwrap.dedent('''
        def resident_mib():
            with open('/proc/self/statm') as statm:
                return int(statm.read().split()[1]) * 4096 / 2**20

        applied = heap.keep_freed_memory({})
        before = resident_mib()
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(block)
        kept = resident_mib()
        released = heap.release_freed_memory()
        print(applied, released, kept - before, resident_mib() - before)
    ''')
    result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=120, check=True)
    applied, released, kept_mib, after_mib = result.stdout.split()
    if applied != 'True':
        pytest.skip('this glibc refused the settings (mallopt(3) documents 32 MiB at most for the mmap threshold)')
    assert released == 'True'
    assert float(kept_mib) > 48
    assert float(after_mib) < 16

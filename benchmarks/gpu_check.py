"""The first check of this project on a GPU: one command, a bounded time, one Markdown report.

    python benchmarks/gpu_check.py --out $OUT/gpu_check.md              # everything, within --budget-s 420
    python benchmarks/gpu_check.py --parts inference,tiles --budget-s 200
    python benchmarks/gpu_check.py                                       # without CUDA: prints the plan, exits 0

Parts (``--parts``, in this order; each has a share of ``--budget-s``, and time a part leaves unused goes to the
next ones):

    tests      (a) the tests of the suite that need CUDA (found in tests/ by what they mention), run by pytest
    inference  (b) HAT and HAT-L x4 at a 480x640 LR input: the official computation (fp32) against ours in fp32,
               bf16 autocast and with ``compile_blocks()`` (torch.compile of each block); time, peak memory, checks
    train      (c) HATModel training iterations, HAT-S and HAT, batch 4, 64x64 LR patches: official fp32 against
               ours in bf16 (and fp32 when time allows)
    tiles      (d) ``Upscaler(tile='auto')`` on CUDA: a forced small budget, an out-of-memory error raised once by
               a wrapper, a real one under a capped allocator, each compared with the untiled output
    torchrun   (e) ``torchrun --nproc_per_node=1 hat/train.py --launcher pytorch`` (NCCL) on a tiny HAT, then
               ``--auto_resume`` to more iterations

Time limits: (b), (c) and (d) each run in a child process that skips what would not fit its share and writes every
measurement to a file as soon as it has it; the parent kills a child (and its process group: compile workers) at
the end of its share and reports what was measured, and which item was cut. (a) and (e) are subprocesses too. The
report says what was skipped and why; it is written again after each part, so that a run stopped from outside
leaves what the finished parts found. The exit status is 0 whenever the report is written, whatever it found.

Method of (b): one network on the GPU at a time; each path runs once untimed (for the compiled paths this includes
compilation, reported), then up to ``--repeats`` timed forwards (CUDA-synchronised; the median is reported). The
allocator's peak is reset before each timed forward and ``torch.cuda.max_memory_allocated`` read after it, so the
peak includes the weights and the input. TF32 is off in (b) and (d), so that fp32 is fp32 and the official and our
outputs can be compared (max abs diff for fp32 paths, PSNR against our fp32 output for bf16 paths). Weights are
random (seeded); the input is the smooth synthetic image of ``bench_inference.py``.

Needs what ``pip install -r requirements.txt && pip install -e .`` installs, plus ``pytest`` for part (a); the
compiled paths need Triton (installed with CUDA builds of torch) and a C compiler.
"""
from __future__ import annotations

import argparse
import ast
import datetime
import gc
import importlib.util
import json
import logging
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

import hat  # noqa: E402,F401  (compat shim before basicsr)
from benchmarks import bench_train  # noqa: E402
from benchmarks.bench_inference import (build, machine_line, network_config, psnr, synchronize,  # noqa: E402
                                        test_image)
from hat.archs.hat_arch import HAT  # noqa: E402
from hat.inference.memory import measure_peak_memory  # noqa: E402
from hat.inference.upscaler import Upscaler  # noqa: E402
from hat.utils.cpu import cpu_model  # noqa: E402
from hat.utils.resume import load_training_state  # noqa: E402

DEFAULT_BUDGET_S = 420.0
# Shares of the budget, in running order. (b) holds the headline comparison and the compilations; (e) starts two
# torchrun jobs, each importing torch and setting up NCCL.
PART_SHARES = {'tests': 0.10, 'inference': 0.45, 'train': 0.15, 'tiles': 0.12, 'torchrun': 0.18}
PARTS = tuple(PART_SHARES)
PART_TITLES = {
    'tests': '(a) CUDA tests of the suite',
    'inference': '(b) Inference: official computation against ours',
    'train': '(c) Training iterations',
    'tiles': '(d) --tile auto and the out-of-memory retry on CUDA',
    'torchrun': '(e) torchrun with NCCL, then --auto_resume',
}
CHILD_PARTS = ('inference', 'train', 'tiles')  # run in a child process that the parent can stop
MIN_PART_S = 10.0  # a part with less time than this left is skipped, not started
CHILD_GRACE_S = 8.0  # a child stops starting new work this long before its hard limit

# Targets stated next to the figures.
SPEED_TARGET = 2.0  # at least 2x the official computation's speed, same GPU
MEMORY_TARGET = 0.5  # at most half its peak memory
HAT_L_BF16_LIMIT_BYTES = 10e9  # HAT-L x4 at 480x640 in bf16: under 10 GB (10^10 bytes)
FP32_MAX_DIFF = 1e-4  # fp32 paths against the official output (GPU kernels order their sums differently)
BF16_MIN_PSNR = 50.0  # bf16 paths against our fp32 output, dB
TILED_MIN_PSNR = 40.0  # tiled against untiled output (random weights, tile_pad 32), dB

# (b)
INFERENCE_VARIANTS = ('HAT', 'HAT-L')
INFERENCE_PATHS = ('official', 'fp32', 'bf16', 'compile-bf16', 'compile')
INFERENCE_SIZE = (480, 640)
COMPILE_FIRST_S = 60.0  # a guess of the first compilation of the blocks at one precision, for the time plan
COMPILE_AGAIN_S = 15.0  # the blocks of the other variant: same shapes, mostly cached
FIRST_FORWARD_GUESS_S = 5.0
# (c)
TRAIN_VARIANTS = ('HAT-S', 'HAT')
TRAIN_MODES = ('official', 'bf16', 'fp32')  # the first two for every variant first, then the rest
TRAIN_BATCH, TRAIN_PATCH = 4, 64
# (d)
TILES_VARIANT = 'HAT'
TILES_SIZE = (240, 320)
TILES_CAP_SHARE = 0.5  # the capped allocator leaves room for this share of the whole image's peak
# (e)
TORCHRUN_ITERS, TORCHRUN_MORE_ITERS = 10, 5
TINY_HAT = {
    'type': 'HAT', 'upscale': 2, 'in_chans': 3, 'img_size': 16, 'window_size': 4, 'embed_dim': 12, 'depths': [1, 1],
    'num_heads': [2, 2], 'compress_ratio': 3, 'squeeze_factor': 6, 'conv_scale': 0.01, 'overlap_ratio': 0.5,
    'mlp_ratio': 2.0, 'img_range': 1.0, 'upsampler': 'pixelshuffle', 'resi_connection': '1conv',
}

OOM_ERROR = getattr(torch, 'OutOfMemoryError', None) or torch.cuda.OutOfMemoryError
RETRY_MESSAGE = re.compile(r'Out of memory with (\d+)-pixel tiles; retrying with (\d+)')
MIB = 2**20


# ----- time -----
@dataclass
class Deadline:
    """A moment (on ``clock``, seconds) by which work must be over."""

    at: float
    clock: Callable[[], float] = time.monotonic

    @classmethod
    def after(cls, seconds: float, clock: Callable[[], float] = time.monotonic) -> 'Deadline':
        return cls(clock() + seconds, clock)

    def remaining(self) -> float:
        return self.at - self.clock()

    def fits(self, seconds: float) -> bool:
        """Whether work expected to take ``seconds`` can still end in time."""
        return self.remaining() >= seconds


def part_deadlines(parts: Sequence[str], budget_s: float, start: float) -> dict[str, float]:
    """When each part must end: the parts share ``budget_s`` in proportion to :data:`PART_SHARES` (renormalised
    over ``parts``), cumulatively, so that time one part leaves unused goes to the next ones and the last one ends
    at ``start + budget_s`` at the latest."""
    total = sum(PART_SHARES[p] for p in parts)
    deadlines, cumulative = {}, 0.0
    for part in parts:
        cumulative += PART_SHARES[part]
        deadlines[part] = start + budget_s * cumulative / total
    return deadlines


# ----- records -----
class Recorder:
    """What a part found, as a list of dicts (``kind`` plus fields); with a path, each record is also appended to
    that file as one JSON line and flushed at once, so that it survives the parent stopping the part."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.records: list[dict] = []

    def __call__(self, kind: str, **fields) -> None:
        record = {'kind': kind, **fields}
        self.records.append(record)
        if self.path is not None:
            with open(self.path, 'a', encoding='utf-8') as handle:
                handle.write(json.dumps(record) + '\n')
                handle.flush()


def read_records(path: Path) -> list[dict]:
    """The records of a results file; a last line cut off when its writer was killed is ignored."""
    records = []
    if not path.is_file():
        return records
    for line in path.read_text(encoding='utf-8').splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def unfinished_item(records: Sequence[dict]) -> str | None:
    """The item a part had started and not reported (what it was doing when it was stopped), if any."""
    started = [r['item'] for r in records if r['kind'] == 'start']
    done = {r.get('item') for r in records if r['kind'] in ('row', 'skip')}
    pending = [item for item in started if item not in done]
    return pending[-1] if pending else None


def describe_error(error: BaseException) -> str:
    """``Type: first line`` of an exception, short enough for a table cell."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else ''
    return f'{type(error).__name__}: {first[:160]}'


# ----- subprocesses -----
@dataclass
class Outcome:
    """How a subprocess ended: exit status (None when stopped at its limit), seconds, stdout and stderr."""

    returncode: int | None
    timed_out: bool
    seconds: float
    output: str


def run_group(command: Sequence[str], *, timeout: float, cwd: Path = ROOT, env: dict | None = None) -> Outcome:
    """Run ``command`` in a session of its own and, if it runs past ``timeout``, kill its whole process group
    (torchrun's workers, torch.compile's compile workers). Output goes through a file: no pipe to fill up."""
    start = time.monotonic()
    with tempfile.TemporaryFile('w+', encoding='utf-8', errors='replace') as log:
        proc = subprocess.Popen(list(command), cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            returncode, timed_out = proc.wait(timeout=max(timeout, 1.0)), False
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            returncode, timed_out = None, True
        log.seek(0)
        output = log.read()
    return Outcome(returncode, timed_out, time.monotonic() - start, output)


def tail(text: str, lines: int = 25) -> str:
    return '\n'.join(text.rstrip().splitlines()[-lines:])


# ----- (a) CUDA tests -----
CUDA_QUESTIONS = ('is_available', 'device_count')


def _mentions_cuda(nodes: Iterable[ast.AST], source: str) -> bool:
    return any('cuda' in (ast.get_source_segment(source, node) or '').lower() for node in nodes)


def _asks_for_cuda(function: ast.AST) -> bool:
    """Whether code (not a string) in ``function`` reads ``<...>.cuda.is_available`` or ``.device_count``."""
    for node in ast.walk(function):
        if isinstance(node, ast.Attribute) and node.attr in CUDA_QUESTIONS:
            owner = node.value
            if getattr(owner, 'attr', getattr(owner, 'id', None)) == 'cuda':
                return True
    return False


def _cuda_tests_in(body: list[ast.stmt], source: str, prefix: str, inherited: bool) -> list[str]:
    """Names (``test_y``, ``TestZ::test_y``) of the tests in ``body`` that need CUDA (see :func:`cuda_test_ids`)."""
    names = []
    for node in body:
        if isinstance(node, ast.ClassDef) and node.name.startswith('Test'):
            marked = inherited or _mentions_cuda(node.decorator_list, source)
            names += _cuda_tests_in(node.body, source, f'{prefix}{node.name}::', marked)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith('test'):
            if inherited or _mentions_cuda(node.decorator_list, source) or _asks_for_cuda(node):
                names.append(f'{prefix}{node.name}')
    return names


def cuda_test_ids(tests_dir: Path, root: Path = ROOT) -> list[str]:
    """pytest node ids (``tests/test_x.py::test_y``, ``...::TestZ::test_y``) of the tests that need CUDA.

    A test needs CUDA when a decorator of it or of its class mentions CUDA (``skipif(not
    torch.cuda.is_available())``, ``pytest.mark.cuda``, a ``requires_cuda`` mark), when its module's ``pytestmark``
    does, or when its body asks whether CUDA is there (a ``pytest.skip`` at run time). Tests that only fake CUDA to
    check a decision (``torch.device('cuda')`` in a precision test) are left out: they run on the CPU already.
    """
    ids = []
    for path in sorted(tests_dir.glob('test_*.py')):
        source = path.read_text(encoding='utf-8')
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        module_mark = any(isinstance(node, ast.Assign) and any(getattr(t, 'id', '') == 'pytestmark'
                                                               for t in node.targets)
                          and _mentions_cuda([node.value], source) for node in tree.body)
        relative = path.relative_to(root).as_posix()
        ids += [f'{relative}::{name}' for name in _cuda_tests_in(tree.body, source, '', module_mark)]
    return ids


def pytest_summary(output: str) -> str:
    """pytest's last line (``1 passed, 2 skipped in 3.1s``), without its ``=`` frame."""
    pattern = re.compile(r'\b(passed|failed|skipped|errors?|deselected|xfailed|xpassed|no tests ran)\b')
    for line in reversed(output.splitlines()):
        if pattern.search(line):
            return line.strip(' =')
    return 'no pytest summary line (see the output below)'


def tests_part(deadline: Deadline, emit: Recorder, *, tests_dir: Path = ROOT / 'tests') -> None:
    """(a): pytest on the tests that need CUDA, in a subprocess limited to the part's time."""
    ids = cuda_test_ids(tests_dir)
    if not ids:
        emit('note', text=f'No test in {tests_dir.name}/ needs CUDA.')
        return
    if importlib.util.find_spec('pytest') is None:
        emit('error', text='pytest is not installed: `pip install pytest` and run again (requirements.txt does '
                           'not include it).', ids=ids)
        return
    command = [sys.executable, '-m', 'pytest', '-q', '-rs', '-p', 'no:cacheprovider', *ids]
    outcome = run_group(command, timeout=deadline.remaining(), cwd=ROOT)
    skipped = [line.strip() for line in outcome.output.splitlines() if line.startswith('SKIPPED')]
    emit('pytest', ids=ids, command=' '.join(['python', *command[1:]]), returncode=outcome.returncode,
         timed_out=outcome.timed_out, seconds=outcome.seconds,
         summary='stopped at the part\'s time limit' if outcome.timed_out else pytest_summary(outcome.output),
         skipped=skipped, tail=tail(outcome.output) if outcome.returncode != 0 else '')


# ----- GPU measurements shared by (b), (c), (d) -----
def reset_peak(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def read_peak(device: torch.device) -> int | None:
    """Bytes of the allocator's peak since :func:`reset_peak` (None off CUDA)."""
    if device.type != 'cuda':
        return None
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))


def release(device: torch.device) -> None:
    """Give the last measurement's memory back, so that the next one starts from the same state."""
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache()


def exact_fp32() -> None:
    """No TF32 in matrix products or convolutions: fp32 paths then compute in fp32 and can be compared closely."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


# ----- (b) inference -----
def masked_attention_kernels(device: torch.device, heads: int = 6, tokens: int = 256) -> str:
    """Which head sizes ``scaled_dot_product_attention``'s memory-efficient kernel takes with an additive mask (as
    HAT's windows need) on ``device``: HAT's 30 and the 32 it is padded to (``HeadAttention.pads_heads``), in fp32
    and bf16. One sentence for the report; a kernel that refuses is reported, not raised."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    answers = []
    for dtype, name in ((torch.float32, 'fp32'), (torch.bfloat16, 'bf16')):
        for head_dim in (30, 32):
            q = torch.randn(1, heads, tokens, head_dim, device=device, dtype=dtype)
            mask = torch.zeros(1, heads, tokens, tokens, device=device, dtype=dtype)
            try:
                with warnings.catch_warnings():  # the refusal's reasons come as warnings
                    warnings.simplefilter('ignore')
                    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
                        torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask)
                answers.append(f'{name} heads of {head_dim}: yes')
            except RuntimeError:  # "No available kernel": the reasons went to the warnings
                answers.append(f'{name} heads of {head_dim}: no')
    return ('Memory-efficient attention with an additive mask (what HAT\'s padded heads are for): '
            + '; '.join(answers) + '.')


def inference_schedule(variants: Sequence[str], paths: Sequence[str]) -> list[tuple[str, str]]:
    """The order of the (variant, path) items: every eager path of every variant first, then the compiled paths,
    so that a compilation that eats the part's time costs only compiled rows."""
    eager = [p for p in paths if not p.startswith('compile')]
    compiled = [p for p in paths if p.startswith('compile')]
    return [(v, p) for v in variants for p in eager] + [(v, p) for p in compiled for v in variants]


def forward_guess(known: dict[str, float], variant: str) -> float:
    """Seconds one forward of ``variant`` is expected to take: the slowest measured for it, else twice the slowest
    of any variant (HAT-L does twice HAT's work), else a first guess."""
    if variant in known:
        return known[variant]
    return 2 * max(known.values()) if known else FIRST_FORWARD_GUESS_S


def inference_estimate(path: str, forward_s: float, runs: int, compiled: set[str]) -> float:
    """Seconds an inference item is expected to take, for the time plan."""
    estimate = runs * forward_s + 2.0
    if path.startswith('compile'):
        estimate += COMPILE_AGAIN_S if path in compiled else COMPILE_FIRST_S
    return estimate


def inference_part(deadline: Deadline, emit: Recorder, *, device: torch.device,
                   variants: Sequence[str] = INFERENCE_VARIANTS, paths: Sequence[str] = INFERENCE_PATHS,
                   size: tuple[int, int] = INFERENCE_SIZE, warmup: int = 1, repeats: int = 3,
                   configs: dict[str, dict] | None = None) -> None:
    """(b): time, peak memory and output check of each (variant, path); one network on the device at a time.

    Records: ``row`` {variant, path, times, setup_s, peak_bytes, max_diff | psnr, error}, ``skip``, ``start``.
    ``configs`` replaces a variant's released configuration (tests use tiny ones).
    """
    if device.type == 'cuda':
        exact_fp32()
        emit('note', text=masked_attention_kernels(device))
    height, width = size
    x = test_image(max(height, width))[..., :height, :width].contiguous().to(device)
    emit('setup', size=[height, width], warmup=warmup, repeats=repeats, device=str(device))
    state_dicts: dict[str, dict] = {}
    references: dict[tuple[str, str], torch.Tensor] = {}  # (variant, 'official' | 'fp32') -> output on the host
    slowest: dict[str, float] = {}
    compiled: set[str] = set()
    for variant, path in inference_schedule(variants, paths):
        item = f'{variant} {path}'
        estimate = inference_estimate(path, forward_guess(slowest, variant), warmup + repeats, compiled)
        if not deadline.fits(estimate):
            emit('skip', item=item, variant=variant, path=path,
                 why=f'needs about {estimate:.0f} s, {max(deadline.remaining(), 0):.0f} s left')
            continue
        emit('start', item=item)
        cfg = (configs or {}).get(variant) or network_config(variant)
        if variant not in state_dicts:
            torch.manual_seed(0)
            state_dicts[variant] = HAT(**cfg).state_dict()
        row: dict = {'item': item, 'variant': variant, 'path': path, 'times': [], 'peak_bytes': None}
        forward = None
        try:
            start = time.perf_counter()
            forward = build(path, cfg, state_dicts[variant], device)
            for _ in range(warmup):
                out = forward(x)
            synchronize(device)
            row['setup_s'] = time.perf_counter() - start
            first = out.float().cpu()
            del out
            if path.startswith('compile'):
                compiled.add(path)
            peaks = []
            for r in range(repeats):
                if r > 0 and not deadline.fits(max(row['times'])):
                    row['note'] = f'{r} of {repeats} timed runs (time)'
                    break
                reset_peak(device)
                start = time.perf_counter()
                out = forward(x)
                synchronize(device)
                row['times'].append(time.perf_counter() - start)
                peaks.append(read_peak(device))
                del out
            row['peak_bytes'] = max(peaks) if peaks and peaks[0] is not None else None
            slowest[variant] = max(slowest.get(variant, 0.0), max(row['times']))
            if path in ('official', 'fp32'):
                references[(variant, path)] = first
            if path.endswith('bf16'):
                ref = references.get((variant, 'fp32'), references.get((variant, 'official')))
                if ref is not None:
                    row['psnr'] = psnr(first, ref)
            elif path != 'official' and (variant, 'official') in references:
                row['max_diff'] = (first - references[(variant, 'official')]).abs().max().item()
        except Exception as error:  # reported in the table: a path that cannot run here (OOM, no compiler)
            row['error'] = describe_error(error)
        emit('row', **row)
        del forward
        release(device)


# ----- (c) training -----
def train_schedule(variants: Sequence[str], modes: Sequence[str]) -> list[tuple[str, str]]:
    """The official and bf16 modes of every variant first (the comparison asked for), then the others."""
    first, rest = modes[:2], modes[2:]
    return [(v, m) for v in variants for m in first] + [(v, m) for v in variants for m in rest]


def train_part(deadline: Deadline, emit: Recorder, *, device: torch.device,
               variants: Sequence[str] = TRAIN_VARIANTS, modes: Sequence[str] = TRAIN_MODES,
               batch: int = TRAIN_BATCH, patch: int = TRAIN_PATCH, warmup: int = 2, iters: int = 5) -> None:
    """(c): HATModel iterations (``bench_train`` builds, feeds and steps them); one model on the device at a time.

    Records: ``row`` {variant, mode, times, setup_s, peak_bytes, growth_bytes, loss, error}, ``skip``, ``start``.
    ``peak_bytes`` is everything allocated during an iteration (weights, gradients, Adam, EMA, activations);
    ``growth_bytes`` the part on top of what was allocated before it (activations and temporaries).
    """
    emit('setup', batch=batch, patch=patch, warmup=warmup, iters=iters, device=str(device))
    data = bench_train.make_batch(batch, patch, device)
    slowest: dict[str, float] = {}
    for variant, mode in train_schedule(variants, modes):
        item = f'{variant} {mode}'
        estimate = (warmup + iters) * forward_guess(slowest, variant) + 5.0
        if not deadline.fits(estimate):
            emit('skip', item=item, variant=variant, mode=mode,
                 why=f'needs about {estimate:.0f} s, {max(deadline.remaining(), 0):.0f} s left')
            continue
        emit('start', item=item)
        row: dict = {'item': item, 'variant': variant, 'mode': mode, 'times': [], 'peak_bytes': None,
                     'growth_bytes': None}
        model = None
        try:
            start = time.perf_counter()
            model = bench_train.build_model(variant, mode, patch, device)
            for i in range(warmup):
                bench_train.step(model, data, i + 1, device)
            row['setup_s'] = time.perf_counter() - start
            row['loss'] = float(model.get_current_log()['l_pix'])
            peaks, growths = [], []
            for r in range(iters):
                if r > 0 and not deadline.fits(max(row['times'])):
                    row['note'] = f'{r} of {iters} timed iterations (time)'
                    break
                before = torch.cuda.memory_allocated(device) if device.type == 'cuda' else None
                reset_peak(device)
                row['times'].append(bench_train.step(model, data, warmup + r + 1, device))
                peak = read_peak(device)
                if peak is not None:
                    peaks.append(peak)
                    growths.append(peak - before)
            if peaks:
                row['peak_bytes'], row['growth_bytes'] = max(peaks), max(growths)
            slowest[variant] = max(slowest.get(variant, 0.0), max(row['times']))
        except Exception as error:  # reported in the table
            row['error'] = describe_error(error)
        emit('row', **row)
        del model
        release(device)


# ----- (d) tiles -----
class RetryLog(logging.Handler):
    """Collects the Upscaler's out-of-memory retries, ``(tile that failed, tile tried next)``."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.retries: list[tuple[int, int]] = []

    def emit(self, record: logging.LogRecord) -> None:
        match = RETRY_MESSAGE.search(record.getMessage())
        if match:
            self.retries.append((int(match.group(1)), int(match.group(2))))


class OutOfMemoryOnce:
    """Stands in for ``Upscaler.forward``: the first call raises the error CUDA raises when memory runs out, the
    others run the real forward. Deterministic on any device, unlike a real out-of-memory error."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.forward = forward
        self.raised = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.raised:
            self.raised = True
            raise OOM_ERROR(f'CUDA out of memory (raised by gpu_check for a {x.shape[-2]}x{x.shape[-1]} piece)')
        return self.forward(x)


def forced_tile_side(height: int, width: int, multiple: int) -> int:
    """The tile the forced budget of (d) aims at: 40% of the shorter side, a multiple of the window, so that the
    image needs several tiles in both directions."""
    return max(multiple, int(min(height, width) * 0.4) // multiple * multiple)


def compare(out: torch.Tensor, whole: torch.Tensor) -> dict:
    return {'psnr': psnr(out, whole), 'max_diff': (out - whole).abs().max().item()}


def tiles_part(deadline: Deadline, emit: Recorder, *, device: torch.device, variant: str = TILES_VARIANT,
               size: tuple[int, int] = TILES_SIZE, tile_pad: int = 32, config: dict | None = None) -> None:
    """(d): ``Upscaler(tile='auto')`` on ``device`` against the untiled output: a forced budget, an out-of-memory
    error raised once, and (CUDA only) a real one under ``torch.cuda.set_per_process_memory_fraction``.

    Records ``row`` {item, case, tile, retries, budget_bytes | cap_bytes, peak_bytes, seconds, psnr, max_diff,
    error}; peaks are device bytes on top of the weights and the input (CUDA: the allocator's; CPU: tensors).
    """
    if device.type == 'cuda':
        exact_fp32()
    height, width = size
    torch.manual_seed(0)
    net = HAT(**(config or network_config(variant))).to(device).eval()
    x = test_image(max(height, width))[..., :height, :width].contiguous()
    known = [*net.parameters(), *net.buffers()]
    retry_log = RetryLog()
    logger = logging.getLogger('basicsr')
    logger.addHandler(retry_log)
    if logger.getEffectiveLevel() > logging.WARNING:
        logger.setLevel(logging.WARNING)

    def upscaler(**options) -> Upscaler:
        return Upscaler(net, device=device, precision='fp32', tile_pad=tile_pad, progress=False, **options)

    def timed(run: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, int, float]:
        result = {}
        start = time.perf_counter()
        peak = measure_peak_memory(lambda: result.setdefault('out', run()), device=device, known=known)
        return result['out'], int(peak), time.perf_counter() - start

    emit('setup', size=[height, width], tile_pad=tile_pad, device=str(device), variant=variant)
    emit('start', item='whole')
    try:
        whole, whole_peak, whole_s = timed(lambda: upscaler(tile=None).upscale_tensor(x))
    except Exception as error:  # without the reference there is nothing to compare the tiled outputs with
        emit('row', item='whole', case='untiled', error=describe_error(error))
        logger.removeHandler(retry_log)
        return
    emit('row', item='whole', case='untiled', tile=None, peak_bytes=whole_peak, seconds=whole_s)
    release(device)
    step_s = 3 * whole_s + 5.0  # a tiled run: more, smaller forwards; the memory model's calibration on top

    def run_item(item: str, case: str, needed_s: float, measure: Callable[[dict], None], **fields) -> None:
        """Measure one tiled item into a table row (errors reported in it), or skip it when time is short."""
        if not deadline.fits(needed_s):
            emit('skip', item=item, why=f'needs about {needed_s:.0f} s')
            return
        emit('start', item=item)
        row: dict = {'item': item, 'case': case, **fields}
        retry_log.retries.clear()
        try:
            measure(row)
        except Exception as error:  # reported in the table
            row['error'] = describe_error(error)
        emit('row', **row)
        release(device)

    def measure_auto(row: dict, auto: Upscaler) -> None:
        """Time ``auto`` on the image, compare it with the whole-image output, record its retries."""
        out, row['peak_bytes'], row['seconds'] = timed(lambda: auto.upscale_tensor(x))
        row.update(compare(out, whole))
        row['retries'] = list(retry_log.retries)

    # Forced budget: what the memory model says a tile of 40% of the shorter side needs.
    def forced_budget(row: dict) -> None:
        auto = upscaler(tile='auto', max_memory=0.0)
        model = auto.memory_model()
        target = forced_tile_side(height, width, auto.multiple)
        overhead = -auto.memory_budget(height, width, x.shape[1])  # what the budget loses to host canvases
        # Half a window more than the target's side: rounding in the model's inverse cannot then cost a window.
        budget = model.peak(target + auto.multiple // 2, target + auto.multiple // 2)
        auto.max_memory = budget + overhead
        row.update(target=target, budget_bytes=budget, tile=auto.tile_for(height, width),
                   memory_model={'fixed_bytes': model.fixed, 'per_pixel_bytes': model.per_pixel})
        measure_auto(row, auto)

    run_item('forced budget', 'tile auto, forced budget', step_s, forced_budget, retries=[])

    # An out-of-memory error raised once, on the whole image: the tile is halved and the image retried.
    def simulated_oom(row: dict) -> None:
        auto = upscaler(tile='auto', max_memory=float(2**50))
        # Calibrated before the error is armed (it must hit the image, not a trial tile) and before the
        # measurement (the calibration resets the allocator's peak itself).
        auto.memory_model()
        auto.forward = OutOfMemoryOnce(auto.forward)
        measure_auto(row, auto)
        row['tile'] = row['retries'][-1][1] if row['retries'] else None

    run_item('simulated OOM', 'tile auto, out-of-memory error raised once', step_s, simulated_oom)

    # A real CUDA out-of-memory error: the allocator may hold only part of what the whole image needs.
    def real_oom(row: dict) -> None:
        total = torch.cuda.get_device_properties(device).total_memory
        try:
            release(device)
            cap = torch.cuda.memory_reserved(device) + TILES_CAP_SHARE * whole_peak
            row['cap_bytes'] = cap
            torch.cuda.set_per_process_memory_fraction(min(cap / total, 1.0), device)
            auto = upscaler(tile='auto', max_memory=float(2**50))  # the budget says: the whole image fits
            auto.memory_model()  # before the measurement: the calibration resets the allocator's peak itself
            measure_auto(row, auto)
            row['tile'] = row['retries'][-1][1] if row['retries'] else None
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, device)

    if device.type != 'cuda':
        emit('skip', item='real OOM', why='needs CUDA')
    else:
        run_item('real OOM', 'tile auto, real out-of-memory error under a capped allocator', 2 * step_s, real_oom)
    logger.removeHandler(retry_log)


# ----- (e) torchrun -----
def write_tiny_image_set(root: Path, count: int = 4, size: int = 48, scale: int = 2) -> None:
    """``count`` smooth RGB images ``size`` x ``size`` in root/gt and their x``scale`` downscales in root/lq."""
    (root / 'gt').mkdir(parents=True, exist_ok=True)
    (root / 'lq').mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(count):
        planes = [np.sin(rng.uniform(2, 8) * xx + rng.uniform(0, 6)) * np.cos(rng.uniform(2, 8) * yy)
                  for _ in range(3)]
        gt = np.clip(127.5 + 100 * np.stack(planes, axis=2), 0, 255).round().astype(np.uint8)
        cv2.imwrite(str(root / 'gt' / f'img{i}.png'), gt)
        lq = cv2.resize(gt, (size // scale, size // scale), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(root / 'lq' / f'img{i}.png'), lq)


def tiny_training_options(data_root: Path, name: str, total_iter: int) -> dict:
    """A training option file for a tiny x2 HAT on :func:`write_tiny_image_set`'s images: one GPU, NCCL, a state
    every 5 iterations, a validation at ``total_iter`` (through the Upscaler, on the GPU)."""
    paired = {'type': 'PairedImageDataset', 'dataroot_gt': str(data_root / 'gt'),
              'dataroot_lq': str(data_root / 'lq'), 'io_backend': {'type': 'disk'}}
    metric = {'type': 'calculate_psnr', 'crop_border': 2, 'test_y_channel': True}
    return {
        'name': name, 'model_type': 'HATModel', 'scale': 2, 'num_gpu': 1, 'manual_seed': 0,
        'datasets': {
            'train': {'name': 'tiny', **paired, 'gt_size': 32, 'use_hflip': True, 'use_rot': True,
                      'num_worker_per_gpu': 0, 'batch_size_per_gpu': 2, 'dataset_enlarge_ratio': 1},
            'val_1': {'name': 'tinyval', **paired},
        },
        'network_g': dict(TINY_HAT),
        'path': {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None},
        'train': {
            'ema_decay': 0.999, 'optim_g': {'type': 'Adam', 'lr': 2e-4, 'weight_decay': 0, 'betas': [0.9, 0.99]},
            'scheduler': {'type': 'MultiStepLR', 'milestones': [1000], 'gamma': 0.5},
            'total_iter': total_iter, 'warmup_iter': -1,
            'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0, 'reduction': 'mean'},
        },
        'val': {'val_freq': total_iter, 'save_img': False, 'metrics': {'psnr': metric}},
        'logger': {'print_freq': 5, 'save_checkpoint_freq': 5, 'use_tb_logger': False},
        'dist_params': {'backend': 'nccl', 'port': 29500},
    }


def torchrun_command(opt_file: Path, *extra: str, processes: int = 1) -> list[str]:
    """``torchrun --standalone --nproc_per_node=PROCESSES hat/train.py -opt FILE --launcher pytorch ...`` (torchrun
    as a module of this interpreter: the console script may not be on PATH; ``--standalone`` picks a free port)."""
    return [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={processes}',
            str(ROOT / 'hat' / 'train.py'), '-opt', str(opt_file), '--launcher', 'pytorch', *extra]


def torchrun_checks(experiment: Path, first: int, total: int, output: str) -> list[dict]:
    """What must hold after a first run to ``first`` iterations and a resumed one to ``total``."""
    logs = '\n'.join(p.read_text(encoding='utf-8', errors='replace') for p in sorted(experiment.glob('train_*.log')))
    resumed = [line for line in logs.splitlines() if 'Resuming training from' in line]
    state_file = experiment / 'training_states' / f'{total}.state'
    state_iter = None
    if state_file.is_file():
        state_iter = load_training_state(str(state_file)).get('iter')
    return [
        {'name': f'first run saved training_states/{first}.state',
         'ok': (experiment / 'training_states' / f'{first}.state').is_file()},
        {'name': f'the second run resumed from iter {first}',
         'ok': any(line.rstrip('.').endswith(f'iter {first}') for line in resumed)},
        {'name': f'training_states/{total}.state holds iter {total}', 'ok': state_iter == total,
         'detail': f'iter {state_iter}'},
        {'name': f'models/net_g_{total}.pth written', 'ok': (experiment / 'models' / f'net_g_{total}.pth').is_file()},
        {'name': 'ran on CUDA with NCCL (no gloo fallback)',
         'ok': 'Device: cuda' in logs and 'falling back to gloo' not in output},
    ]


def torchrun_part(deadline: Deadline, emit: Recorder, *, keep: bool = False, first: int = TORCHRUN_ITERS,
                  more: int = TORCHRUN_MORE_ITERS) -> None:
    """(e): a 1-process torchrun training to ``first`` iterations, then ``--auto_resume`` to ``first + more``.

    The experiment folder is experiments/<name> of this checkout (where hat/train.py puts runs); it is removed at
    the end unless ``keep``.
    """
    name = f'gpu_check_{uuid.uuid4().hex[:8]}'
    experiment = ROOT / 'experiments' / name
    work = Path(tempfile.mkdtemp(prefix='gpu_check_train_'))
    try:
        write_tiny_image_set(work / 'data')
        opt_file = work / f'{name}.yml'
        opt_file.write_text(yaml.safe_dump(tiny_training_options(work / 'data', name, first), sort_keys=False))
        total = first + more
        runs = [('first', torchrun_command(opt_file)),
                ('resume', torchrun_command(opt_file, '--auto_resume', '--force_yml', f'train:total_iter={total}'))]
        # torchrun's log folders (torchelastic_*) and its workers' multiprocessing folders go into ``work`` too.
        env = dict(os.environ, TMPDIR=str(work))
        outputs = []
        for label, command in runs:
            if not deadline.fits(MIN_PART_S):
                emit('skip', item=label, why=f'{max(deadline.remaining(), 0):.0f} s left')
                return
            emit('start', item=label)
            outcome = run_group(command, timeout=deadline.remaining(), cwd=ROOT, env=env)
            outputs.append(outcome.output)
            emit('row', item=label, command=' '.join(['python', *command[1:]]).replace(str(ROOT) + '/', ''),
                 returncode=outcome.returncode, timed_out=outcome.timed_out, seconds=outcome.seconds,
                 tail=tail(outcome.output) if outcome.returncode != 0 else '')
            if outcome.returncode != 0:
                return
        for check in torchrun_checks(experiment, first, total, '\n'.join(outputs)):
            emit('check', **check)
    finally:
        if keep:
            emit('note', text=f'kept {experiment} and {work}')
        else:
            # With its archived copy (<name>_archived_<time>), made when the second run could not resume.
            for folder in [experiment, *experiment.parent.glob(f'{name}_archived_*'), work]:
                shutil.rmtree(folder, ignore_errors=True)


# ----- report -----
def fmt(value: float | None, spec: str, missing: str = '-') -> str:
    return missing if value is None else format(value, spec)


def mib(value: float | None) -> str:
    return fmt(None if value is None else value / MIB, '.0f')


def times(value: float | None) -> str:
    """A ratio as ``2.41x``, or ``-``."""
    return '-' if value is None else f'{value:.2f}x'


def verdict(ok: bool | None) -> str:
    return {True: 'met', False: 'NOT met', None: '-'}[ok]


@dataclass
class Section:
    """One part of the report: its heading, its Markdown lines, and a one-line result for the summary."""

    part: str
    lines: list[str] = field(default_factory=list)
    result: str = ''
    seconds: float | None = None


def common_lines(records: Sequence[dict]) -> list[str]:
    """Lines every part shows: skipped items, notes, errors, and where a stopped part was cut."""
    lines = []
    for r in records:
        if r['kind'] == 'skip':
            lines.append(f'- Skipped {r["item"]}: {r["why"]}.')
        elif r['kind'] == 'note':
            lines.append(f'- {r["text"]}')
        elif r['kind'] == 'stopped':
            where = f' while running {r["item"]}' if r.get('item') else ''
            lines.append(f'- Stopped at the part\'s time limit ({r["limit_s"]:.0f} s){where}; the rows above were '
                         'measured before.')
        elif r['kind'] == 'error':
            lines.append(f'- Error: {r["text"]}')
            if r.get('tail'):
                lines += ['', '```', r['tail'], '```']
    return lines


def tests_section(records: Sequence[dict]) -> Section:
    section = Section('tests')
    for r in records:
        if r['kind'] != 'pytest':
            continue
        section.result = r['summary']
        section.lines += [f'`{r["command"]}` ({r["seconds"]:.0f} s):', '', f'**{r["summary"]}**', '',
                          'Tests that need CUDA: ' + ', '.join(f'`{i}`' for i in r['ids']) + '.']
        if r['skipped']:
            section.lines += ['', 'Skipped:', ''] + [f'- {line}' for line in r['skipped']]
        if r['tail']:
            section.lines += ['', '```', r['tail'], '```']
    section.lines += common_lines(records)
    if not section.result:
        section.result = next((r['text'] for r in records if r['kind'] in ('error', 'note')), 'not run')
    return section


def _ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value is not None and base else None


def inference_section(records: Sequence[dict]) -> Section:
    """(b)'s table: speed-up and memory ratio against the official row of the same variant, the output check, and
    the targets."""
    section = Section('inference')
    setup = next((r for r in records if r['kind'] == 'setup'), {'size': list(INFERENCE_SIZE)})
    rows = [r for r in records if r['kind'] == 'row']
    official = {r['variant']: r for r in rows if r['path'] == 'official' and r.get('times')}
    height, width = setup['size']
    section.lines += [
        f'x4, LR input {height}x{width}, random weights, TF32 off; median of the timed forwards after '
        f'{setup.get("warmup", 1)} untimed (compilation included there); peak = '
        '`torch.cuda.max_memory_allocated` during one forward (weights and input included, one network on the GPU).',
        f'Targets: speed-up >= {SPEED_TARGET:g}x and memory <= {MEMORY_TARGET:g}x the official computation\'s; '
        f'fp32 max abs diff <= {FP32_MAX_DIFF:g}; bf16 PSNR >= {BF16_MIN_PSNR:g} dB against our fp32 output; '
        f'HAT-L bf16 peak < {HAT_L_BF16_LIMIT_BYTES / 1e9:g} GB.', '',
        '| variant | path | median s | runs | speed-up vs official | peak MiB | memory vs official | check | '
        'targets (speed / memory) |',
        '|---|---|---|---|---|---|---|---|---|',
    ]
    met = []
    for r in rows:
        label = r['path'] + (f' (compile {r["setup_s"]:.0f} s)' if r['path'].startswith('compile')
                             and r.get('setup_s') is not None else '')
        if r.get('error') or not r.get('times'):
            section.lines.append(f'| {r["variant"]} | {label} | failed: {r.get("error", "no timed run")} | | | | | '
                                 '| |')
            continue
        median = statistics.median(r['times'])
        base = official.get(r['variant'])
        speed = _ratio(statistics.median(base['times']), median) if base else None
        memory = _ratio(r.get('peak_bytes'), base.get('peak_bytes')) if base else None
        if 'psnr' in r:
            check = f'PSNR {r["psnr"]:.1f} dB ({"ok" if r["psnr"] >= BF16_MIN_PSNR else "LOW"})'
        elif 'max_diff' in r:
            check = f'max diff {r["max_diff"]:.1e} ({"ok" if r["max_diff"] <= FP32_MAX_DIFF else "HIGH"})'
        else:
            check = 'baseline' if r['path'] == 'official' else '-'
        targets = '-'
        if r['path'] != 'official':
            speed_ok = None if speed is None else speed >= SPEED_TARGET
            memory_ok = None if memory is None else memory <= MEMORY_TARGET
            targets = f'{verdict(speed_ok)} / {verdict(memory_ok)}'
            if speed_ok and memory_ok:
                met.append(f'{r["variant"]} {r["path"]}')
        note = f' ({r["note"]})' if r.get('note') else ''
        section.lines.append(f'| {r["variant"]} | {label} | {median:.3f} | {len(r["times"])}{note} | '
                             f'{times(speed)} | {mib(r.get("peak_bytes"))} | {fmt(memory, ".2f")} | {check} | '
                             f'{targets} |')
    section.lines.append('')
    hat_l = next((r for path in ('bf16', 'compile-bf16') for r in rows if r['variant'] == 'HAT-L'
                  and r['path'] == path and r.get('peak_bytes') is not None), None)
    if hat_l is not None:
        ok = hat_l['peak_bytes'] < HAT_L_BF16_LIMIT_BYTES
        section.lines.append(f'- HAT-L x4 at {height}x{width}, {hat_l["path"]}: peak {hat_l["peak_bytes"] / 1e9:.2f} '
                             f'GB, target < {HAT_L_BF16_LIMIT_BYTES / 1e9:g} GB: {verdict(ok)}.')
    else:
        section.lines.append('- HAT-L bf16 peak: not measured.')
    section.lines.append('- Both speed and memory targets met by: ' + (', '.join(met) if met else 'none') + '.')
    section.lines += common_lines(records)
    timed = [r for r in rows if r.get('times')]
    section.result = (f'{len(timed)} of {len(rows) + sum(r["kind"] == "skip" for r in records)} rows measured; '
                      f'both targets met by {", ".join(met) if met else "none"}')
    return section


def train_section(records: Sequence[dict]) -> Section:
    section = Section('train')
    setup = next((r for r in records if r['kind'] == 'setup'), {'batch': TRAIN_BATCH, 'patch': TRAIN_PATCH})
    rows = [r for r in records if r['kind'] == 'row']
    official = {r['variant']: r for r in rows if r['mode'] == 'official' and r.get('times')}
    section.lines += [
        f'HATModel.optimize_parameters (forward, L1, backward, Adam, EMA), x4, batch {setup["batch"]}, LR patches '
        f'{setup["patch"]}x{setup["patch"]}, PyTorch\'s TF32 defaults; median of the timed iterations after '
        f'{setup.get("warmup", 2)} untimed. Peak = everything allocated during an iteration (weights, gradients, '
        'Adam, EMA, activations); activations = the peak over what was allocated before the iteration.',
        f'Targets: speed-up >= {SPEED_TARGET:g}x and peak memory <= {MEMORY_TARGET:g}x the official fp32 '
        'iteration\'s.', '',
        '| variant | mode | median s/iter | iter/s | speed-up vs official | peak MiB | memory vs official | '
        'activations MiB | loss after warm-up | targets (speed / memory) |',
        '|---|---|---|---|---|---|---|---|---|---|',
    ]
    for r in rows:
        if r.get('error') or not r.get('times'):
            section.lines.append(f'| {r["variant"]} | {r["mode"]} | failed: {r.get("error", "no timed run")} | | | '
                                 '| | | | |')
            continue
        median = statistics.median(r['times'])
        base = official.get(r['variant'])
        speed = _ratio(statistics.median(base['times']), median) if base else None
        memory = _ratio(r.get('peak_bytes'), base.get('peak_bytes')) if base else None
        targets = '-' if r['mode'] == 'official' else \
            f'{verdict(None if speed is None else speed >= SPEED_TARGET)} / ' \
            f'{verdict(None if memory is None else memory <= MEMORY_TARGET)}'
        section.lines.append(f'| {r["variant"]} | {r["mode"]} | {median:.3f} | {1 / median:.2f} | '
                             f'{times(speed)} | {mib(r.get("peak_bytes"))} | {fmt(memory, ".2f")} | '
                             f'{mib(r.get("growth_bytes"))} | {fmt(r.get("loss"), ".4f")} | {targets} |')
    section.lines += [''] + common_lines(records)
    timed = [r for r in rows if r.get('times')]
    speedups = []
    for r in timed:
        if r['mode'] == 'bf16' and r['variant'] in official:
            ratio = statistics.median(official[r['variant']]['times']) / statistics.median(r['times'])
            speedups.append(f'{r["variant"]} bf16 {ratio:.2f}x')
    section.result = f'{len(timed)} rows measured' + (f'; {", ".join(speedups)} vs official' if speedups else '')
    return section


def tiles_section(records: Sequence[dict]) -> Section:
    section = Section('tiles')
    setup = next((r for r in records if r['kind'] == 'setup'), None)
    if setup:
        section.lines += [
            f'{setup["variant"]} x4 (random weights, fp32, TF32 off), LR input {setup["size"][0]}x{setup["size"][1]}, '
            f'tile_pad {setup["tile_pad"]}; each tiled output against the untiled one (target PSNR >= '
            f'{TILED_MIN_PSNR:g} dB). Device peak = allocator peak over the weights (the output canvas is in host '
            'memory).', '',
            '| case | tile | budget / cap MiB | device peak MiB | seconds | vs untiled | result |',
            '|---|---|---|---|---|---|---|',
        ]
    passed = failed = 0
    for r in (r for r in records if r['kind'] == 'row'):
        if r.get('error'):
            failed += 1
            section.lines.append(f'| {r["case"]} | | | | | failed: {r["error"]} | NOT ok |')
            continue
        retries = ''.join(f' {a}->{b}' for a, b in r.get('retries', []))
        tile = 'whole image' if r.get('tile') is None and not retries else str(r.get('tile'))
        if retries:
            tile += f' (out of memory:{retries})'
        limit = r.get('budget_bytes', r.get('cap_bytes'))
        if 'psnr' in r:
            comparison = f'PSNR {r["psnr"]:.1f} dB, max diff {r["max_diff"]:.1e}'
            ok = r['psnr'] >= TILED_MIN_PSNR
            if r['item'] == 'forced budget':
                ok = ok and r.get('tile') is not None
                if r['peak_bytes'] is not None and r.get('budget_bytes') is not None:
                    comparison += f'; peak {"within" if r["peak_bytes"] <= r["budget_bytes"] else "OVER"} budget'
            else:
                ok = ok and bool(r.get('retries'))
                if not r.get('retries'):
                    comparison += '; no out-of-memory retry happened'
            passed, failed = passed + ok, failed + (not ok)
            result = 'ok' if ok else 'NOT ok'
        else:
            comparison, result = 'reference', '-'
        section.lines.append(f'| {r["case"]} | {tile} | {mib(limit)} | {mib(r.get("peak_bytes"))} | '
                             f'{fmt(r.get("seconds"), ".2f")} | {comparison} | {result} |')
    forced = next((r for r in records if r['kind'] == 'row' and r['item'] == 'forced budget' and 'target' in r), None)
    if forced and forced.get('memory_model'):
        model = forced['memory_model']
        section.lines += ['', f'- Memory model from the trial tiles: {model["fixed_bytes"] / MIB:.0f} MiB + '
                          f'{model["per_pixel_bytes"] / 1024:.1f} KiB per LR pixel; the forced budget is its '
                          f'estimate for a {forced["target"]}-pixel tile, and --tile auto chose {forced.get("tile")}.']
    section.lines += [''] + common_lines(records)
    section.result = f'{passed} ok, {failed} not ok'
    return section


def torchrun_section(records: Sequence[dict]) -> Section:
    section = Section('torchrun')
    runs = [r for r in records if r['kind'] == 'row']
    if runs:
        section.lines += ['| run | command | exit | seconds |', '|---|---|---|---|']
        for r in runs:
            status = 'stopped (time)' if r['timed_out'] else str(r['returncode'])
            section.lines.append(f'| {r["item"]} | `{r["command"]}` | {status} | {r["seconds"]:.0f} |')
        section.lines.append('')
    checks = [r for r in records if r['kind'] == 'check']
    for c in checks:
        detail = f' ({c["detail"]})' if c.get('detail') else ''
        section.lines.append(f'- [{"x" if c["ok"] else " "}] {c["name"]}{detail}')
    for r in runs:
        if r.get('tail'):
            section.lines += ['', f'Output of the {r["item"]} run (end):', '', '```', r['tail'], '```']
    section.lines += common_lines(records)
    if checks:
        section.result = f'{sum(c["ok"] for c in checks)} of {len(checks)} checks passed'
    elif runs and runs[-1]['returncode'] != 0:
        section.result = f'the {runs[-1]["item"]} run failed'
    else:
        section.result = 'not completed'
    return section


SECTION_BUILDERS: dict[str, Callable[[Sequence[dict]], Section]] = {
    'tests': tests_section, 'inference': inference_section, 'train': train_section, 'tiles': tiles_section,
    'torchrun': torchrun_section,
}


def environment_lines(device: torch.device) -> list[str]:
    """The report's header: the GPU, torch, CUDA, cuDNN, NCCL and the host."""
    nccl = None
    try:
        version = torch.cuda.nccl.version()
        nccl = '.'.join(map(str, version)) if isinstance(version, tuple) else str(version)
    except Exception:  # not built with NCCL, or no library: said as such
        nccl = 'not available'
    return [
        f'{machine_line(device)}.',
        f'torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, NCCL {nccl}; '
        f'Python {platform.python_version()}; host CPU {cpu_model()}, {os.cpu_count()} cores.',
    ]


def assemble_report(header: Sequence[str], sections: Sequence[Section], *, budget_s: float, took_s: float,
                    pending: Sequence[str] = ()) -> str:
    """The Markdown report: header, a summary table of the parts, then one section per part. ``pending``: the parts
    still to run (a report written between parts, so that a run stopped from outside leaves what it measured)."""
    still = (f' Written while running: {", ".join(PART_TITLES[p] for p in pending)} not done yet.' if pending
             else '')
    lines = ['# HAT on a GPU: first check', '', *header, '',
             f'Run {datetime.datetime.now().strftime("%Y-%m-%d %H:%M")}, `python benchmarks/gpu_check.py`, budget '
             f'{budget_s:.0f} s, took {took_s:.0f} s.{still}', '',
             f'Targets: at least {SPEED_TARGET:g}x the official computation\'s speed and at most '
             f'{MEMORY_TARGET:g}x its memory on the same GPU; HAT-L x4 at 480x640 in bf16 under '
             f'{HAT_L_BF16_LIMIT_BYTES / 1e9:g} GB.', '',
             '| part | result | seconds |', '|---|---|---|']
    for s in sections:
        lines.append(f'| {PART_TITLES[s.part]} | {s.result} | {fmt(s.seconds, ".0f")} |')
    for s in sections:
        lines += ['', f'## {PART_TITLES[s.part]}', '', *s.lines]
    return '\n'.join(lines).rstrip() + '\n'


# ----- plan -----
PART_PLANS = {
    'tests': lambda ids: f'pytest on the {len(ids)} test(s) that need CUDA: {", ".join(ids) or "none found"}',
    'inference': lambda ids: (f'{" and ".join(INFERENCE_VARIANTS)} x4 at {INFERENCE_SIZE[0]}x{INFERENCE_SIZE[1]}: '
                              f'{", ".join(INFERENCE_PATHS)}; 1 untimed + up to 3 timed forwards each, peak memory, '
                              'max diff (fp32) / PSNR (bf16) against the official output'),
    'train': lambda ids: (f'HATModel iterations of {", ".join(TRAIN_VARIANTS)}, batch {TRAIN_BATCH}, '
                          f'{TRAIN_PATCH}x{TRAIN_PATCH} LR patches: {", ".join(TRAIN_MODES)} (official fp32, ours '
                          'bf16 first); s/iter and peak memory'),
    'tiles': lambda ids: (f'{TILES_VARIANT} x4 at {TILES_SIZE[0]}x{TILES_SIZE[1]} through Upscaler(tile=\'auto\') on '
                          'CUDA: a forced small budget, an out-of-memory error raised once, a real one under '
                          'torch.cuda.set_per_process_memory_fraction; each against the untiled output'),
    'torchrun': lambda ids: (f'torchrun --nproc_per_node=1 hat/train.py --launcher pytorch (NCCL), tiny HAT, '
                             f'{TORCHRUN_ITERS} iterations, then --auto_resume to '
                             f'{TORCHRUN_ITERS + TORCHRUN_MORE_ITERS}; checks the resume'),
}


def plan_lines(parts: Sequence[str], budget_s: float, test_ids: Sequence[str]) -> list[str]:
    """What a run would do, with each part's share of the budget (time a part leaves goes to the next ones)."""
    total = sum(PART_SHARES[p] for p in parts)
    lines = [f'Plan, within {budget_s:.0f} s (each part\'s share; what a part leaves unused goes to the next):']
    for part in parts:
        lines.append(f'  {PART_TITLES[part]} [{budget_s * PART_SHARES[part] / total:.0f} s]: '
                     f'{PART_PLANS[part](list(test_ids))}')
    return lines


# ----- running the parts -----
def run_child_part(part: str, limit_s: float, workdir: Path) -> list[dict]:
    """Run a measuring part in a child process stopped at ``limit_s``; its records, plus why it ended early."""
    results = workdir / f'{part}.jsonl'
    command = [sys.executable, str(Path(__file__).resolve()), '--child', part, '--child-time-s', f'{limit_s:.1f}',
               '--child-results', str(results)]
    outcome = run_group(command, timeout=limit_s, cwd=ROOT)
    records = read_records(results)
    if outcome.timed_out:
        records.append({'kind': 'stopped', 'limit_s': limit_s, 'item': unfinished_item(records)})
    elif outcome.returncode != 0:
        records.append({'kind': 'error', 'text': f'the part\'s process ended with exit status {outcome.returncode}',
                        'tail': tail(outcome.output)})
    return records


def run_parts(parts: Sequence[str], budget_s: float, *, keep: bool,
              runner: Callable[[str, float, Path], list[dict]] = run_child_part,
              clock: Callable[[], float] = time.monotonic,
              after_part: Callable[[dict], None] | None = None) -> dict[str, tuple[list[dict], float]]:
    """Each part within its deadline (:func:`part_deadlines`): ``{part: (records, seconds)}``. ``runner`` runs the
    parts of :data:`CHILD_PARTS`; the others run here (they are subprocesses already). ``after_part`` is called
    with what was found so far after each part."""
    deadlines = part_deadlines(parts, budget_s, clock())
    found = {}
    with tempfile.TemporaryDirectory(prefix='gpu_check_') as tmp:
        for part in parts:
            began = clock()
            limit = deadlines[part] - began
            if limit < MIN_PART_S:
                found[part] = ([{'kind': 'skip', 'item': 'the whole part', 'why': f'{max(limit, 0):.0f} s left of '
                                 f'the {budget_s:.0f} s budget'}], 0.0)
                continue
            print(f'{PART_TITLES[part]}: up to {limit:.0f} s ...', file=sys.stderr, flush=True)
            if part in CHILD_PARTS:
                records = runner(part, limit, Path(tmp))
            else:
                emit = Recorder()
                try:
                    if part == 'tests':
                        tests_part(Deadline.after(limit, clock), emit)
                    else:
                        torchrun_part(Deadline.after(limit, clock), emit, keep=keep)
                except Exception as error:  # one part's failure must not cost the others' report
                    emit('error', text=describe_error(error))
                records = emit.records
            found[part] = (records, clock() - began)
            if after_part is not None:
                after_part(found)
    return found


def default_out() -> Path:
    """gpu_check.md under $OUT when set (the GPU machine's output folder), else in the working directory."""
    return Path(os.environ['OUT']) / 'gpu_check.md' if os.environ.get('OUT') else Path.cwd() / 'gpu_check.md'


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', help='the Markdown report (default: gpu_check.md under $OUT if set, else here); '
                                      'the raw measurements go next to it as .json')
    parser.add_argument('--budget-s', type=float, default=DEFAULT_BUDGET_S,
                        help=f'seconds for all parts together (default {DEFAULT_BUDGET_S:.0f})')
    parser.add_argument('--parts', default=','.join(PARTS), help=f'comma-separated, from {",".join(PARTS)}')
    parser.add_argument('--keep', action='store_true', help='keep the torchrun experiment folder and its data')
    parser.add_argument('--child', choices=CHILD_PARTS, help=argparse.SUPPRESS)
    parser.add_argument('--child-time-s', type=float, help=argparse.SUPPRESS)
    parser.add_argument('--child-results', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(',') if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        parser.error(f'--parts: unknown {unknown}; choose from {", ".join(PARTS)}')
    args.parts = [p for p in PARTS if p in parts]  # the running order is fixed
    if args.budget_s <= 0:
        parser.error('--budget-s must be positive')
    return args


def child_main(args: argparse.Namespace) -> int:
    """A measuring part in this process (started by :func:`run_child_part`)."""
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s %(levelname)s: %(message)s')
    # With its index: torch.cuda.set_per_process_memory_fraction refuses a bare 'cuda'.
    device = torch.device('cuda', torch.cuda.current_device())
    deadline = Deadline.after(args.child_time_s - CHILD_GRACE_S)
    emit = Recorder(Path(args.child_results))
    parts = {'inference': inference_part, 'train': train_part, 'tiles': tiles_part}
    parts[args.child](deadline, emit, device=device)
    return 0


def no_cuda_reason() -> str:
    if torch.version.cuda is None:
        return f'torch {torch.__version__} is a build without CUDA'
    return f'torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU'


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    test_ids = cuda_test_ids(ROOT / 'tests') if 'tests' in args.parts else []
    plan = plan_lines(args.parts, args.budget_s, test_ids)
    out = Path(args.out) if args.out else default_out()
    if not torch.cuda.is_available():
        text = '\n'.join([f'gpu_check: CUDA is not available ({no_cuda_reason()}); nothing measured. On a GPU it '
                          'would run:', *plan])
        print(text)
        if args.out or os.environ.get('OUT'):  # asked for a file: leave the plan there, so the reader knows why
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(f'# HAT on a GPU: first check\n\n```\n{text}\n```\n', encoding='utf-8')
        return 0

    started = time.monotonic()
    print('\n'.join(plan), file=sys.stderr, flush=True)
    device = torch.device('cuda')
    header = environment_lines(device)

    def write_report(found: dict[str, tuple[list[dict], float]]) -> str:
        """The report of the parts in ``found`` (and their raw records next to it), the others named as pending."""
        done = [p for p in args.parts if p in found]
        sections = []
        for part in done:
            records, seconds = found[part]
            section = SECTION_BUILDERS[part](records)
            section.seconds = seconds
            sections.append(section)
        report = assemble_report(header, sections, budget_s=args.budget_s, took_s=time.monotonic() - started,
                                 pending=[p for p in args.parts if p not in found])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report, encoding='utf-8')
        raw = {'header': header, 'budget_s': args.budget_s, 'parts': {p: found[p][0] for p in done}}
        out.with_suffix('.json').write_text(json.dumps(raw, indent=1), encoding='utf-8')
        return report

    report = write_report(run_parts(args.parts, args.budget_s, keep=args.keep, after_part=write_report))
    print(report)
    print(f'Report written to {out} (measurements: {out.with_suffix(".json")}).', file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())

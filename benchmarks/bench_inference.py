"""Inference speed and memory of HAT: the official computation against this project's paths.

    python benchmarks/bench_inference.py --quick                      # HAT x4 at 64x64 (minutes on 2 cores)
    python benchmarks/bench_inference.py --sizes 64,128 --out speed.md
    python benchmarks/bench_inference.py                              # HAT-S, HAT, HAT-L at 64, 128, 256 (long)

Paths (``--paths``):
    official   ``benchmarks.official_baseline.OfficialHAT``: the released code's computation, fp32 (the baseline)
    reference  our HAT with ``set_fused_attn(False)`` (explicit attention), fp32
    fp32       our HAT as it runs by default, fp32
    bf16       our HAT under ``torch.autocast(dtype=torch.bfloat16)`` (what ``val: {amp: bf16}`` does)
    compile    our HAT after ``compile_blocks()`` (``torch.compile`` of each HAB and OCAB), fp32
    compile-bf16  the same under bf16 autocast

Only what is asked is measured. The default paths include the bf16 ones only where bf16 is native on the device
(a GPU with bf16, a CPU with AVX512-BF16/AMX or Arm BF16): elsewhere torch emulates bf16, ~25x slower than fp32, and
a bf16 row is timed only when ``--paths`` asks for it (the header then says it is emulated). The bf16 matrix-product
rate is measured only when a bf16 path runs. Every table header names the machine: CPU model, torch's CPU
capability and whether bf16 is native, or the GPU.

Method:
* Time: every path runs in a process of its own (:mod:`benchmarks.workers`; in one shared process the official
  computation's forward was up to 17% slower, through the C allocator), ``--warmup`` times first (not timed; for the
  compiled paths this includes compilation, whose time is reported), then ``--repeats`` rounds in which the paths
  run one after another (interleaved, so that a change of machine load hits all of them alike); the table gives the
  median wall time and the fastest round, and the median CPU time (user and system, all threads) and page faults
  of the path's process during one forward (system time is the kernel's handling of page faults). ``--heap-reuse``
  starts the workers with glibc's malloc keeping freed memory (:data:`benchmarks.workers.HEAP_REUSE_ENV`): no page
  faults after the warm-up, the arithmetic alone.
* Memory: on the CPU, each (variant, size, path) runs in a fresh subprocess whose C allocator returns every block
  of 128 KiB or more to the system when it is freed (``MALLOC_MMAP_THRESHOLD_=131072``), so that the resident size
  follows the memory in use instead of what the allocator keeps for reuse (HAT's attention calls keep the size they
  have in the timed workers, :data:`hat.archs.hat_arch.CALL_BUFFER_BYTES`). One forward warms up, then the kernel's
  peak-RSS mark is reset (``/proc/self/clear_refs``) and the growth of peak RSS over the resident size before the
  measured forward is reported (activations and workspace; the weights and the input are excluded). Where the mark
  cannot be reset, the child reports peak RSS (``getrusage``) minus the resident size before its first forward.
  On CUDA: ``torch.cuda.max_memory_allocated`` minus the memory allocated before the forward.
* FLOPs: counted once per configuration with ``torch.utils.flop_counter`` on the meta device (matrix products and
  convolutions, 2 FLOPs per multiply-add); achieved GFLOP/s = FLOPs / median time, and its share of the machine's
  matrix-multiply rate: 2048 x 2048 products in fp32 (both with ``torch.matmul`` and with the oneDNN kernel of our
  ``Linear``, which differ by 2x on AMD CPUs; the better counts) and, when a bf16 path runs, bf16. They are timed at
  the start and the end of the run and once in every round, right after the round's forwards: the share is the
  median over the rounds of each round's GFLOP/s over the rate of that round, so that a shared machine slowing down
  (or speeding up) during the run moves numerator and denominator together.
* Checks: the largest absolute difference of each fp32 path's output from the baseline's, and the PSNR of each
  bf16 path's output against our fp32 output, with the fp32 output's range as the peak.
* Weights: random (the networks' own initialisation, seeded) unless ``--weights`` gives a checkpoint; the input is a
  smooth synthetic image. Speed does not depend on the values; the PSNR does.

HAT-L at 256x256 takes minutes per forward on two CPU cores (the baseline most); ``--sizes 64,128`` skips it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import hat  # noqa: E402,F401  (compat shim before basicsr)
from benchmarks.official_baseline import OfficialHAT  # noqa: E402
from benchmarks.workers import (HEAP_REUSE_ENV, HEAP_REUSE_NOTE, WorkerPool,  # noqa: E402
                                add_heap_reuse_argument, serve, timed_with_usage, usage_cell)
from hat.archs import hat_arch  # noqa: E402
from hat.archs.hat_arch import HAT  # noqa: E402
from hat.inference.precision import device_description, native_bf16  # noqa: E402
from hat.utils.heap import largest_reused_block  # noqa: E402

MANIFESTS = ROOT / 'tests' / 'data' / 'golden'
VARIANTS = ('HAT-S', 'HAT', 'HAT-L')
# autocast's cache of bf16 weight copies: off, as in the inference engine (hat/inference/upscaler.py says why)
AUTOCAST_CACHE = False
SIZES = (64, 128, 256)
PATHS = ('official', 'reference', 'fp32', 'bf16', 'compile', 'compile-bf16')
DEFAULT_PATHS = ('official', 'fp32', 'bf16', 'compile')  # bf16 ones only where native: see default_paths()
BF16_PATHS = ('bf16', 'compile-bf16')


def network_config(variant: str, scale: int = 4) -> dict:
    """``network_g`` of a released variant (from the golden manifests), without ``type``."""
    manifest = MANIFESTS / f'manifest_{variant}_SRx{scale}.json'
    if not manifest.is_file():
        raise SystemExit(f'{manifest} not found: variants are {", ".join(VARIANTS)} at x2, x3, x4.')
    cfg = dict(json.loads(manifest.read_text())['network_g'])
    cfg.pop('type')
    return cfg


def test_image(size: int) -> torch.Tensor:
    """A smooth, deterministic RGB image [1, 3, size, size] in [0, 1] (sinusoids of several frequencies)."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing='ij')
    channels = [0.5 + 0.25 * torch.sin(11 * xx + 3 * c) * torch.cos(7 * yy - c) + 0.1 * torch.sin(40 * xx * yy + c)
                for c in range(3)]
    return torch.stack(channels)[None].clamp(0, 1)


def build(path: str, cfg: dict, state_dict: dict | None,
          device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """The forward function of a path (eval mode, no autograd)."""
    net = (OfficialHAT if path == 'official' else HAT)(**cfg)
    if state_dict is not None:
        net.load_state_dict(state_dict, strict=True)
    net = net.to(device).eval()
    if path == 'reference':
        net.set_fused_attn(False)
    if path.startswith('compile'):
        net.compile_blocks()
    low_precision = path in BF16_PATHS

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=low_precision,
                                             cache_enabled=AUTOCAST_CACHE):
            return net(x)

    return forward


def synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize()


def matmul_rate(dtype: torch.dtype, device: torch.device, *, onednn: bool = False, n: int = 2048,
                repeats: int = 5) -> float | None:
    """GFLOP/s of an n x n matrix product (median of ``repeats``): ``torch.matmul``, or with ``onednn`` the oneDNN
    kernel our fp32 CPU ``Linear`` uses (None where there is none)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    if onednn:
        if device.type != 'cpu' or not hasattr(torch.ops.mkldnn, '_linear_pointwise'):
            return None

        def product():
            return torch.ops.mkldnn._linear_pointwise(a, b, None, 'none', [], '')
    else:

        def product():
            return a @ b

    return 2 * n**3 / median_seconds(product, device, repeats=repeats) / 1e9


def median_seconds(call: Callable[[], object], device: torch.device, *, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``repeats`` calls of ``call`` after ``warmup`` untimed ones (synchronised on CUDA)."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        call()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bf16_is_native(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively (where ``auto`` may pick it, if it is also faster than fp32)."""
    return native_bf16(device)[0]


def default_paths(device: torch.device, paths=DEFAULT_PATHS, bf16_paths=BF16_PATHS) -> tuple[str, ...]:
    """``paths`` without the bf16 ones where bf16 would be emulated."""
    return tuple(p for p in paths if p not in bf16_paths or bf16_is_native(device))


def matmul_rates(device: torch.device, *, bf16: bool, repeats: int = 5) -> dict:
    """GFLOP/s of 2048x2048 products: fp32 (torch.matmul and oneDNN), and bf16 only when ``bf16`` is asked (an
    emulated bf16 product takes minutes)."""
    return {'fp32': matmul_rate(torch.float32, device, repeats=repeats),
            'fp32-onednn': matmul_rate(torch.float32, device, onednn=True, repeats=repeats),
            'bf16': matmul_rate(torch.bfloat16, device, repeats=repeats) if bf16 else None}


def peak_rate(path: str, rates: dict) -> float | None:
    """The matrix-product rate a path is measured against: bf16's for the bf16 paths, else the better fp32 one."""
    if path in BF16_PATHS:
        return rates['bf16']
    return max(rates['fp32'] or 0, rates['fp32-onednn'] or 0) or None


def machine_line(device: torch.device) -> str:
    """The machine of a table: ``CPU: <model>, <n> threads, torch capability AVX2, native bf16: no (emulated)``
    or the GPU."""
    if device.type == 'cpu':
        return f'CPU: {device_description(device)}'
    return f'GPU: {device_description(device)}'


def count_flops(cfg: dict, size: int) -> float:
    """Matrix-product and convolution FLOPs of one forward at ``size`` x ``size`` (counted on the meta device)."""
    return sum(count_flops_by_op(cfg, size).values())


def count_flops_by_op(cfg: dict, size: int) -> dict[str, float]:
    """:func:`count_flops` by ATen operator: ``{'convolution': ..., 'addmm': ... (the linear layers), 'bmm': ...
    (the attention products)}``, counted on the official computation (head size as released, e.g. 30)."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device('meta'):
        net = OfficialHAT(**cfg).eval()  # explicit attention products: counted on every torch version
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(torch.empty(1, 3, size, size, device='meta'))
    return {str(op).removeprefix('aten.'): float(flops) for op, flops in counter.get_flop_counts()['Global'].items()}


# ----- memory -----
def _proc_status_kib(field_name: str) -> int | None:
    try:
        for line in Path('/proc/self/status').read_text().splitlines():
            if line.startswith(field_name + ':'):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        Path('/proc/self/clear_refs').write_text('5')  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def peak_growth_mib(run: Callable[[], object], device: torch.device,
                    rss_before_warmup_kib: int | None = None) -> dict:
    """Peak memory growth (MiB) of one call of an already warmed-up ``run``: ``{'peak_mib', 'method'}``.

    CUDA: allocator peak over what was allocated before. CPU: the peak resident set (VmHWM, reset first) over the
    resident set before. Where VmHWM cannot be reset, the process's lifetime peak (ru_maxrss) over
    ``rss_before_warmup_kib`` if given (an upper bound), else None.
    """
    if device.type == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return {'peak_mib': (torch.cuda.max_memory_allocated() - before) / 2**20, 'method': 'cuda'}
    if _reset_peak_rss():
        before = _proc_status_kib('VmRSS')
        run()
        return {'peak_mib': (_proc_status_kib('VmHWM') - before) / 1024, 'method': 'VmHWM'}
    if rss_before_warmup_kib is None:
        return {'peak_mib': None, 'method': None}
    run()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {'peak_mib': (peak_kib - rss_before_warmup_kib) / 1024, 'method': 'ru_maxrss'}


def memory_child(spec: dict) -> dict:
    """Runs in a fresh process: peak memory growth of one forward (MiB), see the module doc."""
    torch.set_num_threads(spec['threads'])
    device = torch.device(spec['device'])
    # The attention calls as large as in the timed workers, not as this child's allocator setting would make them.
    hat_arch.CALL_BUFFER_BYTES = spec['call_buffer_bytes']
    torch.manual_seed(0)
    forward = build(spec['path'], network_config(spec['variant']), None, device)
    x = test_image(spec['size']).to(device)
    rss_before_warmup = _proc_status_kib('VmRSS') or 0
    forward(x)
    return peak_growth_mib(lambda: forward(x), device, rss_before_warmup)


# glibc: blocks from this size up are mapped on allocation and unmapped when freed (no dynamic threshold).
MEMORY_CHILD_ENV = {'MALLOC_MMAP_THRESHOLD_': '131072'}


def child_peak_mib(script: str, spec: dict, timeout: float, label: str) -> float | None:
    """Peak memory growth (MiB) reported by a fresh ``script --memory-child SPEC`` process, or None (why on stderr).

    A fresh process per configuration, so that no earlier run's freed pages or warm caches count.
    """
    try:
        done = subprocess.run([sys.executable, script, '--memory-child', json.dumps(spec)], capture_output=True,
                              text=True, timeout=timeout, check=False, env={**os.environ, **MEMORY_CHILD_ENV})
    except subprocess.TimeoutExpired:
        print(f'  memory of {label}: no result within {timeout:.0f} s', file=sys.stderr)
        return None
    lines = [line for line in done.stdout.splitlines() if line.startswith('{')]
    if done.returncode != 0 or not lines:
        print(f'  memory of {label} failed:\n{done.stderr[-2000:]}', file=sys.stderr)
        return None
    return json.loads(lines[-1])['peak_mib']


def measure_memory(variant: str, size: int, path: str, device: torch.device, threads: int,
                   timeout: float, heap_reuse: bool = False) -> float | None:
    worker_environment = {**os.environ, **HEAP_REUSE_ENV} if heap_reuse else os.environ
    spec = {'variant': variant, 'size': size, 'path': path, 'device': str(device), 'threads': threads,
            'call_buffer_bytes': largest_reused_block(worker_environment)}
    return child_peak_mib(__file__, spec, timeout, path)


def load_average() -> str:
    """The 1/5/15-minute load averages, printed with every report: a busy machine explains odd ratios."""
    return ' / '.join(f'{v:.2f}' for v in os.getloadavg()) if hasattr(os, 'getloadavg') else 'n/a'


def publish(lines: list[str], out: str | None) -> str:
    """Print the Markdown report and, with ``out``, write it to that file too; returns it."""
    report = '\n'.join(lines)
    print(report)
    if out:
        Path(out).write_text(report + '\n')
    return report


# ----- timing -----
@dataclass
class PathResult:
    times: list = field(default_factory=list)
    replies: list = field(default_factory=list)  # the workers' replies, with CPU time and page faults where known
    round_rates: list = field(default_factory=list)  # GFLOP/s of the matrix product of the path's precision, per round
    setup_s: float = 0.0
    error: str | None = None
    output: torch.Tensor | None = None
    peak_mib: float | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def psnr(a: torch.Tensor, ref: torch.Tensor) -> float:
    peak = (ref.max() - ref.min()).item()
    mse = (a.float() - ref.float()).square().mean().item()
    return float('inf') if mse == 0 else 10 * math.log10(peak**2 / mse)


def path_worker(spec: dict) -> tuple:
    """Runs in a process of its own (``--worker``): builds one path, runs its warm-up forwards, saves the output to
    ``spec['output_file']``, then serves requests ``{}`` with ``{'seconds': ...}`` and the process's CPU time and
    page faults during it (:func:`benchmarks.workers.timed_with_usage`), one forward each (see
    :func:`benchmarks.workers.serve`). The weights: ``spec['weights']`` or the seeded random initialisation, the
    same in every worker."""
    torch.set_num_threads(spec['threads'])
    device = torch.device(spec['device'])
    cfg = network_config(spec['variant'])
    if spec['weights']:
        from hat.io.checkpoints import load_state_dict
        state_dict = load_state_dict(spec['weights'])
    else:
        torch.manual_seed(0)
        state_dict = HAT(**cfg).state_dict()
    x = test_image(spec['size']).to(device)
    start = time.perf_counter()
    forward = build(spec['path'], cfg, state_dict, device)
    for _ in range(spec['warmup']):
        out = forward(x)
    synchronize(device)
    setup_s = time.perf_counter() - start
    torch.save(out.float().cpu(), spec['output_file'])

    def one_forward() -> float:
        synchronize(device)
        begin = time.perf_counter()
        forward(x)
        synchronize(device)
        return time.perf_counter() - begin

    return (lambda _request: timed_with_usage(one_forward)), {'setup_s': setup_s}


def bench_config(variant: str, size: int, paths: list[str], args, device: torch.device) -> dict[str, PathResult]:
    """Each path in a process of its own (:mod:`benchmarks.workers`), the forwards interleaved round by round; the
    matrix-product rates of each round measured here, while the workers wait."""
    results = {p: PathResult() for p in paths}
    with tempfile.TemporaryDirectory() as outputs:
        specs = {path: {'variant': variant, 'size': size, 'path': path, 'device': str(device),
                        'threads': args.threads, 'warmup': args.warmup, 'weights': args.weights,
                        'output_file': os.path.join(outputs, f'{path}.pt')} for path in paths}
        with WorkerPool(__file__, specs, heap_reuse=args.heap_reuse) as pool:
            for path, ready in pool.ready.items():
                results[path].setup_s = ready['setup_s']
                results[path].output = torch.load(specs[path]['output_file'])
            for path, error in pool.errors.items():  # a path that cannot run here (e.g. no compiler for torch.compile)
                print(f'  {path}: skipped ({error})', file=sys.stderr)
            timing_bf16 = any(p in BF16_PATHS for p in pool.workers)
            for _ in range(args.repeats):
                for path in list(pool.workers):
                    answer = pool.request(path, {})
                    if answer is not None:
                        results[path].times.append(answer['seconds'])
                        results[path].replies.append(answer)
                round_rates = matmul_rates(device, bf16=timing_bf16, repeats=2)
                for path in pool.workers:
                    results[path].round_rates.append(peak_rate(path, round_rates))
    for path, error in pool.errors.items():
        results[path].error = error
    if not args.no_memory:
        for path in pool.workers:  # those that ran to the end
            results[path].peak_mib = measure_memory(variant, size, path, device, args.threads, args.memory_timeout,
                                                    args.heap_reuse)
    return results


# ----- report -----
def fmt(value: float | None, spec: str, missing: str = '-') -> str:
    return missing if value is None else format(value, spec)


def matmul_share(path: str, flops: float, res: PathResult, rates: dict) -> float:
    """The path's achieved rate as a share of the matrix-product rate: the median over the rounds of each round's
    GFLOP/s over the rate measured in that round, or (rounds without a rate) the median time against the run's
    ``rates`` (see :func:`matmul_rates`)."""
    shares = [flops / 1e9 / t / r for t, r in zip(res.times, res.round_rates) if r]
    if shares and len(shares) == len(res.times):
        return statistics.median(shares)
    return flops / 1e9 / res.median / peak_rate(path, rates)


def report_rows(variant: str, size: int, flops: float, results: dict[str, PathResult], rates: dict) -> list[str]:
    base = results.get('official')
    base_ok = base is not None and base.times
    fp32 = results.get('fp32')
    rows = []
    for path, res in results.items():
        if res.error or not res.times:
            rows.append(f'| {variant} | {size} | {path} | skipped: {res.error} | | | | | | | |')
            continue
        speed = base.median / res.median if base_ok else None
        gflops = flops / res.median / 1e9
        share = f'{gflops:.0f} ({100 * matmul_share(path, flops, res, rates):.0f}%)' if peak_rate(path, rates) else \
            f'{gflops:.0f}'
        mem_ratio = (res.peak_mib / base.peak_mib if base_ok and res.peak_mib is not None and base.peak_mib
                     else None)
        if path in BF16_PATHS:
            ref = fp32.output if fp32 is not None and fp32.output is not None else base.output if base_ok else None
            check = f'PSNR {psnr(res.output, ref):.1f} dB' if ref is not None else '-'
        elif path != 'official' and base_ok and base.output is not None:
            check = f'max diff {(res.output - base.output).abs().max().item():.1e}'
        else:
            check = 'baseline'
        setup = f' (compile {res.setup_s:.0f} s)' if path.startswith('compile') else ''
        rows.append(f'| {variant} | {size} | {path}{setup} | {res.median:.3f} | {min(res.times):.3f} | '
                    f'{fmt(speed, ".2f")}x | {share} | '
                    f'{fmt(res.peak_mib, ".0f")} | {fmt(mem_ratio, ".2f")} | {usage_cell(res.replies)} | {check} |')
    return rows


def names_from(parser: argparse.ArgumentParser, flag: str, text: str, allowed) -> list[str]:
    """The comma-separated names of an option (``'HAT-S, HAT'`` -> ``['HAT-S', 'HAT']``); exits on one not allowed."""
    names = [name.strip() for name in text.split(',') if name.strip()]
    unknown = [name for name in names if name not in allowed]
    if unknown:
        parser.error(f'{flag}: unknown {unknown}; choose from {", ".join(allowed)}')
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--variants', default=','.join(VARIANTS), help='comma-separated: HAT-S,HAT,HAT-L')
    parser.add_argument('--sizes', default=','.join(map(str, SIZES)), help='LR input sides, comma-separated')
    parser.add_argument('--paths', default=None, help=f'comma-separated, from {",".join(PATHS)} (default: '
                        f'{",".join(DEFAULT_PATHS)}, the bf16 ones only where bf16 is native)')
    parser.add_argument('--repeats', type=int, default=3, help='timed rounds (default 3)')
    parser.add_argument('--warmup', type=int, default=1, help='untimed runs of each path first (default 1)')
    parser.add_argument('--quick', action='store_true', help='HAT x4 at 64x64 only')
    parser.add_argument('--threads', type=int, default=torch.get_num_threads(), help='CPU threads (default: all)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--weights', help='a HAT checkpoint to load (needs a single --variants entry)')
    parser.add_argument('--no-memory', action='store_true', help='skip the peak-memory subprocesses')
    add_heap_reuse_argument(parser)
    parser.add_argument('--memory-timeout', type=float, default=1800, help='seconds per memory subprocess')
    parser.add_argument('--out', help='also write the Markdown report to this file')
    parser.add_argument('--memory-child', help=argparse.SUPPRESS)
    parser.add_argument('--worker', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.variants, args.sizes = 'HAT', '64'
    args.variants = names_from(parser, '--variants', args.variants, VARIANTS)
    args.sizes = [int(s) for s in args.sizes.split(',') if s.strip()]
    if args.paths is None:
        args.paths = ','.join(default_paths(torch.device(args.device)))
    args.paths = names_from(parser, '--paths', args.paths, PATHS)
    if args.weights and len(args.variants) != 1:
        parser.error('--weights needs exactly one --variants entry (the variant of the checkpoint)')
    if args.repeats < 1 or args.warmup < 1:
        parser.error('--repeats and --warmup must be at least 1')
    return args


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        serve(lambda: path_worker(spec))
        return ''
    if args.memory_child:
        print(json.dumps(memory_child(json.loads(args.memory_child))))
        return ''
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    started = time.time()
    timing_bf16 = any(p in BF16_PATHS for p in args.paths)
    rates_start = matmul_rates(device, bf16=timing_bf16)
    rows = []
    for variant in args.variants:
        for size in args.sizes:
            print(f'{variant} x4 at {size}x{size} ...', file=sys.stderr, flush=True)
            flops = count_flops(network_config(variant), size)
            results = bench_config(variant, size, args.paths, args, device)
            rows.append((variant, size, flops, results))
    rates_end = matmul_rates(device, bf16=timing_bf16)
    rates = {k: max(rates_start[k] or 0, rates_end[k] or 0) for k in rates_start}
    emulated = ' bf16 is emulated on this machine: the bf16 rows time the emulation (asked for by --paths).' \
        if timing_bf16 and not bf16_is_native(device) else ''

    lines = [
        f'HAT x4 inference. {machine_line(device)}.{emulated}',
        '',
        f'torch {torch.__version__}; each path in a process of its own'
        f'{"; " + HEAP_REUSE_NOTE if args.heap_reuse else ""}; {args.repeats} interleaved rounds after '
        f'{args.warmup} warm-up; '
        f'{"weights " + args.weights if args.weights else "random weights"}; run took '
        f'{(time.time() - started) / 60:.1f} min; load average at the end (1/5/15 min): {load_average()}.',
        '',
        'Matrix-multiply rate (2048x2048, GFLOP/s at the start / end of the run): fp32 torch.matmul '
        f'{rates_start["fp32"]:.0f} / {rates_end["fp32"]:.0f}, fp32 oneDNN {fmt(rates_start["fp32-onednn"], ".0f")} '
        f'/ {fmt(rates_end["fp32-onednn"], ".0f")}, bf16 {fmt(rates_start["bf16"], ".0f", "not measured")} / '
        f'{fmt(rates_end["bf16"], ".0f", "not measured")}. The % column: '
        'each round\'s GFLOP/s against the rate of the same product measured right after that round (the better fp32 '
        'one for fp32 paths), median over the rounds.',
        '',
        '| variant | LR size | path | median s | best s | speed-up vs official | GFLOP/s (% of matmul) '
        '| peak MiB | memory vs official | CPU user / system s, page faults per forward | check |',
        '|---|---|---|---|---|---|---|---|---|---|---|',
    ]
    for variant, size, flops, results in rows:
        lines += report_rows(variant, size, flops, results, rates)
    lines += ['', 'FLOPs per forward (matrix products and convolutions): ' + ', '.join(
        f'{variant} {size}: {flops / 1e9:.0f} G' for variant, size, flops, _ in rows) + '.']
    return publish(lines, args.out)


if __name__ == '__main__':
    main()

"""Training speed and memory of HATModel: the official computation in fp32 against the training options.

    python benchmarks/bench_train.py --quick                  # HAT-S, batch 2, 32x32 LR patches
    python benchmarks/bench_train.py --variants HAT-S,HAT --out train.md

Each mode is a real ``HATModel`` built from options, and one iteration is ``optimize_parameters``: forward, L1 loss,
backward, Adam step and EMA update (the settings of the official training files: Adam lr 2e-4, betas 0.9/0.99,
EMA 0.999; PyTorch's default Adam for the official computation, the fused one that HATModel picks for the others).
Modes (``--modes``):

    official      network_g: {type: OfficialHAT} (benchmarks/official_baseline.py), fp32: the baseline
    fp32          network_g: {type: HAT}
    bf16          + train: {amp: bf16}
    fp32-ckpt     + network_g: {use_checkpoint: true} (recompute each block in backward, less memory)
    bf16-ckpt     + train: {amp: bf16} and use_checkpoint
    compile       + train: {compile: true} (torch.compile of each block), fp32
    compile-bf16  + train: {compile: true, amp: bf16}

Method: every mode runs in a process of its own (:mod:`benchmarks.workers`: sharing one process, the modes changed
each other's speed through the C allocator, the official computation's most). Each runs ``--warmup`` iterations
(compilation included), then ``--iters`` rounds in which the modes take one iteration each, in turn (one process
computes at a time); the table gives the median iteration time, iterations per second and the speed-up over the
official computation: the ratio of the medians and, with two rounds or more, the range of the rounds' own ratios
(each round runs the modes back to back, so the range shows how far the machine's speed moved during the run), and
the median CPU time (user and system, all threads) and page faults of the mode's process during one iteration: the
system time is the kernel's handling of page faults, memory management rather than computation. ``--heap-reuse``
starts the workers with glibc's malloc keeping freed memory (:data:`benchmarks.workers.HEAP_REUSE_ENV`): no page
faults after the warm-up, the arithmetic alone (each worker then keeps its peak: official and fp32 HAT-S at batch 4,
48x48 do not fit in 24 GiB together). The
workers stay resident: HAT-S at batch 4, 48x48 with official, fp32 and bf16 needs about 21 GiB of memory. Peak
memory: each mode runs again in a fresh subprocess (with the allocator setting of ``bench_inference.py``, so that
the resident size follows the memory in use); after one iteration (Adam's state exists then) the kernel's peak-RSS
mark is reset and the peak growth of one more iteration over the resident size before it is reported (CUDA:
``torch.cuda.max_memory_allocated`` over the allocation before the iteration).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import hat  # noqa: E402,F401  (compat shim before basicsr)
import benchmarks.official_baseline  # noqa: E402,F401  (registers OfficialHAT)
from benchmarks.bench_inference import (VARIANTS, bf16_is_native, child_peak_mib, default_paths,  # noqa: E402
                                        load_average, machine_line, matmul_rates, names_from, network_config,
                                        peak_growth_mib, publish, synchronize)
from benchmarks.workers import (HEAP_REUSE_NOTE, WorkerPool, add_heap_reuse_argument, serve,  # noqa: E402
                                timed_with_usage, usage_cell)
from hat.inference.precision import FORCE_BF16_ENV  # noqa: E402
from hat.models.hat_model import HATModel  # noqa: E402

MODES = ('official', 'fp32', 'bf16', 'fp32-ckpt', 'bf16-ckpt', 'compile', 'compile-bf16')
DEFAULT_MODES = ('official', 'fp32', 'bf16', 'fp32-ckpt', 'bf16-ckpt')


def model_options(variant: str, mode: str, patch: int, device: torch.device) -> dict:
    """HATModel options of a mode (see the module doc)."""
    network = {'type': 'OfficialHAT' if mode == 'official' else 'HAT', **network_config(variant), 'img_size': patch}
    if mode.endswith('-ckpt'):
        network['use_checkpoint'] = True
    train = {
        'ema_decay': 0.999,
        'optim_g': {'type': 'Adam', 'lr': 2e-4, 'weight_decay': 0, 'betas': [0.9, 0.99],
                    # The official code takes PyTorch's default Adam; HATModel's own default is the fused one.
                    **({'fused': False} if mode == 'official' else {})},
        'scheduler': {'type': 'MultiStepLR', 'milestones': [250000], 'gamma': 0.5},
        'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0, 'reduction': 'mean'},
        'amp': 'bf16' if 'bf16' in mode else False,
        'compile': mode.startswith('compile'),
    }
    return {
        'name': f'bench_{mode}', 'model_type': 'HATModel', 'scale': 4, 'num_gpu': int(device.type == 'cuda'),
        'dist': False, 'rank': 0, 'world_size': 1, 'is_train': True, 'network_g': network,
        'path': {'pretrain_network_g': None, 'strict_load_g': True}, 'train': train, 'val': {'save_img': False},
    }


def force_emulated_bf16(device: torch.device) -> bool:
    """Where bf16 is emulated on ``device``, make the precision policy run the bf16 that a benchmark asked for
    instead of the fp32 it would pick (sets :data:`~hat.inference.precision.FORCE_BF16_ENV`). Returns whether bf16
    is emulated here."""
    if bf16_is_native(device):
        return False
    os.environ[FORCE_BF16_ENV] = '1'
    return True


def make_batch(batch: int, patch: int, device: torch.device) -> dict:
    generator = torch.Generator().manual_seed(0)
    lq = torch.rand(batch, 3, patch, patch, generator=generator)
    gt = torch.nn.functional.interpolate(lq, scale_factor=4, mode='bicubic', align_corners=False).clamp(0, 1)
    return {'lq': lq.to(device), 'gt': gt.to(device)}


def build_model(variant: str, mode: str, patch: int, device: torch.device) -> HATModel:
    torch.manual_seed(0)
    return HATModel(model_options(variant, mode, patch, device))


def step(model: HATModel, data: dict, iteration: int, device: torch.device) -> float:
    model.feed_data(data)
    synchronize(device)
    start = time.perf_counter()
    model.optimize_parameters(iteration)
    synchronize(device)
    return time.perf_counter() - start


def speed_up_cell(official: Sequence[float], mode: Sequence[float]) -> str:
    """The speed-up column: ``'2.10x'`` (median official time over median time of the mode), followed by
    ``' (rounds 1.48-2.39x)'``, the range of the per-round ratios, when there are two rounds or more.

    Args:
        official, mode: seconds per iteration of the same rounds, in round order.
    """
    cell = f'{statistics.median(official) / statistics.median(mode):.2f}x'
    per_round = [base / own for base, own in zip(official, mode)]
    if len(per_round) < 2:
        return cell
    return f'{cell} (rounds {min(per_round):.2f}-{max(per_round):.2f}x)'


def timing_worker(spec: dict) -> tuple:
    """Runs in a process of its own (``--worker``): builds a mode's model, warms it up, and then serves requests
    ``{'iteration': i}`` with ``{'seconds': ...}`` and the process's CPU time and page faults during it
    (:func:`benchmarks.workers.timed_with_usage`), one iteration each (see :func:`benchmarks.workers.serve`)."""
    torch.set_num_threads(spec['threads'])
    device = torch.device(spec['device'])
    start = time.perf_counter()
    model = build_model(spec['variant'], spec['mode'], spec['patch'], device)
    data = make_batch(spec['batch'], spec['patch'], device)
    for i in range(spec['warmup']):
        step(model, data, i + 1, device)
    info = {'loss': model.get_current_log()['l_pix'], 'setup_s': time.perf_counter() - start}
    return (lambda request: timed_with_usage(lambda: step(model, data, request['iteration'], device))), info


def memory_child(spec: dict) -> dict:
    """Runs in a fresh process: peak memory growth of one training iteration after the first (MiB)."""
    torch.set_num_threads(spec['threads'])
    device = torch.device(spec['device'])
    model = build_model(spec['variant'], spec['mode'], spec['patch'], device)
    data = make_batch(spec['batch'], spec['patch'], device)
    step(model, data, 1, device)
    return peak_growth_mib(lambda: step(model, data, 2, device), device)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--variants', default='HAT-S,HAT', help='comma-separated: HAT-S,HAT,HAT-L')
    parser.add_argument('--modes', default=None, help=f'comma-separated, from {",".join(MODES)} (default: '
                        f'{",".join(DEFAULT_MODES)}, the bf16 ones only where bf16 is native)')
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--patch', type=int, default=32, help='LR patch side (a multiple of 16, default 32)')
    parser.add_argument('--iters', type=int, default=3, help='timed rounds (default 3)')
    parser.add_argument('--warmup', type=int, default=2, help='untimed iterations per mode (default 2: the official '
                        'computation\'s first iterations are 1.5-2x slower than its later ones)')
    parser.add_argument('--quick', action='store_true', help='HAT-S only, modes official, fp32 (and bf16 where '
                        'native)')
    parser.add_argument('--threads', type=int, default=torch.get_num_threads())
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--no-memory', action='store_true')
    add_heap_reuse_argument(parser)
    parser.add_argument('--memory-timeout', type=float, default=1800)
    parser.add_argument('--out', help='also write the Markdown report to this file')
    parser.add_argument('--memory-child', help=argparse.SUPPRESS)
    parser.add_argument('--worker', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    bf16_modes = tuple(m for m in MODES if 'bf16' in m)
    if args.quick:
        args.variants = 'HAT-S'
        args.modes = args.modes or ','.join(default_paths(torch.device(args.device), ('official', 'fp32', 'bf16'),
                                                          bf16_modes))
    if args.modes is None:
        args.modes = ','.join(default_paths(torch.device(args.device), DEFAULT_MODES, bf16_modes))
    args.variants = names_from(parser, '--variants', args.variants, VARIANTS)
    args.modes = names_from(parser, '--modes', args.modes, MODES)
    if args.patch % 16:
        parser.error('--patch must be a multiple of 16 (the window size of the released variants)')
    if args.iters < 1 or args.warmup < 1:
        parser.error('--iters and --warmup must be at least 1')
    return args


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        serve(lambda: timing_worker(spec))
        return ''
    if args.memory_child:
        print(json.dumps(memory_child(json.loads(args.memory_child))))
        return ''
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    started = time.time()
    timing_bf16 = any('bf16' in m for m in args.modes)
    emulated = timing_bf16 and force_emulated_bf16(device)  # asked for explicitly: time bf16 wherever it runs
    rates = matmul_rates(device, bf16=timing_bf16)
    note = ' bf16 is emulated on this machine: the bf16 rows time the emulation (asked for by --modes).' \
        if emulated else ''
    rows = [f'HATModel training iterations. {machine_line(device)}.{note}', '',
            f'torch {torch.__version__}; batch {args.batch}, LR patch {args.patch}x{args.patch} '
            f'(x4); each mode in a process of its own'
            f'{"; " + HEAP_REUSE_NOTE if args.heap_reuse else ""}; {args.iters} interleaved rounds after '
            f'{args.warmup} warm-up.', '',
            '| variant | mode | median s/iter | iter/s | speed-up vs official | peak MiB | memory vs official | '
            'loss after warm-up | CPU user / system s, page faults per iteration |',
            '|---|---|---|---|---|---|---|---|---|']
    for variant in args.variants:
        print(f'{variant} ...', file=sys.stderr, flush=True)
        replies = {m: [] for m in args.modes}  # per mode, its worker's replies: seconds, CPU time, page faults
        specs = {mode: {'variant': variant, 'mode': mode, 'patch': args.patch, 'batch': args.batch,
                        'device': str(device), 'threads': args.threads, 'warmup': args.warmup}
                 for mode in args.modes}
        # A mode that cannot run here (e.g. torch.compile without a compiler) is reported in the table.
        with WorkerPool(__file__, specs, heap_reuse=args.heap_reuse) as pool:
            for r in range(args.iters):
                for mode in list(pool.workers):
                    answer = pool.request(mode, {'iteration': args.warmup + r + 1})
                    if answer is not None:
                        replies[mode].append(answer)
        errors = pool.errors
        times = {mode: [answer['seconds'] for answer in answers] for mode, answers in replies.items()}
        losses = {mode: ready['loss'] for mode, ready in pool.ready.items()}
        setup = {mode: ready['setup_s'] for mode, ready in pool.ready.items()}
        memory = {}
        if not args.no_memory:
            for mode in pool.workers:  # those that ran to the end
                spec = {'variant': variant, 'mode': mode, 'patch': args.patch, 'batch': args.batch,
                        'device': str(device), 'threads': args.threads}
                memory[mode] = child_peak_mib(__file__, spec, args.memory_timeout, mode)
        official_times = times.get('official')
        for mode in args.modes:
            if mode in errors:
                rows.append(f'| {variant} | {mode} | skipped: {errors[mode]} | | | | | | |')
                continue
            median = statistics.median(times[mode])
            if not official_times:
                speed = '-'
            elif mode == 'official':
                speed = '1.00x'
            else:
                speed = speed_up_cell(official_times, times[mode])
            mem = memory.get(mode)
            mem_ratio = f'{mem / memory["official"]:.2f}' if mem and memory.get('official') else '-'
            label = f'{mode} (compile {setup[mode]:.0f} s)' if mode.startswith('compile') else mode
            rows.append(f'| {variant} | {label} | {median:.3f} | {1 / median:.2f} | {speed} | '
                        f'{"-" if mem is None else f"{mem:.0f}"} | {mem_ratio} | {losses[mode]:.4f} | '
                        f'{usage_cell(replies[mode])} |')
    onednn = rates['fp32-onednn']
    bf16_rate = 'not measured' if rates['bf16'] is None else f'{rates["bf16"]:.0f}'
    rows += ['', f'Matrix-multiply rate (2048x2048) at the start: fp32 {rates["fp32"]:.0f} (torch.matmul), '
             f'{"-" if onednn is None else f"{onednn:.0f}"} (oneDNN), bf16 {bf16_rate} GFLOP/s. '
             f'Run took {(time.time() - started) / 60:.1f} min; load average at the end (1/5/15 min): '
             f'{load_average()}.']
    return publish(rows, args.out)


if __name__ == '__main__':
    main()

"""Where one training iteration of HAT on the CPU spends its time: seconds, FLOPs and GFLOP/s by kind of operator.

    python benchmarks/profile_train.py                                  # HAT-S, batch 4, 48x48 LR patches, fp32
    python benchmarks/profile_train.py --precision bf16 --out profile_train.md

What it answers: which operators hold a training iteration (``bench_train.py``'s, HATModel's forward, L1 loss,
backward, Adam and EMA) where it is, the first thing to know before working on the training targets on a class of
machine. The official computation can be profiled too (``--mode official``), for the ranking of its own steps.

Method: ``--iters`` iterations timed with a clock after ``--warmup`` untimed ones, then one more iteration under the
torch profiler, whose operators are grouped into the kinds below by their self time (on the thread that called
them; the intra-op threads' work is inside it). The backward runs in autograd's C++ engine, where no Python wrapper
sees its calls, hence the profiler rather than ``profile_forward.py``'s clocks; it adds some overhead to every
operator, so the profiled iteration is slower than the clocked ones, and small operators weigh more in it than they
cost: use the seconds for the ranking, and the rates as lower bounds.

Kinds of operator:

    attention products   ``bmm``: the window attention's products, forward and backward; oneDNN Graph's fused
                         attention partitions (bf16 forward); PyTorch's fused CPU attention kernels
    linear products      oneDNN's linear, ``mm`` and ``addmm``: forward products, input and weight gradients
    convolutions         forward and backward
    softmax              forward and backward (the softmax recomputed in a bf16 backward included)
    layer norm           forward and backward
    copies and casts     ``copy_``, ``_to_copy``, ``cat``, ``clone``, ``stack``
    gathers              index_select and its backward (the relative-position tables), index and scatter operators,
                         the pixel (un)shuffles
    other operators      everything else that runs as an operator: additions, multiplications, GELU, sums, Adam's
                         and the EMA's element-wise updates, allocations
    outside operators    the profiled iteration's wall time that no operator covers: Python, the autograd engine

FLOPs are the official computation's forward count (``bench_inference.count_flops_by_op``) times the batch, times 3
for the products and convolutions (the backward computes each product's two gradients; a bf16 backward that
recomputes the attention's logits does a sixth more attention work than counted), so that the rates compare with
the machine's matrix-product rate, measured right after.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile as torch_profile  # noqa: E402

import hat  # noqa: E402,F401  (compat shim before basicsr)
from benchmarks.bench_inference import (VARIANTS, count_flops_by_op, load_average, machine_line,  # noqa: E402
                                        matmul_rates, network_config, peak_rate, publish)
from benchmarks.bench_train import build_model, force_emulated_bf16, make_batch, step  # noqa: E402
from benchmarks.profile_forward import step_row  # noqa: E402

# Operators by kind: exact names, or name prefixes ending in '*'.
OPERATOR_KINDS = {
    'attention products': ('aten::bmm', 'aten::baddbmm', 'LlgaPartition*', 'aten::_scaled_dot_product_*',
                           'aten::_flash_attention*'),
    'linear products': ('mkldnn::_linear_pointwise', 'aten::mm', 'aten::addmm'),
    'convolutions': ('aten::mkldnn_convolution', 'aten::convolution_backward', 'aten::_convolution',
                     'aten::_nnpack_spatial_convolution', 'aten::_slow_conv2d_forward', 'aten::_slow_conv2d_backward'),
    'softmax': ('aten::_softmax', 'aten::_softmax_backward_data'),
    'layer norm': ('aten::native_layer_norm', 'aten::native_layer_norm_backward'),
    'copies and casts': ('aten::copy_', 'aten::_to_copy', 'aten::cat', 'aten::clone', 'aten::stack'),
    'gathers': ('aten::index_select', 'aten::index_add_', 'aten::scatter_add_', 'aten::index', 'aten::index_put_',
                'aten::_index_put_impl_', 'aten::index_copy_', 'aten::gather', 'aten::pixel_shuffle',
                'aten::pixel_unshuffle'),
}
KINDS = (*OPERATOR_KINDS, 'other operators')
# The official forward's FLOPs by ATen operator (count_flops_by_op), by kind.
FLOP_OPS = {'attention products': ('bmm',), 'linear products': ('addmm', 'mm'), 'convolutions': ('convolution',)}
# A product's forward and its two gradients.
TRAINING_FLOPS_PER_FORWARD_FLOP = 3
MODES = ('official', 'fp32', 'bf16')


def kind_of(operator: str) -> str:
    """The kind of a profiler event's name (``'aten::bmm'`` -> ``'attention products'``); ``'other operators'`` for
    names no kind lists."""
    for kind, names in OPERATOR_KINDS.items():
        for name in names:
            if operator == name or (name.endswith('*') and operator.startswith(name[:-1])):
                return kind
    return 'other operators'


@dataclass
class IterationProfile:
    """What :func:`profile_iterations` measured: the clocked iterations' seconds, the profiled iteration's wall
    time, and per kind of operator its self seconds and calls in that iteration; the other operators' largest names."""

    iteration_times: list[float] = field(default_factory=list)
    profiled_s: float = 0.0
    seconds: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    largest_others: list[tuple[str, float]] = field(default_factory=list)

    @property
    def outside_s(self) -> float:
        """The profiled iteration's wall time outside every operator (never below 0)."""
        return max(0.0, self.profiled_s - sum(self.seconds.values()))


def group_operators(events: Iterable[tuple[str, float, int]], *, largest: int = 5) -> tuple[
        dict[str, float], dict[str, int], list[tuple[str, float]]]:
    """Sum (name, self seconds, calls) of profiler events by kind of operator.

    Returns:
        (seconds per kind, calls per kind, the ``largest`` names of 'other operators' with their seconds), every
        kind of :data:`KINDS` present.
    """
    seconds: dict[str, float] = defaultdict(float)
    calls: Counter = Counter()
    others: dict[str, float] = defaultdict(float)
    for name, self_seconds, count in events:
        kind = kind_of(name)
        seconds[kind] += self_seconds
        calls[kind] += count
        if kind == 'other operators':
            others[name] += self_seconds
    ranked = sorted(others.items(), key=lambda item: -item[1])[:largest]
    return {kind: seconds[kind] for kind in KINDS}, {kind: calls[kind] for kind in KINDS}, ranked


def profile_iterations(run_iteration: Callable[[int], float], *, iters: int, warmup: int) -> IterationProfile:
    """Run ``warmup`` untimed iterations, ``iters`` clocked ones and one under the torch profiler.

    Args:
        run_iteration: runs iteration ``i`` (1-based) and returns its seconds.
    """
    result = IterationProfile()
    iteration = 0
    for _ in range(warmup):
        iteration += 1
        run_iteration(iteration)
    for _ in range(iters):
        iteration += 1
        result.iteration_times.append(run_iteration(iteration))
    with torch_profile(activities=[ProfilerActivity.CPU]) as profiler:
        start = time.perf_counter()
        run_iteration(iteration + 1)
        result.profiled_s = time.perf_counter() - start
    events = ((event.key, event.self_cpu_time_total / 1e6, event.count) for event in profiler.key_averages())
    result.seconds, result.calls, result.largest_others = group_operators(events)
    return result


def training_flops(cfg: dict, patch: int, batch: int) -> dict[str, float]:
    """FLOPs of one training iteration by kind of product: the official forward's count at ``patch`` x ``patch``
    times ``batch`` times :data:`TRAINING_FLOPS_PER_FORWARD_FLOP`."""
    by_op = count_flops_by_op(cfg, patch)
    return {kind: TRAINING_FLOPS_PER_FORWARD_FLOP * batch * sum(by_op.get(op, 0.0) for op in ops)
            for kind, ops in FLOP_OPS.items()}


def table(result: IterationProfile, flops: dict[str, float], rate: float | None) -> list[str]:
    """Markdown rows: one per kind of operator, the time outside operators, and the profiled iteration."""
    def row(name: str, calls: str, seconds: float, flop: float) -> str:
        return step_row(name, calls, seconds, flop, total_s=result.profiled_s, rate=rate)

    lines = ['| kind | calls | seconds | share of the iteration | GFLOP | GFLOP/s | % of matmul rate |',
             '|---|---|---|---|---|---|---|']
    for kind in KINDS:
        lines.append(row(kind, str(result.calls[kind]), result.seconds[kind], flops.get(kind, 0.0)))
    lines.append(row('outside operators', '-', result.outside_s, 0.0))
    lines.append(row('**iteration** (profiled)', '1', result.profiled_s, sum(flops.values())))
    return lines


def _count(number: int, noun: str) -> str:
    return f'{number} {noun}{"" if number == 1 else "s"}'


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--variant', default='HAT-S', choices=VARIANTS)
    parser.add_argument('--mode', default=None, choices=MODES,
                        help='official, fp32 or bf16 (HATModel with `amp: bf16`); default: --precision\'s')
    parser.add_argument('--precision', default='fp32', choices=('fp32', 'bf16'), help='our fp32 or bf16 training')
    parser.add_argument('--batch', type=int, default=4)
    parser.add_argument('--patch', type=int, default=48, help='LR patch side (a multiple of 16, default 48)')
    parser.add_argument('--iters', type=int, default=2, help='clocked iterations (default 2)')
    parser.add_argument('--warmup', type=int, default=2, help='untimed iterations first (default 2)')
    parser.add_argument('--threads', type=int, default=torch.get_num_threads())
    parser.add_argument('--out', help='also write the Markdown report to this file')
    args = parser.parse_args(argv)
    if args.iters < 1 or args.warmup < 0 or args.batch < 1:
        parser.error('--iters and --batch must be at least 1, --warmup at least 0')
    if args.patch < 16 or args.patch % 16:
        parser.error('--patch must be a multiple of 16 (the window size)')
    args.mode = args.mode or args.precision
    return args


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device('cpu')
    bf16 = args.mode == 'bf16'
    emulated = bf16 and force_emulated_bf16(device)
    model = build_model(args.variant, args.mode, args.patch, device)
    data = make_batch(args.batch, args.patch, device)
    result = profile_iterations(lambda i: step(model, data, i, device), iters=args.iters, warmup=args.warmup)
    rate = peak_rate('bf16' if bf16 else 'fp32', matmul_rates(device, bf16=bf16))
    flops = training_flops(network_config(args.variant), args.patch, args.batch)
    others = ', '.join(f'{name} {seconds:.3f} s' for name, seconds in result.largest_others)
    lines = [
        f'{args.variant} x4 training iteration ({args.mode}{", bf16 emulated" if emulated else ""}), batch '
        f'{args.batch}, {args.patch}x{args.patch} LR patches, by kind of operator. {machine_line(device)}.',
        '',
        f'torch {torch.__version__}; {_count(args.warmup, "untimed iteration")}, then {args.iters} clocked (median '
        f'{statistics.median(result.iteration_times):.3f} s: '
        f'{", ".join(f"{t:.3f}" for t in result.iteration_times)}), then one under the torch profiler '
        f'({result.profiled_s:.3f} s); random weights; matmul rate 2048x2048 right after: '
        f'{"-" if rate is None else f"{rate:.0f}"} GFLOP/s ({"bf16" if bf16 else "fp32"}); load average (1/5/15 '
        f'min): {load_average()}.',
        '',
        *table(result, flops, rate),
        '',
        f'Largest other operators: {others or "none"}.',
        '',
        'Seconds: self time of the operators in the profiled iteration (the profiler adds some to each call: a '
        'ranking, not a budget). GFLOP: the official computation\'s forward count x batch x 3.',
    ]
    return publish(lines, args.out)


if __name__ == '__main__':
    main()

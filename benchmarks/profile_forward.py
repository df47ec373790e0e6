"""Where one forward of HAT on the CPU spends its time: seconds, FLOPs and GFLOP/s for each kind of step.

    python benchmarks/profile_forward.py                                   # HAT x4 at 128x128, fp32, 3 forwards
    python benchmarks/profile_forward.py --variant HAT-L --size 64 --precision bf16 --out profile.md

What it answers: which step holds the forward below the machine's matrix-product rate (the % column of
``bench_inference.py``), the first thing to know before optimising on a new class of machine.

Method: the functions that do each kind of step are wrapped while the timed forwards run, and a clock is read
around every call (a call made inside another timed call counts for the outer one: ``linear_into`` inside
``fresh_linear``). The torch profiler is no substitute on the CPU: on a Xeon it charged 11-17 ms to layer norms over
a 128x128 map and 22-29 ms to a convolution that take 1 ms and 8-10 ms when timed directly.

Kinds of step:

    attention     ``hat.archs.attention.attention`` as the attention modules call it: the kernel and its mask
    linear        the token-wise products: ``hat.archs.linear.fresh_linear`` and ``linear_into`` (fp32 CPU paths),
                  ``torch.nn.functional.linear`` (everything else)
    convolution   ``nn.Conv2d`` (the CABs, conv_first, conv_after_body, the upsampling head)
    layer norm    ``nn.LayerNorm``
    window moves  ``WindowOrder.take``, ``put`` and ``restore``: the gathers and scatters of the window order
    rest          the forward's time outside all of those: additions, the CAB's GELU and channel weighting, the
                  OCAB's key/value gathers, the pixel shuffle, ...

A second table times the main kernels alone, on one chunk of the shapes the forward gives them (inputs in cache,
median of 10 calls): a step far below its kernel's rate loses time around the kernel (memory, copies), a step near
it is held by the kernel itself.

FLOPs are the official computation's, per kind (``bench_inference.count_flops_by_op``: ``bmm`` is attention,
``addmm`` the linear layers), so that the GFLOP/s match ``bench_inference.py``'s column. Where our fp32 CPU path pads
the heads (30 -> 32 channels, HAT's released variants; for PyTorch's flash kernel, not where oneDNN Graph's kernel
serves), it computes about 7% more in attention, qkv and proj than counted. The matrix-product rate is measured
right after the forwards, as in ``bench_inference.py``.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import hat  # noqa: E402,F401  (compat shim before basicsr)
from benchmarks import bench_inference  # noqa: E402
from benchmarks.bench_inference import (VARIANTS, count_flops_by_op, load_average, machine_line,  # noqa: E402
                                        matmul_rates, median_seconds, network_config, peak_rate, publish,
                                        test_image)
from hat.archs import hat_arch  # noqa: E402
from hat.archs.attention import attention  # noqa: E402
from hat.archs import linear as token_linear  # noqa: E402
from hat.archs.hat_arch import HAT  # noqa: E402
from hat.archs.window import WindowOrder  # noqa: E402

KINDS = ('attention', 'linear', 'convolution', 'layer norm', 'window moves')
# ATen operators of bench_inference.count_flops_by_op, by kind of step
FLOP_OPS = {'attention': ('bmm',), 'linear': ('addmm', 'mm'), 'convolution': ('convolution',)}


class StepClock:
    """Wall time and calls per kind of step, over the calls of functions wrapped by :meth:`wrap`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: Counter = Counter()
        self._inside = False  # a timed call is running: calls it makes count for it

    def wrap(self, kind: str, function: Callable) -> Callable:
        @functools.wraps(function)
        def timed(*args, **kwargs):
            if self._inside:
                return function(*args, **kwargs)
            self._inside = True
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[kind] += time.perf_counter() - start
                self.calls[kind] += 1
                self._inside = False
        return timed


def _call_sites() -> list[tuple[object, str, str]]:
    """(owner, attribute, kind) of every function :func:`timed_steps` wraps."""
    return [
        (hat_arch, 'attention', 'attention'),
        (token_linear, 'fresh_linear', 'linear'),
        (token_linear, 'linear_into', 'linear'),
        (F, 'linear', 'linear'),
        (nn.Conv2d, 'forward', 'convolution'),
        (nn.LayerNorm, 'forward', 'layer norm'),
        (WindowOrder, 'take', 'window moves'),
        (WindowOrder, 'put', 'window moves'),
        (WindowOrder, 'restore', 'window moves'),
    ]


@contextlib.contextmanager
def timed_steps(clock: StepClock) -> Iterator[StepClock]:
    """Inside, the call sites of the kinds of step report to ``clock``; they are put back on leaving."""
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in _call_sites()]
    try:
        for (owner, name, kind), (_, _, function) in zip(_call_sites(), originals):
            setattr(owner, name, clock.wrap(kind, function))
        yield clock
    finally:
        for owner, name, function in originals:
            setattr(owner, name, function)


@dataclass
class StepProfile:
    """What :func:`profile` measured: per kind, seconds and calls per forward (means over the forwards), and the
    forwards' times."""

    seconds: dict[str, float] = field(default_factory=dict)
    calls: dict[str, float] = field(default_factory=dict)
    forward_times: list[float] = field(default_factory=list)

    @property
    def forward_s(self) -> float:
        return statistics.fmean(self.forward_times)

    @property
    def rest_s(self) -> float:
        """The forward's time outside the timed kinds of step."""
        return self.forward_s - sum(self.seconds.values())


def profile(net: nn.Module, x: torch.Tensor, *, repeats: int = 3, bf16: bool = False) -> StepProfile:
    """Time ``repeats`` forwards of ``net`` (eval mode, no autograd; bf16 autocast with ``bf16``) on ``x``
    [B, 3, H, W] after one untimed forward, by kind of step."""
    clock = StepClock()
    result = StepProfile()

    def forward() -> torch.Tensor:
        with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16,
                                             cache_enabled=bench_inference.AUTOCAST_CACHE):
            return net(x)

    forward()
    with timed_steps(clock):
        for _ in range(repeats):
            start = time.perf_counter()
            forward()
            result.forward_times.append(time.perf_counter() - start)
    result.seconds = {kind: clock.seconds[kind] / repeats for kind in KINDS}
    result.calls = {kind: clock.calls[kind] / repeats for kind in KINDS}
    return result


def kernel_rates(net: HAT, size: int, *, bf16: bool = False, repeats: int = 10) -> list[tuple[str, str, float]]:
    """(kernel, shape, GFLOP/s) of the main kernels of ``net``'s forward alone, through the model's own code paths,
    on one chunk of :data:`~hat.archs.linear.ROW_CHUNK` tokens (the CAB's convolutions on a ``size`` x ``size``
    map), with the official computation's FLOPs (head size as released).

    Attention comes three times: the HAB's windows, the OCAB's (keys from the enlarged windows), and the HAB's two
    products alone (``bmm``, no mask or softmax between them): how far the softmax holds the kernel below the
    products' own rate, the first question about attention on a new class of machine.
    """
    block = next(m for m in net.modules() if isinstance(m, hat_arch.HAB))
    ocab = next(m for m in net.modules() if isinstance(m, hat_arch.OCAB))
    attn, mlp, cab = block.attn, block.mlp, block.conv_block.cab
    channels, heads, n = attn.dim, attn.num_heads, attn.window_size ** 2
    n_keys = ocab.overlap_win_size ** 2
    rows = max(n, token_linear.ROW_CHUNK // n * n)  # whole windows, as the forward's chunks
    windows = rows // n
    hidden, squeezed = mlp.fc1.out_features, cab[0].out_channels
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(rows, channels, generator=generator)
    feature_map = torch.randn(1, channels, size, size, generator=generator).contiguous(
        memory_format=torch.channels_last)
    rpi = net.relative_position_index_SA

    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16,
                                         cache_enabled=bench_inference.AUTOCAST_CACHE):
        qkv, head_dim = attn.project_qkv(tokens)
        q, k, v = qkv.view(-1, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        bias = attn.gathered_bias(rpi, n, n)
        attended = attention(q, k, v, bias, scale=attn.scale, fused=True)
        # The OCAB's keys and values: as many windows, each of the enlarged window's tokens (in q's dtype: bf16 under
        # autocast, as the OCAB's projection gives them).
        k_wide, v_wide = (torch.randn(windows, heads, n_keys, head_dim, generator=generator).to(q.dtype)
                          for _ in range(2))
        bias_wide = ocab.gathered_bias(net.relative_position_index_OCA, n, n_keys)
        # The products alone, on the layout the kernels get (windows and heads folded into the batch).
        q_fold, v_fold = (t.reshape(-1, n, head_dim) for t in (q, v))
        k_fold_t = k.reshape(-1, n, head_dim).transpose(1, 2)
        logits = torch.bmm(q_fold, k_fold_t)
        attended_rows = attended.transpose(1, 2).reshape(rows, heads * head_dim)
        hidden_rows = mlp.fc1.forward_gelu(tokens)
        squeezed_map = cab[0](feature_map)
        kernels = [
            ('qkv', f'[{rows}, {channels}] x [{channels}, {3 * channels}]', lambda: attn.project_qkv(tokens),
             2 * rows * channels * 3 * channels),
            ('attention', f'{windows} windows x {heads} heads, {n} tokens',
             lambda: attention(q, k, v, bias, scale=attn.scale, fused=True), 4 * windows * n * n * channels),
            ('attention, products alone', f'{windows} windows x {heads} heads, {n} tokens, no softmax',
             lambda: torch.bmm(torch.bmm(q_fold, k_fold_t, out=logits), v_fold), 4 * windows * n * n * channels),
            ('OCAB attention', f'{windows} windows x {heads} heads, {n} x {n_keys} tokens',
             lambda: attention(q, k_wide, v_wide, bias_wide, scale=ocab.scale, fused=True),
             4 * windows * n * n_keys * channels),
            ('proj', f'[{rows}, {channels}] x [{channels}, {channels}]', lambda: attn.project_out(attended_rows),
             2 * rows * channels * channels),
            ('fc1 + GELU', f'[{rows}, {channels}] x [{channels}, {hidden}]', lambda: mlp.fc1.forward_gelu(tokens),
             2 * rows * channels * hidden),
            ('fc2', f'[{rows}, {hidden}] x [{hidden}, {channels}]', lambda: mlp.fc2(hidden_rows),
             2 * rows * channels * hidden),
            ('CAB conv 3x3', f'{channels} -> {squeezed} channels, {size}x{size}', lambda: cab[0](feature_map),
             2 * size * size * 9 * channels * squeezed),
            ('CAB conv 3x3', f'{squeezed} -> {channels} channels, {size}x{size}', lambda: cab[2](squeezed_map),
             2 * size * size * 9 * channels * squeezed),
        ]
        cpu = torch.device('cpu')
        return [(name, shape, flops / median_seconds(call, cpu, repeats=repeats, warmup=2) / 1e9)
                for name, shape, call, flops in kernels]


def kernel_table(rates: list[tuple[str, str, float]], rate: float | None) -> list[str]:
    """Markdown rows of :func:`kernel_rates`."""
    lines = ['| kernel alone | shape | GFLOP/s | % of matmul rate |', '|---|---|---|---|']
    for name, shape, speed in rates:
        of_rate = '-' if not rate else f'{100 * speed / rate:.0f}%'
        lines.append(f'| {name} | {shape} | {speed:.0f} | {of_rate} |')
    return lines


def flops_by_kind(flops_by_op: dict[str, float]) -> dict[str, float]:
    """FLOPs per kind of step from :func:`~benchmarks.bench_inference.count_flops_by_op`'s operators."""
    by_kind = {kind: sum(flops_by_op.get(op, 0.0) for op in ops) for kind, ops in FLOP_OPS.items()}
    counted = {op for ops in FLOP_OPS.values() for op in ops}
    by_kind['rest'] = sum(flops for op, flops in flops_by_op.items() if op not in counted)
    return by_kind


def step_row(name: str, calls: str, seconds: float, flop: float, *, total_s: float, rate: float | None) -> str:
    """One Markdown row of a time breakdown: name, calls, seconds, share of ``total_s``, GFLOP, GFLOP/s and % of the
    matrix-product ``rate`` (``-`` where there are no FLOPs or no rate)."""
    share = seconds / total_s if total_s > 0 else 0.0
    speed = flop / seconds / 1e9 if flop and seconds > 0 else None
    gflops = '-' if speed is None else f'{speed:.0f}'
    of_rate = '-' if speed is None or not rate else f'{100 * speed / rate:.0f}%'
    return f'| {name} | {calls} | {seconds:.3f} | {100 * share:.0f}% | {flop / 1e9:.1f} | {gflops} | {of_rate} |'


def table(result: StepProfile, flops: dict[str, float], rate: float | None) -> list[str]:
    """Markdown rows: one per kind of step, the rest, and the whole forward."""
    def row(name: str, calls: str, seconds: float, flop: float) -> str:
        return step_row(name, calls, seconds, flop, total_s=result.forward_s, rate=rate)

    lines = ['| step | calls per forward | seconds per forward | share of the forward | GFLOP | GFLOP/s | '
             '% of matmul rate |', '|---|---|---|---|---|---|---|']
    for kind in KINDS:
        lines.append(row(kind, f'{result.calls[kind]:.0f}', result.seconds[kind], flops.get(kind, 0.0)))
    lines.append(row('rest', '-', result.rest_s, flops.get('rest', 0.0)))
    lines.append(row('**forward**', '1', result.forward_s, sum(flops.values())))
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--variant', default='HAT', choices=VARIANTS)
    parser.add_argument('--scale', type=int, default=4, choices=(2, 3, 4))
    parser.add_argument('--size', type=int, default=128, help='LR size in pixels (square input)')
    parser.add_argument('--precision', default='fp32', choices=('fp32', 'bf16'),
                        help='bf16: under bf16 autocast, as `val: {amp: bf16}` runs')
    parser.add_argument('--repeats', type=int, default=3, help='timed forwards (after one untimed)')
    parser.add_argument('--threads', type=int, default=torch.get_num_threads())
    parser.add_argument('--out', help='also write the Markdown report to this file')
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.size < 1:
        parser.error('--repeats and --size must be at least 1')
    return args


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device('cpu')
    cfg = network_config(args.variant, args.scale)
    torch.manual_seed(0)
    net = HAT(**cfg).eval()
    bf16 = args.precision == 'bf16'
    result = profile(net, test_image(args.size), repeats=args.repeats, bf16=bf16)
    kernels = kernel_rates(net, args.size, bf16=bf16)
    rates = matmul_rates(device, bf16=bf16)
    rate = peak_rate('bf16' if bf16 else 'fp32', rates)
    flops = flops_by_kind(count_flops_by_op(cfg, args.size))
    lines = [
        f'{args.variant} x{args.scale} forward at {args.size}x{args.size}, {args.precision}, by kind of step. '
        f'{machine_line(device)}.',
        '',
        f'torch {torch.__version__}; mean of {args.repeats} forwards after one untimed (forward times '
        f'{", ".join(f"{t:.3f}" for t in result.forward_times)} s); random weights; matmul rate 2048x2048 right '
        f'after: {"-" if rate is None else f"{rate:.0f}"} GFLOP/s ({args.precision}); load average (1/5/15 min): '
        f'{load_average()}.',
        '',
        *table(result, flops, rate),
        '',
        *kernel_table(kernels, rate),
        '',
        'GFLOP: the official computation\'s count (head size as released); the fp32 CPU path pads heads of 30 to 32 '
        'for PyTorch\'s flash kernel (not where oneDNN Graph\'s kernel serves fp32). fc2 runs alone into a new tensor; '
        'in the forward it adds into the residual stream.',
    ]
    return publish(lines, args.out)


if __name__ == '__main__':
    main()

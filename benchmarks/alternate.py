"""Whether a setting makes HAT faster: two settings of module constants, alternated run by run.

    python benchmarks/alternate.py --set hat.archs.attention.LOGITS_CHUNK_ELEMENTS=1048576
    python benchmarks/alternate.py --task train --variant HAT-S --batch 4 --patch 48 --precision bf16 \\
        --set hat.archs.attention.LOGITS_CHUNK_ELEMENTS=524288 --rounds 14

On a shared or virtual machine the speed moves by 10-20% from one minute to the next, more than most single
changes make, and a kernel timed alone on data that stays in cache has been no guide to the whole forward. Here one
model runs one input with setting A (the constants as they are) and setting B (``--set``) in turn: each round times
one run of each, A first in even rounds and B first in odd ones, and the ratio of the two runs of a round cancels
most of the machine's drift. The report gives each setting's median, the rounds' ratios A/B and their median (above
1: B is faster), how many rounds B won and a 90% interval of the median ratio from the rounds' order statistics (the
sign test's: no assumption on how the machine's noise is distributed), which says whether the rounds show a
difference at all, and for inference the largest difference between the two outputs.

A run is one forward without autograd (``--task inference``, fp32 or under bf16 autocast, random weights, the
benchmark image of bench_inference) or one training iteration of HATModel (``--task train``, as bench_train's fp32
and bf16 modes: forward, L1 loss, backward, Adam, EMA). ``--set`` takes any module-level constant whose value is a
number, a boolean or a string, read at call time (``LOGITS_CHUNK_ELEMENTS``, ``ROW_CHUNK``,
``RECONSTRUCTION_BAND``, ...); it may be given several times.

``--env NAME=VALUE`` (repeatable) puts an environment variable into B, for what a process reads once at its start
(``THP_MEM_ALLOC_ENABLE``, ``OMP_WAIT_POLICY``, ``MALLOC_*``): A and B then each run in a worker process of their own
(:mod:`benchmarks.workers`), B's with the variables and the ``--set`` constants, and are stepped in turn as above.
Two identical workers gave round ratios of 0.89-1.03 (median 1.00; HAT-S bf16 training on a Zen 4).
``--processes`` does the same for ``--set`` alone: then neither setting shares a model, a heap or caches with the
other (each worker checks that it sees the constants of its setting). Two processes can also differ in speed by
5-10% for a whole run (HAT x4 fp32 inference on a Zen 4: three comparisons of attention chunk sizes in one hour gave
medians that contradicted each other, where the same comparisons in one process agreed), so for a constant read at
call time the comparison in one process is the one to trust. ``--fresh-processes`` starts a new pair of workers for
each round (each warmed up by ``--warmup`` runs): slower, but no one process's speed weighs on every round, and each
round's pair starts from a fresh heap, as a user's process does. That is the comparison for what depends on the
state of the C library's heap, which one shared process hides (both settings then find the blocks the other freed:
HAT's attention calls with and without :data:`hat.archs.hat_arch.CALL_BUFFER_BYTES`: 0 page faults either way in
one process, 17K against 263K per forward in fresh ones).
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import itertools
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import bench_inference, bench_train  # noqa: E402
from benchmarks.workers import WorkerPool, serve  # noqa: E402

TASKS = ('inference', 'train')
PRECISIONS = ('fp32', 'bf16')


class Setting(NamedTuple):
    """One ``--set``: ``module.NAME = value``."""
    module: object
    name: str
    value: object


def parse_setting(text: str) -> Setting:
    """``'package.module.NAME=VALUE'`` -> :class:`Setting`; VALUE is a Python literal of the constant's type.

    Raises:
        ValueError: not of that form, no such module or constant, or a value of another type.
    """
    target, sep, literal = text.partition('=')
    module_name, dot, name = target.strip().rpartition('.')
    if not sep or not dot or not name:
        raise ValueError(f'--set {text!r}: expected package.module.NAME=VALUE, e.g. '
                         'hat.archs.attention.LOGITS_CHUNK_ELEMENTS=1048576')
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f'--set {text!r}: cannot import {module_name!r} ({error})') from None
    if not hasattr(module, name):
        constants = sorted(n for n, v in vars(module).items() if n.isupper() and isinstance(v, (bool, int, float, str)))
        raise ValueError(f'--set {text!r}: {module_name} has no {name!r}; its constants: {", ".join(constants)}')
    current = getattr(module, name)
    try:
        value = ast.literal_eval(literal.strip())
    except (ValueError, SyntaxError):
        value = literal.strip()  # a bare word: a string
    if not isinstance(current, (bool, int, float, str)) or type(value) is not type(current):
        if not (type(current) is float and type(value) is int):
            raise ValueError(f'--set {text!r}: {name} is {current!r} ({type(current).__name__}); give a value of '
                             'that type')
        value = float(value)
    return Setting(module, name, value)


@contextlib.contextmanager
def applied(settings: Sequence[Setting]) -> Iterator[None]:
    """The settings in force inside the block, the previous values restored after it (also on an error)."""
    previous = [getattr(s.module, s.name) for s in settings]
    try:
        for s in settings:
            setattr(s.module, s.name, s.value)
        yield
    finally:
        for s, value in zip(settings, previous):
            setattr(s.module, s.name, value)


def inference_run(variant: str, size: int, precision: str, device: torch.device) -> Callable[[], torch.Tensor]:
    """One forward of a variant x4 (random weights) on bench_inference's image [1, 3, size, size]."""
    torch.manual_seed(0)
    forward = bench_inference.build(precision, bench_inference.network_config(variant), None, device)
    image = bench_inference.test_image(size).to(device)
    return lambda: forward(image).float()


def training_run(variant: str, batch: int, patch: int, precision: str,
                 device: torch.device) -> Callable[[], None]:
    """One training iteration of HATModel as bench_train's fp32 or bf16 mode (batch x 3 x patch x patch LR)."""
    if precision == 'bf16':
        bench_train.force_emulated_bf16(device)
    model = bench_train.build_model(variant, precision, patch, device)
    data = bench_train.make_batch(batch, patch, device)
    iterations = itertools.count(1)

    def run() -> None:
        bench_train.step(model, data, next(iterations), device)

    return run


def alternate(run: Callable[[], object], settings: Sequence[Setting], rounds: int, device: torch.device,
              clock: Callable[[], float] = time.perf_counter) -> tuple[list[float], list[float], list]:
    """Time ``run`` with the constants as they are (A) and with ``settings`` (B), alternately.

    Returns:
        (seconds of A per round, seconds of B per round, [output of A, output of B] of the last round).
    """
    times = {'A': [], 'B': []}
    outputs = {}
    for r in range(rounds):
        for label in ('A', 'B') if r % 2 == 0 else ('B', 'A'):
            with applied(settings if label == 'B' else ()):
                bench_inference.synchronize(device)
                start = clock()
                outputs[label] = run()
                bench_inference.synchronize(device)
                times[label].append(clock() - start)
    return times['A'], times['B'], [outputs.get('A'), outputs.get('B')]


def parse_env(text: str) -> tuple[str, str]:
    """``'NAME=VALUE'`` -> (NAME, VALUE). Raises ValueError when there is no ``=`` or no name."""
    name, sep, value = text.partition('=')
    if not sep or not name.strip():
        raise ValueError(f'--env {text!r}: expected NAME=VALUE, e.g. THP_MEM_ALLOC_ENABLE=1')
    return name.strip(), value


def make_run(args: argparse.Namespace, device: torch.device) -> Callable[[], object]:
    """One run of the task (see the module doc)."""
    if args.task == 'inference':
        return inference_run(args.variant, args.size, args.precision, device)
    return training_run(args.variant, args.batch, args.patch, args.precision, device)


def run_worker(spec: dict) -> tuple:
    """Runs in a worker process (``--worker``): the task of the driver's arguments ``spec['argv']``, with the
    ``--set`` constants in force for good when ``spec['setting'] == 'B'``, warmed up; then each request is one timed
    run, whose output (inference) is saved to ``request['output_file']`` when the request names one. The ready
    reply says what the worker sees of the ``--set`` constants and the ``--env`` variables."""
    args = parse_args(spec['argv'])
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if spec['setting'] == 'B':
        for setting in args.settings:
            setattr(setting.module, setting.name, setting.value)
    run = make_run(args, device)
    for _ in range(args.warmup):
        run()

    def timed(request: dict) -> dict:
        bench_inference.synchronize(device)
        start = time.perf_counter()
        output = run()
        bench_inference.synchronize(device)
        seconds = time.perf_counter() - start
        if request.get('output_file') and output is not None:
            torch.save(output.cpu(), request['output_file'])
        return {'seconds': seconds}

    seen = {'constants': {f'{s.module.__name__}.{s.name}': getattr(s.module, s.name) for s in args.settings},
            'environment': {name: os.environ.get(name) for name, _ in args.env}}
    return timed, seen


def alternate_processes(argv: Sequence[str], env: dict[str, str], rounds: int, settings: Sequence[Setting] = (),
                        *, fresh: bool = False) -> tuple[list[float], list[float], list]:
    """As :func:`alternate`, with A and B each in a worker process (B's environment with ``env``). ``argv``: the
    driver's arguments, for the workers to rebuild the task from; ``settings``: its ``--set`` constants, which each
    worker must see as its setting says (B: set; A: as the driver has them). ``fresh``: a new pair of workers for
    each round (``--fresh-processes``), else one pair for all rounds."""
    base_env = dict(os.environ)
    specs = {label: {'argv': list(argv), 'setting': label} for label in ('A', 'B')}
    environments = {'A': base_env, 'B': {**base_env, **env}}
    times, outputs = {'A': [], 'B': []}, {}
    pools_rounds = [range(r, r + 1) for r in range(rounds)] if fresh else [range(rounds)]
    with tempfile.TemporaryDirectory() as folder:
        for pool_rounds in pools_rounds:
            with WorkerPool(__file__, specs, environments) as pool:
                _check_workers(pool, env, settings)
                for r in pool_rounds:
                    for label in ('A', 'B') if r % 2 == 0 else ('B', 'A'):
                        output_file = os.path.join(folder, f'{label}.pt') if r == rounds - 1 else None
                        answer = pool.request(label, {'output_file': output_file})
                        if answer is None:
                            raise RuntimeError(f'setting {label} failed: {pool.errors[label]}')
                        times[label].append(answer['seconds'])
                        if output_file and os.path.exists(output_file):
                            outputs[label] = torch.load(output_file)
    return times['A'], times['B'], [outputs.get('A'), outputs.get('B')]


def _check_workers(pool: WorkerPool, env: dict[str, str], settings: Sequence[Setting]) -> None:
    """Stop unless both workers started and each sees the variables and constants of its setting."""
    if pool.errors:
        raise RuntimeError('could not start: ' + '; '.join(f'setting {label}: {error}'
                                                           for label, error in pool.errors.items()))
    for label, ready in pool.ready.items():
        expected = {name: (value if label == 'B' else os.environ.get(name)) for name, value in env.items()}
        if ready['environment'] != expected:  # the worker says what it sees: the variables arrived, or stop
            raise RuntimeError(f'setting {label}: its process sees {ready["environment"]}, not {expected}')
        constants = {f'{s.module.__name__}.{s.name}': (s.value if label == 'B' else getattr(s.module, s.name))
                     for s in settings}
        if ready['constants'] != constants:
            raise RuntimeError(f'setting {label}: its process sees {ready["constants"]}, not {constants}')


def median_interval(ratios: Sequence[float], coverage: float = 0.9) -> tuple[float, float] | None:
    """A distribution-free interval that holds the median of the rounds' ratio with at least ``coverage``
    probability: the k-th smallest and k-th largest ratio for the largest k where the binomial distribution of the
    rounds above the median allows it (the sign test's interval; the rounds taken as independent). None when there
    are too few rounds (fewer than 5 for 90%)."""
    ordered, n = sorted(ratios), len(ratios)
    best = None
    for k in range(1, n // 2 + 1):
        below = sum(math.comb(n, i) for i in range(k)) / 2**n  # P(fewer than k rounds below the median)
        if 1 - 2 * below < coverage:
            break
        best = (ordered[k - 1], ordered[n - k])
    return best


def ratio_evidence(ratios: Sequence[float]) -> str:
    """How many rounds B won and whether the rounds show a difference: the 90% interval of :func:`median_interval`
    and whether it excludes 1."""
    wins = sum(r > 1 for r in ratios)
    said = f'B faster in {wins} of {len(ratios)} rounds'
    interval = median_interval(ratios)
    if interval is None:
        return said + '; too few rounds for a 90% interval of the median ratio.'
    low, high = interval
    if low > 1:
        conclusion = 'B is faster'
    elif high < 1:
        conclusion = 'A is faster'
    else:
        conclusion = 'no difference shown'
    return f'{said}; median ratio within {low:.3f}-{high:.3f} with 90% confidence: {conclusion}.'


def report(args: argparse.Namespace, a: Sequence[float], b: Sequence[float], outputs: Sequence,
           device: torch.device) -> list[str]:
    ratios = [x / y for x, y in zip(a, b)]
    what = (f'{args.variant} x4 forward at {args.size}x{args.size}' if args.task == 'inference'
            else f'{args.variant} training iteration, batch {args.batch}, LR patch {args.patch}x{args.patch}')
    changed = ', '.join([f'{s.module.__name__}.{s.name} = {s.value!r}' for s in args.settings]
                        + [f'environment {name}={value}' for name, value in args.env])
    if args.fresh_processes:
        changed += ' (A and B each in a process of its own, a new pair for each round)'
    elif args.env or args.processes:
        changed += ' (A and B each in a process of its own)'
    lines = [f'{what}, {args.precision}. {bench_inference.machine_line(device)}.', '',
             f'A: the constants as they are; B: {changed}. {len(a)} rounds after {args.warmup} warm-up run(s) of '
             'each; load average ' + bench_inference.load_average() + '.', '',
             '| round | A s | B s | A / B |', '|---|---|---|---|']
    lines += [f'| {i + 1} | {x:.3f} | {y:.3f} | {r:.3f} |' for i, (x, y, r) in enumerate(zip(a, b, ratios))]
    lines += [f'| **median** | {statistics.median(a):.3f} | {statistics.median(b):.3f} | '
              f'**{statistics.median(ratios):.3f}** |', '']
    verdict = (f'Median ratio {statistics.median(ratios):.3f} (rounds {min(ratios):.3f}-{max(ratios):.3f}): '
               f'above 1, B is faster. {ratio_evidence(ratios)}')
    if args.task == 'inference' and all(o is not None for o in outputs):
        verdict += f' Largest difference between the outputs of A and B: {(outputs[0] - outputs[1]).abs().max():.2e}.'
    return lines + [verdict]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument('--set', dest='settings', action='append', default=[], metavar='MODULE.NAME=VALUE',
                        help='setting B (repeatable)')
    parser.add_argument('--env', action='append', default=[], metavar='NAME=VALUE',
                        help='an environment variable of B (repeatable; A and B then run in processes of their own)')
    parser.add_argument('--processes', action='store_true',
                        help='A and B each in a process of its own (always so with --env)')
    parser.add_argument('--fresh-processes', action='store_true',
                        help='as --processes, with a new pair of processes for each round')
    parser.add_argument('--worker', help=argparse.SUPPRESS)
    parser.add_argument('--task', choices=TASKS, default='inference')
    parser.add_argument('--variant', choices=bench_inference.VARIANTS, default='HAT')
    parser.add_argument('--precision', choices=PRECISIONS, default='fp32')
    parser.add_argument('--size', type=int, default=128, help='inference: LR side in pixels (default 128)')
    parser.add_argument('--batch', type=int, default=4, help='train: batch (default 4)')
    parser.add_argument('--patch', type=int, default=48, help='train: LR patch side, a multiple of 16 (default 48)')
    parser.add_argument('--rounds', type=int, default=8)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--threads', type=int, default=torch.get_num_threads())
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--out', help='also write the Markdown report to this file')
    args = parser.parse_args(argv)
    if not args.settings and not args.env and not args.worker:
        parser.error('give setting B: --set MODULE.NAME=VALUE and/or --env NAME=VALUE')
    try:
        args.settings = [parse_setting(text) for text in args.settings]
        args.env = [parse_env(text) for text in args.env]
    except ValueError as error:
        parser.error(str(error))
    if args.rounds < 1 or args.warmup < 0:
        parser.error('--rounds must be at least 1 and --warmup at least 0')
    if args.task == 'train' and args.patch % 16:
        parser.error('--patch must be a multiple of 16 (the window size of the released variants)')
    return args


def main(argv: list[str] | None = None) -> str:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        serve(lambda: run_worker(spec))
        return ''
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.env or args.processes or args.fresh_processes:
        a, b, outputs = alternate_processes(argv, dict(args.env), args.rounds, args.settings,
                                            fresh=args.fresh_processes)
        return bench_inference.publish(report(args, a, b, outputs, device), args.out)
    run = make_run(args, device)
    if args.warmup:
        alternate(run, args.settings, args.warmup, device)
    a, b, outputs = alternate(run, args.settings, args.rounds, device)
    return bench_inference.publish(report(args, a, b, outputs, device), args.out)


if __name__ == '__main__':
    main()

"""CPU speed of an exported HAT on ONNX Runtime against the eager PyTorch network, both fp32.

    python benchmarks/bench_onnx.py --quick                   # HAT x4 at 64x64 and 128x128, 3 rounds
    python benchmarks/bench_onnx.py --variant HAT-S --sizes 64,128,256 --repeats 7 --out onnx_speed.md
    python benchmarks/bench_onnx.py --quick --save hat_x4.onnx   # keep the exported file ...
    python benchmarks/bench_onnx.py --quick --onnx hat_x4.onnx   # ... and time it again without exporting

The network is a released variant's architecture (``--variant``, ``--scale``; from the golden manifests) with random
weights (its own initialisation, seeded); speed does not depend on the values. Without ``--onnx`` it is exported
first with :func:`hat.export.export_network` (checked against PyTorch as every export is), which takes minutes for
the full-depth variants; the export time is reported. ``--onnx`` reuses a file this script saved (``--save``) with
the same variant, scale and seed, so that the two paths still compute the same function.

Method: both run with the same number of threads (``--threads``, default torch's). Each path runs ``--warmup``
times untimed, then ``--repeats`` rounds in which the two run one after the other (interleaved, so that a change of
machine load hits both alike); the table gives the median and the fastest round, and the largest absolute
difference between the two outputs. Inputs are smooth synthetic images of ``size`` x ``size``; sizes that are not a
multiple of the window are padded inside both.

The table header names the CPU (model, torch's CPU capability, whether bf16 is native: AVX512-BF16/AMX) and the
load average at the end of the run, since other work on the machine changes the figures.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import hat  # noqa: E402,F401  (compat shim before basicsr)
from benchmarks.bench_inference import load_average, network_config, publish, test_image  # noqa: E402
from hat.archs.hat_arch import HAT  # noqa: E402
from hat.inference.precision import cpu_description  # noqa: E402

QUICK = {'sizes': '64,128', 'repeats': 3, 'warmup': 1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--variant', default='HAT', choices=('HAT-S', 'HAT', 'HAT-L'))
    parser.add_argument('--scale', type=int, default=4, choices=(2, 3, 4))
    parser.add_argument('--sizes', default='64,128', help='comma-separated input sides (default 64,128)')
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--threads', type=int, default=None, help='threads of both (default: torch\'s)')
    parser.add_argument('--onnx', type=Path, default=None,
                        help='time this file instead of exporting (saved by --save with the same variant/scale/seed)')
    parser.add_argument('--save', type=Path, default=None, help='keep the exported file at this path')
    parser.add_argument('--quick', action='store_true', help=f'{QUICK}')
    parser.add_argument('--out', default=None, help='also write the Markdown report to this file')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    try:
        args.sizes = [int(s) for s in str(args.sizes).split(',') if s.strip()]
    except ValueError:
        parser.error(f'--sizes {args.sizes}: give comma-separated integers, e.g. 64,128')
    if not args.sizes or min(args.sizes) < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error('--sizes must be positive, --repeats at least 1, --warmup at least 0')
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import onnxruntime as ort

    from hat.export import export_network

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    torch.manual_seed(args.seed)
    net = HAT(**network_config(args.variant, args.scale)).eval()

    with tempfile.TemporaryDirectory() as scratch:
        export_s = None
        path = args.onnx
        if path is None:
            path = args.save or Path(scratch) / f'{args.variant}_SRx{args.scale}.onnx'
            start = time.perf_counter()
            export_network(net, path)
            export_s = time.perf_counter() - start
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(os.fspath(path), options, providers=['CPUExecutionProvider'])

        rows = []
        for size in args.sizes:
            x = test_image(size)

            def eager(x=x) -> np.ndarray:
                with torch.no_grad():
                    return net(x).numpy()

            def onnx(x=x) -> np.ndarray:
                return session.run(['output'], {'input': x.numpy()})[0]

            paths = {'eager': eager, 'onnx': onnx}
            outputs = {}
            for name, run in paths.items():
                for _ in range(args.warmup):
                    outputs[name] = run()
            times: dict[str, list[float]] = {name: [] for name in paths}
            for _ in range(args.repeats):
                for name, run in paths.items():  # interleaved rounds
                    start = time.perf_counter()
                    outputs[name] = run()
                    times[name].append(time.perf_counter() - start)
            diff = float(np.abs(outputs['onnx'] - outputs['eager']).max())
            rows.append((size, times, diff))
            print(f'  {size}x{size}: eager {statistics.median(times["eager"]):.3f} s, onnxruntime '
                  f'{statistics.median(times["onnx"]):.3f} s', file=sys.stderr)

    lines = [
        f'### ONNX Runtime against eager PyTorch: {args.variant} x{args.scale}, fp32, random weights',
        '',
        f'CPU: {cpu_description()}; torch {torch.__version__}, onnxruntime {ort.__version__} '
        f'(CPUExecutionProvider, {threads} intra-op threads); load average at the end {load_average()}.',
        f'Median of {args.repeats} interleaved rounds (fastest in brackets), after {args.warmup} warm-up run(s).' +
        (f' Export (trace, translate, check) took {export_s:.0f} s.' if export_s is not None else ''),
        '',
        '| input | eager PyTorch (s) | ONNX Runtime (s) | ONNX Runtime / eager | max abs diff |',
        '|---|---|---|---|---|',
    ]
    for size, times, diff in rows:
        eager_s, onnx_s = statistics.median(times['eager']), statistics.median(times['onnx'])
        lines.append(f'| {size}x{size} | {eager_s:.3f} ({min(times["eager"]):.3f}) | {onnx_s:.3f} '
                     f'({min(times["onnx"]):.3f}) | {onnx_s / eager_s:.2f} | {diff:.1e} |')
    publish(lines, args.out)
    return 0


if __name__ == '__main__':
    sys.exit(main())

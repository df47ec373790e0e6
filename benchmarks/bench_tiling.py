"""Peak memory and time of tiled inference (hat-upscale's Upscaler) for several tile sizes, with the --tile auto model.

    python benchmarks/bench_tiling.py                                   # HAT x4, random weights, 128x128 LR, CPU
    python benchmarks/bench_tiling.py --variant HAT-L --size 512 --device cuda --precision bf16
    python benchmarks/bench_tiling.py -m experiments/pretrained_models/HAT_SRx4.pth --tiles 0 256 128 64

For each tile size (0: the whole image) the whole image is upscaled once after a warm-up, and the table gives the
device's peak memory above what the weights take (CUDA: the caching allocator's peak; elsewhere the peak of the bytes
held by tensors, :class:`hat.inference.memory.TensorPeakMemory`, which on the CPU includes the host output canvas), the
part
of it that the output canvas takes (CPU, tiled), the memory model's estimate for one tile of that size, and the wall
time. Weights are random unless ``-m`` is given:
memory and time do not depend on their values.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ''):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hat  # noqa: E402,F401  (compat shim and registries before anything from basicsr)
from hat.archs.detect import RELEASED_HAT_SHARED, RELEASED_HAT_VARIANTS  # noqa: E402
from hat.archs.hat_arch import HAT  # noqa: E402
from hat.archs.detect import build_from_checkpoint  # noqa: E402
from hat.inference.memory import measure_peak_memory  # noqa: E402
from hat.inference.upscaler import Upscaler  # noqa: E402


def build(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    if args.model:
        return build_from_checkpoint(args.model, device=device)
    kwargs = dict(RELEASED_HAT_SHARED, **RELEASED_HAT_VARIANTS[args.variant], upscale=args.scale, img_size=64)
    return HAT(**kwargs).to(device).eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('-m', '--model', type=Path, default=None, help='checkpoint (default: random weights)')
    parser.add_argument('--variant', choices=tuple(RELEASED_HAT_VARIANTS), default='HAT')
    parser.add_argument('--scale', type=int, default=4)
    parser.add_argument('--size', type=int, default=128, help='side of the square LR test image')
    parser.add_argument('--tiles', type=int, nargs='+', default=[0, 96, 64, 32], help='tile sides; 0: whole image')
    parser.add_argument('--tile-pad', type=int, default=16)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--precision', choices=('fp32', 'bf16', 'fp16'), default='fp32')
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    net = build(args, device)
    known = [*net.parameters(), *net.buffers()]
    image = np.random.default_rng(0).random((args.size, args.size, 3), dtype=np.float32)
    model = Upscaler(net, device=device, precision=args.precision, progress=False).memory_model()

    print(f'{type(net).__name__} x{net.upscale} on {device} ({args.precision}), {args.size}x{args.size} LR input')
    # The tiled output is blended into a canvas (and a one-channel weight sum) on the host: on the CPU it is part of
    # the peak; on CUDA it is not. Whole images have no canvas: the network's output is the result.
    canvas = (args.size * net.upscale)**2 * 4 * (3 + 1) if device.type == 'cpu' else 0
    print('| tile | peak memory (MiB) | of which output canvas (MiB) | model estimate for one tile (MiB) | time (s) |')
    print('|---:|---:|---:|---:|---:|')
    for tile in args.tiles:
        upscaler = Upscaler(net, device=device, precision=args.precision, tile=tile or None, tile_pad=args.tile_pad,
                            progress=False)
        side = tile or args.size
        upscaler.upscale(image[:side, :side])  # warm-up (kernels, caches)
        start = time.perf_counter()
        peak = measure_peak_memory(lambda: upscaler.upscale(image), device=device, known=known)  # noqa: B023
        seconds = time.perf_counter() - start
        tiled_canvas = canvas if tile and tile < args.size else 0
        print(f'| {tile or "whole"} | {peak / 2**20:.1f} | {tiled_canvas / 2**20:.1f} | '
              f'{model.peak(side, side) / 2**20:.1f} | {seconds:.2f} |')


if __name__ == '__main__':
    main()

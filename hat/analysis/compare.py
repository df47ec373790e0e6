"""LAM of several models on one image and window, in one figure: the LR image with the window, then each model's
attribution map with its diffusion index (the comparison figure of the HAT paper, e.g. EDSR, RCAN, SwinIR, HAT).

Writes ``DIR/compare.png``, ``DIR/compare.json`` and, per model, the files of :mod:`hat.analysis.lam` in
``DIR/<name>/`` (the caption, with characters unsafe in a folder name replaced by ``_``).
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from hat.analysis import render
from hat.analysis.lam import USER_ERRORS, add_lam_arguments, run_lam

logger = logging.getLogger(__name__)


def model_names(models: Sequence[str], names: Sequence[str] | None) -> list[str]:
    """Captions: ``names`` when given, else the file stems, made unique with a suffix."""
    if names is not None:
        if len(names) != len(models):
            raise ValueError(f'--names gives {len(names)} names for {len(models)} models.')
        chosen = list(names)
    else:
        chosen = [Path(m).stem for m in models]
    return _unique(chosen)


def _unique(names: Sequence[str]) -> list[str]:
    seen: dict = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f'{name}_{seen[name]}')
    return unique


def folder_name(name: str) -> str:
    """A caption turned into a folder name: characters other than letters, digits, '.', '-' and '_' become '_'."""
    return re.sub(r'[^A-Za-z0-9._-]', '_', name).strip('.') or 'model'


def comparison_figure(lr_bgr: np.ndarray, window: tuple, panels: Sequence[tuple[str, float, np.ndarray]],
                      *, size: tuple) -> np.ndarray:
    """LR image (bicubic to ``size`` = output height, width) with the window, then each (name, di, overlay)."""
    x, y, side = window
    height, width = size
    lr = render.draw_window(render.resize_bicubic(lr_bgr, size=(height, width)), x, y, side)
    row = [render.captioned(lr, ['LR input', f'window {side}px'])]
    row += [render.captioned(overlay, [name, f'DI {di:.2f}']) for name, di, overlay in panels]
    return render.side_by_side(row)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog='python -m hat.analysis.compare',
        description='LAM and diffusion index of several SR models on one image, side by side.')
    parser.add_argument('-m', '--models', nargs='+', required=True,
                        help='checkpoints (.pth, architecture detected) or option files (.yml); same scale')
    parser.add_argument('--names', nargs='+', default=None, help='captions, one per model (default: file names)')
    add_lam_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    try:
        report = compare(args)
    except USER_ERRORS as err:
        parser.exit(2, f'{parser.prog}: error: {err}\n')
    if args.json:
        sys.stdout.write(json.dumps(report) + '\n')
    return report


def compare(args: argparse.Namespace) -> dict:
    """Run LAM for every model of ``args.models`` and write the figure, the JSON and the per-model files."""
    names = model_names(args.models, args.names)
    folders = _unique([folder_name(n) for n in names])
    out = Path(args.out)
    entries, panels = [], []
    lr_bgr, sr_size = None, None
    for model, name, folder in zip(args.models, names, folders):
        summary, result, image = run_lam(model, args, out / folder)
        if sr_size is not None and tuple(summary['sr_size']) != sr_size:
            raise ValueError(f'{model} gives a {summary["sr_size"]} output, {names[0]} gave {list(sr_size)}: '
                             'the window is in output pixels, so the models must share the scale.')
        sr_size = tuple(summary['sr_size'])
        # The LR panel shows the image as the first model read it (luminance for a gray model).
        lr_bgr = lr_bgr if lr_bgr is not None else render.to_bgr_uint8(image)
        overlay = render.attribution_overlay(result.attribution, render.to_bgr_uint8(image), size=sr_size)
        panels.append((name, result.di, render.draw_window(overlay, *args.window)))
        entries.append({'name': name, 'folder': folder, **summary})

    figure_path = out / 'compare.png'
    render.write_png(figure_path, comparison_figure(lr_bgr, tuple(args.window), panels, size=sr_size))
    report = {
        'image': str(args.image),
        'window': {'x': args.window[0], 'y': args.window[1], 'size': args.window[2]},
        'figure': str(figure_path),
        'models': entries,
    }
    (out / 'compare.json').write_text(json.dumps(report, indent=1) + '\n', encoding='utf-8')
    for entry in entries:
        logger.info('%-24s DI %7.3f', entry['name'], entry['di'])
    return report


if __name__ == '__main__':
    main()

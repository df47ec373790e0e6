"""The demo: prepare the demo set, run the test pipeline with HAT-demo x4, print bicubic vs HAT-demo per image.

    python scripts/demo.py            (what `make demo` runs)

Prints a Markdown table of PSNR/SSIM (Y channel, crop 4, BasicSR's metrics) of MATLAB-exact bicubic upscaling and
of HAT-demo for each image and on average; the super-resolved images land in results/HAT-demo_SRx4/.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'scripts'))

import hat  # noqa: E402,F401  (compat shim before basicsr)
from basicsr.metrics import calculate_psnr, calculate_ssim  # noqa: E402

from hat.io.images import read_array  # noqa: E402
from hat.test import test_pipeline  # noqa: E402
from hat.utils.matlab_resize import imresize_uint8  # noqa: E402
from prepare_demo import DEMO_PHOTOS, SCALE, prepare_demo  # noqa: E402

OPTION_FILE = ROOT / 'options' / 'test' / 'HAT-demo_SRx4.yml'
CHECKPOINT = ROOT / 'experiments' / 'pretrained_models' / 'HAT-demo_SRx4.pth'


def measure(img, gt) -> tuple[float, float]:
    kwargs = {'crop_border': SCALE, 'test_y_channel': True}
    return calculate_psnr(img, gt, **kwargs), calculate_ssim(img, gt, **kwargs)


def report_table(demo_dir: Path, results_dir: Path) -> str:
    """Markdown table: per image and average PSNR/SSIM of bicubic and of the HAT-demo images in results_dir."""
    rows, sums = [], [0.0, 0.0, 0.0, 0.0]
    for name in DEMO_PHOTOS:
        gt = read_array(demo_dir / f'GTmod{SCALE}' / f'{name}.png', colour=True)
        lq = read_array(demo_dir / f'LRbicx{SCALE}' / f'{name}.png', colour=True)
        sr_path = results_dir / f'{name}_HAT-demo_SRx4.png'
        if not sr_path.is_file():
            raise FileNotFoundError(f'{sr_path} was not written by the test pipeline')
        sr = read_array(sr_path, colour=True)
        values = (*measure(imresize_uint8(lq, SCALE), gt), *measure(sr, gt))
        sums = [s + v for s, v in zip(sums, values)]
        rows.append(f'| {name} | {values[0]:.2f} / {values[1]:.4f} | {values[2]:.2f} / {values[3]:.4f} | '
                    f'{values[2] - values[0]:+.2f} |')
    n = len(DEMO_PHOTOS)
    mean = [s / n for s in sums]
    rows.append(f'| **average** | {mean[0]:.2f} / {mean[1]:.4f} | {mean[2]:.2f} / {mean[3]:.4f} | '
                f'{mean[2] - mean[0]:+.2f} |')
    header = ['| image | bicubic PSNR / SSIM | HAT-demo PSNR / SSIM | gain (dB) |', '|---|---|---|---|']
    return '\n'.join(header + rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    if not CHECKPOINT.is_file():
        print(f'error: {CHECKPOINT} is missing (it ships with the project; restore it with git checkout).',
              file=sys.stderr)
        return 2
    demo_dir = ROOT / 'datasets' / 'demo'
    if not all((demo_dir / f'{sub}{SCALE}' / f'{n}.png').is_file() for sub in ('GTmod', 'LRbicx') for n in DEMO_PHOTOS):
        prepare_demo(demo_dir)
    test_pipeline(str(ROOT), ['-opt', str(OPTION_FILE)])
    results_dir = ROOT / 'results' / 'HAT-demo_SRx4' / 'visualization' / 'demo'
    print('\nHAT-demo x4 on the demo set (PSNR dB / SSIM on Y, crop 4):\n')
    print(report_table(demo_dir, results_dir))
    print(f'\nSuper-resolved images: {results_dir}')
    return 0


if __name__ == '__main__':
    sys.exit(main())

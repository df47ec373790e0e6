"""Build the demo test set from photographs bundled with scikit-image (no download needed).

    python scripts/prepare_demo.py [--out datasets/demo]

Writes ``OUT/GTmod4/<name>.png`` (the photo cropped to a multiple of 4) and ``OUT/LRbicx4/<name>.png`` (its
MATLAB-exact bicubic x1/4 downscale), the layout of the benchmark sets.
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prepare_benchmark import prepare_benchmark  # noqa: E402

# scikit-image ships these photographs inside its wheel (no download).
DEMO_PHOTOS = ('astronaut', 'chelsea', 'coffee', 'rocket', 'motorcycle')
SCALE = 4


def load_photo(name: str) -> np.ndarray:
    """An RGB uint8 photo of scikit-image's data module. [H, W, 3]"""
    import skimage.data

    if name == 'motorcycle':
        return skimage.data.stereo_motorcycle()[0]
    return getattr(skimage.data, name)()


def prepare_demo(out_dir: Path) -> list[str]:
    """Write the demo set into ``out_dir``; returns the image names."""
    with tempfile.TemporaryDirectory() as tmp:
        for name in DEMO_PHOTOS:
            rgb = load_photo(name)
            if not cv2.imwrite(str(Path(tmp) / f'{name}.png'), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
                raise OSError(f'could not write {name}.png to {tmp}')
        prepare_benchmark(Path(tmp), out_dir, [SCALE])
    return list(DEMO_PHOTOS)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', type=Path, default=Path(__file__).resolve().parents[1] / 'datasets' / 'demo',
                        help='output folder (default: datasets/demo of the project)')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    names = prepare_demo(args.out)
    logging.getLogger(__name__).info(f'Demo set: {len(names)} images in {args.out}/GTmod{SCALE} and LRbicx{SCALE}')
    return 0


if __name__ == '__main__':
    sys.exit(main())

"""Reproduce the paper's table: PSNR/SSIM of a checkpoint on the benchmark sets, next to the published numbers.

    python scripts/benchmark.py -m experiments/pretrained_models/HAT_SRx4.pth
    python scripts/benchmark.py -m HAT-S_SRx2.pth --sets Set5 Set14 --datasets-root datasets --out results/benchmark

The architecture, variant and scale are read from the checkpoint (:mod:`hat.archs.detect`). Every set is read from
``<datasets-root>/<set>/`` in one of two layouts (see ``datasets/README.md``):

* ``GTmod{s}/`` and ``LRbicx{s}/``: what ``scripts/prepare_benchmark.py`` makes and the option files read;
* ``HR/`` and ``LR_bicubic/X{s}/``: the layout of the usual benchmark archives, used as it is. The HR images need
  not be mod-cropped: the test pipeline and the bicubic baseline crop the up to ``s - 1`` extra rows/columns, as
  BasicSR does, which gives the numbers of the mod-cropped GT. An LR file is named like its HR file, or
  ``<name>x{s}`` (the archives of EDSR).

The spellings of the official option files are accepted (``BSDS100`` for B100, ``urban100``, ``manga109``), as are
other names for custom sets. A set that is not there is listed as "not found".

For each set the table gives:
* the checkpoint's PSNR/SSIM, measured by the test pipeline (``hat/test.py``: HATModel with padding to the window
  size, BasicSR's ``calculate_psnr``/``calculate_ssim`` on the Y channel, ``crop_border = scale``);
* the paper's numbers for the detected variant and scale (``hat/data/published_results.json``; ``--published``
  picks another row, e.g. for a custom HAT), and the difference;
* a bicubic baseline: MATLAB-exact bicubic upscaling of the same LR images
  (:func:`hat.utils.matlab_resize.imresize_uint8`), measured the same way.

Writes ``<out>/benchmark_<checkpoint>.md`` and ``.csv``; the test pipeline's log (and the images with
``--save-images``) go to ``<out>/results/benchmark_<checkpoint>/``.

Exit status: 0 when at least one set was measured, 1 when none was found, 2 for bad arguments or a set whose LR
images do not pair with its GT images.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np
import torch
import yaml

if __package__ in (None, ''):  # run as a script: make the project importable without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hat  # noqa: E402,F401  (compat shim and registries before anything from basicsr)
from basicsr.metrics import calculate_psnr, calculate_ssim  # noqa: E402

from hat.archs.detect import DetectedArch, detect_architecture, load_state_dict  # noqa: E402
from hat.data.paired_image_dataset import gt_fits_for_validation, lq_file_name  # noqa: E402
from hat.test import test_pipeline  # noqa: E402
from hat.utils.matlab_resize import imresize_uint8  # noqa: E402

logger = logging.getLogger('benchmark')

PUBLISHED_RESULTS = Path(__file__).resolve().parents[1] / 'hat' / 'data' / 'published_results.json'
DEFAULT_SETS = ('Set5', 'Set14', 'B100', 'Urban100', 'Manga109')
# Folder names tried for each set, in order: the paper's name, the official option files' spelling, others seen.
SET_FOLDERS = {
    'Set5': ('Set5', 'set5'),
    'Set14': ('Set14', 'set14'),
    'B100': ('B100', 'BSDS100', 'BSD100', 'bsds100', 'b100'),
    'Urban100': ('Urban100', 'urban100'),
    'Manga109': ('Manga109', 'manga109'),
}
IMAGE_EXTENSIONS = ('.png', '.bmp', '.jpg', '.jpeg', '.tif', '.tiff')
NOT_FOUND = 'not found'
MISSING_VALUE = 'n/a'


def canonical_set(name: str) -> str:
    """The paper's name of a set given in any known spelling (``bsds100`` -> ``B100``); other names unchanged."""
    for canonical, spellings in SET_FOLDERS.items():
        if name.lower() in (s.lower() for s in spellings):
            return canonical
    return name


# Layouts of a set's folder, in the order tried: (GT folder, LR folder), both relative to the set's folder.
SET_LAYOUTS = (('GTmod{scale}', 'LRbicx{scale}'), ('HR', 'LR_bicubic/X{scale}'))


@dataclass
class SetResult:
    """Everything the tables show for one set."""

    name: str
    gt_dir: Path | None = None
    lq_dir: Path | None = None
    # LR file name from the GT base name, as PairedImageDataset's ``filename_tmpl``; the extension is the GT's.
    filename_tmpl: str = '{}'
    tried: list[Path] = field(default_factory=list)
    images: int = 0
    model: dict[str, float] = field(default_factory=dict)
    bicubic: dict[str, float] = field(default_factory=dict)
    paper: dict[str, float] | None = None

    @property
    def found(self) -> bool:
        return self.gt_dir is not None

    def difference(self, metric: str) -> float | None:
        if not self.paper or self.paper.get(metric) is None or metric not in self.model:
            return None
        return self.model[metric] - self.paper[metric]


def locate_set(root: Path, name: str, scale: int) -> SetResult:
    """Find the GT and LR folders of a set under ``root`` (any spelling, any of ``SET_LAYOUTS``); record the set
    folders tried otherwise."""
    result = SetResult(name=name)
    spellings = SET_FOLDERS.get(name, (name, ))
    for spelling in spellings:
        for gt_name, lq_name in SET_LAYOUTS:
            gt_dir = root / spelling / gt_name.format(scale=scale)
            lq_dir = root / spelling / lq_name.format(scale=scale)
            if gt_dir.is_dir() and lq_dir.is_dir():
                gt_files = image_files(gt_dir)
                result.gt_dir, result.lq_dir, result.images = gt_dir, lq_dir, len(gt_files)
                result.filename_tmpl = lr_name_template(gt_files, lq_dir, scale)
                return result
        result.tried.append(root / spelling)
    return result


def lr_name_template(gt_files: Sequence[Path], lq_dir: Path, scale: int) -> str:
    """``'{}'`` when the LR files are named like the GT files, ``'{}x<scale>'`` when EDSR's archives named them
    (``babyx4.png``); decided by the first GT file that has either (``'{}'`` when none has: the pipeline then
    names the unpaired files)."""
    for gt_path in gt_files:
        for template in ('{}', f'{{}}x{scale}'):
            if (lq_dir / lq_file_name(gt_path.name, template)).is_file():
                return template
    return '{}'


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _read_color(path: Path) -> np.ndarray:
    """Read as the test pipeline does: 3-channel BGR uint8 (grey images repeated)."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f'cannot read {path}')
    return img


def bicubic_scores(gt_dir: Path, lq_dir: Path, scale: int, filename_tmpl: str = '{}') -> dict[str, float]:
    """Mean PSNR/SSIM (Y, crop = scale) of MATLAB bicubic upscaling of every LR image against its GT.

    The LR file of ``<gt_dir>/a.png`` is ``<lq_dir>/<filename_tmpl of a>.png``, the pair the test pipeline reads. A
    GT up to ``scale - 1`` rows/columns larger than the upscaled LR (an HR image that was not mod-cropped) is cropped
    to it, as the test pipeline crops it.

    Raises:
        ValueError: an LR image is missing, or the GT does not fit its upscaled size.
    """
    psnr, ssim = [], []
    for gt_path in image_files(gt_dir):
        lq_path = lq_dir / lq_file_name(gt_path.name, filename_tmpl)
        if not lq_path.is_file():
            raise ValueError(f'{gt_dir.parent.name}: no LR image {lq_path.name} for {gt_path.name} in {lq_dir}')
        gt = _read_color(gt_path)
        lq = _read_color(lq_path)
        upscaled = imresize_uint8(lq, scale)
        (height, width), (gt_height, gt_width) = upscaled.shape[:2], gt.shape[:2]
        if not gt_fits_for_validation((gt_height, gt_width), lq.shape[:2], scale):
            raise ValueError(f'{lq_path} upscaled x{scale} is {width}x{height}, but {gt_path} is '
                             f'{gt_width}x{gt_height}: the LR image must be the GT downscaled x{scale} '
                             '(scripts/prepare_benchmark.py makes such pairs)')
        gt = gt[:height, :width]
        psnr.append(calculate_psnr(upscaled, gt, crop_border=scale, test_y_channel=True))
        ssim.append(calculate_ssim(upscaled, gt, crop_border=scale, test_y_channel=True))
    return {'psnr': float(np.mean(psnr)), 'ssim': float(np.mean(ssim))}


def load_published(path: Path = PUBLISHED_RESULTS) -> dict[str, Any]:
    return json.loads(path.read_text(encoding='utf-8'))


def published_scores(published: dict[str, Any], variant: str, scale: int) -> dict[str, dict[str, float] | None]:
    """``{set: {'psnr', 'ssim'} or None}`` of a variant at a scale; empty when the paper has no such row."""
    return dict((published['psnr_ssim'].get(variant) or {}).get(f'x{scale}') or {})


def pipeline_options(name: str, checkpoint: Path, detected: DetectedArch, sets: Sequence[SetResult], *,
                 param_key: str | None, num_gpu: int, self_ensemble: bool, save_images: bool) -> dict[str, Any]:
    """The option file of the test pipeline for the found sets."""
    scale = detected.scale
    metrics = {
        'psnr': {'type': 'calculate_psnr', 'crop_border': scale, 'test_y_channel': True},
        'ssim': {'type': 'calculate_ssim', 'crop_border': scale, 'test_y_channel': True},
    }
    return {
        'name': name, 'model_type': 'HATModel', 'scale': scale, 'num_gpu': num_gpu, 'manual_seed': 0,
        'datasets': {
            f'test_{i}': {'name': s.name, 'type': 'PairedImageDataset', 'dataroot_gt': str(s.gt_dir),
                          'dataroot_lq': str(s.lq_dir), 'filename_tmpl': s.filename_tmpl,
                          'io_backend': {'type': 'disk'}}
            for i, s in enumerate(sets, start=1)
        },
        'network_g': detected.network_options(),
        'path': {'pretrain_network_g': str(checkpoint), 'strict_load_g': True,
                 'param_key_g': param_key or 'params_ema'},
        'val': {'save_img': save_images, 'suffix': None, 'self_ensemble': self_ensemble, 'pbar': True,
                'metrics': metrics},
    }


def _cell(scores: dict[str, float] | None, signed: bool = False) -> str:
    if not scores or scores.get('psnr') is None:
        return MISSING_VALUE
    sign = '+' if signed else ''
    # Some published rows give PSNR only (the authors' README table); the SSIM half then reads n/a.
    ssim = MISSING_VALUE if scores.get('ssim') is None else f'{scores["ssim"]:{sign}.4f}'
    return f'{scores["psnr"]:{sign}.2f} / {ssim}'


def markdown_table(results: Sequence[SetResult], *, checkpoint: Path, detected: DetectedArch, row: str,
                   published: dict[str, Any], self_ensemble: bool) -> str:
    scale = detected.scale
    names = [r.name for r in results]
    row_source = published['psnr_ssim'].get(row, {}).get('source', 'none (not a row of the paper)')
    lines = [f'# {checkpoint.name} on the benchmark sets', '',
             f'Detected: {detected.summary()}.', '',
             f'PSNR (dB) / SSIM on the Y channel, crop_border = {scale} (BasicSR\'s calculate_psnr / calculate_ssim)'
             + (', with the x8 self-ensemble' if self_ensemble else '') + '.',
             f'Paper: {row} x{scale} of {published["source"]["paper"]} (arXiv {published["source"]["arxiv"]}); '
             f'{MISSING_VALUE} where hat/data/published_results.json has no value.',
             f'Source of the {row} row: {row_source}.', '',
             '| Method | ' + ' | '.join(names) + ' |',
             '|---|' + '---|' * len(names)]

    def cells(values: list[str]) -> str:
        return '| ' + ' | '.join(values) + ' |'

    lines.append(cells(['Bicubic'] + [_cell(r.bicubic) if r.found else NOT_FOUND for r in results]))
    lines.append(cells([checkpoint.name] + [_cell(r.model) if r.found else NOT_FOUND for r in results]))
    lines.append(cells([f'{row} x{scale} (paper)'] + [_cell(r.paper) for r in results]))
    differences = []
    for r in results:
        psnr, ssim = r.difference('psnr'), r.difference('ssim')
        differences.append(MISSING_VALUE if psnr is None else _cell({'psnr': psnr, 'ssim': ssim}, signed=True))
    lines.append(cells(['Difference'] + differences))
    missing = [r for r in results if not r.found]
    if missing:
        lines += ['', 'Not found (prepare them with scripts/prepare_benchmark.py, see datasets/README.md):']
        for r in missing:
            tried = ', '.join(str(p) for p in r.tried)
            lines.append(f'- {r.name}: no GTmod{scale}/ and LRbicx{scale}/ (nor HR/ and LR_bicubic/X{scale}/) in '
                         f'{tried}')
    return '\n'.join(lines) + '\n'


CSV_COLUMNS = ('set', 'scale', 'status', 'images', 'psnr', 'ssim', 'paper_psnr', 'paper_ssim', 'diff_psnr',
               'diff_ssim', 'bicubic_psnr', 'bicubic_ssim')


def csv_rows(results: Sequence[SetResult], scale: int) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        paper = r.paper or {}

        def value(x: float | None) -> str:
            return '' if x is None else f'{x:.6f}'

        rows.append({
            'set': r.name, 'scale': scale, 'status': 'ok' if r.found else NOT_FOUND, 'images': r.images,
            'psnr': value(r.model.get('psnr')), 'ssim': value(r.model.get('ssim')),
            'paper_psnr': value(paper.get('psnr')), 'paper_ssim': value(paper.get('ssim')),
            'diff_psnr': value(r.difference('psnr')), 'diff_ssim': value(r.difference('ssim')),
            'bicubic_psnr': value(r.bicubic.get('psnr')), 'bicubic_ssim': value(r.bicubic.get('ssim')),
        })
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='python scripts/benchmark.py',
        description='PSNR/SSIM of a checkpoint on the benchmark sets, next to the paper\'s numbers and bicubic.',
        epilog='Exit status: 0 at least one set measured, 1 no set found, 2 bad arguments or unpaired images.')
    parser.add_argument('-m', '--model', type=Path, required=True, help='checkpoint (architecture detected)')
    parser.add_argument('--sets', nargs='+', default=list(DEFAULT_SETS),
                        help=f'sets to measure (default: {" ".join(DEFAULT_SETS)}; any spelling of the option files)')
    parser.add_argument('--scale', default='auto',
                        help='auto (default): the checkpoint\'s; a number is checked against it')
    parser.add_argument('--datasets-root', type=Path, default=Path('datasets'),
                        help='folder holding <set>/GTmod{s} and <set>/LRbicx{s}, or <set>/HR and '
                        '<set>/LR_bicubic/X{s} (default: datasets)')
    parser.add_argument('--out', type=Path, default=Path('results/benchmark'),
                        help='folder for the tables and the test pipeline\'s log (default: results/benchmark)')
    parser.add_argument('--published', default=None,
                        help='row of the paper to compare with (HAT-S, HAT, HAT-L; default: the detected variant)')
    parser.add_argument('--param-key', default=None, help='weights entry of the checkpoint (default: params_ema, '
                        'then params)')
    parser.add_argument('--device', choices=('auto', 'cpu', 'cuda'), default='auto',
                        help='auto (default): CUDA if available')
    parser.add_argument('--self-ensemble', action='store_true', help='x8 self-ensemble (not used by the paper\'s '
                        'table)')
    parser.add_argument('--save-images', action='store_true', help='also write the super-resolved images')
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    try:
        state_dict = load_state_dict(args.model, args.param_key)
        detected = detect_architecture(state_dict)
    except (FileNotFoundError, ValueError, ImportError) as error:
        logger.error(f'-m {args.model}: {error}')
        return 2
    del state_dict
    scale = detected.scale
    if args.scale != 'auto' and (not args.scale.isdigit() or int(args.scale) != scale):
        logger.error(f'--scale {args.scale}: {args.model} is a x{scale} model; leave --scale auto or pass {scale}')
        return 2
    published = load_published()
    row = args.published or detected.variant
    if args.published and args.published not in published['psnr_ssim']:
        logger.error(f'--published {args.published}: the paper rows are {", ".join(published["psnr_ssim"])}')
        return 2
    paper = published_scores(published, row, scale)
    if not paper:
        logger.warning(f'No published numbers for {row} x{scale} (a custom architecture?): pass --published '
                       f'{" / ".join(published["psnr_ssim"])} to compare with a row of the paper.')
    if args.device == 'cuda' and not torch.cuda.is_available():
        logger.error('--device cuda: CUDA is not available; use --device cpu')
        return 2
    num_gpu = 0 if args.device == 'cpu' or not torch.cuda.is_available() else 1

    results = []
    for name in dict.fromkeys(canonical_set(s) for s in args.sets):
        result = locate_set(args.datasets_root, name, scale)
        result.paper = paper.get(name)
        if result.found:
            logger.info(f'{name}: {result.images} images in {result.gt_dir} and {result.lq_dir}; bicubic '
                        'baseline...')
            try:
                result.bicubic = bicubic_scores(result.gt_dir, result.lq_dir, scale, result.filename_tmpl)
            except ValueError as error:  # unpaired or mis-sized images: nothing is measured until they are fixed
                logger.error(f'{name}: {error}')
                return 2
        else:
            logger.warning(f'{name}: {NOT_FOUND} (looked in {", ".join(str(p) for p in result.tried)})')
        results.append(result)

    found = [r for r in results if r.found]
    run_name = f'benchmark_{args.model.stem}'
    args.out.mkdir(parents=True, exist_ok=True)
    if found:
        options = pipeline_options(run_name, args.model.resolve(), detected, found, param_key=args.param_key,
                               num_gpu=num_gpu, self_ensemble=args.self_ensemble, save_images=args.save_images)
        option_file = args.out / f'{run_name}.yml'
        option_file.write_text(yaml.safe_dump(options, sort_keys=False), encoding='utf-8')
        scores = test_pipeline(str(args.out.resolve()), ['-opt', str(option_file)])
        for r in found:
            r.model = {k: float(v) for k, v in scores.get(r.name, {}).items()}

    table = markdown_table(results, checkpoint=args.model, detected=detected, row=row, published=published,
                           self_ensemble=args.self_ensemble)
    (args.out / f'{run_name}.md').write_text(table, encoding='utf-8')
    with open(args.out / f'{run_name}.csv', 'w', newline='', encoding='utf-8') as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(csv_rows(results, scale))
    sys.stdout.write(table)
    logger.info(f'Wrote {args.out / run_name}.md and .csv')
    return 0 if found else 1


if __name__ == '__main__':
    sys.exit(main())

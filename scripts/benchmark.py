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
* the published numbers of the checkpoint's row (``hat/data/published_results.json``), and the difference. The row
  is the detected variant, except that the HAT network has two rows, told apart by the file name: ``ImageNet`` in it
  (``HAT_SRx4_ImageNet-pretrain.pth``) picks ``HAT-ImageNet``, anything else ``HAT``. ``--published`` picks another
  row, e.g. for a custom HAT. Each published figure shows its trust level: unmarked, the authors' own text;
  ``‡``, two independent sources agree; ``†``, one secondary source only. A footnote names the sources;
* a bicubic baseline: MATLAB-exact bicubic upscaling of the same LR images
  (:func:`hat.utils.matlab_resize.imresize_uint8`), measured the same way.

Writes ``<out>/benchmark_<checkpoint>.md`` and ``.csv``; the test pipeline's log (and the images with
``--save-images``) go to ``<out>/results/benchmark_<checkpoint>/``. ``--plot`` also writes
``<out>/benchmark_<checkpoint>.png``, PSNR against Multi-Adds (``--plot-x params``: parameters) of the published
variants and of the checkpoint, like the paper's Fig. 1; it needs matplotlib, an optional dependency.

Exit status: 0 when at least one set was measured, 1 when none was found, 2 for bad arguments, a set whose LR
images do not pair with its GT images, or ``--plot`` without matplotlib (the tables are written all the same).
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import yaml

if __package__ in (None, ''):  # run as a script: make the project importable without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hat  # noqa: E402,F401  (compat shim and registries before anything from basicsr)
from basicsr.metrics import calculate_psnr, calculate_ssim  # noqa: E402

from hat.analysis import complexity  # noqa: E402
from hat.archs.detect import VARIANT_CUSTOM, DetectedArch, detect_architecture  # noqa: E402
from hat.data.paired_image_dataset import gt_fits_for_validation, lq_file_name  # noqa: E402
from hat.io.checkpoints import load_state_dict  # noqa: E402
from hat.io.images import IMAGE_EXTENSIONS, read_array  # noqa: E402
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
    # The published cell of this set: psnr, ssim, and their sources and trust levels (published_results.json).
    paper: dict[str, Any] | None = None

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
    """Read as the test pipeline does: 3-channel BGR uint8 (grey images repeated); UnreadableImageError names a
    damaged file."""
    return read_array(path, colour=True)


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


# ---------------------------------------------------------------------------------------------------------------
# Published numbers
# ---------------------------------------------------------------------------------------------------------------

TRUST_ONE_SOURCE = 'one source'
# The authors' own figures stay unmarked; the others carry a mark, explained under the table, so that a figure that
# rests on one secondary source is never read as a verified one. The same marks as the complexity table's.
TRUST_MARKS = complexity.TRUST_MARKS
TRUST_LEGEND = ('unmarked, the authors\' own text; ‡, two independent sources agree; †, one source only, a '
                'secondary source quoting the paper (not verified)')
METRICS = ('psnr', 'ssim')


def load_published(path: Path = PUBLISHED_RESULTS) -> dict[str, Any]:
    """``hat/data/published_results.json``: every published figure with its sources and trust level."""
    return json.loads(path.read_text(encoding='utf-8'))


def published_row(published: Mapping[str, Any], variant: str, checkpoint: Path) -> str:
    """The row of ``published['psnr_ssim']`` for a checkpoint of a detected variant.

    Rows of one network that differ only by training (HAT and HAT-ImageNet) cannot be told apart by the weights, so
    the file name decides: ``ImageNet`` in it, as in the released ``HAT_SRx4_ImageNet-pretrain.pth``, picks the
    ImageNet-pretrained row. A variant with a single row gets it whatever the file is called (every HAT-L is
    ImageNet-pretrained). A variant without a row (``custom``) is returned as it is: it has no published numbers.
    """
    rows = [name for name, row in published['psnr_ssim'].items() if row.get('architecture') == variant]
    if not rows:
        return variant
    imagenet = 'imagenet' in checkpoint.name.lower()
    same_training = [name for name in rows
                     if bool(published['psnr_ssim'][name].get('imagenet_pretraining')) == imagenet]
    return (same_training or rows)[0]


def published_scores(published: Mapping[str, Any], row: str, scale: int) -> dict[str, dict[str, Any] | None]:
    """``{set: cell or None}`` of a row at a scale, a cell being ``{'psnr', 'ssim', 'sources', 'trust'}``; empty
    when there is no such row."""
    return dict((published['psnr_ssim'].get(row) or {}).get(f'x{scale}') or {})


def figure_trust(cell: Mapping[str, Any] | None, metric: str) -> str | None:
    """Trust level of one published figure (``'authors'``, ``'two sources'``, ``'one source'``); None when the cell
    has no such figure."""
    if not cell or cell.get(metric) is None:
        return None
    # A figure whose level is not stated is trusted no more than a single source.
    return (cell.get('trust') or {}).get(metric, TRUST_ONE_SOURCE)


def figure_sources(cell: Mapping[str, Any] | None, metric: str) -> list[str]:
    """Keys of ``published['sources']`` that give one figure (empty when there is no figure)."""
    if not cell or cell.get(metric) is None:
        return []
    return list((cell.get('sources') or {}).get(metric, []))


def trust_mark(level: str | None) -> str:
    return TRUST_MARKS.get(level, TRUST_MARKS[TRUST_ONE_SOURCE]) if level else ''


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




def _cell(scores: Mapping[str, Any] | None, signed: bool = False) -> str:
    if not scores or scores.get('psnr') is None:
        return MISSING_VALUE
    sign = '+' if signed else ''
    # Some published rows give PSNR only (the authors' README table); the SSIM half then reads n/a.
    ssim = MISSING_VALUE if scores.get('ssim') is None else f'{scores["ssim"]:{sign}.4f}'
    return f'{scores["psnr"]:{sign}.2f} / {ssim}'


def _published_cell(cell: Mapping[str, Any] | None) -> str:
    """``33.04 / 0.9056‡``: the published figures, each with the mark of its trust level."""
    if not cell or cell.get('psnr') is None:
        return MISSING_VALUE
    psnr = f'{cell["psnr"]:.2f}{trust_mark(figure_trust(cell, "psnr"))}'
    ssim = MISSING_VALUE if cell.get('ssim') is None else f'{cell["ssim"]:.4f}{trust_mark(figure_trust(cell, "ssim"))}'
    return f'{psnr} / {ssim}'


def published_footnote(results: Sequence[SetResult], published: Mapping[str, Any], row: str, scale: int) -> list[str]:
    """Lines under the table: what the marks mean, where each published figure of the row comes from, and the
    row's notes. Empty when the row has no figure for the sets shown."""
    figures, used = [], []
    for r in results:
        parts = []
        for metric in METRICS:
            level = figure_trust(r.paper, metric)
            if level is None:
                continue
            sources = figure_sources(r.paper, metric)
            used += sources
            value = f'{r.paper[metric]:.2f}' if metric == 'psnr' else f'{r.paper[metric]:.4f}'
            named = f'[{", ".join(sources)}]' if sources else 'no source named'
            parts.append(f'{metric.upper()} {value}{trust_mark(level)} {named}, {level}')
        if parts:
            figures.append(f'- {r.name}: ' + '; '.join(parts))
    if not figures:
        return []
    lines = ['', f'Published figures: {TRUST_LEGEND}. Sources of the {row} x{scale} figures:'] + figures
    catalogue = published.get('sources', {})
    for key in dict.fromkeys(used):
        entry = catalogue.get(key, {})
        lines.append(f'- [{key}] {entry.get("where", "not described in published_results.json")}: '
                     f'{entry.get("what", "")}')
    lines += [f'- Note: {note}' for note in published['psnr_ssim'].get(row, {}).get('notes', [])]
    return lines


def markdown_table(results: Sequence[SetResult], *, checkpoint: Path, detected: DetectedArch, row: str,
                   published: Mapping[str, Any], self_ensemble: bool) -> str:
    scale = detected.scale
    names = [r.name for r in results]
    paper = published['paper']
    citation = paper['citation'].rstrip('.')
    lines = [f'# {checkpoint.name} on the benchmark sets', '',
             f'Detected: {detected.summary()}.', '',
             f'PSNR (dB) / SSIM on the Y channel, crop_border = {scale} (BasicSR\'s calculate_psnr / calculate_ssim)'
             + (', with the x8 self-ensemble' if self_ensemble else '') + '.']
    if row in published['psnr_ssim']:
        row_label = f'{row} x{scale} (published)'
        lines += [f'Published: the {row} x{scale} row of hat/data/published_results.json, results of {citation} '
                  f'(arXiv {paper["arxiv"]}); {MISSING_VALUE} where no source gives a figure.',
                  f'Source of the {row} row: {published["psnr_ssim"][row]["source"]}.', '']
    else:
        row_label = 'Published (no row)'
        lines += [f'Published: no row for a {row} model; --published {" / ".join(published["psnr_ssim"])} compares '
                  'with one.', '']
    lines += ['| Method | ' + ' | '.join(names) + ' |', '|---|' + '---|' * len(names)]

    def cells(values: list[str]) -> str:
        return '| ' + ' | '.join(values) + ' |'

    lines.append(cells(['Bicubic'] + [_cell(r.bicubic) if r.found else NOT_FOUND for r in results]))
    lines.append(cells([checkpoint.name] + [_cell(r.model) if r.found else NOT_FOUND for r in results]))
    lines.append(cells([row_label] + [_published_cell(r.paper) for r in results]))
    differences = []
    for r in results:
        psnr, ssim = r.difference('psnr'), r.difference('ssim')
        differences.append(MISSING_VALUE if psnr is None else _cell({'psnr': psnr, 'ssim': ssim}, signed=True))
    lines.append(cells(['Difference'] + differences))
    lines += published_footnote(results, published, row, scale)
    missing = [r for r in results if not r.found]
    if missing:
        lines += ['', 'Not found (prepare them with scripts/prepare_benchmark.py, see datasets/README.md):']
        for r in missing:
            tried = ', '.join(str(p) for p in r.tried)
            lines.append(f'- {r.name}: no GTmod{scale}/ and LRbicx{scale}/ (nor HR/ and LR_bicubic/X{scale}/) in '
                         f'{tried}')
    return '\n'.join(lines) + '\n'


CSV_COLUMNS = ('set', 'scale', 'status', 'images', 'psnr', 'ssim', 'paper_psnr', 'paper_ssim', 'diff_psnr',
               'diff_ssim', 'bicubic_psnr', 'bicubic_ssim', 'paper_row', 'paper_psnr_trust', 'paper_ssim_trust',
               'paper_psnr_sources', 'paper_ssim_sources')


def csv_rows(results: Sequence[SetResult], scale: int, row: str = '') -> list[dict[str, Any]]:
    """One CSV row per set; ``row`` names the published row (empty when there is none). Sources are the keys of
    ``published_results.json``'s ``sources``, space-separated."""
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
            'paper_row': row,
            'paper_psnr_trust': figure_trust(paper, 'psnr') or '',
            'paper_ssim_trust': figure_trust(paper, 'ssim') or '',
            'paper_psnr_sources': ' '.join(figure_sources(paper, 'psnr')),
            'paper_ssim_sources': ' '.join(figure_sources(paper, 'ssim')),
        })
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Accuracy against cost, like the paper's Fig. 1
# ---------------------------------------------------------------------------------------------------------------

# --plot-x -> (key of published_results.json's complexity figures, axis name)
PLOT_AXES = {'multi-adds': ('multi_adds_g', 'Multi-Adds (G)'), 'params': ('params_m', 'Parameters (M)')}
# On a tie of published points the plot prefers Urban100, where the variants lie furthest apart, then Set5.
PREFERRED_PLOT_SETS = ('Urban100', 'Set5')
# The published costs are those of x4 networks for a 64x64 LR input; everything plotted is counted the same way.
COST_SCALE, COST_SIZE = 4, 64
MATPLOTLIB_MISSING = '--plot needs matplotlib, an optional dependency that is not installed: pip install matplotlib'


@dataclass(frozen=True)
class PlotPoint:
    """One model of the accuracy-against-cost figure.

    Attributes:
        label: name shown beside the point.
        cost: Multi-Adds (G) or parameters (M).
        psnr: PSNR (dB) on the plotted set.
        cost_counted: no published cost: counted here (drawn hollow).
        psnr_trust: trust level of a published PSNR; None for the checkpoint measured here.
    """

    label: str
    cost: float
    psnr: float
    cost_counted: bool
    psnr_trust: str | None = None

    @property
    def measured(self) -> bool:
        return self.psnr_trust is None


def import_pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (files only, no display needed).

    Raises:
        ImportError: matplotlib is not installed.
    """
    import matplotlib  # optional: only --plot needs it, so it is imported here and not with the script

    matplotlib.use('Agg')
    from matplotlib import pyplot
    return pyplot


def counted_cost(network: torch.nn.Module, axis: str) -> float:
    """Multi-Adds (G) or parameters (M) of a network (best on the meta device) for a 64x64 input."""
    result = complexity.count_complexity(network, size=COST_SIZE)
    return result.params / 1e6 if axis == 'params' else result.total_macs / 1e9


def published_point_count(published: Mapping[str, Any], set_name: str, scale: int) -> int:
    """How many published rows give a PSNR on a set at a scale."""
    return sum(figure_trust((row.get(f'x{scale}') or {}).get(set_name), 'psnr') is not None
               for row in published['psnr_ssim'].values())


def default_plot_set(published: Mapping[str, Any], scale: int, measured: Sequence[str]) -> str:
    """Of the measured sets (all sets when none was measured), the one with the most published PSNR figures at this
    scale; Urban100, then Set5, on a tie, then the order given."""
    candidates = list(measured) or list(published['sets'])

    def rank(name: str) -> tuple[int, int, int]:
        preference = PREFERRED_PLOT_SETS.index(name) if name in PREFERRED_PLOT_SETS else len(PREFERRED_PLOT_SETS)
        return -published_point_count(published, name, scale), preference, candidates.index(name)

    return min(candidates, key=rank)


def published_points(published: Mapping[str, Any], set_name: str, scale: int, axis: str) -> list[PlotPoint]:
    """Every published row with a PSNR on ``set_name`` at ``scale``, at the cost of its network: the published
    figure where a source gives one, else this project's count (HAT-L's Multi-Adds)."""
    key = PLOT_AXES[axis][0]
    costs = published['complexity']['models']
    points = []
    for name, row in published['psnr_ssim'].items():
        cell = (row.get(f'x{scale}') or {}).get(set_name)
        level = figure_trust(cell, 'psnr')
        if level is None:
            continue
        architecture = row.get('architecture', name)
        cost = (costs.get(architecture) or {}).get(key)
        counted = cost is None
        if counted:
            try:
                cost = counted_cost(complexity.variant_network(architecture, scale=COST_SCALE), axis)
            except ValueError:
                logger.warning(f'--plot: {name} has no published {PLOT_AXES[axis][1]} and its network '
                               f'{architecture!r} cannot be counted here; left out')
                continue
        points.append(PlotPoint(label=name, cost=float(cost), psnr=float(cell['psnr']), cost_counted=counted,
                                psnr_trust=level))
    return points


def model_point(label: str, detected: DetectedArch, psnr: float, axis: str) -> PlotPoint:
    """The measured checkpoint, at the cost of its network counted here. A x2 or x3 network is counted as its x4
    counterpart (they differ only in the upsampler), the setting of the published figures."""
    kwargs = dict(detected.kwargs)
    if 'upscale' in kwargs:
        kwargs['upscale'] = COST_SCALE
    network = complexity.network_on_meta(detected.type, kwargs)
    return PlotPoint(label=label, cost=counted_cost(network, axis), psnr=psnr, cost_counted=True)


def plot_accuracy_vs_cost(path: Path, points: Sequence[PlotPoint], *, set_name: str, scale: int,
                          axis: str) -> None:
    """Write a PNG of PSNR against cost: published variants as circles (hollow when the cost is counted here),
    measured checkpoints as stars, each labelled with the trust mark of its PSNR.

    Raises:
        ImportError: matplotlib is not installed.
    """
    pyplot = import_pyplot()
    from matplotlib.ticker import ScalarFormatter

    figure, ax = pyplot.subplots(figsize=(7.0, 4.8), dpi=120)
    for point in points:
        if point.measured:
            ax.scatter(point.cost, point.psnr, marker='*', s=260, color='tab:red', zorder=3)
        else:
            # SwinIR, the paper's baseline, as a grey square: it may sit on HAT-S (Set5, Set14).
            marker, color = ('s', 'tab:gray') if point.label == 'SwinIR' else ('o', 'tab:blue')
            ax.scatter(point.cost, point.psnr, marker=marker, s=80, edgecolors=color, linewidths=1.5, zorder=2,
                       facecolors='none' if point.cost_counted else color, alpha=0.85)
    costs = [p.cost for p in points]
    if costs and max(costs) / min(costs) > 8:
        # A small model beside the published ones: a linear axis would crush the published points together.
        ax.set_xscale('log')
        ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.margins(x=0.2, y=0.15)
    ax.autoscale_view()
    # Points can coincide (SwinIR and HAT-S on Set5: same PSNR, nearly the same cost): the labels of points close
    # to an earlier one go one line lower each, so that none covers another.
    to_axes = ax.transData + ax.transAxes.inverted()
    placed: list[tuple[float, float]] = []
    for point in points:
        x, y = to_axes.transform((point.cost, point.psnr))
        crowd = sum(abs(x - px) < 0.08 and abs(y - py) < 0.05 for px, py in placed)
        placed.append((x, y))
        ax.annotate(f'{point.label}{trust_mark(point.psnr_trust)}', (point.cost, point.psnr),
                    xytext=(7, 4 - 11 * crowd), textcoords='offset points', fontsize=9)
    name = PLOT_AXES[axis][1]
    ax.set_xlabel(f'{name} of the x{COST_SCALE} network, {COST_SIZE}x{COST_SIZE} input')
    ax.set_ylabel(f'PSNR (dB), {set_name} x{scale}')
    ax.set_title(f'PSNR on {set_name} (x{scale}) against {name}')
    ax.grid(True, which='both', alpha=0.3)
    figure.text(0.01, 0.01, 'Published PSNR: unmarked, the authors\' figure; ‡ two sources; † one source only.\n'
                f'Hollow: no published {name}, counted here. Star: measured here (cost counted here).',
                fontsize=7.5, color='dimgray')
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    figure.savefig(path)
    pyplot.close(figure)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='python scripts/benchmark.py',
        description='PSNR/SSIM of a checkpoint on the benchmark sets, next to the published numbers and bicubic.',
        epilog='Exit status: 0 at least one set measured, 1 no set found, 2 bad arguments, unpaired images or '
        '--plot without matplotlib (the tables are written all the same).')
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
                        help='published row to compare with (HAT-S, HAT, HAT-ImageNet, HAT-L, SwinIR; default: the '
                        'detected variant, HAT-ImageNet for a HAT whose file name says ImageNet)')
    parser.add_argument('--param-key', default=None, help='weights entry of the checkpoint (default: params_ema, '
                        'then params)')
    parser.add_argument('--device', choices=('auto', 'cpu', 'cuda'), default='auto',
                        help='auto (default): CUDA if available')
    parser.add_argument('--self-ensemble', action='store_true', help='x8 self-ensemble (not used by the paper\'s '
                        'table)')
    parser.add_argument('--save-images', action='store_true', help='also write the super-resolved images')
    parser.add_argument('--plot', action='store_true',
                        help='also write <out>/benchmark_<checkpoint>.png: PSNR against cost of the published '
                        'variants and of this checkpoint (needs matplotlib)')
    parser.add_argument('--plot-set', default=None,
                        help='set of the plot (default: of the measured sets, the one with the most published '
                        'points; Urban100, then Set5, on a tie)')
    parser.add_argument('--plot-x', choices=tuple(PLOT_AXES), default='multi-adds',
                        help='cost axis of the plot (default: multi-adds)')
    return parser


def write_plot(path: Path, *, published: Mapping[str, Any], results: Sequence[SetResult], detected: DetectedArch,
               checkpoint: Path, set_name: str | None, axis: str) -> None:
    """The accuracy-against-cost figure of a run: the published points of its scale and, when it was measured on
    the plotted set, the checkpoint."""
    scale = detected.scale
    measured = [r.name for r in results if r.found and 'psnr' in r.model]
    set_name = canonical_set(set_name) if set_name else default_plot_set(published, scale, measured)
    points = published_points(published, set_name, scale, axis)
    result = next((r for r in results if r.name == set_name and 'psnr' in r.model), None)
    if result is None:
        logger.warning(f'--plot: {checkpoint.name} was not measured on {set_name}; the figure shows the published '
                       'variants only')
    else:
        points.append(model_point(f'{checkpoint.stem} (measured)', detected, result.model['psnr'], axis))
    if not points:
        logger.warning(f'--plot: nothing to plot on {set_name} x{scale} (no published PSNR, no measurement)')
        return
    plot_accuracy_vs_cost(path, points, set_name=set_name, scale=scale, axis=axis)
    logger.info(f'Wrote {path} ({set_name} x{scale}, {len(points)} points)')


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    plot_unavailable = False
    if args.plot:
        try:
            import_pyplot()
        except ImportError:
            # Said now, before minutes of measuring, and again at the end, where the run stops with status 2.
            plot_unavailable = True
            logger.warning(f'{MATPLOTLIB_MISSING}; the tables will still be written')
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
    rows = ', '.join(published['psnr_ssim'])
    if args.published and args.published not in published['psnr_ssim']:
        logger.error(f'--published {args.published}: the published rows are {rows}')
        return 2
    row = args.published or published_row(published, detected.variant, args.model)
    if not args.published and row != detected.variant:
        logger.info(f'Published row: {row} ({args.model.name} is a {detected.variant} trained with ImageNet '
                    'pre-training, by its file name; --published HAT compares with the other row)')
    paper = published_scores(published, row, scale)
    if not paper:
        what = 'a custom architecture' if detected.variant == VARIANT_CUSTOM else f'no published {row} row'
        logger.warning(f'No published numbers for {row} x{scale} ({what}): pass --published with one of {rows} to '
                       'compare with a published row.')
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
        writer.writerows(csv_rows(results, scale, row if row in published['psnr_ssim'] else ''))
    sys.stdout.write(table)
    logger.info(f'Wrote {args.out / run_name}.md and .csv')
    if args.plot:
        if plot_unavailable:
            logger.error(MATPLOTLIB_MISSING)
            return 2
        write_plot(args.out / f'{run_name}.png', published=published, results=results, detected=detected,
                   checkpoint=args.model, set_name=args.plot_set, axis=args.plot_x)
    return 0 if found else 1


if __name__ == '__main__':
    sys.exit(main())

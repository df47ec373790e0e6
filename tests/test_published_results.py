"""hat/data/published_results.json against its sources, and how scripts/benchmark.py picks and shows its rows."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch

from conftest import REPO, SHARED
from hat.archs.detect import DetectedArch
from hat.archs.hat_arch import HAT
from test_benchmark_script import TINY_HAT_X4, load_script

PUBLISHED = REPO / 'hat' / 'data' / 'published_results.json'
SOURCES_MD = SHARED / 'docs' / 'published_results_sources.md'
TRUST_LEVELS = {'authors', 'two sources', 'one source'}
METRICS = ('psnr', 'ssim')
# The sources file spells B100 as the authors' README does.
SET_NAMES = {'BSD100': 'B100'}

requires_sources_file = pytest.mark.skipif(
    not SOURCES_MD.is_file(), reason=f'the list of published sources is not at {SOURCES_MD} (the shared/ folder '
    'beside the clone)')


@pytest.fixture(scope='module')
def published() -> dict:
    return json.loads(PUBLISHED.read_text(encoding='utf-8'))


@pytest.fixture(scope='module')
def benchmark():
    return load_script('benchmark')


# ---------------------------------------------------------------------------------------------------------------
# The sources file, parsed
# ---------------------------------------------------------------------------------------------------------------

def parse_cell(text: str, default_sources: list[str] | None) -> dict[str, tuple[float, list[str] | None]] | None:
    """``'33.04 [A] / 0.9056 [B1,B2]'`` -> ``{'psnr': (33.04, ['A']), 'ssim': (0.9056, ['B1', 'B2'])}``.

    A bracket names the sources of the figures before it that have none yet (``38.63 / 0.9630 [B1]``: both);
    figures without a bracket take the section's sources (``one source each [E]``). A cell without a figure (``—``)
    is None; a quoted number is a misprint the file reports, not a figure.
    """
    text = re.sub(r'"[^"]*"', '', text)
    figures: dict[str, list] = {}
    pending: list[str] = []
    for number, sources in re.findall(r'(\d+\.\d+)|\[([^\]]+)\]', text):
        if number:
            metric = 'ssim' if float(number) < 1 else 'psnr'
            figures[metric] = [float(number), None]
            pending.append(metric)
        else:
            for metric in pending:
                figures[metric][1] = [s.strip() for s in sources.split(',')]
            pending = []
    for metric in pending:
        figures[metric][1] = default_sources
    return {metric: tuple(value) for metric, value in figures.items()} or None


def parse_sources(text: str) -> dict[str, dict[str, dict[str, dict | None]]]:
    """``{checkpoint pattern: {'x4': {set: parsed cell}}}`` from the sections of the sources file whose heading names
    the released checkpoints (``## HAT-S (`HAT-S_SRx{2,3,4}.pth`)``)."""
    tables = {}
    for section in re.split(r'^## ', text, flags=re.M)[1:]:
        heading, *lines = section.splitlines()
        checkpoints = re.search(r'`([^`]+\.pth)`', heading)
        if not checkpoints:
            continue
        heading_sources = re.findall(r'\[([^\]]+)\]', heading)
        default = [s.strip() for s in heading_sources[-1].split(',')] if heading_sources else None
        sets, rows = [], {}
        for line in lines:
            cells = [c.strip() for c in line.strip().strip('|').split('|')]
            if cells[0] == 'scale':
                sets = [SET_NAMES.get(name, name) for name in cells[1:]]
            elif re.fullmatch(r'x\d', cells[0]):
                rows[cells[0]] = {name: parse_cell(cell, default) for name, cell in zip(sets, cells[1:])}
        tables[checkpoints.group(1)] = rows
    return tables


def test_cell_parser():
    """The parser itself, on the shapes of cells the file uses."""
    assert parse_cell('33.04 [A] / 0.9056 [B1,B2]', None) == {'psnr': (33.04, ['A']), 'ssim': (0.9056, ['B1', 'B2'])}
    assert parse_cell('38.63 / 0.9630 [B1] one source', None) == {'psnr': (38.63, ['B1']), 'ssim': (0.963, ['B1'])}
    assert parse_cell('33.18', ['E']) == {'psnr': (33.18, ['E'])}
    assert parse_cell('— (printed "33.73", a typo)', ['E']) is None
    assert parse_cell('—', None) is None


@pytest.fixture(scope='module')
def sources_tables() -> dict:
    if not SOURCES_MD.is_file():
        pytest.skip(f'the list of published sources is not at {SOURCES_MD}')
    return parse_sources(SOURCES_MD.read_text(encoding='utf-8'))


@requires_sources_file
def test_every_cell_matches_the_sources_file(published, sources_tables):
    """Each variant of the sources file is a row of the data file with the same figures and the same sources; a
    cell the sources file leaves empty is null."""
    rows = {row['checkpoints']: name for name, row in published['psnr_ssim'].items() if row.get('checkpoints')}
    assert set(sources_tables) == set(rows), 'every released variant of the sources file has a row, and no more'
    compared = 0
    for checkpoints, table in sources_tables.items():
        row = published['psnr_ssim'][rows[checkpoints]]
        for scale in ('x2', 'x3', 'x4'):
            assert scale in table, f'{checkpoints}: the sources file has no {scale} row'
            for set_name in published['sets']:
                expected, cell = table[scale][set_name], row[scale][set_name]
                where = f'{rows[checkpoints]} {scale} {set_name}'
                if expected is None:
                    assert cell is None, f'{where}: no source gives it, so it must be null'
                    continue
                for metric in METRICS:
                    if metric in expected:
                        value, sources = expected[metric]
                        assert cell[metric] == value, where
                        assert cell['sources'][metric] == sources, where
                        compared += 1
                    else:
                        assert cell[metric] is None, f'{where} {metric}: no source gives it'
    assert compared == 56  # every figure of the four tables of the sources file


@requires_sources_file
def test_swinir_and_complexity_match_the_sources_file(published):
    text = SOURCES_MD.read_text(encoding='utf-8')
    line = re.search(r'SwinIR for comparison \(x4, \[(\w+)\]\): ([\d. /]+)', text)
    swinir = published['psnr_ssim']['SwinIR']['x4']
    assert [swinir[s]['psnr'] for s in published['sets']] == [float(v) for v in line.group(2).strip(' .').split('/')]
    assert {swinir[s]['sources']['psnr'][0] for s in published['sets']} == {line.group(1)}

    models = published['complexity']['models']
    for name in ('SwinIR', 'HAT-S', 'HAT', 'HAT-L'):
        cells = re.search(rf'^\| {re.escape(name)} \| (.+?) \| (.+?) \|$', text, flags=re.M).groups()
        params = re.search(r'(\d+(?:\.\d+)?)M \[(\w+)\]|\[(\w+)\] (\d+(?:\.\d+)?)M', cells[0]).groups()
        value, source = (params[0], params[1]) if params[0] else (params[3], params[2])
        assert models[name]['params_m'] == float(value) and models[name]['sources']['params_m'] == [source], name
        adds = re.search(r'(\d+(?:\.\d+)?)G \[(\w+)\]', cells[1])
        if adds is None:
            assert 'no source' in cells[1]
            assert models[name]['multi_adds_g'] is None, f'{name}: its Multi-Adds have no source'
        else:
            assert models[name]['multi_adds_g'] == float(adds.group(1))
            assert models[name]['sources']['multi_adds_g'] == [adds.group(2)]


# ---------------------------------------------------------------------------------------------------------------
# The data file on its own
# ---------------------------------------------------------------------------------------------------------------

def expected_trust(sources: list[str]) -> str:
    """The rule of the sources file: the authors' text (A) first, then two independent sources, else one."""
    if 'A' in sources:
        return 'authors'
    return 'two sources' if len(set(sources)) >= 2 else 'one source'


def figures(published: dict):
    """Every (where, cell or entry, figure key) of the data file, null or not."""
    for name, row in published['psnr_ssim'].items():
        for scale in ('x2', 'x3', 'x4'):
            for set_name in published['sets']:
                cell = row[scale][set_name]
                for metric in METRICS:
                    yield f'{name} {scale} {set_name} {metric}', cell, metric
    for name, entry in published['complexity']['models'].items():
        for key in ('params_m', 'multi_adds_g'):
            yield f'{name} {key}', entry, key


def test_every_figure_has_a_source_and_a_trust_level(published):
    assert set(published['trust_levels']) == TRUST_LEVELS
    filled = 0
    for where, cell, key in figures(published):
        value = None if cell is None else cell.get(key)
        sources = [] if cell is None else (cell.get('sources') or {}).get(key)
        trust = None if cell is None else (cell.get('trust') or {}).get(key)
        if value is None:
            assert not sources and trust is None, f'{where}: a null figure names no source'
            continue
        filled += 1
        assert sources, f'{where}: {value} has no source'
        assert set(sources) <= set(published['sources']), f'{where}: unknown source in {sources}'
        assert trust == expected_trust(sources), f'{where}: {sources} make it {expected_trust(sources)!r}'
    assert filled == 56 + 5 + 7  # the four variants, SwinIR's row, and the complexity figures


def test_cells_are_psnr_ssim_pairs_in_set_order(published):
    for name, row in published['psnr_ssim'].items():
        assert row['source'] and row['architecture'] and isinstance(row['imagenet_pretraining'], bool), name
        for scale in ('x2', 'x3', 'x4'):
            assert list(row[scale]) == published['sets']
            for cell in row[scale].values():
                assert cell is None or (20 < cell['psnr'] < 45 and (cell['ssim'] is None or 0.5 < cell['ssim'] < 1))
    assert published['sets'] == ['Set5', 'Set14', 'B100', 'Urban100', 'Manga109']
    assert '2205.04437' in published['paper']['arxiv']
    assert 'XPixelGroup/HAT' in published['sources']['A']['where']


def test_a_sample_of_cells(published):
    """Spot checks that do not need the sources file."""
    rows = published['psnr_ssim']
    assert rows['HAT']['x4']['Urban100']['psnr'] == 27.97 and rows['HAT']['x4']['Urban100']['ssim'] == 0.8368
    assert rows['HAT']['x4']['Set5']['trust'] == {'psnr': 'authors', 'ssim': 'two sources'}
    assert rows['HAT']['x2']['Set5']['trust'] == {'psnr': 'one source', 'ssim': 'one source'}
    assert [v['psnr'] for v in rows['HAT-S']['x4'].values()] == [32.92, 29.15, 27.97, 27.87, 32.35]
    assert rows['HAT-ImageNet']['x2']['Set5'] is None  # its one source misprints it
    assert rows['HAT-ImageNet']['x3']['Manga109'] == {'psnr': 35.84, 'ssim': None, 'sources': {'psnr': ['E']},
                                                      'trust': {'psnr': 'one source'}}
    assert rows['HAT-L']['x4']['Urban100']['trust'] == {'psnr': 'two sources', 'ssim': 'one source'}
    assert rows['HAT-L']['x4']['Set5']['ssim'] is None
    assert published['complexity']['models']['HAT-L']['multi_adds_g'] is None


def test_complexity_tool_reads_the_same_figures(published):
    from hat.analysis import complexity
    assert complexity.published_complexity() == published['complexity']['models']
    assert set(complexity.TRUST_MARKS) == TRUST_LEVELS


# ---------------------------------------------------------------------------------------------------------------
# scripts/benchmark.py: which row, and how it is shown
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('variant, file_name, row', [
    ('HAT', 'HAT_SRx4.pth', 'HAT'),
    ('HAT', 'HAT_SRx4_ImageNet-pretrain.pth', 'HAT-ImageNet'),
    ('HAT', 'my_hat_imagenet_finetuned.pth', 'HAT-ImageNet'),
    ('HAT-S', 'HAT-S_SRx2.pth', 'HAT-S'),
    ('HAT-L', 'HAT-L_SRx3_ImageNet-pretrain.pth', 'HAT-L'),
    ('HAT-L', 'net_g_latest.pth', 'HAT-L'),  # the only row of its network, whatever the file is called
    ('custom', 'HAT-demo_SRx4.pth', 'custom'),
])
def test_published_row_from_variant_and_file_name(benchmark, published, variant, file_name, row):
    assert benchmark.published_row(published, variant, Path(file_name)) == row
    assert set(benchmark.TRUST_MARKS) == TRUST_LEVELS


def run_as_variant(benchmark, monkeypatch, tmp_path: Path, variant: str, file_name: str, *extra: str,
                   scale: int = 4) -> dict:
    """Run the script on a tiny checkpoint saved under a released file name, detected as a released variant (the
    released weights are too large for the tests), with no set present: the CSV rows of the published figures."""
    torch.manual_seed(0)
    checkpoint = tmp_path / file_name
    kwargs = dict(TINY_HAT_X4, upscale=scale)
    torch.save({'params_ema': HAT(**kwargs).state_dict()}, checkpoint)
    monkeypatch.setattr(benchmark, 'detect_architecture',
                        lambda state_dict: DetectedArch(type='HAT', kwargs=kwargs, variant=variant))
    out = tmp_path / 'out'
    assert benchmark.main(['-m', str(checkpoint), '--datasets-root', str(tmp_path / 'none'), '--out', str(out),
                           *extra]) == 1  # nothing measured; the published row is still written
    with open(out / f'benchmark_{checkpoint.stem}.csv', newline='', encoding='utf-8') as handle:
        rows = {row['set']: row for row in csv.DictReader(handle)}
    rows['table'] = (out / f'benchmark_{checkpoint.stem}.md').read_text(encoding='utf-8')
    return rows


def test_hat_l_checkpoint_gets_its_row_with_trust_levels(benchmark, monkeypatch, tmp_path):
    rows = run_as_variant(benchmark, monkeypatch, tmp_path, 'HAT-L', 'HAT-L_SRx4_ImageNet-pretrain.pth')
    urban = rows['Urban100']
    assert (urban['paper_row'], urban['paper_psnr'], urban['paper_ssim']) == ('HAT-L', '28.600000', '0.849800')
    assert (urban['paper_psnr_trust'], urban['paper_ssim_trust']) == ('two sources', 'one source')
    assert (urban['paper_psnr_sources'], urban['paper_ssim_sources']) == ('C D', 'C')
    assert (rows['Set5']['paper_psnr'], rows['Set5']['paper_psnr_trust'], rows['Set5']['paper_ssim_trust']) == (
        '33.300000', 'one source', '')
    table = rows['table']
    assert '| HAT-L x4 (published) | 33.30† / n/a | 29.47† / n/a | 28.09† / n/a | 28.60‡ / 0.8498† | 33.09† / n/a |' \
        in table
    assert '- Urban100: PSNR 28.60‡ [C, D], two sources; SSIM 0.8498† [C], one source' in table
    assert '- [D] github.com/ming053l/DRCT, README.md' in table
    assert '†, one source only' in table and 'Note: x4 Manga109' in table


def test_imagenet_pretrained_hat_gets_its_row(benchmark, monkeypatch, tmp_path):
    rows = run_as_variant(benchmark, monkeypatch, tmp_path, 'HAT', 'HAT_SRx3_ImageNet-pretrain.pth', scale=3)
    assert rows['Set5']['paper_row'] == 'HAT-ImageNet'
    assert [rows[s]['paper_psnr'] for s in ('Set5', 'Set14', 'B100', 'Urban100', 'Manga109')] == [
        '35.160000', '31.330000', '29.590000', '30.700000', '35.840000']
    assert {rows[s]['paper_psnr_trust'] for s in ('Set5', 'Urban100')} == {'one source'}
    assert rows['Set5']['paper_psnr_sources'] == 'E' and rows['Set5']['paper_ssim'] == ''
    # --published overrides the file name
    rows = run_as_variant(benchmark, monkeypatch, tmp_path, 'HAT', 'HAT_SRx3_ImageNet-pretrain.pth',
                          '--published', 'HAT', scale=3)
    assert rows['Urban100']['paper_row'] == 'HAT' and rows['Urban100']['paper_psnr'] == '30.230000'
    assert rows['Set5']['paper_psnr'] == ''  # HAT x3 Set5 has no source

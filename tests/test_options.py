"""Option files: the official ones are unchanged, every network in them builds, and the benchmark tests line up.

Networks are built on the meta device: shapes and parameter counts without allocating memory, so even HAT-L
(40.8M parameters) builds in milliseconds.
"""
from __future__ import annotations

import inspect
import json
import re
import shutil
import subprocess
from pathlib import Path, PurePosixPath

import pytest
import torch
import yaml
from basicsr.utils.registry import ARCH_REGISTRY

from conftest import GOLDEN, REPO, SHARED

OPTIONS = REPO / 'options'
PRETRAINED_DIR = PurePosixPath('experiments/pretrained_models')
PRETRAINED_README = REPO / PRETRAINED_DIR / 'README.md'
OPTION_FILES = sorted(p.relative_to(REPO).as_posix() for p in OPTIONS.rglob('*.yml'))
TEST_OPTION_FILES = [p for p in OPTION_FILES if p.startswith('options/test/')]

SCALES = (2, 3, 4)
VARIANTS = ('HAT-S', 'HAT', 'HAT-L')
# The file that tests a released model on all five benchmark sets. HAT's short name belongs to the official
# Set5-only file, so its five-set test carries the suffix `_benchmark`.
FIVE_SET_FILE = {
    'HAT-S': 'options/test/HAT-S_SRx{scale}.yml',
    'HAT': 'options/test/HAT_SRx{scale}_benchmark.yml',
    'HAT-L': 'options/test/HAT-L_SRx{scale}.yml',
}
CHECKPOINT = {
    'HAT-S': 'HAT-S_SRx{scale}.pth',
    'HAT': 'HAT_SRx{scale}.pth',
    'HAT-L': 'HAT-L_SRx{scale}_ImageNet-pretrain.pth',
}
# The official file whose network_g is the reference for each variant.
OFFICIAL_NETWORK_SOURCE = {
    'HAT-S': 'options/test/HAT-S_SRx{scale}.yml',
    'HAT': 'options/test/HAT_SRx{scale}.yml',
    'HAT-L': 'options/test/HAT-L_SRx{scale}_ImageNet-pretrain.yml',
}
# (dataset name, folder under ./datasets) exactly as the official HAT-S test files spell them
BENCHMARK_SETS = [('Set5', 'Set5'), ('Set14', 'Set14'), ('Urban100', 'urban100'), ('BSDS100', 'BSDS100'),
                  ('Manga109', 'manga109')]
NUM_OFFICIAL_FILES = 35


def _official_json() -> Path | None:
    for folder in (GOLDEN, SHARED / 'golden'):
        if (folder / 'official_options.json').is_file():
            return folder / 'official_options.json'
    return None


OFFICIAL_JSON = _official_json()
OFFICIAL: dict[str, dict] = json.loads(OFFICIAL_JSON.read_text()) if OFFICIAL_JSON else {}
NO_OFFICIAL = pytest.mark.skipif(
    not OFFICIAL, reason=f'official_options.json not found in {GOLDEN} or {SHARED / "golden"}')
FIVE_SET_PATHS = {FIVE_SET_FILE[v].format(scale=s) for v in VARIANTS for s in SCALES}
MANIFESTS = {(v, s): json.loads((GOLDEN / f'manifest_{v}_SRx{s}.json').read_text()) for v in VARIANTS for s in SCALES}
HAT_DEFAULTS = {name: p.default for name, p in inspect.signature(ARCH_REGISTRY.get('HAT').__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}


def load(path: str) -> dict:
    with open(REPO / path, encoding='utf-8') as f:
        return yaml.safe_load(f)


def first_difference(got, want, where: str = '') -> str | None:
    """Where two parsed YAML trees differ, with types compared strictly (2 != 2.0, True != 1, None != missing)."""
    if type(got) is not type(want):
        return f'{where or "<root>"}: {got!r} ({type(got).__name__}) != {want!r} ({type(want).__name__})'
    if isinstance(want, dict):
        if list(got) != list(want) and set(got) != set(want):
            return f'{where or "<root>"}: keys {sorted(set(got) ^ set(want))} differ'
        for key in want:
            diff = first_difference(got[key], want[key], f'{where}.{key}' if where else key)
            if diff:
                return diff
        return None
    if isinstance(want, list):
        if len(got) != len(want):
            return f'{where}: {len(got)} items != {len(want)}'
        for i, (g, w) in enumerate(zip(got, want)):
            diff = first_difference(g, w, f'{where}[{i}]')
            if diff:
                return diff
        return None
    return None if got == want else f'{where}: {got!r} != {want!r}'


def network_differences(cfg: dict, reference: dict) -> list[str]:
    """Keywords on which two network_g dicts build different HATs (a missing keyword takes HAT's default)."""
    def value(d: dict, key: str):
        v = d[key] if key in d else HAT_DEFAULTS[key]
        return list(v) if isinstance(v, tuple) else v
    return [k for k in sorted(set(cfg) | set(reference)) if value(cfg, k) != value(reference, k)]


def build_on_meta(cfg: dict) -> torch.nn.Module:
    kwargs = dict(cfg)
    arch = kwargs.pop('type')
    with torch.device('meta'):
        return ARCH_REGISTRY.get(arch)(**kwargs)


def released_variant(cfg: dict) -> tuple[str, int] | None:
    for key, manifest in MANIFESTS.items():
        if not network_differences(cfg, manifest['network_g']):
            return key
    return None


def walk(tree, where: str = ''):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from walk(v, f'{where}.{k}' if where else k)
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from walk(v, f'{where}[{i}]')
    else:
        yield where, tree


def readme_checkpoints() -> set[str]:
    """File names in the tables of experiments/pretrained_models/README.md (first column)."""
    names = set()
    for line in PRETRAINED_README.read_text(encoding='utf-8').splitlines():
        match = re.match(r'\|\s*`([^`/]+\.pth)`\s*\|', line)
        if match:
            names.add(match.group(1))
    return names


def pretrained_references(paths: list[str]) -> dict[str, list[str]]:
    """Checkpoint file name -> option files that load it from experiments/pretrained_models/."""
    refs: dict[str, list[str]] = {}
    for path in paths:
        ckpt = load(path).get('path', {}).get('pretrain_network_g')
        if ckpt and PurePosixPath(ckpt.removeprefix('./')).parent == PRETRAINED_DIR:
            refs.setdefault(PurePosixPath(ckpt).name, []).append(path)
    return refs


# ------------------------------------------------------------------------------------------- (a) official files

@NO_OFFICIAL
def test_official_set_is_complete():
    assert len(OFFICIAL) == NUM_OFFICIAL_FILES
    missing = [p for p in OFFICIAL if not (REPO / p).is_file()]
    assert not missing, f'official option files missing: {missing}'


@NO_OFFICIAL
@pytest.mark.parametrize('path', sorted(OFFICIAL) or ['<none>'])
def test_official_file_is_unchanged(path):
    assert (REPO / path).is_file(), f'{path} is missing'
    diff = first_difference(load(path), OFFICIAL[path])
    assert diff is None, f'{path} differs from the official release at {diff}'


def test_first_difference_is_type_strict():
    """The comparison used above catches the slips YAML makes easy: 2e-4 read as a string, 2 vs 2.0, ~ vs missing."""
    assert first_difference(yaml.safe_load('lr: 2e-4'), {'lr': 2e-4}) is not None  # a str without !!float
    assert first_difference(yaml.safe_load('lr: !!float 2e-4'), {'lr': 2e-4}) is None
    assert first_difference({'mlp_ratio': 2.0}, {'mlp_ratio': 2}) is not None
    assert first_difference({'a': 1}, {'a': 1, 'suffix': None}) is not None
    assert first_difference({'x': [6, 6]}, {'x': [6, 6, 6]}) is not None


# ------------------------------------------------------------------------------------------- (b) every file builds

@pytest.mark.parametrize('path', OPTION_FILES)
def test_option_file_builds_network_g(path):
    opt = load(path)
    for key in ('name', 'model_type', 'scale', 'num_gpu', 'datasets', 'network_g', 'path'):
        assert key in opt, f'{path}: no `{key}`'
    cfg = opt['network_g']
    assert cfg.get('upscale', opt['scale']) == opt['scale'], f'{path}: network_g.upscale != scale'
    stray = [(w, v) for w, v in walk(opt) if isinstance(v, str) and re.fullmatch(r'[-+]?\d+(\.\d*)?[eE][-+]?\d+', v)]
    assert not stray, f'{path}: numbers parsed as strings (write !!float): {stray}'

    net = build_on_meta(cfg)
    params = list(net.parameters())
    assert params and all(p.is_meta for p in params)
    if cfg['type'] != 'HAT':
        return
    assert net.conv_first.out_channels == cfg['embed_dim']
    assert len(net.layers) == len(cfg['depths'])

    variant = released_variant(cfg)
    if path in OFFICIAL or path in FIVE_SET_PATHS:
        assert variant is not None, f'{path}: network_g is none of the released HAT-S/HAT/HAT-L models'
    if variant is not None:
        manifest = MANIFESTS[variant]
        assert variant[1] == opt['scale']
        assert sum(p.numel() for p in params) == manifest['num_params']
        shapes = {k: list(v.shape) for k, v in net.state_dict().items()}
        assert shapes == manifest['state_dict'], f'{path}: state-dict layout differs from released {variant}'


@pytest.mark.parametrize('path', [p for p in OPTION_FILES if 'network_d' in load(p)] or ['<none>'])
def test_option_file_builds_network_d(path):
    if path == '<none>':
        pytest.skip('no option file has a network_d')
    cfg = load(path)['network_d']
    if cfg['type'] not in ARCH_REGISTRY:
        pytest.skip(f'{cfg["type"]} is not registered in ARCH_REGISTRY yet')
    net = build_on_meta(cfg)
    params = list(net.parameters())
    assert params and all(p.is_meta for p in params)
    first_conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.in_channels == cfg['num_in_ch']
    assert first_conv.out_channels == cfg['num_feat']


# ------------------------------------------------------------------------------------------- (c) five-set tests

@pytest.mark.parametrize('scale', SCALES)
@pytest.mark.parametrize('variant', VARIANTS)
def test_five_set_test_file(variant, scale):
    path = FIVE_SET_FILE[variant].format(scale=scale)
    assert (REPO / path).is_file(), f'{path} is missing'
    opt = load(path)
    assert opt['name'] == Path(path).stem
    assert opt['model_type'] == 'HATModel'
    assert opt['scale'] == scale

    sets = list(opt['datasets'].items())
    assert [d['name'] for _, d in sets] == [name for name, _ in BENCHMARK_SETS]
    for (key, dataset), (_, folder) in zip(sets, BENCHMARK_SETS):
        assert key.startswith('test')
        assert dataset['type'] == 'PairedImageDataset'
        assert dataset['dataroot_gt'] == f'./datasets/{folder}/GTmod{scale}'
        assert dataset['dataroot_lq'] == f'./datasets/{folder}/LRbicx{scale}'

    assert opt['path']['pretrain_network_g'] == f'./{PRETRAINED_DIR}/{CHECKPOINT[variant].format(scale=scale)}'
    assert opt['path']['param_key_g'] == 'params_ema'
    assert opt['path']['strict_load_g'] is True
    for metric in ('psnr', 'ssim'):
        assert opt['val']['metrics'][metric]['crop_border'] == scale
        assert opt['val']['metrics'][metric]['test_y_channel'] is True

    manifest_cfg = MANIFESTS[(variant, scale)]['network_g']
    assert network_differences(opt['network_g'], manifest_cfg) == []


@NO_OFFICIAL
@pytest.mark.parametrize('scale', SCALES)
@pytest.mark.parametrize('variant', VARIANTS)
def test_five_set_test_file_follows_official_settings(variant, scale):
    """Datasets, metrics and loading are those of the official five-set (HAT-S) file; network_g is the variant's."""
    opt = load(FIVE_SET_FILE[variant].format(scale=scale))
    reference = OFFICIAL[f'options/test/HAT-S_SRx{scale}.yml']
    for key in ('model_type', 'scale', 'num_gpu', 'manual_seed', 'datasets', 'val'):
        assert first_difference(opt[key], reference[key], key) is None
    network = OFFICIAL[OFFICIAL_NETWORK_SOURCE[variant].format(scale=scale)]['network_g']
    assert first_difference(opt['network_g'], network, 'network_g') is None


def test_network_comparison_sees_a_variant_change():
    hat_l = MANIFESTS[('HAT-L', 4)]['network_g']
    assert network_differences(MANIFESTS[('HAT', 4)]['network_g'], hat_l) == ['depths', 'num_heads']
    assert network_differences({**hat_l, 'mlp_ratio': 2}, hat_l) == []  # 2 and 2.0 build the same network
    assert network_differences({k: v for k, v in hat_l.items() if k != 'qkv_bias'}, hat_l) == []  # the default
    assert released_variant({**hat_l, 'upscale': 3}) == ('HAT-L', 3)


# ------------------------------------------------------------------------------------------- (d) checkpoints

@pytest.mark.parametrize('path', TEST_OPTION_FILES)
def test_test_checkpoint_is_documented(path):
    ckpt = load(path)['path'].get('pretrain_network_g')
    assert ckpt, f'{path}: a test option file needs path.pretrain_network_g'
    assert PurePosixPath(ckpt.removeprefix('./')).parent == PRETRAINED_DIR, f'{path}: {ckpt} is not in {PRETRAINED_DIR}'
    assert PurePosixPath(ckpt).name in readme_checkpoints(), f'{path}: {ckpt} is not listed in {PRETRAINED_README}'


def test_readme_lists_exactly_the_referenced_checkpoints():
    refs = pretrained_references(OPTION_FILES)
    listed = readme_checkpoints()
    assert listed == set(refs), f'listed but unused: {listed - set(refs)}; used but unlisted: {set(refs) - listed}'
    # the README also says which files use each checkpoint
    text = PRETRAINED_README.read_text(encoding='utf-8')
    for name, users in refs.items():
        row = next(line for line in text.splitlines() if line.startswith(f'| `{name}`'))
        for user in users:
            assert f'`{user}`' in row, f'README row of {name} does not name {user}'


def test_pretrained_readme_is_not_git_ignored():
    if shutil.which('git') is None:
        pytest.skip('git is not installed')
    result = subprocess.run(['git', 'check-ignore', '-q', str(PRETRAINED_README.relative_to(REPO))], cwd=REPO,
                            capture_output=True)
    if result.returncode == 128:
        pytest.skip('not a git checkout')
    assert result.returncode == 1, f'{PRETRAINED_README} is ignored by .gitignore'

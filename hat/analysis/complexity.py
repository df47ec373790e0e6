"""Parameters and multiply-adds of HAT variants (and SwinIR, the paper's baseline), beside the published figures.

    python -m hat.analysis.complexity                       # HAT-S, HAT, HAT-L and SwinIR, x4, 64x64 LR input
    python -m hat.analysis.complexity --variants HAT --scale 2 --size 128
    python -m hat.analysis.complexity -opt options/test/HAT-L_SRx4_ImageNet-pretrain.yml --variants

What is counted
    * parameters: every element of ``net.parameters()``; buffers (``relative_position_index_SA``/``_OCA``, the RGB
      mean) are not parameters and are not counted.
    * multiply-accumulates (MACs, the paper's "Multi-Adds"), one per multiplication of a weight or activation that is
      summed into an output, for one forward pass of a ``1 x C x size x size`` LR input:
        - conv: every ``aten.convolution`` (3x3 convs, the CAB convs, the channel-attention 1x1 convs, the
          upsampler): ``output elements x in_channels / groups x kh x kw``;
        - linear: every ``aten.addmm``/``aten.mm`` (the qkv, projection and MLP layers): ``M x N x K``;
        - attention: every ``aten.bmm``/``aten.baddbmm`` and fused attention kernel, which in HAT and SwinIR are the
          two products of window attention, ``q @ k^T`` and ``attn @ v``: ``heads x N_q x N_k x head_dim`` each, per
          window.
      Not counted: bias additions, softmax, LayerNorm, GELU/ReLU/sigmoid, residual additions, the scaling of ``q``,
      pooling, padding, pixel shuffle and memory movement. They are elementwise (a few operations per activation,
      well under 1% of the total here), and the paper's figures leave them out too: this convention reproduces the
      paper's SwinIR figure (53.6G) to the first decimal.

Published figures (``hat/data/published_results.json``, x4 and a 64x64 input only) carry the mark of their trust
level: unmarked, the authors' own text; ``‡``, two independent sources; ``†``, one secondary source. Their sources
are listed under the table. HAT-L's Multi-Adds have no published source: its row shows this tool's count there,
labelled "counted here".

How: the network is built on PyTorch's ``meta`` device (shapes only, no memory, no arithmetic) and run once under
``torch.utils.flop_counter.FlopCounterMode``, which records every matrix product and convolution with its shapes; it
reports FLOPs = 2 x MACs for these operations. Attention is switched to its explicit path (``set_fused_attn(False)``)
so that its products are plain ``bmm`` calls. A count takes about a second per model on a laptop CPU.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
import yaml
from torch.utils.flop_counter import FlopCounterMode

import hat  # noqa: F401  (compat shim and registries before anything from basicsr)
from basicsr.utils.registry import ARCH_REGISTRY
from hat.archs.detect import RELEASED_HAT_SHARED, RELEASED_HAT_VARIANTS

logger = logging.getLogger(__name__)

PUBLISHED_RESULTS = Path(__file__).resolve().parents[1] / 'data' / 'published_results.json'

# SwinIR-M, the classical-SR SwinIR the HAT paper compares with (SwinIR's "classical" x4 setting).
SWINIR_CLASSICAL = dict(in_chans=3, img_size=64, window_size=8, img_range=1.0, depths=[6] * 6, embed_dim=180,
                        num_heads=[6] * 6, mlp_ratio=2, upsampler='pixelshuffle', resi_connection='1conv')
VARIANTS = (*RELEASED_HAT_VARIANTS, 'SwinIR')
DEFAULT_VARIANTS = VARIANTS
DEFAULT_SCALE = 4
DEFAULT_SIZE = 64

# aten operator -> category of the count (see the module docstring).
_CATEGORIES = {
    'convolution': 'conv',
    'addmm': 'linear',
    'mm': 'linear',
    'bmm': 'attention',
    'baddbmm': 'attention',
}
CATEGORIES = ('conv', 'linear', 'attention')


@dataclass(frozen=True)
class Complexity:
    """Size and computation of one network for one input size.

    Attributes:
        name: what was counted (a variant name or an option file's ``name``).
        params: number of parameters.
        macs: multiply-accumulates by category (``conv``, ``linear``, ``attention``; see the module docstring).
        input_size: (C, H, W) of the LR input the MACs are for.
    """

    name: str
    params: int
    macs: Mapping[str, int]
    input_size: tuple[int, int, int]

    @property
    def total_macs(self) -> int:
        return sum(self.macs.values())

    def as_dict(self) -> dict[str, Any]:
        return {'name': self.name, 'params': self.params, 'macs': dict(self.macs), 'total_macs': self.total_macs,
                'input_size': list(self.input_size)}


def _category(op_name: str) -> str:
    """Category of an aten operator name such as ``aten.addmm`` or ``aten._scaled_dot_product_flash_attention``."""
    base = op_name.split('.')[-1] if op_name.startswith('aten.') else op_name.split('.')[0]
    if 'scaled_dot_product' in base:
        return 'attention'
    if base not in _CATEGORIES:
        raise ValueError(f'FlopCounterMode counted {op_name}, which this tool does not know how to label; add it to '
                         '_CATEGORIES')
    return _CATEGORIES[base]


def count_complexity(net: nn.Module, *, size: int | tuple[int, int] = DEFAULT_SIZE, in_chans: int | None = None,
                     name: str = '') -> Complexity:
    """Count the parameters of ``net`` and the MACs of one forward pass on a ``1 x C x H x W`` input.

    Args:
        net: any network; best built on the ``meta`` device (nothing is computed then). It is put in eval mode.
        size: H = W of the LR input, or (H, W).
        in_chans: input channels C; default: those of the first convolution.
        name: label of the result.
    Returns:
        the :class:`Complexity`.
    """
    height, width = (size, size) if isinstance(size, int) else size
    if in_chans is None:
        first = next((m for m in net.modules() if isinstance(m, nn.Conv2d)), None)
        if first is None:
            raise ValueError(f'{type(net).__name__} has no Conv2d: pass in_chans')
        in_chans = first.in_channels
    params = sum(p.numel() for p in net.parameters())
    device = next(net.parameters()).device
    if hasattr(net, 'set_fused_attn'):
        net.set_fused_attn(False)  # explicit q @ k^T and attn @ v: counted as bmm on every device
    net.eval()
    x = torch.zeros(1, in_chans, height, width, device=device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        net(x)
    macs = dict.fromkeys(CATEGORIES, 0)
    for op, flops in counter.get_flop_counts()['Global'].items():
        # FlopCounterMode counts 2 FLOPs (a multiply and an add) per multiply-accumulate for all these operators.
        macs[_category(str(op))] += int(flops) // 2
    return Complexity(name=name or type(net).__name__, params=params, macs=macs, input_size=(in_chans, height, width))


def network_on_meta(arch: str, kwargs: Mapping[str, Any]) -> nn.Module:
    """Build ``ARCH_REGISTRY[arch](**kwargs)`` without allocating or initialising weights, when the class allows it.

    Args:
        arch: a registered architecture name (``'HAT'``, ``'SwinIR'``, ``'SRVGGNetCompact'``, ...).
        kwargs: its constructor keywords (an option file's ``network_g`` without ``type``).
    Returns:
        the network, on the ``meta`` device: ready for :func:`count_complexity`.
    """
    cls = ARCH_REGISTRY.get(arch)
    try:
        with torch.device('meta'):
            return cls(**kwargs)
    except (RuntimeError, NotImplementedError):
        # Some constructors read values while building (basicsr's SwinIR calls .item() on its drop-path rates):
        # build those on the CPU, then drop the storage.
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', message='torch.meshgrid', category=UserWarning)
            return cls(**kwargs).to('meta')


def variant_network(name: str, *, scale: int = DEFAULT_SCALE) -> nn.Module:
    """A released HAT variant (``HAT-S``, ``HAT``, ``HAT-L``) or SwinIR-M at ``scale``, on the meta device."""
    if name in RELEASED_HAT_VARIANTS:
        kwargs = dict(RELEASED_HAT_SHARED, **RELEASED_HAT_VARIANTS[name], upscale=scale, img_size=64,
                      conv_scale=0.01, img_range=1.0, upsampler='pixelshuffle')
        return network_on_meta('HAT', kwargs)
    if name == 'SwinIR':
        return network_on_meta('SwinIR', dict(SWINIR_CLASSICAL, upscale=scale))
    raise ValueError(f'unknown variant {name!r}; choose from {", ".join(VARIANTS)}')


def options_network(path: str | Path) -> tuple[str, nn.Module]:
    """``network_g`` of an option file, on the meta device, with the file's ``name``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'option file not found: {path}')
    opt = yaml.safe_load(path.read_text(encoding='utf-8')) or {}
    network = opt.get('network_g')
    if not isinstance(network, dict) or 'type' not in network:
        raise ValueError(f'{path} has no network_g with a type')
    kwargs = dict(network)
    arch = kwargs.pop('type')
    if arch not in ARCH_REGISTRY:
        raise ValueError(f'{path}: network_g.type={arch!r} is not a registered architecture')
    return str(opt.get('name') or path.stem), network_on_meta(arch, kwargs)


def load_published(path: Path = PUBLISHED_RESULTS) -> dict[str, Any]:
    """``hat/data/published_results.json``: the published figures, each with its sources and trust level."""
    return json.loads(path.read_text(encoding='utf-8'))


def published_complexity(path: Path = PUBLISHED_RESULTS) -> dict[str, dict[str, Any]]:
    """Published parameters (``params_m``, M) and Multi-Adds (``multi_adds_g``, G) by network name, x4 and a 64x64
    input, each with its ``sources`` and ``trust`` level; a figure without a source is None."""
    return load_published(path)['complexity']['models']


# The authors' own figures stay unmarked; the others are marked so that nobody reads them as verified.
TRUST_MARKS = {'authors': '', 'two sources': '‡', 'one source': '†'}


def _published_figure(entry: Mapping[str, Any], key: str, unit: str = '') -> str:
    """``20.8M`` or ``40.84M†``: a published figure with the mark of its trust level; empty without a figure."""
    value = entry.get(key)
    if value is None:
        return ''
    # A figure whose level is not stated is trusted no more than a single source.
    level = (entry.get('trust') or {}).get(key, 'one source')
    return f'{value}{unit}{TRUST_MARKS.get(level, TRUST_MARKS["one source"])}'


def _percent(ours: float, paper: float | None) -> str:
    return '' if paper is None else f'{100 * (ours - paper) / paper:+.1f}%'


def format_table(results: Sequence[Complexity], published: Mapping[str, Mapping[str, Any]], *, scale: int,
                 sources: Mapping[str, Mapping[str, str]] | None = None) -> str:
    """Markdown table: parameters and MACs by category, beside the published figures (x4, 64x64 input only).

    Args:
        results: the counts.
        published: :func:`published_complexity`.
        scale: the scale counted; published figures are shown for x4 only.
        sources: ``published_results.json``'s ``sources``, to name those of the figures shown under the table.
    Returns:
        the table and its notes.
    """
    lines = ['| Model | Params | Published params | MACs (G) | conv | linear | attention | Published Multi-Adds (G) '
             '| Diff |',
             '|---|---:|---:|---:|---:|---:|---:|---:|---:|']
    comparable = scale == 4
    used: list[str] = []
    counted_here: list[str] = []
    for r in results:
        ref = published.get(r.name, {}) if comparable and r.input_size[1:] == (64, 64) else {}
        params_m, macs_g = r.params / 1e6, r.total_macs / 1e9
        paper_macs = ref.get('multi_adds_g')
        macs_cell = _published_figure(ref, 'multi_adds_g')
        if ref and paper_macs is None:
            # No source gives this network's Multi-Adds (HAT-L): show ours in its place, said to be ours.
            macs_cell = f'{macs_g:.1f} (counted here)'
            counted_here.append(r.name)
        for figure in ('params_m', 'multi_adds_g'):
            if ref.get(figure) is not None:
                used += (ref.get('sources') or {}).get(figure, [])
        lines.append(
            f'| {r.name} | {r.params:,} ({params_m:.1f}M) | {_published_figure(ref, "params_m", "M")} '
            f'| {macs_g:.1f} | {r.macs["conv"] / 1e9:.1f} | {r.macs["linear"] / 1e9:.1f} '
            f'| {r.macs["attention"] / 1e9:.1f} | {macs_cell} | {_percent(macs_g, paper_macs)} |')
    size = results[0].input_size if results else (3, DEFAULT_SIZE, DEFAULT_SIZE)
    lines.append('')
    lines.append(f'x{scale}, input 1x{size[0]}x{size[1]}x{size[2]} (LR). MACs: conv + linear (weights) + attention '
                 '(q@k^T and attn@v); softmax, normalisation, activations and additions are not counted. '
                 'Published figures are for x4 and a 64x64 input.')
    if used:
        lines.append('Published figures: unmarked, the authors\' own text; ‡ two independent sources agree; † one '
                     'source only, a secondary source quoting the paper (not verified).')
        for key in dict.fromkeys(used):
            entry = (sources or {}).get(key, {})
            lines.append(f'- [{key}] {entry.get("where", "see hat/data/published_results.json")}')
    for name in counted_here:
        lines.append(f'- {name}: no published Multi-Adds has a source; the figure shown is this tool\'s count.')
    return '\n'.join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='python -m hat.analysis.complexity',
        description='Parameters and multiply-adds of HAT variants and SwinIR, next to the paper\'s figures.')
    parser.add_argument('--variants', nargs='*', default=list(DEFAULT_VARIANTS), choices=VARIANTS,
                        help=f'built-in models to count (default: {" ".join(DEFAULT_VARIANTS)}); '
                        'pass --variants with no name to count only -opt files')
    parser.add_argument('-opt', '--opt', action='append', default=[], metavar='OPTION_FILE',
                        help='also count the network_g of this option file (repeatable)')
    parser.add_argument('--scale', type=int, default=DEFAULT_SCALE, help='upscaling factor of the built-in models')
    parser.add_argument('--size', type=int, default=DEFAULT_SIZE, help='side of the square LR input (default 64)')
    parser.add_argument('--json', action='store_true', help='print JSON instead of a Markdown table')
    return parser


def main(argv: Sequence[str] | None = None) -> list[Complexity]:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    if args.size < 1:
        parser.error('--size must be positive')
    results = []
    try:
        for name in args.variants:
            results.append(count_complexity(variant_network(name, scale=args.scale), size=args.size, name=name))
        for option_file in args.opt:
            name, net = options_network(option_file)
            results.append(count_complexity(net, size=args.size, name=name))
    except (FileNotFoundError, ValueError, TypeError) as err:
        parser.exit(2, f'{parser.prog}: error: {err}\n')
    if not results:
        parser.error('nothing to count: name --variants or pass -opt')
    if args.json:
        sys.stdout.write(json.dumps([r.as_dict() for r in results], indent=1) + '\n')
    else:
        published = load_published()
        sys.stdout.write(format_table(results, published['complexity']['models'], scale=args.scale,
                                      sources=published.get('sources')) + '\n')
    return results


if __name__ == '__main__':
    main()

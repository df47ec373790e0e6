"""Intermediate feature maps: the output of each stage of the deep feature extraction, as images.

Stages of a HAT (forward hooks, nothing in the network changes): ``conv_first`` (shallow features), every RHAG
``layers[i]`` and ``conv_after_body`` (end of the deep features). An RHAG returns tokens [B, H*W, C]; they are
reshaped with the feature size the RHAG was called with (its ``x_size`` argument), which is the input size padded to
a multiple of the window, and every map is cropped back to the input size. Window attention leaves a blocking
pattern on the window grid in these maps; the paper shows it for SwinIR and how HAT reduces it.

Other architectures are supported when they are built the same way: an optional ``conv_first``, a ``layers`` or
``body`` list of stages (tokens with an ``x_size`` argument, like SwinIR's RSTBs, or [B, C, H, W] maps, like the
residual groups of RCAN and the residual blocks of EDSR) and an optional ``conv_after_body``.

One PNG per stage: a grid of tiles, first the mean absolute activation over channels, then the first ``channels``
channels, row by row; each tile is min-max normalised on its own and coloured with viridis (dark: low).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from hat.analysis import render
from hat.analysis.loading import input_channels, load_model
from hat.inference.precision import resolve_device
from hat.io.images import read_image_tensor

logger = logging.getLogger(__name__)

DEFAULT_CHANNELS = 15
GRID_COLUMNS = 4
MIN_TILE_SIDE = 96


@dataclass
class StageFeature:
    """name: the module's attribute path (``conv_first``, ``layers.0``, ...); features: [C, H, W] float32 (CPU)."""

    name: str
    features: Tensor


def feature_stages(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (name, module) stages whose outputs are shown, in forward order.

    Raises ValueError for architectures without a ``layers`` or ``body`` list.
    """
    body = None
    for attr in ('layers', 'body'):
        modules = getattr(net, attr, None)
        if isinstance(modules, (nn.ModuleList, nn.Sequential)) and len(modules) > 0:
            body = (attr, modules)
            break
    if body is None:
        raise ValueError(f'{type(net).__name__} has no `layers` or `body` list of stages. Feature maps are supported '
                         'for HAT and architectures built like it: conv_first, a layers/body list, conv_after_body '
                         '(e.g. SwinIR, RCAN, EDSR).')
    stages = []
    if isinstance(getattr(net, 'conv_first', None), nn.Module):
        stages.append(('conv_first', net.conv_first))
    attr, modules = body
    stages += [(f'{attr}.{i}', m) for i, m in enumerate(modules)]
    if isinstance(getattr(net, 'conv_after_body', None), nn.Module):
        stages.append(('conv_after_body', net.conv_after_body))
    return stages


def _size_argument(args: tuple) -> tuple[int, int] | None:
    """The (H, W) a token stage was called with, e.g. ``RHAG.forward(x, x_size, params)``."""
    if len(args) > 1 and isinstance(args[1], (tuple, list, torch.Size)) and len(args[1]) == 2:
        if all(isinstance(v, int) for v in args[1]):
            return int(args[1][0]), int(args[1][1])
    return None


def collect_features(net: nn.Module, image: Tensor) -> list[StageFeature]:
    """Run ``net`` once on ``image`` [C, H, W] (eval mode, no gradients) and return every stage's output as
    [channels, H, W], cropped to the input size."""
    stages = feature_stages(net)
    param = next(net.parameters(), None)
    if param is not None:
        image = image.to(device=param.device, dtype=param.dtype)
    h, w = image.shape[-2:]
    captured: list[StageFeature] = []
    last_map_size: list = [None]

    def hook_for(name: str):

        def hook(module: nn.Module, args: tuple, output) -> None:
            out = output[0] if isinstance(output, (tuple, list)) else output
            if out.ndim == 4:
                maps = out[0]
            elif out.ndim == 3:
                size = _size_argument(args) or last_map_size[0]
                if size is None or size[0] * size[1] != out.shape[1]:
                    raise ValueError(f'stage {name} returned tokens {list(out.shape)} whose spatial size is unknown; '
                                     'only stages called with an x_size argument, or after a [B, C, H, W] stage, '
                                     'can be shown.')
                maps = out[0].transpose(0, 1).reshape(out.shape[2], *size)
            else:
                raise ValueError(f'stage {name} returned a tensor of shape {list(out.shape)}; expected '
                                 '[B, C, H, W] or tokens [B, H*W, C].')
            last_map_size[0] = tuple(maps.shape[-2:])
            captured.append(StageFeature(name, maps[:, :h, :w].detach().float().cpu()))

        return hook

    handles = [module.register_forward_hook(hook_for(name)) for name, module in stages]
    was_training = net.training
    try:
        net.eval()
        with torch.no_grad():
            net(image[None])
    finally:
        for handle in handles:
            handle.remove()
        net.train(was_training)
    return captured


def stage_grid(features: Tensor, *, channels: int = DEFAULT_CHANNELS) -> np.ndarray:
    """[C, H, W] -> uint8 BGR grid: mean |activation| first, then the first ``channels`` channels."""
    maps = [features.abs().mean(dim=0)] + [features[c] for c in range(min(channels, features.shape[0]))]
    tiles = [render.enlarge(render.feature_colors(m.numpy()), min_side=MIN_TILE_SIDE) for m in maps]
    return render.grid(tiles, columns=GRID_COLUMNS)


def overview(stage_features: Sequence[StageFeature]) -> np.ndarray:
    """The mean |activation| of every stage side by side, each captioned with its stage name."""
    panels = []
    for stage in stage_features:
        tile = render.enlarge(render.feature_colors(stage.features.abs().mean(dim=0).numpy()), min_side=MIN_TILE_SIDE)
        panels.append(render.captioned(tile, [stage.name]))
    return render.side_by_side(panels)


def save_features(stage_features: Sequence[StageFeature], out_dir: str | Path, *,
                  channels: int = DEFAULT_CHANNELS) -> dict:
    """Write ``NN_<stage>.png`` per stage and ``overview.png``. Returns {stage name: path, 'overview': path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for i, stage in enumerate(stage_features):
        path = out / f'{i:02d}_{stage.name}.png'
        render.write_png(path, stage_grid(stage.features, channels=channels))
        files[stage.name] = str(path)
    files['overview'] = str(out / 'overview.png')
    render.write_png(Path(files['overview']), overview(stage_features))
    return files


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog='python -m hat.analysis.features',
        description='Save the output of each deep-feature stage (conv_first, every RHAG, conv_after_body) as images.')
    parser.add_argument('-m', '--model', required=True,
                        help='checkpoint (.pth, architecture detected) or option file (.yml with network_g and '
                        'path.pretrain_network_g)')
    parser.add_argument('-i', '--image', required=True, help='input (LR) image')
    parser.add_argument('--out', required=True, help='output folder')
    parser.add_argument('--channels', type=int, default=DEFAULT_CHANNELS,
                        help=f'channels shown per stage after the mean |activation| (default {DEFAULT_CHANNELS})')
    parser.add_argument('--device', default=None, help='cuda, cpu, ... (default: cuda when available)')
    parser.add_argument('--param-key', default=None,
                        help='state-dict key in the checkpoint (default params_ema, then params)')
    parser.add_argument('--json', action='store_true', help='print one JSON object with the stages and files')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    try:
        summary = save_stage_images(args)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f'{parser.prog}: error: {err}\n')
    if args.json:
        sys.stdout.write(json.dumps(summary) + '\n')
    return summary


def save_stage_images(args: argparse.Namespace) -> dict:
    """Load the model and the image of ``args``, hook the stages and write their images. Returns a summary."""
    net = load_model(args.model, param_key=args.param_key, device=resolve_device(args.device))
    image = read_image_tensor(args.image, channels=input_channels(net))
    stage_features = collect_features(net, image)
    files = save_features(stage_features, args.out, channels=args.channels)
    summary = {
        'model': str(args.model),
        'arch': type(net).__name__,
        'image': str(args.image),
        'stages': [{'name': s.name, 'shape': list(s.features.shape), 'file': files[s.name]} for s in stage_features],
        'overview': files['overview'],
    }
    logger.info('%d stages of %s written to %s', len(stage_features), summary['arch'], args.out)
    return summary


if __name__ == '__main__':
    main()

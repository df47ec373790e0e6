"""Architecture detection from a state dict, and building the detected network.

    detect_architecture(sd)      key names and tensor shapes -> ``DetectedArch`` (type, constructor kwargs, variant)
    build_from_checkpoint(path)  read the file (:mod:`hat.io.checkpoints`), detect, build from basicsr's
                                 ``ARCH_REGISTRY``, load strictly, eval mode

Detection is declarative: every architecture lists the keys it requires, then reads each hyper-parameter from one
key's name or shape (``embed_dim`` from ``conv_first.weight``, ``window_size`` from ``relative_position_index_SA``,
``depths`` by counting blocks, the scale from the upsample convs). It reads shapes only, never values, so a state
dict of ``device='meta'`` tensors works. What the weights cannot tell (``img_size``, ``img_range``, ``conv_scale``,
...) is set to the released models' value and listed in ``DetectedArch.notes``. Finally the detected configuration is
built on the meta device and its state-dict layout compared with the checkpoint, so a detection either reproduces
every key and shape or fails with the reason.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from os import PathLike
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
from basicsr.utils.registry import ARCH_REGISTRY

from hat.archs.window import overlapping_window_size
from hat.io.checkpoints import (bare_network, layout_differences, load_state_dict, state_dict_layout,
                                 unwrap_state_dict)

logger = logging.getLogger('basicsr')

# HAT's reconstruction head always works with 64 features (fixed in the architecture, not a keyword).
HAT_NUM_FEAT = 64

# The released HAT variants (XPixelGroup/HAT option files). Everything here is architecture: two checkpoints with the
# same values are the same variant, whatever their scale. img_size, img_range and conv_scale are not in the weights.
RELEASED_HAT_VARIANTS: dict[str, dict[str, Any]] = {
    'HAT-S': dict(embed_dim=144, depths=[6] * 6, num_heads=[6] * 6, compress_ratio=24, squeeze_factor=24),
    'HAT': dict(embed_dim=180, depths=[6] * 6, num_heads=[6] * 6, compress_ratio=3, squeeze_factor=30),
    'HAT-L': dict(embed_dim=180, depths=[6] * 12, num_heads=[6] * 12, compress_ratio=3, squeeze_factor=30),
}
RELEASED_HAT_SHARED = dict(in_chans=3, window_size=16, overlap_ratio=0.5, mlp_ratio=2.0, resi_connection='1conv',
                           qkv_bias=True)

# Values the weights do not store, with the value every released HAT uses.
HAT_NOT_INFERABLE = {
    'img_range': (1.0, 'input scaling; not stored in the weights'),
    'conv_scale': (0.01, 'weight of the CAB branch; not stored in the weights (released models use 0.01)'),
    'qk_scale': (None, 'attention scale; not stored, None means head_dim ** -0.5 as in all released models'),
}
HAT_TRAINING_ONLY = 'drop_rate, attn_drop_rate, drop_path_rate and use_checkpoint are training-only and not stored; ' \
                    'the constructor defaults apply'
HAT_DEFAULT_IMG_SIZE = 64

# ReLU and LeakyReLU have no parameters: a state dict cannot tell them apart.
SRVGG_PARAMETER_FREE_ACT = 'leakyrelu'

VARIANT_CUSTOM = 'custom'


@dataclass
class DetectedArch:
    """What a state dict says about the network that produced it.

    Attributes:
        type: the ``ARCH_REGISTRY`` name (``'HAT'`` or ``'SRVGGNetCompact'``).
        kwargs: constructor keywords (``network_g`` without ``type``).
        variant: ``'HAT-S'``, ``'HAT'`` or ``'HAT-L'`` when the architecture is a released one, else ``'custom'``.
        notes: what could not be read from the weights and which value was assumed instead.
    """

    type: str
    kwargs: dict[str, Any]
    variant: str = VARIANT_CUSTOM
    notes: list[str] = field(default_factory=list)

    @property
    def scale(self) -> int:
        return int(self.kwargs['upscale'])

    def network_options(self) -> dict[str, Any]:
        """The ``network_g`` dict of an option file: ``{'type': ..., **kwargs}``."""
        return {'type': self.type, **self.kwargs}

    def summary(self) -> str:
        """One line, e.g. ``HAT-S x4 (HAT, embed_dim=144, depths=[6, 6, 6, 6, 6, 6], ...)``."""
        name = f'{self.variant} x{self.scale}' if self.variant != VARIANT_CUSTOM else \
            f'a custom {self.type} x{self.scale}'
        shown = _SUMMARY_KEYS.get(self.type, tuple(self.kwargs))
        details = ', '.join(f'{k}={self.kwargs[k]}' for k in shown if k in self.kwargs)
        return f'{name} ({self.type}, {details})'


_SUMMARY_KEYS = {
    'HAT': ('in_chans', 'embed_dim', 'depths', 'num_heads', 'window_size', 'compress_ratio', 'squeeze_factor',
            'mlp_ratio', 'overlap_ratio', 'resi_connection'),
    'SRVGGNetCompact': ('num_in_ch', 'num_out_ch', 'num_feat', 'num_conv', 'act_type'),
}

# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------------------------


class _Shapes:
    """Read-only view of a state dict by key names and shapes (values are never read: meta tensors work)."""

    def __init__(self, state_dict: Mapping[str, Any]) -> None:
        self.shapes = state_dict_layout(state_dict)

    def has(self, key: str) -> bool:
        return key in self.shapes

    def shape(self, key: str, ndim: int | None = None) -> tuple[int, ...]:
        if key not in self.shapes:
            raise ValueError(f'the state dict has no {key}')
        shape = self.shapes[key]
        if ndim is not None and len(shape) != ndim:
            raise ValueError(f'{key} has shape {list(shape)}, expected {ndim} dimensions')
        return shape

    def indices(self, pattern: str) -> list[int]:
        """Sorted distinct integers captured by ``pattern`` (one group ``(\\d+)``) at the start of the keys."""
        regex = re.compile(pattern)
        return sorted({int(m.group(1)) for k in self.shapes if (m := regex.match(k))})


def _isqrt_exact(n: int, what: str) -> int:
    root = math.isqrt(n)
    if root * root != n:
        raise ValueError(f'{what} ({n}) is not a perfect square')
    return root


def _consecutive(indices: list[int], what: str) -> int:
    if indices != list(range(len(indices))):
        raise ValueError(f'{what} are numbered {indices}, expected 0..{len(indices) - 1}')
    return len(indices)


def _ratio(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f'{what}: {numerator} is not a multiple of {denominator}')
    return numerator // denominator


def _infer_hat(sd: _Shapes) -> tuple[dict[str, Any], list[str]]:
    notes: list[str] = []
    blk = 'layers.0.residual_group.blocks.0'

    embed_dim, in_chans = sd.shape('conv_first.weight', 4)[:2]

    # relative_position_index_SA: [ws*ws, ws*ws]; relative_position_index_OCA: [ws*ws, ows*ows].
    window_size = _isqrt_exact(sd.shape('relative_position_index_SA', 2)[0], 'relative_position_index_SA side')
    ows = _isqrt_exact(sd.shape('relative_position_index_OCA', 2)[1], 'relative_position_index_OCA second dim')
    overlap_ratio = (ows - window_size) / window_size
    if overlapping_window_size(window_size, overlap_ratio) != ows:
        raise ValueError(f'no overlap_ratio gives an overlapping window of {ows} for window_size={window_size}')

    num_layers = _consecutive(sd.indices(r'layers\.(\d+)\.'), 'RHAGs (layers.N)')
    depths = [
        _consecutive(sd.indices(rf'layers\.{i}\.residual_group\.blocks\.(\d+)\.'), f'blocks of layers.{i}')
        for i in range(num_layers)
    ]
    # Bias tables: [(2ws-1)^2, heads] per HAB; the OCAB of the same RHAG has the same number of heads.
    num_heads = [sd.shape(f'layers.{i}.residual_group.blocks.0.attn.relative_position_bias_table', 2)[1]
                 for i in range(num_layers)]

    compress_ratio = _ratio(embed_dim, sd.shape(f'{blk}.conv_block.cab.0.weight', 4)[0], 'compress_ratio')
    squeeze_factor = _ratio(embed_dim, sd.shape(f'{blk}.conv_block.cab.3.attention.1.weight', 4)[0],
                            'squeeze_factor')

    # The MLP hidden width is int(embed_dim * mlp_ratio); keep the ratio that gives that width back.
    hidden = sd.shape(f'{blk}.mlp.fc1.weight', 2)[0]
    mlp_ratio = next((r for r in (hidden / embed_dim, round(hidden / embed_dim, 6), (hidden + 0.5) / embed_dim)
                      if int(embed_dim * r) == hidden), hidden / embed_dim)

    # Pixel-shuffle upsampler: log2(scale) convs to 4*64 channels, or one conv to 9*64 for x3, or none for x1.
    num_feat = sd.shape('conv_before_upsample.0.weight', 4)[0]
    if num_feat != HAT_NUM_FEAT:
        raise ValueError(f'conv_before_upsample.0.weight has {num_feat} output channels; HAT reconstructs with '
                         f'{HAT_NUM_FEAT}')
    ups = [sd.shape(f'upsample.{i}.weight', 4)[0] for i in sd.indices(r'upsample\.(\d+)\.weight')]
    if not ups:
        upscale = 1
        notes.append('upscale: no upsample convs, so upscale=1 (conv_last works at the input resolution)')
    elif all(c == 4 * HAT_NUM_FEAT for c in ups):
        upscale = 2**len(ups)
    elif ups == [9 * HAT_NUM_FEAT]:
        upscale = 3
    else:
        raise ValueError(f'upsample convs with {ups} output channels match neither pixel shuffle x2^n '
                         f'({4 * HAT_NUM_FEAT} each) nor x3 (one with {9 * HAT_NUM_FEAT})')

    kwargs: dict[str, Any] = dict(upscale=upscale, in_chans=in_chans, img_size=HAT_DEFAULT_IMG_SIZE, patch_size=1,
                                  window_size=window_size, embed_dim=embed_dim, depths=depths, num_heads=num_heads,
                                  compress_ratio=compress_ratio, squeeze_factor=squeeze_factor,
                                  conv_scale=HAT_NOT_INFERABLE['conv_scale'][0], overlap_ratio=overlap_ratio,
                                  mlp_ratio=mlp_ratio, qkv_bias=sd.has(f'{blk}.attn.qkv.bias'),
                                  img_range=HAT_NOT_INFERABLE['img_range'][0], upsampler='pixelshuffle',
                                  resi_connection='1conv' if sd.has('layers.0.conv.weight') else 'identity')
    if not sd.has('patch_embed.norm.weight'):
        kwargs['patch_norm'] = False

    if sd.has('absolute_pos_embed'):
        # [1, H*W, C] at the training patch size: the only place the weights record img_size.
        kwargs['ape'] = True
        tokens = sd.shape('absolute_pos_embed', 3)[1]
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise ValueError(f'absolute_pos_embed has {tokens} positions, not a square patch: cannot tell img_size')
        kwargs['img_size'] = side
    else:
        if window_size >= HAT_DEFAULT_IMG_SIZE:
            # A patch no larger than the window would switch the shifted windows off; the weights cannot say.
            kwargs['img_size'] = 2 * window_size
        notes.append(f'img_size: the training patch size is not stored in the weights; using {kwargs["img_size"]} '
                     '(without ape it only decides whether blocks shift their windows: img_size > window_size)')
    for name, (default, why) in HAT_NOT_INFERABLE.items():
        notes.append(f'{name}: {why}; using {default}')
    notes.append(HAT_TRAINING_ONLY)
    return kwargs, notes


def _hat_variant(kwargs: Mapping[str, Any]) -> str:
    for name, arch in RELEASED_HAT_VARIANTS.items():
        if all(kwargs.get(k) == v for k, v in {**RELEASED_HAT_SHARED, **arch}.items()):
            return name
    return VARIANT_CUSTOM


def _infer_srvgg(sd: _Shapes) -> tuple[dict[str, Any], list[str]]:
    notes: list[str] = []
    # Convs are the 4-D weights body.0, body.2, ...; a PReLU between them stores a [num_feat] weight.
    convs = [i for i in sd.indices(r'body\.(\d+)\.weight') if len(sd.shape(f'body.{i}.weight')) == 4]
    if convs != list(range(0, 2 * len(convs), 2)) or len(convs) < 2:
        raise ValueError(f'convolutions at body.{convs}: expected body.0, body.2, ..., body.2n (at least two)')
    num_feat, num_in_ch = sd.shape('body.0.weight', 4)[:2]
    num_conv = len(convs) - 2
    if sd.has('body.1.weight'):
        act_type = 'prelu'
    else:
        act_type = SRVGG_PARAMETER_FREE_ACT
        notes.append(f'act_type: the activations have no parameters, so relu and leakyrelu look the same; using '
                     f'{act_type!r} (set act_type if the model was trained with the other)')

    # The last conv has num_out_ch * upscale^2 channels; num_out_ch is num_in_ch except for a gray-to-colour model.
    last_out = sd.shape(f'body.{convs[-1]}.weight', 4)[0]
    for num_out_ch in dict.fromkeys((num_in_ch, 3)):
        squared = last_out / num_out_ch
        if squared.is_integer() and math.isqrt(int(squared))**2 == int(squared):
            upscale = math.isqrt(int(squared))
            break
    else:
        raise ValueError(f'the last conv body.{convs[-1]} has {last_out} output channels, which is not '
                         f'num_out_ch * upscale^2 for num_out_ch {num_in_ch} or 3')
    if num_out_ch != num_in_ch:
        notes.append(f'num_out_ch: {last_out} output channels read as {num_out_ch} x {upscale}^2')
    kwargs = dict(num_in_ch=num_in_ch, num_out_ch=num_out_ch, num_feat=num_feat, num_conv=num_conv, upscale=upscale,
                  act_type=act_type)
    return kwargs, notes


@dataclass(frozen=True)
class ArchSpec:
    """How to recognise one architecture: required keys, an optional pattern every key must match, the reader."""

    type: str
    required: tuple[str, ...]
    infer: Callable[[_Shapes], tuple[dict[str, Any], list[str]]]
    variant: Callable[[Mapping[str, Any]], str] = lambda kwargs: VARIANT_CUSTOM
    all_keys_match: str | None = None
    registry_names: tuple[str, ...] = ()

    def missing(self, sd: _Shapes) -> list[str]:
        return [k for k in self.required if not sd.has(k)]

    def foreign_keys(self, sd: _Shapes) -> list[str]:
        if self.all_keys_match is None:
            return []
        regex = re.compile(self.all_keys_match)
        return [k for k in sd.shapes if not regex.fullmatch(k)]


ARCH_SPECS: tuple[ArchSpec, ...] = (
    ArchSpec(
        type='HAT',
        required=('conv_first.weight', 'relative_position_index_SA', 'relative_position_index_OCA',
                  'layers.0.residual_group.blocks.0.attn.relative_position_bias_table',
                  'layers.0.residual_group.blocks.0.conv_block.cab.0.weight',
                  'layers.0.residual_group.overlap_attn.relative_position_bias_table', 'conv_before_upsample.0.weight',
                  'conv_last.weight'),
        infer=_infer_hat,
        variant=_hat_variant,
        registry_names=('HAT', ),
    ),
    ArchSpec(
        type='SRVGGNetCompact',
        required=('body.0.weight', 'body.0.bias'),
        infer=_infer_srvgg,
        all_keys_match=r'body\.\d+\.(weight|bias)',
        # basicsr registers the same layout under a suffixed name; used if this project's class is not registered.
        registry_names=('SRVGGNetCompact', 'SRVGGNetCompact_basicsr'),
    ),
)


def _spec(type_name: str) -> ArchSpec:
    return next(s for s in ARCH_SPECS if s.type == type_name)


def _registered_class(spec: ArchSpec) -> type:
    for name in spec.registry_names:
        if name in ARCH_REGISTRY:
            return ARCH_REGISTRY.get(name)
    raise ValueError(f'no architecture named {" or ".join(spec.registry_names)} is registered: import hat first')


def detect_architecture(state_dict: Mapping[str, Any]) -> DetectedArch:
    """Recognise HAT or SRVGGNetCompact and read its constructor keywords from key names and shapes.

    Args:
        state_dict: a state dict, flat or wrapped (see :func:`unwrap_state_dict`); only ``.shape`` of each value is
            read, so ``device='meta'`` tensors do.
    Returns:
        the :class:`DetectedArch`; ``.network_options()`` is a ``network_g`` dict.
    Raises:
        ValueError: no architecture's required keys are all present (the message says what was recognised), or the
            keys are inconsistent with the recognised architecture.
    """
    sd = _Shapes(unwrap_state_dict(state_dict))
    for spec in ARCH_SPECS:
        if spec.missing(sd) or spec.foreign_keys(sd):
            continue
        try:
            kwargs, notes = spec.infer(sd)
        except ValueError as error:
            raise ValueError(f'looks like a {spec.type} checkpoint, but {error}') from None
        detected = DetectedArch(type=spec.type, kwargs=kwargs, variant=spec.variant(kwargs), notes=notes)
        _check_layout(spec, detected, sd)
        return detected
    raise ValueError(_unrecognised_message(sd))


def _check_layout(spec: ArchSpec, detected: DetectedArch, sd: _Shapes) -> None:
    """Build the detected configuration on the meta device and compare its layout with the checkpoint's."""
    try:
        with torch.device('meta'):
            network = _registered_class(spec)(**detected.kwargs)
    except (ValueError, TypeError) as error:
        raise ValueError(f'looks like a {spec.type} checkpoint, but its detected configuration '
                         f'{detected.kwargs} cannot be built: {error}') from None
    expected = state_dict_layout(network.state_dict())
    differences = layout_differences(expected, sd.shapes)
    if differences:
        raise ValueError(f'looks like {detected.summary()}, but that network does not have exactly the '
                         f'checkpoint\'s keys and shapes ({"; ".join(differences)}): it is a variant this '
                         'project cannot build')


def _unrecognised_message(sd: _Shapes) -> str:
    parts = []
    for spec in ARCH_SPECS:
        present = [k for k in spec.required if sd.has(k)]
        missing = spec.missing(sd)
        if not present:
            parts.append(f'{spec.type}: none of its keys ({", ".join(spec.required[:2])}, ...)')
            continue
        text = f'{spec.type}: has {", ".join(present)}'
        if missing:
            text += f' but no {", ".join(missing)}'
        foreign = spec.foreign_keys(sd)
        if foreign:
            text += f' and keys it never has ({", ".join(foreign[:3])}{", ..." if len(foreign) > 3 else ""})'
        parts.append(text)
    first = ', '.join(list(sd.shapes)[:8]) or '(none)'
    return (f'not a {" or ".join(s.type for s in ARCH_SPECS)} checkpoint. ' + '; '.join(parts) +
            f'. {len(sd.shapes)} keys, first keys: {first}')


# ---------------------------------------------------------------------------------------------------------------
# Building and diagnosing
# ---------------------------------------------------------------------------------------------------------------


def build_from_checkpoint(path: str | PathLike, *, param_key: str | None = None,
                          device: str | torch.device = 'cpu') -> nn.Module:
    """Load a checkpoint, detect its architecture, build that network and load the weights strictly.

    Args:
        path: checkpoint file (see :func:`load_state_dict`; weights-only, so files that need code are refused).
        param_key: see :func:`unwrap_state_dict`.
        device: where the returned network lives.
    Returns:
        the network in eval mode, with the :class:`DetectedArch` as its attribute ``detected`` (its notes list what
        was assumed, e.g. ``conv_scale``; change such a value on the network or build it yourself from
        ``detected.network_options()``).
    """
    state_dict = load_state_dict(path, param_key)
    try:
        detected = detect_architecture(state_dict)
    except ValueError as error:
        raise ValueError(f'{path}: {error}') from None
    network = _registered_class(_spec(detected.type))(**detected.kwargs)
    try:
        network.load_state_dict(state_dict, strict=True)
    except RuntimeError:
        raise ValueError(f'{path}: {describe_mismatch(network, state_dict)}') from None
    network.detected = detected
    logger.info(f'Built {detected.summary()} from {path}.')
    for note in detected.notes:
        logger.debug(f'  assumed {note}')
    return network.to(device).eval()


def describe_mismatch(network: nn.Module, state_dict: Mapping[str, Any]) -> str:
    """Explain why ``state_dict`` does not load strictly into ``network``, and what the checkpoint looks like.

    Args:
        network: the network (a DataParallel/DDP wrapper is looked through).
        state_dict: the checkpoint's weights, flat or wrapped (``params_ema``/``params``/``module.`` are handled).
    Returns:
        a message naming missing keys, unexpected keys and shape mismatches (first few, with counts), the detected
        architecture of the checkpoint and the options where it differs from the network.
    """
    network = bare_network(network)
    try:
        state_dict = unwrap_state_dict(state_dict)
    except ValueError as error:
        return f'The checkpoint holds no state dict: {error}'
    differences = layout_differences(state_dict_layout(network.state_dict()), state_dict_layout(state_dict))
    name = type(network).__name__
    if differences:
        lines = [f'The checkpoint does not fit the {name} network:'] + [f'  {d}' for d in differences]
    else:
        lines = [f'The checkpoint\'s keys and shapes match the {name} network.']
    try:
        detected = detect_architecture(state_dict)
    except ValueError as error:
        lines.append(f'Its architecture was not recognised: {error}')
        return '\n'.join(lines)
    lines.append(f'This checkpoint looks like {detected.summary()}.')
    try:
        own = detect_architecture(network.state_dict())
    except ValueError:
        own = None
    if own is not None and own.type == detected.type:
        changes = [f'{k}: {v} (the network has {own.kwargs.get(k)})' for k, v in detected.kwargs.items()
                   if own.kwargs.get(k) != v]
        if changes:
            lines.append('Set in network_g: ' + '; '.join(changes) + '.')
    else:
        lines.append(f'Build it with network_g {detected.network_options()}.')
    return '\n'.join(lines)

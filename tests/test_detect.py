"""Checkpoint loading and architecture detection: released layouts, golden checkpoints, wrappers, errors, trust."""
from __future__ import annotations

import io
import json
import sys

import pytest
import torch

# hat first: it applies the torchvision shim that ``import basicsr`` needs and registers the architectures.
# isort: off
from conftest import GOLDEN, GOLDEN_CASES, golden_io, golden_state_dict
from hat.archs.detect import (RELEASED_HAT_SHARED, RELEASED_HAT_VARIANTS, SRVGG_PARAMETER_FREE_ACT, DetectedArch,
                              build_from_checkpoint, describe_mismatch, detect_architecture, load_state_dict,
                              unwrap_state_dict)
from hat.archs.hat_arch import HAB, HAT
from hat.archs.srvgg_arch import SRVGGNetCompact
from basicsr.archs.srvgg_arch import SRVGGNetCompact as BasicsrSRVGGNetCompact
# isort: on

RELEASED = [(variant, scale) for variant in ('HAT-S', 'HAT', 'HAT-L') for scale in (2, 3, 4)]
TOLERANCE = 1e-5
# The golden cases use conv_scale=0.5 so that the CAB branch shows; the weights cannot say so (see the notes).
GOLDEN_CONV_SCALE = 0.5


class CustomObject:
    """A class that weights-only unpickling does not know: a pickle holding it could run arbitrary code."""

    def __init__(self) -> None:
        self.epoch = 3


def manifest(variant: str, scale: int) -> dict:
    return json.loads((GOLDEN / f'manifest_{variant}_SRx{scale}.json').read_text())


def meta_state_dict(shapes: dict) -> dict:
    """The layout of a checkpoint without its memory (HAT-L would be 160 MB of zeros)."""
    return {key: torch.empty(shape, device='meta') for key, shape in shapes.items()}


def golden_network_g(case: str) -> dict:
    return json.loads((GOLDEN / f'{case}.json').read_text())['network_g']


# ----------------------------------------------------------------------------------------------- released layouts


@pytest.mark.parametrize('variant,scale', RELEASED, ids=[f'{v}_SRx{s}' for v, s in RELEASED])
def test_released_layouts_are_detected(variant, scale):
    data = manifest(variant, scale)
    detected = detect_architecture(meta_state_dict(data['state_dict']))
    assert isinstance(detected, DetectedArch)
    assert detected.type == 'HAT'
    assert detected.variant == variant
    assert detected.scale == scale
    # Every keyword of the official network_g: the inferable ones read from shapes, the rest the released defaults.
    assert detected.network_options() == data['network_g']
    assert detected.summary().startswith(f'{variant} x{scale} (HAT, ')
    noted = ' '.join(detected.notes)
    for name in ('img_size', 'img_range', 'conv_scale', 'qk_scale'):
        assert name in noted


def test_released_variant_table_agrees_with_the_manifests():
    for variant, scale in RELEASED:
        network_g = manifest(variant, scale)['network_g']
        for key, value in {**RELEASED_HAT_SHARED, **RELEASED_HAT_VARIANTS[variant]}.items():
            assert network_g[key] == value, (variant, scale, key)


def test_a_changed_released_layout_is_custom():
    shapes = dict(manifest('HAT', 4)['state_dict'])
    # HAT with one RHAG less is no released variant, but still a HAT this project builds.
    shapes = {k: v for k, v in shapes.items() if not k.startswith('layers.5.')}
    detected = detect_architecture(meta_state_dict(shapes))
    assert detected.variant == 'custom'
    assert detected.kwargs['depths'] == [6] * 5
    assert detected.summary().startswith('a custom HAT x4 (HAT, ')


# ----------------------------------------------------------------------------------------------- round trips


CUSTOM_HATS = {
    'x1_no_upsample': dict(upscale=1),
    'x8': dict(upscale=8),
    'identity_no_qkv_bias': dict(resi_connection='identity', qkv_bias=False),
    'ape_no_patch_norm': dict(ape=True, img_size=32, patch_norm=False),
    'uneven': dict(window_size=8, overlap_ratio=0.25, mlp_ratio=1.5, depths=[1, 2, 3], num_heads=[2, 4, 1]),
    'gray_x3': dict(in_chans=1, upscale=3, compress_ratio=4, squeeze_factor=2),
}


# Keywords the detection only returns when they differ from the constructor default.
HAT_DEFAULTS = dict(ape=False, patch_norm=True)


@pytest.mark.parametrize('changes', CUSTOM_HATS.values(), ids=CUSTOM_HATS.keys())
def test_custom_hat_round_trip(changes):
    kwargs = dict(embed_dim=16, depths=[2], num_heads=[2], window_size=4, compress_ratio=2, squeeze_factor=4,
                  mlp_ratio=2.0, upscale=2) | changes
    with torch.device('meta'):
        state_dict = HAT(**kwargs).state_dict()
    detected = detect_architecture(state_dict)
    assert {k: detected.kwargs.get(k, HAT_DEFAULTS.get(k)) for k in kwargs} == kwargs
    assert detected.variant == 'custom'


def test_upscale_one_is_noted():
    with torch.device('meta'):
        state_dict = HAT(embed_dim=16, depths=[1], num_heads=[2], window_size=4, compress_ratio=2, squeeze_factor=4,
                         upscale=1).state_dict()
    detected = detect_architecture(state_dict)
    assert detected.scale == 1
    assert any(note.startswith('upscale: no upsample convs') for note in detected.notes)


# ----------------------------------------------------------------------------------------------- golden checkpoints


@pytest.mark.parametrize('case', GOLDEN_CASES)
def test_golden_checkpoint_detected_built_and_reproduced(case):
    expected = golden_network_g(case)
    state_dict = load_state_dict(GOLDEN / f'{case}.pth')
    detected = detect_architecture(state_dict)
    options = detected.network_options()
    assert options.pop('conv_scale') == 0.01  # the released value, not what the golden case used
    expected.pop('conv_scale')
    assert options == expected

    net = HAT(**detected.kwargs | {'conv_scale': GOLDEN_CONV_SCALE})
    net.load_state_dict(state_dict, strict=True)
    io = golden_io(case)
    with torch.no_grad():
        out = net.eval()(io['input'])
    assert out.shape == io['output'].shape
    assert (out - io['output']).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize('case', ['hat_tiny_x2', 'hat_tiny_x3_batch2'])
def test_build_from_checkpoint_golden(case):
    net = build_from_checkpoint(GOLDEN / f'{case}.pth')
    assert isinstance(net, HAT) and not net.training
    assert net.detected.kwargs['upscale'] == golden_network_g(case)['upscale']
    io = golden_io(case)
    with torch.no_grad():
        released_scale = net(io['input'])
        for module in net.modules():  # conv_scale is the one value the weights cannot carry
            if isinstance(module, HAB):
                module.conv_scale = GOLDEN_CONV_SCALE
        golden_scale = net(io['input'])
    assert (golden_scale - io['output']).abs().max().item() <= TOLERANCE
    assert (released_scale - io['output']).abs().max().item() > 1e-3


# ----------------------------------------------------------------------------------------------- wrappers


WRAPPERS = {
    'params_ema': lambda sd: {'params_ema': sd},
    'params': lambda sd: {'params': sd},
    'bare': lambda sd: sd,
    'module_prefix': lambda sd: {'params_ema': {f'module.{k}': v for k, v in sd.items()}},
    'bare_module_prefix': lambda sd: {f'module.{k}': v for k, v in sd.items()},
}


@pytest.mark.parametrize('wrap', WRAPPERS.values(), ids=WRAPPERS.keys())
def test_wrappers_are_unwrapped(tmp_path, wrap):
    state_dict = golden_state_dict('hat_tiny_x2')
    path = tmp_path / 'net.pth'
    torch.save(wrap(state_dict), path)
    loaded = load_state_dict(path)
    assert list(loaded) == list(state_dict)
    assert all(torch.equal(loaded[k], state_dict[k]) for k in state_dict)
    net = build_from_checkpoint(path)
    assert torch.equal(net.conv_first.weight, state_dict['conv_first.weight'])


def test_params_ema_is_preferred_and_param_key_picks():
    ema = {'w': torch.ones(1)}
    raw = {'w': torch.zeros(1)}
    checkpoint = {'params': raw, 'params_ema': ema, 'iter': 10}
    assert unwrap_state_dict(checkpoint)['w'].item() == 1.0
    assert unwrap_state_dict(checkpoint, 'params')['w'].item() == 0.0
    with pytest.raises(ValueError, match=r"param_key='params_g' is not in the checkpoint.*'params'.*'params_ema'"):
        unwrap_state_dict(checkpoint, 'params_g')


def test_unwrap_refuses_what_is_not_a_state_dict():
    with pytest.raises(ValueError, match=r"not a state dict.*'optimizers'.*'iter'"):
        unwrap_state_dict({'optimizers': [{}], 'iter': 5})
    with pytest.raises(ValueError, match='not a state dict'):
        unwrap_state_dict({})


def test_unwrap_accepts_a_pickled_module():
    net = torch.nn.Conv2d(1, 2, 3)
    assert set(unwrap_state_dict({'params': net})) == {'weight', 'bias'}
    assert set(unwrap_state_dict(net)) == {'weight', 'bias'}


# ----------------------------------------------------------------------------------------------- SRVGGNetCompact


@pytest.mark.parametrize('act_type', ['relu', 'prelu', 'leakyrelu'])
@pytest.mark.parametrize('upscale', [2, 4])
def test_srvgg_detected_and_built(tmp_path, upscale, act_type):
    torch.manual_seed(upscale)
    reference = BasicsrSRVGGNetCompact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=3, upscale=upscale,
                                       act_type=act_type).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.uniform_(-0.5, 0.5)
    detected = detect_architecture(reference.state_dict())
    assert detected.type == 'SRVGGNetCompact' and detected.variant == 'custom'
    parameter_free = act_type != 'prelu'
    assert detected.kwargs == dict(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=3, upscale=upscale,
                                   act_type=SRVGG_PARAMETER_FREE_ACT if parameter_free else act_type)
    assert any('relu and leakyrelu' in note for note in detected.notes) == parameter_free

    path = tmp_path / 'compact.pth'
    torch.save({'params': reference.state_dict()}, path)
    net = build_from_checkpoint(path)
    assert isinstance(net, SRVGGNetCompact) and not net.training
    x = torch.rand(1, 3, 6, 5)
    with torch.no_grad():
        out, expected = net(x), reference(x)
    assert out.shape == (1, 3, 6 * upscale, 5 * upscale)
    if act_type == detected.kwargs['act_type']:
        assert (out - expected).abs().max().item() <= 1e-6


def test_srvgg_gray_to_colour():
    reference = BasicsrSRVGGNetCompact(num_in_ch=1, num_out_ch=3, num_feat=4, num_conv=1, upscale=2)
    detected = detect_architecture(reference.state_dict())
    assert (detected.kwargs['num_in_ch'], detected.kwargs['num_out_ch'], detected.scale) == (1, 3, 2)


# ----------------------------------------------------------------------------------------------- unknown layouts


def test_unknown_hat_like_checkpoint_names_what_was_recognised():
    # SwinIR's layout: conv_first and windows, but per-block relative_position_index and no OCAB.
    shapes = {
        'conv_first.weight': (60, 3, 3, 3),
        'layers.0.residual_group.blocks.0.attn.relative_position_bias_table': (225, 6),
        'layers.0.residual_group.blocks.0.attn.relative_position_index': (64, 64),
        'conv_last.weight': (3, 60, 3, 3),
    }
    with pytest.raises(ValueError) as info:
        detect_architecture(meta_state_dict(shapes))
    message = str(info.value)
    assert 'not a HAT or SRVGGNetCompact checkpoint' in message
    assert 'HAT: has conv_first.weight' in message
    assert 'but no relative_position_index_SA' in message
    assert 'first keys: conv_first.weight' in message


def test_unknown_checkpoint_with_foreign_keys():
    shapes = {'body.0.weight': (8, 3, 3, 3), 'body.0.bias': (8, ), 'head.0.weight': (8, 3, 3, 3)}
    with pytest.raises(ValueError, match=r'SRVGGNetCompact: has body\.0\.weight, body\.0\.bias and keys it never '
                       r'has \(head\.0\.weight\)'):
        detect_architecture(meta_state_dict(shapes))
    with pytest.raises(ValueError, match=r'HAT: none of its keys.*1 keys, first keys: fc\.weight'):
        detect_architecture(meta_state_dict({'fc.weight': (10, 4)}))


def test_inconsistent_hat_layout_is_reported():
    shapes = dict(manifest('HAT-S', 4)['state_dict'])
    del shapes['layers.2.residual_group.blocks.1.attn.qkv.bias']
    with pytest.raises(ValueError, match=r'looks like HAT-S x4 .*1 missing keys: '
                       r'layers\.2\.residual_group\.blocks\.1\.attn\.qkv\.bias'):
        detect_architecture(meta_state_dict(shapes))


def test_non_square_window_index_is_reported():
    shapes = dict(manifest('HAT', 2)['state_dict'])
    shapes['relative_position_index_SA'] = [200, 200]
    with pytest.raises(ValueError, match=r'looks like a HAT checkpoint, but relative_position_index_SA side \(200\)'):
        detect_architecture(meta_state_dict(shapes))


# ----------------------------------------------------------------------------------------------- describe_mismatch


def test_describe_mismatch_names_the_variant():
    checkpoint = meta_state_dict(manifest('HAT-S', 4)['state_dict'])
    network_g = dict(manifest('HAT', 4)['network_g'])
    network_g.pop('type')
    with torch.device('meta'):
        network = HAT(**network_g)
    message = describe_mismatch(network, {'params_ema': checkpoint})
    assert 'does not fit the HAT network' in message
    assert 'shape mismatches: conv_first.weight: checkpoint [144, 3, 3, 3], network [180, 3, 3, 3]' in message
    assert 'This checkpoint looks like HAT-S x4 (HAT, in_chans=3, embed_dim=144' in message
    assert 'embed_dim: 144 (the network has 180)' in message
    assert 'compress_ratio: 24 (the network has 3)' in message


def test_describe_mismatch_counts_missing_and_unexpected_keys():
    checkpoint_shapes = manifest('HAT-L', 2)['state_dict']
    network_g = dict(manifest('HAT', 3)['network_g'])
    network_g.pop('type')
    with torch.device('meta'):
        network = HAT(**network_g)
    message = describe_mismatch(network, meta_state_dict(checkpoint_shapes))
    network_keys = set(network.state_dict())
    unexpected = [k for k in checkpoint_shapes if k not in network_keys]
    assert unexpected and unexpected[0].startswith('layers.6.')
    assert f'{len(unexpected)} unexpected keys: {", ".join(unexpected[:5])}, ... and {len(unexpected) - 5} more' \
        in message
    assert 'missing keys' not in message  # x3 and x2 both have upsample.0, with 9*64 and 4*64 channels
    assert '2 shape mismatches: upsample.0.weight: checkpoint [256, 64, 3, 3], network [576, 64, 3, 3]' in message
    assert 'looks like HAT-L x2' in message
    assert 'depths: [6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6] (the network has [6, 6, 6, 6, 6, 6])' in message
    assert 'upscale: 2 (the network has 3)' in message


def test_describe_mismatch_with_an_unrecognised_checkpoint():
    network = torch.nn.Conv2d(3, 4, 3)
    message = describe_mismatch(network, {'weight': torch.zeros(4, 3, 3, 3), 'extra': torch.zeros(1)})
    assert '1 missing keys: bias' in message and '1 unexpected keys: extra' in message
    assert 'Its architecture was not recognised: not a HAT or SRVGGNetCompact checkpoint' in message


def test_describe_mismatch_across_architectures():
    checkpoint = BasicsrSRVGGNetCompact(num_feat=4, num_conv=1, upscale=2).state_dict()
    with torch.device('meta'):
        network = HAT(embed_dim=16, depths=[1], num_heads=[2], window_size=4, compress_ratio=2, squeeze_factor=4)
    message = describe_mismatch(network, checkpoint)
    assert 'looks like a custom SRVGGNetCompact x2' in message
    assert "Build it with network_g {'type': 'SRVGGNetCompact'" in message


# ----------------------------------------------------------------------------------------------- loading and trust


def test_pickle_with_custom_class_is_refused_unless_trusted(tmp_path):
    state_dict = golden_state_dict('hat_tiny_x2')
    path = tmp_path / 'legacy.pth'
    torch.save({'params_ema': state_dict, 'meta': CustomObject()}, path)
    with pytest.raises(ValueError) as info:
        load_state_dict(path)
    message = str(info.value)
    assert str(path) in message and 'could run code' in message and 'trust_remote_code=True' in message
    assert 'CustomObject' in message
    loaded = load_state_dict(path, trust_remote_code=True)
    assert list(loaded) == list(state_dict)
    with pytest.raises(ValueError, match='could run code'):
        build_from_checkpoint(path)


def test_missing_file(tmp_path):
    path = tmp_path / 'nowhere' / 'HAT_SRx4.pth'
    with pytest.raises(FileNotFoundError, match=r'checkpoint not found: .*HAT_SRx4\.pth does not exist'):
        load_state_dict(path)
    with pytest.raises(FileNotFoundError, match='is a directory'):
        load_state_dict(tmp_path)


def legacy_bytes() -> bytes:
    """The tiny checkpoint in torch's pre-1.6 (non-zip) format, still readable with weights_only=True."""
    buffer = io.BytesIO()
    torch.save({'params_ema': golden_state_dict('hat_tiny_x2')}, buffer, _use_new_zipfile_serialization=False)
    return buffer.getvalue()


DAMAGED = {
    'truncated': lambda: (GOLDEN / 'hat_tiny_x2.pth').read_bytes()[:50_000],
    'legacy_truncated': lambda: legacy_bytes()[:50_000],
    'legacy_cut_in_header': lambda: legacy_bytes()[:300],
    'empty': lambda: b'',
    'text': lambda: b'this is not a checkpoint\n' * 20,
}


@pytest.mark.parametrize('make', DAMAGED.values(), ids=DAMAGED.keys())
def test_damaged_file(tmp_path, make):
    path = tmp_path / 'damaged.pth'
    path.write_bytes(make())
    with pytest.raises(ValueError, match=r'damaged\.pth is not a readable PyTorch checkpoint'):
        load_state_dict(path)


def test_legacy_format_loads(tmp_path):
    path = tmp_path / 'legacy.pth'
    path.write_bytes(legacy_bytes())
    assert list(load_state_dict(path)) == list(golden_state_dict('hat_tiny_x2'))


def test_safetensors_without_the_package(tmp_path, monkeypatch):
    path = tmp_path / 'net.safetensors'
    path.write_bytes(b'\0' * 16)
    monkeypatch.setitem(sys.modules, 'safetensors', None)  # makes ``import safetensors`` fail
    monkeypatch.setitem(sys.modules, 'safetensors.torch', None)
    with pytest.raises(ImportError, match=r'net\.safetensors.*pip install safetensors'):
        load_state_dict(path)


def test_safetensors_round_trip(tmp_path):
    safetensors_torch = pytest.importorskip('safetensors.torch', reason='the safetensors package is not installed')
    state_dict = golden_state_dict('hat_tiny_x2')
    path = tmp_path / 'net.safetensors'
    safetensors_torch.save_file(state_dict, str(path))
    net = build_from_checkpoint(path)
    assert torch.equal(net.conv_first.weight, state_dict['conv_first.weight'])
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=r'net\.safetensors is not a readable \.safetensors file'):
        load_state_dict(path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_build_on_cuda():
    net = build_from_checkpoint(GOLDEN / 'hat_tiny_x2.pth', device='cuda')
    assert net.conv_first.weight.is_cuda
    io = golden_io('hat_tiny_x2')
    for module in net.modules():
        if isinstance(module, HAB):
            module.conv_scale = GOLDEN_CONV_SCALE
    with torch.no_grad():
        out = net(io['input'].cuda()).cpu()
    assert (out - io['output']).abs().max().item() <= 1e-4

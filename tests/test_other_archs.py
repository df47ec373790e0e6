"""SRVGGNetCompact and UNetDiscriminatorSN are basicsr's Real-ESRGAN networks: same keys, same function."""
from __future__ import annotations

import pytest
import torch

# hat first: it applies the torchvision shim that ``import basicsr`` needs and registers the plain names.
# isort: off
import hat  # noqa: F401
from hat.archs.discriminator_arch import UNetDiscriminatorSN
from hat.archs.srvgg_arch import SUPPORTED_ACT_TYPES, SRVGGNetCompact
from basicsr.archs import build_network
from basicsr.archs.discriminator_arch import UNetDiscriminatorSN as BasicsrUNetDiscriminatorSN
from basicsr.archs.srvgg_arch import SRVGGNetCompact as BasicsrSRVGGNetCompact
from basicsr.utils.registry import ARCH_REGISTRY
# isort: on

TOLERANCE = 1e-6
SN_LAYERS = [f'conv{i}' for i in range(1, 9)]


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def build_pair(ours_cls, theirs_cls, seed: int, **kwargs):
    torch.manual_seed(seed)
    ours = ours_cls(**kwargs)
    torch.manual_seed(seed)
    theirs = theirs_cls(**kwargs)
    return ours, theirs


def randomize_(net: torch.nn.Module, seed: int) -> None:
    """Give every parameter random values, so constant initialisations (PReLU slopes of 0.25) still get checked."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            # symmetric around zero, so that activations see negative inputs as well
            p.copy_(torch.rand(p.shape, generator=gen) - 0.5)


def assert_same_state(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), key


# ----------------------------------------------------------------------------------------------- registry


def test_plain_names_are_registered_to_this_project():
    assert ARCH_REGISTRY.get('SRVGGNetCompact') is SRVGGNetCompact
    assert ARCH_REGISTRY.get('UNetDiscriminatorSN') is UNetDiscriminatorSN
    # basicsr's own classes stay reachable under their suffixed names
    assert ARCH_REGISTRY.get('SRVGGNetCompact_basicsr') is BasicsrSRVGGNetCompact
    assert ARCH_REGISTRY.get('UNetDiscriminatorSN_basicsr') is BasicsrUNetDiscriminatorSN


def test_build_network_from_options():
    net_g = build_network({'type': 'SRVGGNetCompact', 'num_feat': 8, 'num_conv': 2, 'upscale': 2})
    net_d = build_network({'type': 'UNetDiscriminatorSN', 'num_in_ch': 3, 'num_feat': 4, 'skip_connection': False})
    assert type(net_g) is SRVGGNetCompact and net_g.upscale == 2 and net_g.act_type == 'prelu'
    assert type(net_d) is UNetDiscriminatorSN and net_d.skip_connection is False


# ----------------------------------------------------------------------------------------------- SRVGGNetCompact


@pytest.mark.parametrize('act_type', SUPPORTED_ACT_TYPES)
@pytest.mark.parametrize('upscale', [2, 4])
def test_srvgg_matches_basicsr(upscale, act_type):
    kwargs = dict(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=upscale, act_type=act_type)
    ours, theirs = build_pair(SRVGGNetCompact, BasicsrSRVGGNetCompact, seed=upscale, **kwargs)
    assert_same_state(ours.state_dict(), theirs.state_dict())  # same keys, shapes and seeded initialisation
    num_convs = 2 + kwargs['num_conv']
    expected_keys = 2 * num_convs + (num_convs - 1 if act_type == 'prelu' else 0)
    assert len(ours.state_dict()) == expected_keys
    assert f'body.{2 * kwargs["num_conv"] + 2}.weight' in ours.state_dict()

    x = torch.rand(2, 3, 6, 7, generator=torch.Generator().manual_seed(0))
    for src, dst, seed in ((theirs, ours, 10), (ours, theirs, 20)):
        randomize_(src, seed)
        dst.load_state_dict(src.state_dict(), strict=True)
        ours.eval(), theirs.eval()
        with torch.no_grad():
            out_ours, out_theirs = ours(x), theirs(x)
        assert out_ours.shape == (2, 3, 6 * upscale, 7 * upscale)
        assert max_abs_diff(out_ours, out_theirs) <= TOLERANCE


def test_srvgg_gray_input_to_color_output_matches_basicsr():
    """A 1-channel input broadcasts over the 3 output channels in the residual, as in basicsr."""
    kwargs = dict(num_in_ch=1, num_out_ch=3, num_feat=4, num_conv=1, upscale=2, act_type='leakyrelu')
    ours, theirs = build_pair(SRVGGNetCompact, BasicsrSRVGGNetCompact, seed=3, **kwargs)
    randomize_(theirs, 3)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.rand(1, 1, 5, 5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert max_abs_diff(ours(x), theirs(x)) <= TOLERANCE


def test_srvgg_untrained_residual_is_nearest_upsampling():
    """With the last conv zeroed the output is exactly the nearest-neighbour enlargement of the input."""
    net = SRVGGNetCompact(num_feat=4, num_conv=1, upscale=3)
    with torch.no_grad():
        net.body[-1].weight.zero_()
        net.body[-1].bias.zero_()
        x = torch.rand(1, 3, 4, 5)
        out = net(x)
    assert torch.equal(out, x.repeat_interleave(3, dim=2).repeat_interleave(3, dim=3))


def test_srvgg_unsupported_act_type_raises():
    with pytest.raises(ValueError, match='act_type') as info:
        SRVGGNetCompact(act_type='gelu')
    for name in SUPPORTED_ACT_TYPES:
        assert name in str(info.value)
    assert "'gelu'" in str(info.value)


def test_srvgg_mismatched_channels_raise():
    with pytest.raises(ValueError, match='num_in_ch'):
        SRVGGNetCompact(num_in_ch=3, num_out_ch=1)


def test_srvgg_constructor_is_keyword_only():
    with pytest.raises(TypeError):
        SRVGGNetCompact(3, 3)  # type: ignore[misc]


# ----------------------------------------------------------------------------------------------- UNetDiscriminatorSN


@pytest.mark.parametrize('skip_connection', [True, False], ids=['skip', 'noskip'])
def test_discriminator_eval_matches_basicsr(skip_connection):
    kwargs = dict(num_in_ch=3, num_feat=4, skip_connection=skip_connection)
    ours, theirs = build_pair(UNetDiscriminatorSN, BasicsrUNetDiscriminatorSN, seed=5, **kwargs)
    state = ours.state_dict()
    assert_same_state(state, theirs.state_dict())
    for name in SN_LAYERS:
        assert {f'{name}.weight_orig', f'{name}.weight_u', f'{name}.weight_v'} <= set(state)
        assert f'{name}.weight' not in state and f'{name}.bias' not in state
    assert {'conv0.weight', 'conv0.bias', 'conv9.weight', 'conv9.bias'} <= set(state)

    x = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(0))
    for src, dst, seed in ((theirs, ours, 11), (ours, theirs, 21)):
        randomize_(src, seed)
        dst.load_state_dict(src.state_dict(), strict=True)
        ours.eval(), theirs.eval()
        with torch.no_grad():
            out_ours, out_theirs = ours(x), theirs(x)
        assert out_ours.shape == (2, 1, 16, 24)
        assert max_abs_diff(out_ours, out_theirs) <= TOLERANCE
    # eval mode uses the stored power-iteration vectors without updating them
    assert_same_state(ours.state_dict(), theirs.state_dict())


@pytest.mark.parametrize('skip_connection', [True, False], ids=['skip', 'noskip'])
def test_discriminator_train_step_matches_basicsr(skip_connection):
    """One train-mode forward runs a power iteration: u and v move, identically in both; so do output and grads."""
    kwargs = dict(num_in_ch=3, num_feat=4, skip_connection=skip_connection)
    ours, theirs = build_pair(UNetDiscriminatorSN, BasicsrUNetDiscriminatorSN, seed=7, **kwargs)
    randomize_(theirs, 12)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    ours.train(), theirs.train()

    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    out_ours, out_theirs = ours(x), theirs(x)
    assert max_abs_diff(out_ours, out_theirs) <= TOLERANCE
    out_ours.square().mean().backward()
    out_theirs.square().mean().backward()

    after_ours, after_theirs = ours.state_dict(), theirs.state_dict()
    for name in SN_LAYERS:
        for buf in ('weight_u', 'weight_v'):
            key = f'{name}.{buf}'
            assert max_abs_diff(after_ours[key], before[key]) > 1e-4, f'{key} was not updated in train mode'
            assert max_abs_diff(after_ours[key], after_theirs[key]) <= TOLERANCE, key
    theirs_params = dict(theirs.named_parameters())
    for key, p in ours.named_parameters():
        assert p.grad is not None, key
        assert max_abs_diff(p.grad, theirs_params[key].grad) <= TOLERANCE, key


def test_discriminator_skip_needs_multiple_of_8():
    net = UNetDiscriminatorSN(num_in_ch=3, num_feat=4).eval()
    with pytest.raises(ValueError, match='multiples of 8'):
        net(torch.rand(1, 3, 12, 16))


def test_discriminator_without_skip_accepts_other_sizes_like_basicsr():
    kwargs = dict(num_in_ch=1, num_feat=4, skip_connection=False)
    ours, theirs = build_pair(UNetDiscriminatorSN, BasicsrUNetDiscriminatorSN, seed=9, **kwargs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ours.eval(), theirs.eval()
    x = torch.rand(1, 1, 12, 20, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out_ours, out_theirs = ours(x), theirs(x)
    assert out_ours.shape == (1, 1, 8, 16)
    assert max_abs_diff(out_ours, out_theirs) <= TOLERANCE

"""The speed benchmarks' building blocks: FLOP counts, options, the HATModel each training mode builds.

The benchmarks themselves take minutes; they are run by hand (see README, section Speed).
"""
from __future__ import annotations

import sys

import pytest
import torch

from conftest import REPO

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import bench_inference, bench_train  # noqa: E402
from benchmarks.official_baseline import OfficialHAT  # noqa: E402
from hat.archs.hat_arch import HAT  # noqa: E402


def test_flops_of_hat_x4_at_64_are_the_papers_order():
    """HAT x4 on a 64x64 input: about 104 G multiply-adds (208 GFLOP) of products and convolutions."""
    flops = bench_inference.count_flops(bench_inference.network_config('HAT'), 64)
    assert flops == pytest.approx(207.76e9, rel=1e-3)
    # windowed attention: the cost is linear in the number of pixels
    assert bench_inference.count_flops(bench_inference.network_config('HAT'), 128) == pytest.approx(4 * flops)


def test_quick_selects_hat_at_64():
    args = bench_inference.parse_args(['--quick', '--paths', 'official,fp32'])
    assert (args.variants, args.sizes, args.paths) == (['HAT'], [64], ['official', 'fp32'])
    with pytest.raises(SystemExit):
        bench_inference.parse_args(['--paths', 'fp64'])
    with pytest.raises(SystemExit):
        bench_inference.parse_args(['--weights', 'x.pth'])  # needs a single variant


def test_both_benchmarks_reject_unknown_names(capsys):
    args = bench_train.parse_args(['--variants', ' HAT-S, HAT ', '--modes', 'fp32,bf16'])
    assert (args.variants, args.modes) == (['HAT-S', 'HAT'], ['fp32', 'bf16'])
    with pytest.raises(SystemExit):
        bench_train.parse_args(['--modes', 'fp32,fp64'])
    assert "--modes: unknown ['fp64']; choose from official, fp32," in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_inference.parse_args(['--variants', 'HAT-XL'])
    assert "--variants: unknown ['HAT-XL']; choose from HAT-S, HAT, HAT-L" in capsys.readouterr().err


def test_paths_build_the_networks_they_name():
    cfg = dict(bench_inference.network_config('HAT-S'), depths=[1], num_heads=[6])
    state = HAT(**cfg).state_dict()
    x = bench_inference.test_image(16)
    outputs = {p: bench_inference.build(p, cfg, state, torch.device('cpu'))(x) for p in ('official', 'fp32', 'bf16')}
    assert (outputs['fp32'] - outputs['official']).abs().max() <= 1e-5
    assert bench_inference.psnr(outputs['bf16'], outputs['fp32']) >= 50
    assert not torch.equal(outputs['bf16'], outputs['fp32'])


def test_training_speed_up_gives_the_ratio_of_medians_and_the_rounds_range():
    # medians 11 and 5; the rounds' own ratios 2.0, 3.0 and 2.0
    assert bench_train.speed_up_cell([10.0, 12.0, 11.0], [5.0, 4.0, 5.5]) == '2.20x (rounds 2.00-3.00x)'
    assert bench_train.speed_up_cell([9.0], [3.0]) == '3.00x'  # one round: no range


@pytest.mark.parametrize('mode, network, amp, checkpointing, compiled', [
    ('official', OfficialHAT, False, False, False),
    ('bf16', HAT, 'bf16', False, False),
    ('fp32-ckpt', HAT, False, True, False),
    ('compile-bf16', HAT, 'bf16', False, True),
])
def test_training_modes_are_option_keys(mode, network, amp, checkpointing, compiled, monkeypatch):
    monkeypatch.setenv('HAT_FORCE_BF16', '1')  # as bench_train does when bf16 modes are asked for on any CPU
    opt = bench_train.model_options('HAT-S', mode, 32, torch.device('cpu'))
    assert opt['train']['amp'] == amp and opt['train']['compile'] == compiled
    assert opt['network_g'].get('use_checkpoint', False) == checkpointing
    assert opt['network_g']['img_size'] == 32
    if not compiled:  # building a compiled model is cheap, but keep the test light
        opt['network_g'].update(depths=[1], num_heads=[6])
        model = bench_train.HATModel(opt)
        assert type(model.net_g) is network
        assert model.train_amp == (torch.bfloat16 if amp else None)
        assert all(layer.residual_group.use_checkpoint == checkpointing for layer in model.net_g.layers)

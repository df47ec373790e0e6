"""The speed benchmarks' building blocks: FLOP counts, options, the HATModel each training mode builds.

The benchmarks themselves take minutes; they are run by hand (see README, section Speed).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

from conftest import REPO

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import alternate, bench_inference, bench_train  # noqa: E402
from hat.archs import attention as attention_module, linear as linear_module  # noqa: E402
from benchmarks.official_baseline import OfficialHAT  # noqa: E402
from hat.archs.hat_arch import HAT  # noqa: E402

ROW_CHUNK = linear_module.ROW_CHUNK  # as imported: 1024, or 2048 where oneDNN multiplies


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


@pytest.mark.parametrize('native', [True, False])
def test_bf16_benchmarks_force_bf16_only_where_it_is_emulated(native, monkeypatch):
    """bench_train and alternate time the bf16 they are asked for: where it is emulated (the precision policy would
    run fp32) they set HAT_FORCE_BF16; where it is native they leave the policy alone."""
    monkeypatch.setenv('HAT_FORCE_BF16', 'recorded')  # so that the teardown removes what the function sets
    monkeypatch.delenv('HAT_FORCE_BF16')
    monkeypatch.setattr(bench_train, 'bf16_is_native', lambda device: native)
    assert bench_train.force_emulated_bf16(torch.device('cpu')) is not native
    assert os.environ.get('HAT_FORCE_BF16') == (None if native else '1')


def test_alternate_parses_settings_of_module_constants(capsys):
    chunk = alternate.parse_setting('hat.archs.attention.LOGITS_CHUNK_ELEMENTS=1048576')
    assert (chunk.module, chunk.name, chunk.value) == (attention_module, 'LOGITS_CHUNK_ELEMENTS', 1 << 20)
    assert alternate.parse_setting('hat.archs.hat_arch.RECONSTRUCTION_BAND=32').value == 32
    with pytest.raises(ValueError, match=r"hat.archs.linear has no 'ROW_CHUNKS'; its constants: .*ROW_CHUNK"):
        alternate.parse_setting('hat.archs.linear.ROW_CHUNKS=64')
    with pytest.raises(ValueError, match=rf'ROW_CHUNK is {ROW_CHUNK} \(int\); give a value of that type'):
        alternate.parse_setting('hat.archs.linear.ROW_CHUNK=6.5')
    with pytest.raises(ValueError, match="cannot import 'hat.archs.lineer'"):
        alternate.parse_setting('hat.archs.lineer.ROW_CHUNK=6')
    with pytest.raises(ValueError, match='expected package.module.NAME=VALUE'):
        alternate.parse_setting('ROW_CHUNK=6')
    with pytest.raises(SystemExit):
        alternate.parse_args(['--set', 'hat.archs.linear.ROW_CHUNK=x'])
    assert f'ROW_CHUNK is {ROW_CHUNK} (int)' in capsys.readouterr().err


def test_alternate_swaps_the_order_each_round_and_restores_the_constants():
    setting = alternate.parse_setting('hat.archs.linear.ROW_CHUNK=64')
    seen, ticks = [], iter(range(100))
    a, b, outputs = alternate.alternate(lambda: seen.append(linear_module.ROW_CHUNK) or linear_module.ROW_CHUNK,
                                        [setting], 3, torch.device('cpu'), clock=lambda: float(next(ticks)))
    assert seen == [ROW_CHUNK, 64, 64, ROW_CHUNK, ROW_CHUNK, 64]  # A first, then B first, then A first
    assert a == b == [1.0, 1.0, 1.0] and outputs == [ROW_CHUNK, 64]
    assert linear_module.ROW_CHUNK == ROW_CHUNK
    with pytest.raises(RuntimeError):
        with alternate.applied([setting]):
            assert linear_module.ROW_CHUNK == 64
            raise RuntimeError
    assert linear_module.ROW_CHUNK == ROW_CHUNK


@pytest.mark.parametrize('task', ['inference', 'train'])
def test_alternate_reports_each_round_and_the_median_ratio(task, tmp_path):
    """HAT-S on a 16x16 image (inference) or a batch of one 16x16 patch (train), two rounds: smaller row chunks
    change the speed, not the output."""
    out = tmp_path / 'alternate.md'
    report = alternate.main(['--task', task, '--variant', 'HAT-S', '--size', '16', '--batch', '1', '--patch', '16',
                             '--rounds', '2', '--warmup', '0', '--set', 'hat.archs.linear.ROW_CHUNK=64',
                             '--out', str(out)])
    assert out.read_text() == report + '\n'
    assert 'B: hat.archs.linear.ROW_CHUNK = 64. 2 rounds' in report
    rows = [line for line in report.splitlines() if line.startswith('| ') and line[2].isdigit()]
    assert len(rows) == 2 and '| **median** |' in report
    a_seconds, b_seconds, ratio = (float(cell) for cell in rows[0].strip('| ').split(' | ')[1:])
    assert ratio == pytest.approx(a_seconds / b_seconds, rel=0.02)  # seconds printed to the ms
    assert ('Largest difference between the outputs of A and B: 0.00e+00' in report) == (task == 'inference')
    assert ('training iteration, batch 1, LR patch 16x16' in report) == (task == 'train')
    assert linear_module.ROW_CHUNK == ROW_CHUNK

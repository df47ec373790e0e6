"""Training options of HATModel: mixed precision and compilation (``train: {amp, compile}``, ``val: {amp}``),
the EMA and the choice of Adam's implementation."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import golden_config, golden_state_dict
from hat.archs.hat_arch import HAT
from hat.models.hat_model import HATModel, amp_dtype, fused_adam_serves

SCALE = 2


@pytest.fixture(autouse=True)
def cpu_with_native_bf16(monkeypatch):
    """These tests are about bf16 arithmetic: they see a CPU with native bf16 (mocked), so that ``amp: bf16`` runs
    bf16 on any machine (on a CPU that emulates bf16 it is slow, but the same function)."""
    from hat.inference import precision
    monkeypatch.setattr(precision, 'native_cpu_bf16', lambda: 'avx512_bf16')


def model_options(*, train: dict | None = None, val: dict | None = None, is_train: bool = True) -> dict:
    """A tiny HAT (the golden ``hat_tiny_x2`` configuration) trained with L1, Adam and EMA on the CPU."""
    opt = {
        'name': 'amp_test', 'model_type': 'HATModel', 'scale': SCALE, 'num_gpu': 0, 'dist': False, 'rank': 0,
        'world_size': 1, 'is_train': is_train,
        'network_g': {'type': 'HAT', **golden_config('hat_tiny_x2')},
        'path': {'pretrain_network_g': None, 'strict_load_g': True},
        'val': {'save_img': False, **(val or {})},
    }
    if is_train:
        opt['train'] = {
            'ema_decay': 0.9,
            'optim_g': {'type': 'Adam', 'lr': 1e-3, 'betas': [0.9, 0.99]},
            'scheduler': {'type': 'MultiStepLR', 'milestones': [100], 'gamma': 0.5},
            'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0, 'reduction': 'mean'},
            **(train or {}),
        }
    return opt


def smooth_batch(batch: int = 2, size: int = 16) -> dict:
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing='ij')
    lq = torch.stack([0.5 + 0.3 * torch.sin(5 * xx + c) * torch.cos(3 * yy - c) for c in range(3)])
    lq = lq[None].repeat(batch, 1, 1, 1)
    gt = torch.nn.functional.interpolate(lq, scale_factor=SCALE, mode='bicubic', align_corners=False).clamp(0, 1)
    return {'lq': lq, 'gt': gt}


def build(opt: dict) -> HATModel:
    torch.manual_seed(0)
    model = HATModel(opt)
    model.net_g.load_state_dict(golden_state_dict('hat_tiny_x2'))
    if hasattr(model, 'net_g_ema'):
        model.net_g_ema.load_state_dict(golden_state_dict('hat_tiny_x2'))
    return model


def psnr(a: torch.Tensor, ref: torch.Tensor) -> float:
    mse = (a.float() - ref.float()).square().mean().item()
    return 10 * math.log10((ref.max() - ref.min()).item()**2 / mse)


def test_bf16_training_step_changes_weights_like_fp32():
    steps = {}
    for amp in (False, 'bf16'):
        model = build(model_options(train={'amp': amp}))
        before = {k: v.clone() for k, v in model.net_g.state_dict().items()}
        ema_before = model.net_g_ema.conv_first.weight.clone()
        model.feed_data(smooth_batch())
        model.optimize_parameters(1)
        loss = model.get_current_log()['l_pix']
        assert math.isfinite(loss) and loss > 0
        assert model.output.dtype == torch.float32 or amp
        after = model.net_g.state_dict()
        changed = [k for k in before if not torch.equal(before[k], after[k])]
        assert 'conv_first.weight' in changed and 'layers.0.residual_group.blocks.1.attn.qkv.weight' in changed
        assert not torch.equal(model.net_g_ema.conv_first.weight, ema_before)  # EMA followed
        steps[amp] = (loss, {k: after[k] - before[k] for k in changed})
    assert model.train_amp is torch.bfloat16 and model.grad_scaler is None
    # bf16 computes the same step up to its precision: the same loss to 1%, and an update of all weights that points
    # the same way as in fp32 (Adam's first step is about lr * sign(grad): elements with tiny gradients may flip)
    assert steps['bf16'][0] == pytest.approx(steps[False][0], rel=1e-2)
    names = sorted(steps[False][1])
    full, low = (torch.cat([steps[amp][1][name].flatten() for name in names]) for amp in (False, 'bf16'))
    assert torch.nn.functional.cosine_similarity(full, low, dim=0).item() > 0.9


def test_fp16_on_the_cpu_is_a_clear_error():
    with pytest.raises(ValueError, match='fp16 needs CUDA.*amp: bf16'):
        HATModel(model_options(train={'amp': 'fp16'}))
    model = build(model_options(val={'amp': 'fp16'}, is_train=False))
    model.feed_data(smooth_batch(1))
    with pytest.raises(ValueError, match='val: amp: fp16 needs CUDA'):
        model.test()


@pytest.mark.parametrize('value', ['bfloat16', 'int8', True])
def test_unknown_amp_values_are_rejected(value):
    with pytest.raises(ValueError, match='bf16'):
        amp_dtype(value, 'train', torch.device('cpu'))


def test_amp_values_map_to_dtypes():
    cpu, cuda = torch.device('cpu'), torch.device('cuda')
    assert amp_dtype(False, 'val', cpu) is None and amp_dtype(None, 'val', cpu) is None
    assert amp_dtype('fp32', 'val', cpu) is None
    assert amp_dtype('bf16', 'val', cpu) is torch.bfloat16
    assert amp_dtype('fp16', 'val', cuda) is torch.float16  # no CUDA needed to decide


def test_val_amp_bf16_is_within_50_db_of_fp32():
    outputs = {}
    for amp in (False, 'bf16'):
        model = build(model_options(val={'amp': amp}, is_train=False))
        model.feed_data(smooth_batch(1, 24))
        model.test()
        outputs[amp] = model.output
    assert outputs['bf16'].dtype == torch.float32 and outputs['bf16'].shape == (1, 3, 48, 48)
    assert not torch.equal(outputs['bf16'], outputs[False])  # bf16 really ran
    assert psnr(outputs['bf16'], outputs[False]) >= 50


def test_val_amp_applies_to_tiled_inference():
    outputs = {}
    for amp in (False, 'bf16'):
        model = build(model_options(val={'amp': amp}, is_train=False))
        model.opt['tile'] = {'tile_size': 16, 'tile_pad': 4, 'progress': False}
        model.feed_data(smooth_batch(1, 24))
        model.test()
        outputs[amp] = model.output
    assert not torch.equal(outputs['bf16'], outputs[False])
    assert psnr(outputs['bf16'], outputs[False]) >= 50


def test_train_compile_compiles_the_blocks_in_place(monkeypatch):
    """``train: compile: true`` compiles HAT's blocks in place (state-dict keys unchanged); compiling itself is
    exercised by benchmarks/bench_train.py, too slow for a unit test on two cores."""
    compiled = []
    monkeypatch.setattr(HAT, 'compile_blocks', lambda self, **kw: compiled.append(self))
    model = build(model_options(train={'compile': True}))
    assert compiled == [model.net_g]
    assert set(model.net_g.state_dict()) == set(golden_state_dict('hat_tiny_x2'))
    compiled.clear()
    build(model_options())
    assert compiled == []


def test_compile_blocks_keeps_the_state_dict_keys():
    net = HAT(**golden_config('hat_tiny_x2'))
    keys = list(net.state_dict())
    net.compile_blocks()  # wraps lazily: nothing is compiled before the first call
    assert list(net.state_dict()) == keys
    assert all(not k.startswith('_orig_mod') for k in net.state_dict())


def test_ema_update_is_the_basicsr_formula():
    model = build(model_options())
    with torch.no_grad():
        for p in model.net_g.parameters():
            p.add_(torch.randn_like(p))
    expected = {k: 0.9 * v + 0.1 * dict(model.net_g.named_parameters())[k]
                for k, v in copy.deepcopy(dict(model.net_g_ema.named_parameters())).items()}
    model.model_ema(decay=0.9)
    for name, value in model.net_g_ema.named_parameters():
        torch.testing.assert_close(value, expected[name], rtol=1e-6, atol=1e-6)


def test_subclasses_with_their_own_set_up_get_the_precision_on_the_first_step():
    from basicsr.models.sr_model import SRModel

    class OwnSetUp(HATModel):
        def init_training_settings(self):
            SRModel.init_training_settings(self)

    torch.manual_seed(0)
    model = OwnSetUp(model_options(train={'amp': 'bf16'}))
    assert not hasattr(model, 'train_amp')
    model.feed_data(smooth_batch())
    model.optimize_parameters(1)
    assert model.train_amp is torch.bfloat16 and math.isfinite(model.get_current_log()['l_pix'])


def trained_once(optim_g: dict) -> HATModel:
    model = build(model_options(train={'optim_g': {'type': 'Adam', 'lr': 1e-3, 'betas': [0.9, 0.99], **optim_g}}))
    model.feed_data(smooth_batch())
    model.optimize_parameters(1)
    return model


@pytest.mark.skipif(not fused_adam_serves([torch.zeros(1)]), reason='this PyTorch has no fused Adam for the CPU')
def test_adam_is_fused_unless_the_options_choose_and_updates_as_the_default():
    fused, default, foreach = (trained_once(optim_g) for optim_g in ({}, {'fused': False}, {'foreach': True}))
    assert fused.optimizer_g.param_groups[0]['fused'] is True
    assert default.optimizer_g.param_groups[0]['fused'] is False
    assert foreach.optimizer_g.param_groups[0]['fused'] is None and foreach.optimizer_g.param_groups[0]['foreach']
    after_default = dict(default.net_g.named_parameters())
    moved = 0
    for name, value in fused.net_g.named_parameters():
        torch.testing.assert_close(value, after_default[name], rtol=0, atol=1e-7)
        moved += not torch.equal(value, golden_state_dict('hat_tiny_x2')[name])
    assert moved > 100  # a real step was taken by both
    # A resumed state keeps its implementation: the default's state loads into a model that would fuse.
    resumed = build(model_options())
    resumed.optimizer_g.load_state_dict(default.optimizer_g.state_dict())
    assert resumed.optimizer_g.param_groups[0]['fused'] is False


def fused_kernels_on(monkeypatch, *devices: str) -> None:
    """PyTorch's list of the devices its fused optimiser kernels serve, as this test says (the CPU joined in 2.4)."""
    import torch.utils._foreach_utils as foreach_utils
    monkeypatch.setattr(foreach_utils, '_get_fused_kernels_supported_devices', lambda: list(devices))


def test_fused_adam_only_where_pytorch_has_the_kernel(monkeypatch):
    weight = torch.zeros(3, requires_grad=True)
    fused_kernels_on(monkeypatch, 'cpu', 'cuda')
    assert fused_adam_serves([weight])
    assert not fused_adam_serves([weight, torch.zeros(3, dtype=torch.int64)])  # not floating point
    assert not fused_adam_serves([{'params': [weight]}])  # parameter groups: left to PyTorch
    assert not fused_adam_serves([])
    fused_kernels_on(monkeypatch, 'cuda')  # torch < 2.4
    assert not fused_adam_serves([weight])
    model = build(model_options())
    assert model.optimizer_g.param_groups[0]['fused'] is None  # PyTorch's default Adam, without an error


def test_state_of_a_fused_adam_resumes_where_the_kernel_is_missing(monkeypatch, caplog):
    fused_kernels_on(monkeypatch, 'cpu', 'cuda')
    trained = trained_once({})
    state = {'optimizers': [o.state_dict() for o in trained.optimizers],
             'schedulers': [s.state_dict() for s in trained.schedulers]}
    assert state['optimizers'][0]['param_groups'][0]['fused'] is True
    fused_kernels_on(monkeypatch, 'cuda')  # torch < 2.4
    resumed = build(model_options())
    resumed.net_g.load_state_dict(trained.net_g.state_dict())
    with caplog.at_level('WARNING', logger='basicsr'):
        resumed.resume_training(state)
    assert resumed.optimizer_g.param_groups[0]['fused'] is False and 'fused Adam' in caplog.text
    resumed.feed_data(smooth_batch())
    resumed.optimize_parameters(2)  # PyTorch's default Adam, from the saved moments
    assert resumed.optimizer_g.state_dict()['state'][0]['step'].item() == 2

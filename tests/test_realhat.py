"""Real-HAT training on the CPU: RealHATMSEModel and RealHATGANModel from the shipped option files, with tiny networks.

The option files of options/train/ are loaded as they are; only paths, sizes, iteration counts and the network sizes
are overridden. The perceptual loss reads a stand-in VGG19 file: random weights in the layout of torchvision's
``vgg19().features`` state dict. It exercises the loading code path; it is not an ImageNet VGG.
"""
from __future__ import annotations

import random
import re
import types
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torchvision
import yaml
from basicsr.models import build_model
from basicsr.utils import DiffJPEG, USMSharp
from basicsr.utils.registry import MODEL_REGISTRY
from torch.utils.data import default_collate

from conftest import REPO, tiny_hat_config
from hat.data import RealESRGANDataset
from hat.losses import LocalVGGPerceptualLoss, find_vgg_weights
from hat.losses.perceptual import VGGFeatures, load_vgg_features, vgg_layer_names
from hat.models import RealHATGANModel, RealHATMSEModel
from hat.models.realhatmse_model import RealESRGANDegradation, TrainingPairPool
from hat.train import train_pipeline
from hat.utils.options import parse_options

MSE_FILE = REPO / 'options/train/train_Real_HAT_SRx4_mse_model.yml'
GAN_FILE = REPO / 'options/train/train_Real_HAT_GAN_SRx4_finetune_from_mse_model.yml'
VGG_FILE = 'vgg19-dcbb9e9d.pth'
SCALE = 4
CROP = 96  # the GT patch the LQ is made from (Real-ESRGAN: 400)
GT_SIZE = 32  # the training crop (LQ 8x8)
TINY_HAT = {'type': 'HAT', **tiny_hat_config(upscale=SCALE, img_size=8)}
SHIPPED_LAYER_WEIGHTS = {'conv1_2': 0.1, 'conv2_2': 0.1, 'conv3_4': 1, 'conv4_4': 1, 'conv5_4': 1}


def textured_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """uint8 BGR [size, size, 3]: smooth colour ramps with sharp-edged blocks (so USM sharpening changes it)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.stack([127 + 100 * np.sin(rng.uniform(2, 6) * xx + rng.uniform(0, 6) * yy) for _ in range(3)], axis=2)
    for _ in range(6):
        top, left = rng.integers(0, size - 16, size=2)
        img[top:top + 16, left:left + 16] = rng.uniform(0, 255, size=3)
    return np.clip(img, 0, 255).round().astype(np.uint8)


@pytest.fixture(scope='module')
def images(tmp_path_factory) -> Path:
    """gt/: 4 GT images 96x96; val_gt/, val_lq/: one 32x32 pair at x4 for validation."""
    root = tmp_path_factory.mktemp('realhat_images')
    rng = np.random.default_rng(0)
    for folder in ('gt', 'val_gt', 'val_lq'):
        (root / folder).mkdir()
    for i in range(4):
        cv2.imwrite(str(root / 'gt' / f'img{i}.png'), textured_image(rng, CROP))
    val = textured_image(rng, GT_SIZE)
    cv2.imwrite(str(root / 'val_gt' / 'val0.png'), val)
    cv2.imwrite(str(root / 'val_lq' / 'val0.png'), cv2.resize(val, (GT_SIZE // SCALE,) * 2,
                                                                interpolation=cv2.INTER_AREA))
    return root


@pytest.fixture(scope='module')
def fake_vgg19_state() -> dict[str, torch.Tensor]:
    """Random weights in the layout of torchvision's vgg19 state dict (its ``features.*`` part, plus one
    classifier entry that the loader must ignore). Not a trained network."""
    torch.manual_seed(0)
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs['E'])
    state = {f'features.{k}': v for k, v in features.state_dict().items()}
    state['classifier.6.bias'] = torch.zeros(1000)
    return state


def put_fake_vgg(root: Path, state: dict) -> Path:
    path = root / 'experiments' / 'pretrained_models' / VGG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def real_hat_options(option_file: Path, images: Path, name: str, *, total_iter: int = 4,
                     pretrain_g: str | None = None) -> dict:
    """A shipped Real-HAT option file with test paths and sizes; every other setting as shipped."""
    opt = yaml.safe_load(option_file.read_text())
    opt['name'] = name
    opt['gt_size'] = GT_SIZE
    opt['queue_size'] = 4  # two batches of two
    train = opt['datasets']['train']
    train.update(dataroot_gt=str(images / 'gt'), meta_info_file=None, crop_pad_size=CROP, gt_size=GT_SIZE,
                 batch_size_per_gpu=2, num_worker_per_gpu=0)
    opt['network_g'] = dict(TINY_HAT)
    if 'network_d' in opt:
        opt['network_d']['num_feat'] = 8
    opt['path']['pretrain_network_g'] = pretrain_g
    opt['train']['total_iter'] = total_iter
    opt['logger'].update(print_freq=1, save_checkpoint_freq=2, use_tb_logger=False)
    return opt


def write_yaml(path: Path, opt: dict) -> str:
    path.write_text(yaml.safe_dump(opt, sort_keys=False))
    return str(path)


def build_training_model(root: Path, opt: dict):
    """The model of an option dict, as train_pipeline builds it (parsed options, root_path), without training."""
    parsed, _ = parse_options(str(root), is_train=True, argv=['-opt', write_yaml(root / f'{opt["name"]}.yml', opt)])
    parsed['root_path'] = str(root)
    return build_model(parsed)


def training_batch(opt: dict, seed: int = 0) -> dict:
    """A batch of two samples of the shipped RealESRGANDataset settings (GT patches and blur kernels)."""
    dataset_opt = dict(opt['datasets']['train'], phase='train', scale=SCALE)
    dataset = RealESRGANDataset(dataset_opt)
    random.seed(seed)
    np.random.seed(seed)
    return default_collate([dataset[0], dataset[1]])


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def assert_on_8bit_grid(t: torch.Tensor) -> None:
    assert t.min() >= 0 and t.max() <= 1
    levels = t * 255
    assert torch.allclose(levels, levels.round(), atol=1e-4), 'values are not multiples of 1/255'


def log_text(exp: Path) -> str:
    return '\n'.join(p.read_text() for p in sorted(exp.glob('train_*.log')))


# ---------------------------------------------------------------------------------------------------------------
# Degradation, pool and USM
# ---------------------------------------------------------------------------------------------------------------


def test_degradation_gives_lq_of_gt_over_scale_on_the_8bit_grid():
    opt = yaml.safe_load(MSE_FILE.read_text())
    degrade = RealESRGANDegradation.from_options(opt, device='cpu')
    gt = torch.rand(3, 3, 96, 80)
    kernel = torch.zeros(3, 7, 7)
    kernel[:, 3, 3] = 1
    outputs = []
    for seed in range(4):
        seed_all(seed)
        lq = degrade(gt, kernel, kernel, kernel)
        assert lq.shape == (3, 3, 96 // SCALE, 80 // SCALE)
        assert_on_8bit_grid(lq)
        outputs.append(lq)
    assert not torch.equal(outputs[0], outputs[1]), 'different seeds drew the same degradation'
    seed_all(2)
    assert torch.equal(degrade(gt, kernel, kernel, kernel), outputs[2]), 'same seed, different degradation'
    # noise, JPEG and blur really happened: not just a resize of the GT
    plain = torch.nn.functional.interpolate(gt, size=(24, 20), mode='area')
    assert (outputs[0] - plain).abs().mean() > 0.01


@pytest.mark.parametrize('model_name, basicsr_name', [('RealHATMSEModel', 'RealESRNetModel_basicsr'),
                                                      ('RealHATGANModel', 'RealESRGANModel_basicsr')])
def test_same_seed_same_pairs_as_realesrgan(model_name, basicsr_name, images, tmp_path, fake_vgg19_state,
                                            monkeypatch):
    """The synthesis draws the same random numbers in the same order as basicsr's Real-ESRGAN models."""
    import importlib

    from basicsr.utils.img_process_util import filter2D

    # On the CPU, DiffJPEG returns a channels-last tensor that basicsr's filter2D cannot .view(); give the
    # reference the contiguous input that ours passes.
    module = importlib.import_module(MODEL_REGISTRY.get(basicsr_name).__module__)
    monkeypatch.setattr(module, 'filter2D', lambda img, kernel: filter2D(img.contiguous(), kernel))
    option_file = MSE_FILE if model_name == 'RealHATMSEModel' else GAN_FILE
    put_fake_vgg(tmp_path, fake_vgg19_state)
    opt = real_hat_options(option_file, images, f'parity_{model_name}')
    opt['num_gpu'] = 0
    ours = build_training_model(tmp_path, opt)
    assert type(ours) is {'RealHATMSEModel': RealHATMSEModel, 'RealHATGANModel': RealHATGANModel}[model_name]

    # basicsr's model without its __init__ (which moves everything to CUDA) and without its CUDA-only pool
    reference_cls = MODEL_REGISTRY.get(basicsr_name)
    reference = reference_cls.__new__(reference_cls)
    reference.opt, reference.device, reference.is_train = ours.opt, torch.device('cpu'), True
    reference.jpeger, reference.usm_sharpener = DiffJPEG(differentiable=False), USMSharp()
    reference._dequeue_and_enqueue = lambda: None

    for seed in range(6):
        batch = training_batch(opt, seed)
        seed_all(seed)
        reference.feed_data(batch)
        seed_all(seed)
        lq, gt = ours.synthesise(batch)
        assert lq.shape == (2, 3, GT_SIZE // SCALE, GT_SIZE // SCALE) and gt.shape == (2, 3, GT_SIZE, GT_SIZE)
        assert torch.equal(lq, reference.lq)
        assert torch.equal(gt, reference.gt)
        if model_name == 'RealHATGANModel':
            ours.gt = gt
            assert torch.equal(ours.loss_targets()['pixel'], reference.usm_sharpener(reference.gt))


def test_pair_pool_returns_enqueued_pairs():
    pool = TrainingPairPool(size=6)
    next_id = 0
    enqueued_after_fill, returned_after_fill = [], []
    for step in range(8):
        ids = torch.tensor([next_id, next_id + 1], dtype=torch.float32)
        next_id += 2
        lq = ids.view(2, 1, 1, 1).expand(2, 3, 2, 2).clone()
        gt = ids.view(2, 1, 1, 1).expand(2, 3, 8, 8).clone() + 1000  # same id, distinguishable tensor
        out_lq, out_gt = pool.exchange(lq, gt)
        assert out_lq.shape == lq.shape and out_gt.shape == gt.shape
        out_ids = out_lq[:, 0, 0, 0]
        # each returned LQ still travels with its own GT
        assert torch.equal(out_gt - 1000, out_ids.view(2, 1, 1, 1).expand(2, 3, 8, 8))
        assert torch.equal(out_lq, out_ids.view(2, 1, 1, 1).expand(2, 3, 2, 2))
        if step < 3:  # filling: the batch passes through
            assert torch.equal(out_ids, ids)
        else:  # full: pairs drawn from earlier batches, never the one just given
            assert set(out_ids.tolist()) <= set(range(next_id - 2))
            returned_after_fill += out_ids.tolist()
            enqueued_after_fill += ids.tolist()
    # nothing lost or duplicated: what the pool holds plus what it gave out is everything it was given
    held = pool.lq[:, 0, 0, 0].tolist()
    assert sorted(held + returned_after_fill) == sorted(list(range(6)) + enqueued_after_fill)
    assert torch.equal(pool.gt[:, 0, 0, 0] - 1000, pool.lq[:, 0, 0, 0])
    assert len(set(returned_after_fill)) == len(returned_after_fill)


def test_pair_pool_needs_a_multiple_of_the_batch_and_zero_disables_it():
    with pytest.raises(ValueError, match='queue_size 6 is not a multiple of the batch size 4'):
        TrainingPairPool(size=6).exchange(torch.zeros(4, 3, 2, 2), torch.zeros(4, 3, 8, 8))
    lq, gt = torch.rand(3, 3, 2, 2), torch.rand(3, 3, 8, 8)
    out = TrainingPairPool(size=0).exchange(lq, gt)
    assert out[0] is lq and out[1] is gt


def test_queue_size_is_checked_when_the_model_is_built(images, tmp_path):
    opt = real_hat_options(MSE_FILE, images, 'bad_queue')
    opt['num_gpu'] = 0
    opt['queue_size'] = 5
    with pytest.raises(ValueError, match=r'queue_size 5 must be a non-negative multiple of .*batch_size_per_gpu'):
        build_training_model(tmp_path, opt)


def test_too_small_patches_are_refused_when_the_model_is_built(images, tmp_path):
    opt = real_hat_options(MSE_FILE, images, 'small_crop')
    opt['num_gpu'] = 0
    opt['datasets']['train']['crop_pad_size'] = 64  # 64 * 0.15 = 9 px after the first resize: no room for blur2
    with pytest.raises(ValueError, match='crop_pad_size 64 is too small for the degradation'):
        build_training_model(tmp_path, opt)
    gan = real_hat_options(GAN_FILE, images, 'small_gt')
    gan.update(num_gpu=0, gt_size=24)  # the USM kernel needs patches of at least 26 px
    with pytest.raises(ValueError, match='gt_size 24 must be at least 26'):
        build_training_model(tmp_path, gan)


@pytest.mark.parametrize('gt_usm', [True, False])
def test_mse_model_sharpens_the_gt_only_when_gt_usm(gt_usm, images, tmp_path):
    opt = real_hat_options(MSE_FILE, images, f'usm_{gt_usm}')
    opt.update(num_gpu=0, gt_usm=gt_usm, queue_size=0, gt_size=CROP)  # the crop is the whole patch
    model = build_training_model(tmp_path, opt)
    batch = training_batch(opt)
    sharpened = USMSharp()(batch['gt'])
    assert not torch.equal(sharpened, batch['gt'])
    model.feed_data(batch)
    assert torch.equal(model.gt, sharpened if gt_usm else batch['gt'])
    assert model.lq.shape == (2, 3, CROP // SCALE, CROP // SCALE)
    assert_on_8bit_grid(model.lq)


def test_gan_model_sharpens_each_loss_target_as_configured(images, tmp_path, fake_vgg19_state):
    put_fake_vgg(tmp_path, fake_vgg19_state)
    opt = real_hat_options(GAN_FILE, images, 'gan_usm')
    opt.update(num_gpu=0, queue_size=0, gt_size=CROP)
    assert (opt['l1_gt_usm'], opt['percep_gt_usm'], opt['gan_gt_usm']) == (True, True, False)  # as shipped
    model = build_training_model(tmp_path, opt)
    batch = training_batch(opt)
    model.feed_data(batch)
    sharpened = USMSharp()(batch['gt'])
    assert torch.equal(model.gt, batch['gt'])  # the pool and the discriminator get the plain GT
    targets = model.loss_targets()
    assert torch.equal(targets['pixel'], sharpened) and torch.equal(targets['perceptual'], sharpened)
    assert torch.equal(targets['gan'], batch['gt'])
    model.l1_gt_usm, model.gan_gt_usm = False, True
    targets = model.loss_targets()
    assert torch.equal(targets['pixel'], batch['gt']) and torch.equal(targets['gan'], sharpened)

    # the LQ is made from the sharpened GT, as the MSE model's with gt_usm
    mse_opt = real_hat_options(MSE_FILE, images, 'mse_usm')
    mse_opt.update(num_gpu=0, queue_size=0, gt_size=CROP, gt_usm=True)
    mse = build_training_model(tmp_path, mse_opt)
    seed_all(3)
    model.feed_data(batch)
    seed_all(3)
    mse.feed_data(batch)
    assert torch.equal(model.lq, mse.lq)


# ---------------------------------------------------------------------------------------------------------------
# Perceptual loss from a local VGG file
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('criterion', ['l1', 'fro'])
def test_local_perceptual_loss_equals_basicsr(criterion, tmp_path, fake_vgg19_state, monkeypatch):
    """Same features, loss, style loss and gradients as basicsr's PerceptualLoss given the same VGG weights."""
    import basicsr.archs.vgg_arch as vgg_arch
    from basicsr.losses.basic_loss import PerceptualLoss

    weights = put_fake_vgg(tmp_path, fake_vgg19_state)
    reference_vgg = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs['E'])
    reference_vgg.load_state_dict({k.removeprefix('features.'): v for k, v in fake_vgg19_state.items()
                                   if k.startswith('features.')})
    # hand basicsr our stand-in instead of letting it download torchvision's weights
    monkeypatch.setattr(vgg_arch, 'VGG_PRETRAIN_PATH', str(tmp_path / 'absent.pth'))
    monkeypatch.setattr(vgg_arch, 'vgg', types.SimpleNamespace(
        vgg19=lambda pretrained: types.SimpleNamespace(features=reference_vgg)))
    settings = dict(layer_weights=SHIPPED_LAYER_WEIGHTS, vgg_type='vgg19', use_input_norm=True, range_norm=False,
                    perceptual_weight=1.0, style_weight=0.5, criterion=criterion)
    reference = PerceptualLoss(**settings)
    ours = LocalVGGPerceptualLoss(**settings, vgg_weights=str(weights))

    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    gt = torch.rand(2, 3, 32, 32)
    results = []
    for loss in (reference, ours):
        xi = x.clone().requires_grad_(True)
        percep, style = loss(xi, gt)
        (percep + style).backward()
        results.append((percep.detach(), style.detach(), xi.grad))
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert results[1][0] > 0 and not any(p.requires_grad for p in ours.parameters())


def random_vgg_features(vgg_type: str, seed: int) -> torch.nn.Sequential:
    """torchvision's ``vgg.features`` layout with random weights (and random batch-norm statistics for ``_bn``)."""
    torch.manual_seed(seed)
    cfg = {'vgg16': 'D', 'vgg19': 'E'}[vgg_type.removesuffix('_bn')]
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs[cfg], batch_norm=vgg_type.endswith('_bn'))
    for module in features.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
            torch.nn.init.normal_(module.bias, std=0.1)
            module.running_mean.normal_(std=0.1)
            module.running_var.uniform_(0.5, 2.0)
    return features.eval()


@pytest.mark.parametrize('vgg_type', ['vgg19', 'vgg16_bn'])
def test_vgg_features_equal_basicsr_feature_extractor_at_every_layer(vgg_type, tmp_path, monkeypatch):
    """A weights file in torchvision's layout (``features.0.weight``, ...) gives, at every named layer, exactly the
    output of basicsr's VGGFeatureExtractor built from the same weights, under the same layer names."""
    import basicsr.archs.vgg_arch as vgg_arch
    from basicsr.archs.vgg_arch import VGGFeatureExtractor

    reference_features = random_vgg_features(vgg_type, seed=1)
    weights = tmp_path / f'{vgg_type}.pth'
    torch.save({f'features.{k}': v for k, v in reference_features.state_dict().items()}, weights)
    # the keys torchvision's own network expects for its ``features`` (built on the meta device: nothing allocated)
    with torch.device('meta'):
        torchvision_keys = [k for k in getattr(torchvision.models, vgg_type)(weights=None).state_dict()
                            if k.startswith('features.')]
    assert [f'features.{k}' for k in load_vgg_features(vgg_type, str(weights)).state_dict()] == torchvision_keys

    monkeypatch.setattr(vgg_arch, 'VGG_PRETRAIN_PATH', str(tmp_path / 'absent.pth'))
    monkeypatch.setattr(vgg_arch, 'vgg', types.SimpleNamespace(
        **{vgg_type: lambda pretrained: types.SimpleNamespace(features=reference_features)}))
    names = vgg_layer_names(vgg_type)
    reference = VGGFeatureExtractor(layer_name_list=names, vgg_type=vgg_type, use_input_norm=True, range_norm=True)
    ours = VGGFeatures(layer_names=names, vgg_type=vgg_type, weights_file=str(weights), use_input_norm=True,
                       range_norm=True)
    assert names == reference.names
    assert list(ours.state_dict()) == [k for k in reference.state_dict() if k not in ('mean', 'std')]
    assert all(not p.requires_grad for p in ours.parameters())

    torch.manual_seed(2)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    ours.train()  # a training model switches its losses to train mode: the frozen VGG must stay in eval mode
    with torch.no_grad():
        expected, got = reference(x), ours(x)
    assert list(got) == names and got['pool5'].shape == (2, 512, 1, 1)
    for name in names:
        assert torch.equal(got[name], expected[name]), name
    assert (got['conv1_1'] < 0).any(), 'the pre-activation features were overwritten by the ReLU'


def test_missing_vgg_file_names_it_and_downloads_nothing(tmp_path, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError('a download was attempted')

    monkeypatch.setattr(torch.hub, 'load_state_dict_from_url', no_download)
    monkeypatch.setattr(torch.hub, 'download_url_to_file', no_download)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as error:
        LocalVGGPerceptualLoss(layer_weights=SHIPPED_LAYER_WEIGHTS, root_path=str(tmp_path / 'project'))
    message = str(error.value)
    assert str(tmp_path / 'project' / 'experiments' / 'pretrained_models' / VGG_FILE) in message
    assert f'https://download.pytorch.org/models/{VGG_FILE}' in message
    assert 'vgg_weights' in message


def test_vgg_file_of_the_wrong_network_is_refused(tmp_path):
    weights = tmp_path / 'not_vgg19.pth'
    torch.save({'features.0.weight': torch.zeros(8, 3, 3, 3)}, weights)
    with pytest.raises(ValueError, match=r'features\.0\.weight has shape \[8, 3, 3, 3\], expected \[64, 3, 3, 3\]'):
        LocalVGGPerceptualLoss(layer_weights={'conv1_2': 1.0}, vgg_weights=str(weights))
    with pytest.raises(ValueError, match="layer_weights names \\['conv6_1'\\]"):
        LocalVGGPerceptualLoss(layer_weights={'conv6_1': 1.0}, vgg_weights=str(weights))


def test_vgg_weights_option_is_relative_to_the_project_root(tmp_path, monkeypatch):
    (tmp_path / 'project' / 'weights').mkdir(parents=True)
    target = tmp_path / 'project' / 'weights' / 'my_vgg19.pth'
    target.write_bytes(b'')
    monkeypatch.chdir(tmp_path)
    assert find_vgg_weights('vgg19', 'weights/my_vgg19.pth', tmp_path / 'project') == str(target)
    default = tmp_path / 'project' / 'experiments' / 'pretrained_models' / VGG_FILE
    default.parent.mkdir(parents=True)
    default.write_bytes(b'')
    assert find_vgg_weights('vgg19', None, tmp_path / 'project') == str(default)


def test_gan_training_without_vgg_file_stops_before_the_first_iteration(images, tmp_path, fake_vgg19_state):
    opt = real_hat_options(GAN_FILE, images, 'gan_no_vgg', total_iter=1)
    assert opt['train']['perceptual_opt']['type'] == 'PerceptualLoss'  # as shipped
    opt_file = write_yaml(tmp_path / 'gan_no_vgg.yml', opt)
    with pytest.raises(FileNotFoundError, match=re.escape(VGG_FILE)):
        train_pipeline(str(tmp_path), ['-opt', opt_file])
    exp = tmp_path / 'experiments' / 'gan_no_vgg'
    assert not any((exp / 'models').iterdir()) and not any((exp / 'training_states').iterdir())
    assert 'Start training' not in log_text(exp)

    # the documented option key points the loss at a file elsewhere
    weights = tmp_path / 'elsewhere' / 'vgg19.pth'
    weights.parent.mkdir()
    torch.save(fake_vgg19_state, weights)
    opt['name'] = 'gan_vgg_weights'
    opt['train']['perceptual_opt']['vgg_weights'] = str(weights)
    train_pipeline(str(tmp_path), ['-opt', write_yaml(tmp_path / 'gan_vgg_weights.yml', opt)])
    exp = tmp_path / 'experiments' / 'gan_vgg_weights'
    assert (exp / 'models' / 'net_d_latest.pth').is_file()
    assert f'weights from {weights}' in log_text(exp)


# ---------------------------------------------------------------------------------------------------------------
# End to end: the MSE stage, then the GAN stage from its result, each stopped and resumed
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def project(tmp_path_factory, images, fake_vgg19_state) -> Path:
    """A project root holding the stand-in VGG19 where the shipped GAN option file looks for it."""
    root = tmp_path_factory.mktemp('realhat_project')
    put_fake_vgg(root, fake_vgg19_state)
    return root


@pytest.fixture(scope='module')
def trained_mse(project, images) -> Path:
    """4 iterations of the shipped MSE option file (tiny HAT, tiny validation), then --auto_resume to 6."""
    opt = real_hat_options(MSE_FILE, images, 'real_mse')
    opt['datasets']['val'] = {'name': 'tinyval', 'type': 'PairedImageDataset', 'dataroot_gt': str(images / 'val_gt'),
                              'dataroot_lq': str(images / 'val_lq'), 'io_backend': {'type': 'disk'}}
    opt['val'] = {'val_freq': 4, 'save_img': False,
                  'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': SCALE, 'test_y_channel': True}}}
    opt_file = write_yaml(project / 'real_mse.yml', opt)
    train_pipeline(str(project), ['-opt', opt_file])
    train_pipeline(str(project), ['-opt', opt_file, '--auto_resume', '--force_yml', 'train:total_iter=6'])
    return project / 'experiments' / 'real_mse'


@pytest.fixture(scope='module')
def trained_gan(project, images, trained_mse) -> Path:
    """The shipped GAN option file from the MSE result: 4 iterations, then --auto_resume to 6."""
    opt = real_hat_options(GAN_FILE, images, 'real_gan', pretrain_g=str(trained_mse / 'models' / 'net_g_latest.pth'))
    assert opt['train']['perceptual_opt']['type'] == 'PerceptualLoss' and 'vgg_weights' not in opt['train'][
        'perceptual_opt']
    opt_file = write_yaml(project / 'real_gan.yml', opt)
    train_pipeline(str(project), ['-opt', opt_file])
    train_pipeline(str(project), ['-opt', opt_file, '--auto_resume', '--force_yml', 'train:total_iter=6'])
    return project / 'experiments' / 'real_gan'


def assert_resumed_from_4(exp: Path) -> None:
    text = log_text(exp)
    assert re.search(r'Resuming training from \S+/training_states/4\.state: epoch 1, iter 4\.', text)
    assert 'Start training from epoch: 1, iter: 4' in text
    assert re.search(r'iter:\s+6,', text) and not re.search(r'iter:\s+7,', text)
    assert {p.name for p in (exp / 'training_states').iterdir()} == {'2.state', '4.state', '6.state'}
    assert torch.load(exp / 'training_states' / '6.state', weights_only=True)['iter'] == 6


def test_mse_training_writes_checkpoints_and_resumes(trained_mse):
    exp = trained_mse
    assert {p.name for p in (exp / 'models').iterdir()} == {'net_g_2.pth', 'net_g_4.pth', 'net_g_6.pth',
                                                             'net_g_latest.pth'}
    assert_resumed_from_4(exp)
    text = log_text(exp)
    assert 'Model [RealHATMSEModel] is created.' in text
    assert 'Validation tinyval' in text and re.search(r'# psnr: \d+\.\d+', text)
    at_4, at_6 = (torch.load(exp / 'models' / f'net_g_{i}.pth', weights_only=True) for i in (4, 6))
    assert set(at_6) == {'params', 'params_ema'}
    assert any(not torch.equal(at_4['params'][k], at_6['params'][k]) for k in at_6['params']
               if at_6['params'][k].is_floating_point())


def test_gan_training_writes_both_networks_and_resumes_both(trained_gan, trained_mse):
    exp = trained_gan
    assert {p.name for p in (exp / 'models').iterdir()} == {
        f'net_{n}_{i}.pth' for n in ('g', 'd') for i in (2, 4, 6, 'latest')}
    assert_resumed_from_4(exp)
    text = log_text(exp)
    assert f'Loading HAT model from {trained_mse}/models/net_g_latest.pth, with param key: [params_ema]' in text
    assert f'Loading UNetDiscriminatorSN model from {exp}/models/net_d_4.pth, with param key: [params]' in text
    assert f'weights from {exp.parent}/pretrained_models/{VGG_FILE}' in text
    for loss in ('l_g_pix', 'l_g_percep', 'l_g_gan', 'l_d_real', 'l_d_fake'):
        assert re.search(rf'{loss}: [-+]?\d\.\d+e[-+]\d+', text), loss

    state = torch.load(exp / 'training_states' / '6.state', weights_only=True)
    assert len(state['optimizers']) == 2 and len(state['schedulers']) == 2  # generator and discriminator
    net_g = torch.load(exp / 'models' / 'net_g_6.pth', weights_only=True)
    assert set(net_g) == {'params', 'params_ema'}
    d_4, d_6 = (torch.load(exp / 'models' / f'net_d_{i}.pth', weights_only=True) for i in (4, 6))
    assert set(d_6) == {'params'} and 'conv1.weight_orig' in d_6['params']
    assert any(not torch.equal(d_4['params'][k], d_6['params'][k]) for k in d_6['params'])
    # the discriminator optimizer state of the resumed run continues the saved one
    assert state['optimizers'][1]['state'][0]['step'] == 6

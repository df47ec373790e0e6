"""HATModel: basicsr's SRModel with HAT's test-time behaviour, on any device.

Differences from basicsr's SRModel (and from the official HATModel):
* inference pads the input to a multiple of the window size and crops the output (as the released models were
  evaluated), optionally tile by tile with blended overlaps (``tile: {tile_size, tile_pad}``) and with the x8
  self-ensemble (``val: {self_ensemble: true}``);
* the network is put back in the mode it was in after inference (the official code leaves it in eval mode);
* a validation set without ground truth writes its images and warns that metrics were skipped;
* checkpoints load with ``weights_only=True`` and a mismatch names the keys and the variant the file looks like;
* checkpoints and training states are written atomically; distributed training works on the CPU (gloo);
* mixed precision and compilation by option: ``train: {amp: bf16|fp16|false, compile: true|false}`` and
  ``val: {amp: bf16|fp16|false}`` (see :func:`amp_dtype`).
"""
from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from os import path as osp

import torch
from basicsr.metrics import calculate_metric
from basicsr.models.sr_model import SRModel
from basicsr.utils import imwrite, tensor2img
from basicsr.utils.registry import MODEL_REGISTRY
from torch import Tensor
from torch.nn.parallel import DataParallel, DistributedDataParallel
from tqdm import tqdm

from hat.data.errors import UnreadableImageError
from hat.inference.descriptor import ModelDescriptor
from hat.inference.precision import resolve_precision
from hat.inference.upscaler import Upscaler
from hat.io.checkpoints import load_into_network
from hat.utils.atomic import atomic_torch_save
from hat.utils.resume import capture_rng_state

logger = logging.getLogger('basicsr')

# Values of an ``amp`` option that mean full precision.
AMP_OFF = (None, False, 'false', 'fp32', 'none')


def amp_precision(value, where: str) -> str:
    """The precision an ``amp`` option names (``'fp32'`` for off), checked.

    Raises:
        ValueError: a value other than auto, bf16, fp16 or off; ``where`` is the option's section.
    """
    if value in AMP_OFF:
        return 'fp32'
    if value not in ('auto', 'bf16', 'fp16'):
        raise ValueError(f'{where}: amp: {value!r} is not supported; use auto, bf16 (recommended), fp16 (CUDA only) '
                         'or false.')
    return value


def amp_dtype(value, where: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype an ``amp`` option asks for on ``device``, or None for full precision.

    ``auto`` is bf16 where the hardware computes it natively (a recent GPU, a CPU with AVX512-BF16/AMX), else fp32;
    an explicit ``bf16`` where it would be emulated runs fp32 with one warning (see
    :mod:`hat.inference.precision`). fp16 is accepted on CUDA only (with a gradient scaler in training); HAT's
    attention logits are known to overflow fp16 (users of the official code and its descendants report NaN losses).

    Args:
        value: the option's value: ``auto``, ``bf16``, ``fp16``, or ``false``/``fp32``/absent for full precision.
        where: the option's section, for messages (``train`` or ``val``).
    Raises:
        ValueError: an unknown value, or fp16 without CUDA.
    """
    return resolve_precision(amp_precision(value, where), device, where=f'{where}: amp').dtype


def fused_adam_serves(params: list) -> bool:
    """Whether PyTorch has a fused Adam kernel for all of ``params`` (tensors; False for parameter groups): floating
    point on a device that the kernels serve (the CPU from torch 2.4, CUDA)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # a PyTorch without the list: keep its default
        return False
    devices = _get_fused_kernels_supported_devices()
    return bool(params) and all(isinstance(p, Tensor) and torch.is_floating_point(p) and p.device.type in devices
                                for p in params)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device``, or a no-op context for None."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


@MODEL_REGISTRY.register()
class HATModel(SRModel):
    """Single-image SR model for HAT (and any network that maps [B, C, H, W] to [B, C, sH, sW])."""

    # ----- devices -----
    def model_to_device(self, net: torch.nn.Module) -> torch.nn.Module:
        net = net.to(self.device)
        if self.opt['dist']:
            # DDP takes device_ids only for CUDA; on the CPU (gloo) it must be None.
            device_ids = [torch.cuda.current_device()] if self.device.type == 'cuda' else None
            net = DistributedDataParallel(
                net, device_ids=device_ids, find_unused_parameters=self.opt.get('find_unused_parameters', False))
        elif self.opt['num_gpu'] > 1:
            net = DataParallel(net)
        return net

    # ----- loading and saving -----
    def load_network(self, net: torch.nn.Module, load_path: str, strict: bool = True,
                     param_key: str | None = 'params') -> None:
        logger.info(f'Loading {type(self.get_bare_model(net)).__name__} model from {load_path}, with param key: '
                    f'[{param_key}].')
        load_into_network(net, load_path, param_key=param_key, strict=strict)

    def save_network(self, net, net_label: str, current_iter: int, param_key='params') -> None:
        if self.opt['rank'] != 0:
            return
        nets = net if isinstance(net, list) else [net]
        keys = param_key if isinstance(param_key, list) else [param_key]
        if len(nets) != len(keys):
            raise ValueError('save_network needs one param_key per network.')
        save_dict = {}
        for net_, key in zip(nets, keys):
            state_dict = self.get_bare_model(net_).state_dict()
            save_dict[key] = OrderedDict((k.removeprefix('module.'), v.detach().cpu()) for k, v in state_dict.items())
        label = 'latest' if current_iter == -1 else current_iter
        atomic_torch_save(save_dict, osp.join(self.opt['path']['models'], f'{net_label}_{label}.pth'))

    def save_training_state(self, epoch: int, current_iter: int) -> None:
        if self.opt['rank'] != 0 or current_iter == -1:
            return
        state = {
            'epoch': epoch,
            'iter': current_iter,
            'optimizers': [o.state_dict() for o in self.optimizers],
            'schedulers': [s.state_dict() for s in self.schedulers],
            'rng': capture_rng_state(),
        }
        atomic_torch_save(state, osp.join(self.opt['path']['training_states'], f'{current_iter}.state'))

    # ----- training -----
    def get_optimizer(self, optim_type: str, params, lr: float, **kwargs) -> torch.optim.Optimizer:
        """basicsr's optimiser (Adam), with ``fused=True`` where the options set neither ``fused`` nor ``foreach``
        and PyTorch has the fused kernel for the parameters' device and dtype (:func:`fused_adam_serves`).

        PyTorch's default Adam on the CPU updates one parameter at a time: about 10 operators for each of HAT-S's 862
        parameter tensors, a fifth of all operator calls of a training iteration. The fused kernel updates them all
        in one call: 22 against 80 ms per step (HAT-S, Ice Lake, 2 threads), the same update up to fp32 rounding
        (parameters within 1e-8 of the default's after a step). ``fused: false`` or a ``foreach`` setting in
        ``optim_g`` keep PyTorch's own choice. A resumed state keeps the implementation it was saved with.
        """
        params = list(params)
        if optim_type == 'Adam' and 'fused' not in kwargs and 'foreach' not in kwargs and fused_adam_serves(params):
            kwargs['fused'] = True
        return super().get_optimizer(optim_type, params, lr, **kwargs)

    def resume_training(self, resume_state: dict) -> None:
        """basicsr's: the optimisers' and schedulers' states. A state saved by a fused Adam that this PyTorch cannot
        run fused for these parameters (saved on a GPU, or with a newer PyTorch, resumed on a CPU without the fused
        kernel) continues with PyTorch's default Adam, the same update, with a warning, instead of failing at the
        first step."""
        super().resume_training(resume_state)
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                if group.get('fused') and not fused_adam_serves(group['params']):
                    logger.warning('The training state was saved by a fused Adam, which this PyTorch has no kernel '
                                   'for here; training continues with its default Adam (the same update).')
                    group['fused'] = False

    def init_training_settings(self) -> None:
        self.setup_training_precision()  # an fp16 request on the CPU fails here, before anything is built
        super().init_training_settings()
        if self.opt['train'].get('compile', False):
            self.compile_network(self.net_g)

    def setup_training_precision(self) -> None:
        """Set ``train_amp`` (the autocast dtype of ``train: amp``, or None) and ``grad_scaler`` (fp16 only).

        Subclasses that replace ``init_training_settings`` get it on their first ``optimize_parameters``.
        """
        self.train_amp = amp_dtype(self.opt['train'].get('amp', False), 'train', self.device)
        self.grad_scaler = None
        if self.train_amp is torch.float16:
            logger.warning('train: amp: fp16 overflows in HAT\'s attention in reported runs (NaN losses); '
                           'amp: bf16 is the recommended mixed precision.')
            scaler_class = getattr(torch.amp, 'GradScaler', None)  # torch >= 2.3; before: torch.cuda.amp
            self.grad_scaler = scaler_class('cuda') if scaler_class else torch.cuda.amp.GradScaler()

    def compile_network(self, net: torch.nn.Module) -> None:
        """``torch.compile`` in place: HAT's blocks (``compile_blocks``) or, for other networks, the whole module.

        In place, so that checkpoints keep their key names.
        """
        bare = self.get_bare_model(net)
        logger.info(f'Compiling {type(bare).__name__} with torch.compile (the first iterations are slow).')
        if hasattr(bare, 'compile_blocks'):
            bare.compile_blocks()
        else:
            bare.compile()

    def optimize_parameters(self, current_iter: int) -> None:
        """One step: forward (under ``train: amp`` autocast), losses, backward, optimiser step, EMA."""
        if not hasattr(self, 'train_amp'):
            self.setup_training_precision()
        self.optimizer_g.zero_grad(set_to_none=True)
        with autocast(self.device, self.train_amp):
            self.output = self.net_g(self.lq)
            output = self.output.float()
            l_total = 0
            loss_dict = OrderedDict()
            if self.cri_pix:
                l_pix = self.cri_pix(output, self.gt)
                l_total += l_pix
                loss_dict['l_pix'] = l_pix
            if self.cri_perceptual:
                l_percep, l_style = self.cri_perceptual(output, self.gt)
                if l_percep is not None:
                    l_total += l_percep
                    loss_dict['l_percep'] = l_percep
                if l_style is not None:
                    l_total += l_style
                    loss_dict['l_style'] = l_style

        if self.grad_scaler is not None:
            self.grad_scaler.scale(l_total).backward()
            self.grad_scaler.step(self.optimizer_g)
            self.grad_scaler.update()
        else:
            l_total.backward()
            self.optimizer_g.step()

        self.log_dict = self.reduce_loss_dict(loss_dict)
        if self.ema_decay > 0:
            self.model_ema(decay=self.ema_decay)

    def model_ema(self, decay: float = 0.999) -> None:
        """net_g_ema = decay * net_g_ema + (1 - decay) * net_g, over all parameters at once (``_foreach``)."""
        source = dict(self.get_bare_model(self.net_g).named_parameters())
        names, targets = zip(*self.net_g_ema.named_parameters())
        with torch.no_grad():
            torch._foreach_lerp_(list(targets), [source[name].detach() for name in names], 1 - decay)

    # ----- inference -----
    def _network_for_inference(self) -> torch.nn.Module:
        return self.net_g_ema if hasattr(self, 'net_g_ema') else self.net_g

    def upscaler(self) -> Upscaler:
        """The Upscaler of test/validation: the network in use (EMA if any), padding to the window, the
        ``tile: {tile_size, tile_pad}`` and ``val: {amp, self_ensemble}`` options."""
        net = self._network_for_inference()
        tile_opt = self.opt.get('tile') or {}
        val_opt = self.opt.get('val') or {}
        model = ModelDescriptor.from_network(net, scale=self.opt['scale'],
                                             size_multiple=int(self.opt['network_g'].get('window_size', 1)))
        return Upscaler(model, device=self.device, precision=amp_precision(val_opt.get('amp', False), 'val'),
                        tile=int(tile_opt['tile_size']) if tile_opt else None,
                        tile_pad=int(tile_opt.get('tile_pad', 0)), self_ensemble=val_opt.get('self_ensemble', False),
                        progress=tile_opt.get('progress', True), precision_option='val: amp')

    def super_resolve(self, lq: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, C, H * scale, W * scale] (float32, on the host) with padding, tiling, self-ensemble
        and precision (``val: amp``) per the options."""
        return self.upscaler().upscale_tensor(lq)

    def test(self) -> None:
        net = self._network_for_inference()
        was_training = net.training
        net.eval()
        try:
            with torch.no_grad():
                self.output = self.super_resolve(self.lq)
        finally:
            net.train(was_training)

    # ----- validation -----
    def nondist_validation(self, dataloader, current_iter: int, tb_logger, save_img: bool) -> None:
        dataset_name = dataloader.dataset.opt['name']
        val_opt = self.opt['val']
        metrics_opt = val_opt.get('metrics')
        if metrics_opt:
            self._initialize_best_metric_results(dataset_name)
        totals = {name: 0.0 for name in (metrics_opt or {})}
        measured = 0
        warned_no_gt = False

        bar = tqdm(total=len(dataloader), unit='image', desc=dataset_name, disable=not val_opt.get('pbar', False))
        for val_data in _skipping_unreadable(dataloader, dataset_name, bar):
            img_name = osp.splitext(osp.basename(val_data['lq_path'][0]))[0]
            self.feed_data(val_data)
            self.test()
            sr_img = tensor2img([self.output.detach().cpu()])
            gt_img = tensor2img([self.gt.detach().cpu()]) if 'gt' in val_data else None
            del self.lq, self.output
            if hasattr(self, 'gt'):
                del self.gt

            if save_img:
                imwrite(sr_img, self._visualization_path(dataset_name, img_name, current_iter))

            if metrics_opt:
                if gt_img is None:
                    if not warned_no_gt:
                        logger.warning(f'Dataset {dataset_name} has no ground truth: metrics '
                                       f'({", ".join(metrics_opt)}) skipped; images are still written.')
                        warned_no_gt = True
                else:
                    for name, metric_opt in metrics_opt.items():
                        totals[name] += calculate_metric({'img': sr_img, 'img2': gt_img}, metric_opt)
                    measured += 1
            bar.update(1)
            bar.set_postfix_str(img_name)
        bar.close()

        if metrics_opt and measured:
            self.metric_results = {name: total / measured for name, total in totals.items()}
            for name, value in self.metric_results.items():
                self._update_best_metric_result(dataset_name, name, value, current_iter)
            self._log_validation_metric_values(current_iter, dataset_name, tb_logger)
        elif metrics_opt:
            self.metric_results = {}

    def _visualization_path(self, dataset_name: str, img_name: str, current_iter: int) -> str:
        root = self.opt['path']['visualization']
        if self.opt['is_train']:
            return osp.join(root, img_name, f'{img_name}_{current_iter}.png')
        suffix = self.opt['val'].get('suffix') or self.opt['name']
        return osp.join(root, dataset_name, f'{img_name}_{suffix}.png')


def _skipping_unreadable(dataloader, dataset_name: str, bar: tqdm):
    """Iterate a validation loader, skipping (with a warning) items whose image cannot be read.

    One broken file must not cost the evaluation of the rest of the set; the metrics are averaged over the images
    that were read, and the log says how many were skipped.
    """
    iterator = iter(dataloader)
    skipped = 0
    while True:
        try:
            yield next(iterator)
        except StopIteration:
            break
        except UnreadableImageError as err:
            skipped += 1
            bar.update(1)
            logger.warning(f'Validation of {dataset_name}: skipping an image. {err}')
    if skipped:
        logger.warning(f'Validation of {dataset_name}: {skipped} unreadable image(s) skipped; metrics average the '
                       f'{len(dataloader) - skipped} others.')

"""RealHATGANModel: Real-HAT's second stage, fine-tuning with pixel + perceptual + GAN losses.

The LQ images are synthesised exactly as in :class:`~hat.models.realhatmse_model.RealHATMSEModel` (same options,
same random draws), always from the USM-sharpened GT as in Real-ESRGAN. Each loss then compares the output with the
sharpened or the plain GT patch, per ``l1_gt_usm`` (default true), ``percep_gt_usm`` (true) and ``gan_gt_usm``
(false; the discriminator sees real, unsharpened images).

Networks: ``network_g`` (HAT, with ``net_g_ema`` when ``train.ema_decay > 0``) and ``network_d`` (the U-Net
discriminator). Each iteration updates the generator (when ``iter % net_d_iters == 0`` and
``iter > net_d_init_iters``) with ``pixel_opt`` + ``perceptual_opt`` + ``gan_opt``, then the discriminator on the real
target and the detached output. Checkpoints: ``net_g_<iter>.pth`` (``params`` and ``params_ema``) and
``net_d_<iter>.pth`` (``params``) next to ``training_states/<iter>.state`` (both optimizers and schedulers), so
``--auto_resume`` restores both networks.

``perceptual_opt`` of ``type: PerceptualLoss`` (basicsr's name, used by the official option file) is built as
:class:`~hat.losses.LocalVGGPerceptualLoss`: the same loss, with the VGG19 weights read from
``experiments/pretrained_models/vgg19-dcbb9e9d.pth`` or ``perceptual_opt.vgg_weights``; a missing file stops the run
at model construction, before any iteration, with instructions.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import torch
from basicsr.archs import build_network
from basicsr.losses import build_loss
from basicsr.utils.registry import MODEL_REGISTRY
from torch import Tensor

from hat.models.realhatmse_model import RealHATMSEModel, usm_flag

logger = logging.getLogger('basicsr')


@MODEL_REGISTRY.register()
class RealHATGANModel(RealHATMSEModel):
    """Real-HAT GAN fine-tuning: HAT generator, U-Net discriminator, Real-ESRGAN degradations (see module doc)."""

    # ----- options -----
    def read_usm_options(self, opt: dict[str, Any]) -> bool:
        self.l1_gt_usm = usm_flag(opt, 'l1_gt_usm', alias='gt_usm', default=True)
        self.percep_gt_usm = usm_flag(opt, 'percep_gt_usm', default=True)
        self.gan_gt_usm = usm_flag(opt, 'gan_gt_usm', default=False)
        return self.l1_gt_usm or self.percep_gt_usm or self.gan_gt_usm

    def _check_training_options(self, opt: dict[str, Any]) -> None:
        if 'network_d' not in opt:
            raise KeyError('RealHATGANModel needs network_d (type: UNetDiscriminatorSN) in the option file.')
        train_opt = opt['train']
        if not train_opt.get('gan_opt'):
            raise KeyError('RealHATGANModel needs train.gan_opt (type: GANLoss).')
        if not train_opt.get('optim_d'):
            raise KeyError('RealHATGANModel needs train.optim_d (the discriminator optimizer).')
        if train_opt.get('ldl_opt'):
            raise ValueError('train.ldl_opt (LDL artifact loss) is not supported by RealHATGANModel; remove it.')
        super()._check_training_options(opt)

    # ----- training set-up -----
    def init_training_settings(self) -> None:
        train_opt = self.opt['train']
        self.net_g.train()
        self.init_ema()

        self.net_d = self.model_to_device(build_network(self.opt['network_d']))
        self.print_network(self.net_d)
        load_path = self.opt['path'].get('pretrain_network_d')
        if load_path is not None:
            self.load_network(self.net_d, load_path, self.opt['path'].get('strict_load_d', True),
                              self.opt['path'].get('param_key_d', 'params'))
        self.net_d.train()

        self.build_losses()
        self.cri_gan = build_loss(train_opt['gan_opt']).to(self.device)
        self.net_d_iters = int(train_opt.get('net_d_iters', 1))
        self.net_d_init_iters = int(train_opt.get('net_d_init_iters', 0))
        if self.net_d_iters < 1:
            raise ValueError(f'train.net_d_iters must be >= 1, got {self.net_d_iters}.')

        self.setup_optimizers()
        self.setup_schedulers()

    def setup_optimizers(self) -> None:
        """``optimizer_g`` (trainable net_g parameters) then ``optimizer_d``: the order of the saved states."""
        train_opt = self.opt['train']
        params_g = []
        for name, param in self.net_g.named_parameters():
            if param.requires_grad:
                params_g.append(param)
            else:
                logger.warning(f'Params {name} will not be optimized.')
        optim_g = dict(train_opt['optim_g'])
        self.optimizer_g = self.get_optimizer(optim_g.pop('type'), params_g, **optim_g)
        self.optimizers.append(self.optimizer_g)
        optim_d = dict(train_opt['optim_d'])
        self.optimizer_d = self.get_optimizer(optim_d.pop('type'), self.net_d.parameters(), **optim_d)
        self.optimizers.append(self.optimizer_d)

    # ----- data -----
    def degradation_source_and_target(self, gt: Tensor) -> tuple[Tensor, Tensor]:
        """Real-ESRGAN degrades the sharpened GT and keeps the plain GT; each loss picks its target later."""
        return self.usm_sharpener(gt), gt

    @torch.no_grad()
    def loss_targets(self) -> dict[str, Tensor]:
        """The GT patch each loss compares with: ``{'pixel', 'perceptual', 'gan'}`` -> [B, 3, H, W], sharpened per
        ``l1_gt_usm`` / ``percep_gt_usm`` / ``gan_gt_usm``.

        The patches are sharpened after the pair pool (as in Real-ESRGAN), so the pool holds plain GT only.
        """
        wanted = (self.l1_gt_usm, self.percep_gt_usm, self.gan_gt_usm)
        sharpened = self.usm_sharpener(self.gt) if any(wanted) else None
        return {name: sharpened if flag else self.gt for name, flag in zip(('pixel', 'perceptual', 'gan'), wanted)}

    # ----- optimisation -----
    def optimize_parameters(self, current_iter: int) -> None:
        targets = self.loss_targets()
        loss_dict = OrderedDict()

        # generator: the discriminator is a fixed critic here
        for param in self.net_d.parameters():
            param.requires_grad = False
        self.optimizer_g.zero_grad()
        self.output = self.net_g(self.lq)
        if current_iter % self.net_d_iters == 0 and current_iter > self.net_d_init_iters:
            l_g_total = 0
            if self.cri_pix:
                l_g_pix = self.cri_pix(self.output, targets['pixel'])
                l_g_total = l_g_total + l_g_pix
                loss_dict['l_g_pix'] = l_g_pix
            if self.cri_perceptual:
                l_g_percep, l_g_style = self.cri_perceptual(self.output, targets['perceptual'])
                if l_g_percep is not None:
                    l_g_total = l_g_total + l_g_percep
                    loss_dict['l_g_percep'] = l_g_percep
                if l_g_style is not None:
                    l_g_total = l_g_total + l_g_style
                    loss_dict['l_g_style'] = l_g_style
            l_g_gan = self.cri_gan(self.net_d(self.output), True, is_disc=False)
            l_g_total = l_g_total + l_g_gan
            loss_dict['l_g_gan'] = l_g_gan
            l_g_total.backward()
            self.optimizer_g.step()

        # discriminator: real target against the detached output
        for param in self.net_d.parameters():
            param.requires_grad = True
        self.optimizer_d.zero_grad()
        real_d_pred = self.net_d(targets['gan'])
        l_d_real = self.cri_gan(real_d_pred, True, is_disc=True)
        loss_dict['l_d_real'] = l_d_real
        loss_dict['out_d_real'] = torch.mean(real_d_pred.detach())
        l_d_real.backward()
        fake_d_pred = self.net_d(self.output.detach().clone())
        l_d_fake = self.cri_gan(fake_d_pred, False, is_disc=True)
        loss_dict['l_d_fake'] = l_d_fake
        loss_dict['out_d_fake'] = torch.mean(fake_d_pred.detach())
        l_d_fake.backward()
        self.optimizer_d.step()

        if self.ema_decay > 0:
            self.model_ema(decay=self.ema_decay)
        self.log_dict = self.reduce_loss_dict(loss_dict)

    # ----- checkpoints -----
    def save(self, epoch: int, current_iter: int) -> None:
        """net_g (params, params_ema), net_d (params), then the training state: a state on disk implies that the
        networks it resumes are complete."""
        if hasattr(self, 'net_g_ema'):
            self.save_network([self.net_g, self.net_g_ema], 'net_g', current_iter, param_key=['params', 'params_ema'])
        else:
            self.save_network(self.net_g, 'net_g', current_iter)
        self.save_network(self.net_d, 'net_d', current_iter)
        self.save_training_state(epoch, current_iter)

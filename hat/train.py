"""Training pipeline: ``python hat/train.py -opt options/train/<file>.yml [--auto_resume] [--launcher pytorch]``.

The loop is BasicSR's; what differs is set up in ``hat.utils``: CPU fallback, torchrun on the CPU, resume from any
working directory (newest complete state), atomic checkpoints, and a clear stop on a non-finite loss.
"""
from __future__ import annotations

import datetime
import logging
import math
import signal
import sys
import time
from os import path as osp

import torch

if __package__ in (None, ''):  # run as a script: make the project importable without installing it
    sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import hat  # noqa: E402,F401  (compat shim and registries before anything from basicsr)
from basicsr.data import build_dataloader, build_dataset  # noqa: E402
from basicsr.data.data_sampler import EnlargedSampler  # noqa: E402
from basicsr.data.prefetch_dataloader import CPUPrefetcher, CUDAPrefetcher  # noqa: E402
from basicsr.models import build_model  # noqa: E402
from basicsr.utils import (AvgTimer, MessageLogger, get_env_info, get_time_str, init_tb_logger,  # noqa: E402
                           make_exp_dirs, mkdir_and_rename)
from basicsr.utils.options import dict2str  # noqa: E402

from hat.utils.cli import run_command  # noqa: E402
from hat.utils.log import setup_logger  # noqa: E402
from hat.utils.options import copy_option_file, parse_options  # noqa: E402
from hat.utils.resume import prepare_resume, restore_rng_state  # noqa: E402

ROOT_PATH = osp.dirname(osp.dirname(osp.abspath(__file__)))


def create_dataloaders(opt: dict) -> tuple:
    """(train_loader, train_sampler, val_loaders, total_epochs, total_iters, notes) from ``opt['datasets']``; notes:
    a line per data set for the log (built before the log exists, see :func:`train_pipeline`)."""
    train_loader = train_sampler = None
    val_loaders, notes = [], []
    total_epochs = total_iters = 0
    for phase, dataset_opt in opt['datasets'].items():
        if phase == 'train':
            enlarge_ratio = dataset_opt.get('dataset_enlarge_ratio', 1)
            train_set = build_dataset(dataset_opt)
            train_sampler = EnlargedSampler(train_set, opt['world_size'], opt['rank'], enlarge_ratio)
            train_loader = build_dataloader(train_set, dataset_opt, num_gpu=opt['num_gpu'], dist=opt['dist'],
                                            sampler=train_sampler, seed=opt['manual_seed'])
            # The loader drops the last incomplete batch: count the batches it really yields (BasicSR's ceil
            # overestimates, so that its runs can stop before total_iter).
            iters_per_epoch = len(train_loader)
            if iters_per_epoch == 0:
                raise ValueError(f'Training set {dataset_opt["name"]} has {len(train_set)} images (x{enlarge_ratio}) '
                                 f'for {opt["world_size"]} process(es): fewer than one batch of '
                                 f'{dataset_opt["batch_size_per_gpu"]}. Add images or raise dataset_enlarge_ratio.')
            total_iters = int(opt['train']['total_iter'])
            total_epochs = math.ceil(total_iters / iters_per_epoch)
            notes.append(f'Training set: {len(train_set)} images, enlarge ratio {enlarge_ratio}, batch size per '
                         f'process {dataset_opt["batch_size_per_gpu"]}, world size {opt["world_size"]}, '
                         f'{iters_per_epoch} iters per epoch; total {total_epochs} epochs, {total_iters} iters.')
        elif phase.split('_')[0] == 'val':
            val_set = build_dataset(dataset_opt)
            val_loaders.append(build_dataloader(val_set, dataset_opt, num_gpu=opt['num_gpu'], dist=opt['dist'],
                                                sampler=None, seed=opt['manual_seed']))
            notes.append(f'Validation set {dataset_opt["name"]}: {len(val_set)} images.')
        else:
            raise ValueError(f'Dataset phase {phase!r} is not recognised: use train or val_*.')
    if train_loader is None:
        raise ValueError('The option file has no datasets.train entry.')
    return train_loader, train_sampler, val_loaders, total_epochs, total_iters, notes


def make_prefetcher(opt: dict, train_loader, logger: logging.Logger):
    mode = opt['datasets']['train'].get('prefetch_mode')
    if mode == 'cuda' and opt['num_gpu'] == 0:
        logger.warning('prefetch_mode: cuda needs CUDA; using the CPU prefetcher.')
        mode = 'cpu'
    if mode in (None, 'cpu'):
        return CPUPrefetcher(train_loader)
    if mode == 'cuda':
        if opt['datasets']['train'].get('pin_memory') is not True:
            raise ValueError('prefetch_mode: cuda needs pin_memory: true in datasets.train.')
        return CUDAPrefetcher(train_loader, opt)
    raise ValueError(f'prefetch_mode {mode!r} is not supported; use ~ (none), cpu or cuda.')


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop saves a state at the end of the current iteration and exits.

    Saving from inside the handler could write a half-updated model; waiting for the iteration to finish cannot.
    A second signal while waiting restores the default behaviour (stop at once).
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, _frame) -> None:
        if self.signal_name is not None:  # asked twice: give up waiting
            self.uninstall()
            signal.raise_signal(signum)
            return
        self.signal_name = signal.Signals(signum).name
        logging.getLogger('basicsr').warning(
            f'{self.signal_name} received: saving a training state after this iteration, then stopping.')


def validate(model, val_loaders: list, current_iter: int, tb_logger, save_img: bool) -> None:
    """Validation must not consume the training random streams (a resumed run would then diverge)."""
    with torch.random.fork_rng(devices=[]):
        for val_loader in val_loaders:
            model.validation(val_loader, current_iter, tb_logger, save_img)


def skip_trained_batches(prefetcher, resume_state: dict, start_epoch: int, current_iter: int,
                         iters_per_epoch: int, logger: logging.Logger) -> tuple[int, object]:
    """Position the data stream where the interrupted run was, then restore its random state.

    Returns (epoch to continue in, first batch). Replaying the batches already trained in the epoch (instead of
    restarting the epoch, as BasicSR does) makes a resumed run see the same data as an uninterrupted one.
    """
    done_in_epoch = current_iter - start_epoch * iters_per_epoch
    finished_epoch = done_in_epoch >= iters_per_epoch  # the state was saved on the last batch of its epoch
    if not finished_epoch:
        if done_in_epoch > 0:
            logger.info(f'Skipping the {done_in_epoch} batches of epoch {start_epoch} trained before the resume.')
        for _ in range(max(done_in_epoch, 0)):
            prefetcher.next()
    if 'rng' in resume_state:
        restore_rng_state(resume_state['rng'])
    if finished_epoch:
        return start_epoch + 1, None
    return start_epoch, prefetcher.next()


def check_finite_losses(model, current_iter: int) -> None:
    """Stop before a non-finite loss corrupts the weights that the next save would write."""
    bad = {k: v for k, v in model.get_current_log().items() if not math.isfinite(v)}
    if bad:
        raise FloatingPointError(f'Non-finite loss at iter {current_iter}: {bad}. The last saved checkpoint and '
                                 'training state are intact; lower the learning rate or check the data, then resume '
                                 'with --auto_resume.')


def train_pipeline(root_path: str = ROOT_PATH, argv: list[str] | None = None) -> dict:
    """Run a training option file. Returns the parsed options (for tests and callers)."""
    opt, args = parse_options(root_path, is_train=True, argv=argv)
    opt['root_path'] = root_path
    device = torch.device('cuda' if opt['num_gpu'] > 0 else 'cpu')
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True

    # The data first: a missing or malformed data set stops the run before experiments/<name> is made, and before
    # an earlier run's folder of that name is archived.
    train_loader, train_sampler, val_loaders, total_epochs, total_iters, data_notes = create_dataloaders(opt)
    resume_state = prepare_resume(opt, device)
    if resume_state is None and opt['rank'] == 0:
        make_exp_dirs(opt)
        if opt['logger'].get('use_tb_logger') and 'debug' not in opt['name']:
            mkdir_and_rename(osp.join(root_path, 'tb_logger', opt['name']))
    if opt['dist']:
        torch.distributed.barrier()  # the folders exist before any rank writes into them
    if opt['rank'] == 0:
        copy_option_file(args.opt, opt['path']['experiments_root'], argv)

    log_file = osp.join(opt['path']['log'], f"train_{opt['name']}_{get_time_str()}.log")
    logger = setup_logger(log_file, opt['rank'])
    logger.info(get_env_info())
    logger.info(f'Device: {device}' + (f', {opt["world_size"]} processes' if opt['dist'] else ''))
    logger.info(dict2str(opt))
    tb_logger = None
    if opt['logger'].get('use_tb_logger') and 'debug' not in opt['name'] and opt['rank'] == 0:
        tb_logger = init_tb_logger(log_dir=osp.join(root_path, 'tb_logger', opt['name']))

    for note in data_notes:
        logger.info(note)

    model = build_model(opt)
    if resume_state:
        model.resume_training(resume_state)
        start_epoch, current_iter = resume_state['epoch'], resume_state['iter']
        logger.info(f"Resuming training from {opt['path']['resume_state']}: epoch {start_epoch}, "
                    f'iter {current_iter}.')
    else:
        start_epoch, current_iter = 0, 0

    msg_logger = MessageLogger(opt, current_iter, tb_logger)
    prefetcher = make_prefetcher(opt, train_loader, logger)
    iters_per_epoch = len(train_loader)
    val_opt = opt.get('val')
    logger.info(f'Start training from epoch: {start_epoch}, iter: {current_iter}')
    data_timer, iter_timer = AvgTimer(), AvgTimer()
    start_time = time.time()
    stop = StopRequest()
    stop.install()
    epoch = first_epoch = start_epoch
    first_batch = None
    if resume_state:
        train_sampler.set_epoch(start_epoch)
        prefetcher.reset()
        first_epoch, first_batch = skip_trained_batches(prefetcher, resume_state, start_epoch, current_iter,
                                                        iters_per_epoch, logger)
    try:
        for epoch in range(first_epoch, total_epochs + 1):
            if first_batch is None:
                train_sampler.set_epoch(epoch)
                prefetcher.reset()
                train_data = prefetcher.next()
            else:
                train_data, first_batch = first_batch, None
            while train_data is not None:
                data_timer.record()
                current_iter += 1
                if current_iter > total_iters:
                    break
                model.update_learning_rate(current_iter, warmup_iter=opt['train'].get('warmup_iter', -1))
                model.feed_data(train_data)
                model.optimize_parameters(current_iter)
                check_finite_losses(model, current_iter)
                iter_timer.record()
                if current_iter == 1:
                    msg_logger.reset_start_time()
                if current_iter % opt['logger']['print_freq'] == 0:
                    log_vars = {'epoch': epoch, 'iter': current_iter, 'lrs': model.get_current_learning_rate(),
                                'time': iter_timer.get_avg_time(), 'data_time': data_timer.get_avg_time()}
                    log_vars.update(model.get_current_log())
                    msg_logger(log_vars)
                if current_iter % opt['logger']['save_checkpoint_freq'] == 0:
                    logger.info('Saving models and training states.')
                    model.save(epoch, current_iter)
                elif stop.signal_name:
                    logger.info(f'Saving models and training states at iter {current_iter} before stopping.')
                    model.save(epoch, current_iter)
                if stop.signal_name:
                    logger.info(f'Stopped by {stop.signal_name}; continue with --auto_resume.')
                    if tb_logger:
                        tb_logger.close()
                    return opt
                if val_opt is not None and current_iter % val_opt['val_freq'] == 0:
                    validate(model, val_loaders, current_iter, tb_logger, val_opt['save_img'])
                data_timer.start()
                iter_timer.start()
                train_data = prefetcher.next()
            if current_iter > total_iters:
                break
    finally:
        stop.uninstall()

    current_iter = min(current_iter, total_iters)  # the loop counts one past the end before it stops
    consumed = str(datetime.timedelta(seconds=int(time.time() - start_time)))
    logger.info(f'End of training. Time consumed: {consumed}')
    logger.info('Save the latest model.')
    model.save(epoch=-1, current_iter=-1)
    if val_opt is not None:
        validate(model, val_loaders, current_iter, tb_logger, val_opt['save_img'])
    if tb_logger:
        tb_logger.close()
    if opt['dist']:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return opt


if __name__ == '__main__':
    sys.exit(run_command(lambda: train_pipeline(ROOT_PATH), prog='train.py'))

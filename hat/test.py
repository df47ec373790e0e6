"""Test pipeline: ``python hat/test.py -opt options/test/HAT-L_SRx4.yml``.

Super-resolves every test set of the option file, writes the images to ``results/<name>/visualization/<set>/`` and
logs PSNR/SSIM (BasicSR's metrics) per set to ``results/<name>/``.
"""
from __future__ import annotations

import sys
from os import path as osp

import torch

if __package__ in (None, ''):  # run as a script: make the project importable without installing it
    sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import hat  # noqa: E402,F401  (compat shim and registries before anything from basicsr)
from basicsr.data import build_dataloader, build_dataset  # noqa: E402
from basicsr.models import build_model  # noqa: E402
from basicsr.utils import get_env_info, get_time_str, make_exp_dirs  # noqa: E402
from basicsr.utils.options import dict2str  # noqa: E402

from hat.utils.cli import run_command  # noqa: E402
from hat.utils.heap import keep_freed_memory  # noqa: E402
from hat.utils.log import setup_logger  # noqa: E402
from hat.utils.options import parse_options  # noqa: E402

ROOT_PATH = osp.dirname(osp.dirname(osp.abspath(__file__)))


def test_pipeline(root_path: str = ROOT_PATH, argv: list[str] | None = None) -> dict:
    """Run a test option file. Returns ``{dataset name: {metric: value}}`` (empty dicts for sets without GT)."""
    opt, _ = parse_options(root_path, is_train=False, argv=argv)
    # The data sets first: a missing or malformed one stops the run before results/<name> is made, and before an
    # earlier run's folder of that name is archived.
    test_sets = [(build_dataset(dataset_opt), dataset_opt) for _, dataset_opt in sorted(opt['datasets'].items())]
    if opt['rank'] == 0:
        make_exp_dirs(opt)
    if opt['dist']:
        torch.distributed.barrier()
    logger = setup_logger(osp.join(opt['path']['log'], f"test_{opt['name']}_{get_time_str()}.log"), opt['rank'])
    logger.info(get_env_info())
    logger.info(f"Device: {'cuda' if opt['num_gpu'] > 0 else 'cpu'}")
    logger.info(dict2str(opt))

    test_loaders = []
    for test_set, dataset_opt in test_sets:
        test_loaders.append(build_dataloader(test_set, dataset_opt, num_gpu=opt['num_gpu'], dist=opt['dist'],
                                             sampler=None, seed=opt['manual_seed']))
        logger.info(f"Number of test images in {dataset_opt['name']}: {len(test_set)}")

    model = build_model(opt)
    results = {}
    for test_loader in test_loaders:
        name = test_loader.dataset.opt['name']
        logger.info(f'Testing {name}...')
        model.validation(test_loader, current_iter=opt['name'], tb_logger=None, save_img=opt['val']['save_img'])
        results[name] = dict(getattr(model, 'metric_results', {}) or {})
    if opt['dist']:
        torch.distributed.destroy_process_group()
    return results


if __name__ == '__main__':
    keep_freed_memory()  # the allocator keeps freed maps for the next image (hat/utils/heap.py)
    sys.exit(run_command(lambda: test_pipeline(ROOT_PATH), prog='test.py'))

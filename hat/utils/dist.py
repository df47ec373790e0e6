"""Process-group set-up for torchrun / slurm that also works without CUDA.

basicsr's ``init_dist`` calls ``torch.cuda.set_device`` unconditionally and defaults to nccl, both fatal on a CPU-only
machine. Here the CUDA device is set only when CUDA is used, and nccl falls back to gloo on the CPU.
"""
from __future__ import annotations

import os
import subprocess
import warnings

import torch
import torch.distributed as dist


def init_dist(launcher: str, *, use_cuda: bool, backend: str | None = None, port: int | None = None) -> None:
    """Initialise the default process group.

    Args:
        launcher: 'pytorch' (torchrun: RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment) or 'slurm'.
        use_cuda: whether this run uses CUDA devices (one per process).
        backend: 'nccl' or 'gloo' (``dist_params: {backend: ...}``); default nccl with CUDA, gloo without.
        port: master port for slurm (torchrun sets its own).
    """
    if dist.is_initialized():
        return
    if backend is None:
        backend = 'nccl' if use_cuda else 'gloo'
    if backend == 'nccl' and not use_cuda:
        warnings.warn('dist_params.backend is nccl but no CUDA device is used: falling back to gloo.', stacklevel=2)
        backend = 'gloo'
    if launcher == 'slurm':
        _export_slurm_env(port)
    elif launcher != 'pytorch':
        raise ValueError(f'launcher={launcher!r} is not supported; use none, pytorch or slurm.')
    for var in ('RANK', 'WORLD_SIZE'):
        if var not in os.environ:
            raise RuntimeError(f'--launcher {launcher} needs {var} in the environment: start the run with '
                               '`torchrun --nproc_per_node=N hat/train.py -opt ... --launcher pytorch`.')
    if use_cuda:
        local_rank = int(os.environ.get('LOCAL_RANK', os.environ['RANK']))
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    dist.init_process_group(backend=backend)


def _export_slurm_env(port: int | None) -> None:
    """Translate slurm's variables into the ones ``init_process_group`` reads."""
    proc_id = int(os.environ['SLURM_PROCID'])
    node_list = os.environ['SLURM_NODELIST']
    addr = subprocess.getoutput(f'scontrol show hostname {node_list} | head -n1')
    os.environ.setdefault('MASTER_PORT', str(port or 29500))
    if port is not None:
        os.environ['MASTER_PORT'] = str(port)
    os.environ['MASTER_ADDR'] = addr
    os.environ['WORLD_SIZE'] = os.environ['SLURM_NTASKS']
    gpus = max(torch.cuda.device_count(), 1)
    os.environ['LOCAL_RANK'] = str(proc_id % gpus)
    os.environ['RANK'] = str(proc_id)

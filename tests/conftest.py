"""Shared fixtures and paths for the test suite (CPU only, tiny configurations)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import hat  # noqa: F401  (applies the basicsr compat shim and registers everything)

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / 'data'
GOLDEN = DATA / 'golden'
SHARED = REPO.parent / 'shared'
SHARED_DATASETS = SHARED / 'datasets'

# One thread: the tests run many small operators, and on a busy two-core machine OpenMP threads spin-waiting for a
# core cost far more than they save (measured: tiny networks up to 40x slower with 2 threads under load).
torch.set_num_threads(1)

requires_shared_datasets = pytest.mark.skipif(
    not SHARED_DATASETS.is_dir(),
    reason=f'benchmark images not found at {SHARED_DATASETS} (the shared/ folder beside the clone; CI has it)')


def golden_config(case: str) -> dict:
    """The constructor keywords of a golden case, without ``type``."""
    cfg = dict(json.loads((GOLDEN / f'{case}.json').read_text())['network_g'])
    cfg.pop('type')
    return cfg


def golden_state_dict(case: str) -> dict:
    return torch.load(GOLDEN / f'{case}.pth', weights_only=True)['params_ema']

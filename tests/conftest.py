"""Shared fixtures and paths for the test suite (CPU only, tiny configurations)."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import hat  # noqa: F401  (applies the basicsr compat shim and registers everything)
from hat.archs.hat_arch import HAT

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


# The golden cases of tests/data/golden (its README says what each covers): checkpoint, settings and the output of the
# official code for one input.
GOLDEN_CASES = ['hat_tiny_x2', 'hat_tiny_x3_batch2', 'hat_tiny_x4_window16', 'hat_tiny_x2_gray',
                'hat_tiny_x2_overlap025']


def golden_config(case: str) -> dict:
    """The constructor keywords of a golden case, without ``type``."""
    cfg = dict(json.loads((GOLDEN / f'{case}.json').read_text())['network_g'])
    cfg.pop('type')
    return cfg


def golden_state_dict(case: str) -> dict:
    return torch.load(GOLDEN / f'{case}.pth', weights_only=True)['params_ema']


def golden_io(case: str) -> dict:
    """``{'input': [B, C, H, W], 'output': [B, C, H * scale, W * scale]}`` of a golden case; ``hat_tiny_x2_padded``
    (an input that is no multiple of the window) also names its ``checkpoint``."""
    return torch.load(GOLDEN / f'{case}_io.pt', weights_only=True)


def golden_net(case: str, **extra) -> HAT:
    """The HAT of a golden case with its weights (loaded strictly), in eval mode; ``extra``: more constructor
    keywords (``fused_attn``, ``use_checkpoint``)."""
    net = HAT(**golden_config(case), **extra)
    net.load_state_dict(golden_state_dict(case), strict=True)
    return net.eval()


def output_and_grads(net: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward and backward of a squared-output loss from zeroed gradients: (the output, every parameter's
    gradient), on the host whatever the network's device."""
    net.zero_grad()
    out = net(x)
    out.square().mean().backward()
    return out.detach().cpu(), {name: p.grad.cpu().clone() for name, p in net.named_parameters()}


def tiny_hat_config(*, upscale: int = 2, depths: Sequence[int] = (1,), **changes) -> dict:
    """Constructor keywords of a tiny HAT (embed_dim 12, window 4, two heads per group) for tests that need a network
    that runs in milliseconds rather than the official numerics (those are the golden cases'). ``changes`` override
    any keyword. Lists, not tuples, so that the dict can go into a YAML option file as ``network_g``."""
    config = {
        'upscale': upscale, 'in_chans': 3, 'img_size': 16, 'window_size': 4, 'embed_dim': 12, 'depths': list(depths),
        'num_heads': [2] * len(depths), 'compress_ratio': 3, 'squeeze_factor': 6, 'conv_scale': 0.01,
        'overlap_ratio': 0.5, 'mlp_ratio': 2.0, 'img_range': 1.0, 'upsampler': 'pixelshuffle',
        'resi_connection': '1conv',
    }
    config.update(changes)
    return config


def smooth_image(rng: np.random.Generator, h: int, w: int, channels: int = 3) -> np.ndarray:
    """A smooth uint8 image ``[h, w, channels]`` (``[h, w]`` for one channel)."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    planes = [np.sin(rng.uniform(2, 8) * xx + rng.uniform(0, 6)) * np.cos(rng.uniform(2, 8) * yy)
              for _ in range(channels)]
    img = np.clip(127.5 + 100 * np.stack(planes, axis=2), 0, 255).round().astype(np.uint8)
    return img[:, :, 0] if channels == 1 else img


@pytest.fixture(scope='module')
def image_set(tmp_path_factory) -> Path:
    """4 smooth GT images (40x56 and 48x48) with their x2 LQ (INTER_AREA), in gt/ and lq/ under the same names."""
    root = tmp_path_factory.mktemp('images')
    rng = np.random.default_rng(0)
    (root / 'gt').mkdir()
    (root / 'lq').mkdir()
    for i, (h, w) in enumerate([(40, 56), (48, 48), (40, 56), (48, 48)]):
        gt = smooth_image(rng, h, w)
        cv2.imwrite(str(root / 'gt' / f'img{i}.png'), gt)
        cv2.imwrite(str(root / 'lq' / f'img{i}.png'), cv2.resize(gt, (w // 2, h // 2), interpolation=cv2.INTER_AREA))
    return root


@pytest.fixture(autouse=True)
def cpu_without_native_bf16(monkeypatch):
    """Tests see a CPU without native bf16 whatever machine runs them, so that ``precision: auto`` means fp32 and
    results do not depend on the CPU class; tests of the bf16 policy patch the capability themselves. For the same
    reason bf16 attention takes the chunked path, not oneDNN Graph's fused kernel (tested on its own), which asks
    the same detection."""
    from hat.archs import onednn_graph
    from hat.inference import precision
    monkeypatch.setattr(precision, 'native_cpu_bf16', lambda: None)
    onednn_graph.reset()
    # Where a test makes bf16 native, it is also twice as fast as fp32 (as on an AMD Zen 4), unless it says otherwise.
    monkeypatch.setattr(precision, 'cpu_bf16_speedup', lambda: 2.0)
    precision._warned.clear()

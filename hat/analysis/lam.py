"""Local attribution maps (LAM, Gu & Dong, "Interpreting Super-Resolution Networks with Local Attribution Maps",
CVPR 2021) and the diffusion index, as used by the HAT paper to show that HAT uses more input pixels.

Which LR pixels does an SR network use to draw the edges and textures inside a window of its output?

1. Detector ``D(y)``: the sum over the window of the output's gradient magnitude (:func:`gradient_magnitude`), so
   the question is about the window's structure, not its brightness.
2. Path: from a blurred baseline to the LR image ``I`` along a Gaussian blur path. With ``fold`` steps and sigmas
   ``s_j = sigma * (1 - j / fold)``, j = 0..fold (linear from ``sigma`` to 0), step k = 0..fold-1 evaluates the
   network at ``x_k = I * G(s_{k+1})`` and the path derivative there is ``d_k = I * (G(s_{k+1}) - G(s_k)) * fold``
   (``G(s)``: the normalised Gaussian of side ``kernel_size``, ``G(0)`` the unit impulse, so the last step is ``I``
   itself; ``*``: 2-D filtering of each channel, borders reflected without repeating the edge pixel, OpenCV's
   default).
3. Path-integrated gradient ``P = 1/fold * sum_k grad D(f(x_k)) . d_k``, [C, H, W]; the map is
   ``|sum_c P| / max |sum_c P|``, in [0, 1] with maximum 1.
4. Diffusion index ``DI = (1 - Gini(map)) * 100``: high when many pixels contribute.

For a score linear in the input, F(x) = D(f(x)) = w . x + b, the steps telescope: ``P = w . (I - I * G(sigma))``, the
integrated gradient from the blurred baseline (the tests check the implementation against it).

The steps go through the network in batches of ``batch``: the samples of a batch are independent in eval mode, so
the gradient of the batch's summed score with respect to each sample is that sample's own gradient.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from hat.analysis import render
from hat.analysis.loading import input_channels, load_model
from hat.inference.precision import resolve_device
from hat.io.images import read_image_tensor

logger = logging.getLogger(__name__)

GRADIENT_EPS = 1e-12
GINI_OFFSET = 1e-7
DEFAULT_SIGMA = 1.2
DEFAULT_FOLD = 50
DEFAULT_KERNEL = 9
DEFAULT_BATCH = 10

# Raised for wrong files, keys, windows and options; the command lines print the message instead of a traceback.
USER_ERRORS = (FileNotFoundError, ValueError)

Objective = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Window:
    """A square of the SR output: top-left column ``x``, row ``y``, side ``size`` (HR pixels)."""

    x: int
    y: int
    size: int

    def check_inside(self, height: int, width: int) -> None:
        """Raise ValueError unless the window lies inside an output of ``height`` x ``width``."""
        if self.size < 1 or self.x < 0 or self.y < 0 or self.x + self.size > width or self.y + self.size > height:
            raise ValueError(f'window x={self.x} y={self.y} size={self.size} does not fit in the SR output of '
                             f'{width}x{height} (width x height): need 0 <= x, x + size <= {width}, 0 <= y, '
                             f'y + size <= {height}. The window is given in output (HR) pixels.')


@dataclass
class LAMResult:
    """Outcome of :func:`local_attribution_map`.

    attribution: [H, W] float64, the normalised map (max 1, min >= 0) over the LR pixels.
    path_gradient: [C, H, W] float64, the path-integrated gradient ``P`` before the channel sum.
    di: diffusion index of ``attribution``, in [0, 100].
    sr: [C, sH, sW] float32, the network's output for the image (CPU).
    """

    attribution: np.ndarray
    path_gradient: np.ndarray
    di: float
    sr: Tensor


def gradient_magnitude(y: Tensor, *, eps: float = GRADIENT_EPS) -> Tensor:
    """Per-pixel, per-channel gradient magnitude. y: [B, C, H, W] -> [B, C, H, W].

    ``m[i, j] = sqrt(dy[i, j]^2 + dx[i, j]^2 + eps)`` with forward differences ``dy[i, j] = y[i+1, j] - y[i, j]`` and
    ``dx[i, j] = y[i, j+1] - y[i, j]``.

    Borders: the image is extended by repeating its last row and column, so ``dy = 0`` on the last row and ``dx = 0``
    on the last column and the map has the image's size (any window inside the image is defined). Elsewhere this is
    the reference LAM detector, which crops the map to (H-1) x (W-1).

    Epsilon: ``eps = 1e-12`` keeps gradients finite. The derivative of sqrt at 0 is infinite, so without it a flat
    patch (dy = dx = 0) gives NaN gradients (the reference code replaced those by 0); with it the derivative with
    respect to a difference, ``d / sqrt(d^2 + ... + eps)``, is bounded by 1 in magnitude and exactly 0 on a flat patch.
    It adds at most ``sqrt(eps) = 1e-6`` per pixel to the magnitude.
    """
    dy = F.pad(y[..., 1:, :] - y[..., :-1, :], (0, 0, 0, 1))
    dx = F.pad(y[..., :, 1:] - y[..., :, :-1], (0, 1, 0, 0))
    return torch.sqrt(dy * dy + dx * dx + eps)


def window_gradient_objective(window: Window, *, eps: float = GRADIENT_EPS) -> Objective:
    """The LAM detector: [B, C, sH, sW] -> [B], the gradient magnitude summed over the window and the channels."""

    def objective(y: Tensor) -> Tensor:
        window.check_inside(y.shape[-2], y.shape[-1])
        m = gradient_magnitude(y, eps=eps)
        return m[..., window.y:window.y + window.size, window.x:window.x + window.size].sum(dim=(1, 2, 3))

    return objective


def gaussian_kernel(size: int, sigma: float) -> Tensor:
    """Normalised isotropic Gaussian [size, size] float64, centred; ``sigma = 0`` gives the unit impulse."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f'kernel size must be odd and positive, got {size}.')
    if sigma < 0:
        raise ValueError(f'sigma must be >= 0, got {sigma}.')
    kernel = torch.zeros(size, size, dtype=torch.float64)
    if sigma == 0:
        kernel[size // 2, size // 2] = 1.0
        return kernel
    ax = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    kernel = torch.exp(-(ax[:, None]**2 + ax[None, :]**2) / (2.0 * sigma**2))
    return kernel / kernel.sum()


def path_kernels(*, sigma: float, fold: int, kernel_size: int) -> Tensor:
    """The ``fold + 1`` kernels of the blur path, sigma linear from ``sigma`` to 0. Returns [fold + 1, k, k]."""
    if fold < 1:
        raise ValueError(f'fold (number of path steps) must be >= 1, got {fold}.')
    sigmas = np.linspace(sigma, 0.0, fold + 1)
    return torch.stack([gaussian_kernel(kernel_size, float(s)) for s in sigmas])


def filter_image(image: Tensor, kernels: Tensor) -> Tensor:
    """Filter each channel with each kernel, reflecting borders (OpenCV's default, edge pixel not repeated).

    image: [C, H, W]; kernels: [N, k, k] -> [N, C, H, W] in the image's dtype.
    """
    c, h, w = image.shape
    k = kernels.shape[-1]
    pad = k // 2
    if pad >= h or pad >= w:
        raise ValueError(f'the image ({w}x{h}) must be larger than half the blur kernel ({k}): use a larger image '
                         'or a smaller --kernel.')
    padded = F.pad(image[:, None], (pad, pad, pad, pad), mode='reflect')  # [C, 1, H+2p, W+2p]
    # Kernels are symmetric, so conv2d's correlation is the convolution.
    out = F.conv2d(padded, kernels[:, None].to(image), padding=0)  # [C, N, H, W]
    return out.transpose(0, 1)


def blur_path(image: Tensor, kernels: Tensor, steps: Sequence[int] | range, fold: int) -> tuple[Tensor, Tensor]:
    """Points and derivatives of the blur path at the given steps.

    image: [C, H, W]; kernels: [fold + 1, k, k] from :func:`path_kernels`.
    Returns (x [S, C, H, W], d [S, C, H, W]) with ``x_k = I * G_{k+1}`` and ``d_k = I * (G_{k+1} - G_k) * fold``.
    """
    idx = torch.as_tensor(list(steps), dtype=torch.long)
    points = filter_image(image, kernels[idx + 1])
    derivatives = filter_image(image, (kernels[idx + 1] - kernels[idx]) * fold)
    return points, derivatives


@contextmanager
def _eval_mode(net: nn.Module) -> Iterator[None]:
    """Batched steps need samples that do not interact (no batch statistics, no dropout): run in eval mode and put
    the network back as it was."""
    was_training = net.training
    net.eval()
    try:
        yield
    finally:
        net.train(was_training)


def path_integrated_gradient(net: nn.Module, image: Tensor, objective: Objective, *, sigma: float = DEFAULT_SIGMA,
                             fold: int = DEFAULT_FOLD, kernel_size: int = DEFAULT_KERNEL, batch: int = DEFAULT_BATCH,
                             progress: bool = False) -> Tensor:
    """``P = 1/fold * sum_k grad F(x_k) . d_k`` along the blur path, with ``F = objective(net(.))``.

    image: [C, H, W] on the network's device, in its dtype. objective: [B, C, sH, sW] -> [B].
    Returns [C, H, W] float64.
    """
    if batch < 1:
        raise ValueError(f'batch must be >= 1, got {batch}.')
    kernels = path_kernels(sigma=sigma, fold=fold, kernel_size=kernel_size).to(image.device)
    total = torch.zeros(image.shape, dtype=torch.float64, device=image.device)
    nan_steps = 0
    with _eval_mode(net), tqdm(total=fold, desc='LAM path', unit='step', disable=not progress, leave=False) as bar:
        for start in range(0, fold, batch):
            steps = range(start, min(fold, start + batch))
            with torch.no_grad():
                points, derivatives = blur_path(image, kernels, steps, fold)
            points.requires_grad_(True)
            with torch.enable_grad():
                score = objective(net(points))
                if score.shape != (len(steps), ):
                    raise ValueError(f'the objective must return one value per sample, [{len(steps)}], '
                                     f'got {list(score.shape)}.')
                (grad, ) = torch.autograd.grad(score.sum(), points)
            bad = ~torch.isfinite(grad)
            if bad.any():
                nan_steps += int(bad.flatten(1).any(dim=1).sum())
                grad = torch.where(bad, torch.zeros_like(grad), grad)
            total += (grad.double() * derivatives.double()).sum(dim=0)
            bar.update(len(steps))
    if nan_steps:
        logger.warning('%d of %d path steps had non-finite gradients; those entries were set to 0.', nan_steps, fold)
    return total / fold


def normalised_attribution(path_gradient: Tensor | np.ndarray) -> np.ndarray:
    """[C, H, W] -> [H, W] float64: ``|sum over channels|`` divided by its maximum (all zeros if the maximum is 0)."""
    p = path_gradient.detach().cpu().numpy() if isinstance(path_gradient, Tensor) else np.asarray(path_gradient)
    attribution = np.abs(p.astype(np.float64).sum(axis=0))
    peak = attribution.max()
    if peak <= 0:
        logger.warning('the attribution is zero everywhere (the window score does not depend on the input along the '
                       'path); the map is all zeros.')
        return attribution
    return attribution / peak


def gini(values: np.ndarray | Tensor) -> float:
    """Gini coefficient of the flattened values, after shifting them to a minimum of 0 and adding 1e-7.

    With the shifted values sorted ascending, ``x_1 <= ... <= x_n``: ``G = sum_i (2i - n - 1) x_i / (n sum_i x_i)``.
    0 for a constant map; ``(n - 1) / n`` (about 1) when one entry holds everything. The reference LAM code shifts
    only maps with negative entries; the two agree on maps whose minimum is 0, as attribution maps nearly always have.
    """
    x = values.detach().cpu().numpy() if isinstance(values, Tensor) else np.asarray(values)
    x = np.sort(x.astype(np.float64).ravel())
    if x.size == 0:
        raise ValueError('the Gini coefficient of an empty map is undefined.')
    x = x - x[0] + GINI_OFFSET
    n = x.size
    i = np.arange(1, n + 1, dtype=np.float64)
    return float(np.sum((2.0 * i - n - 1.0) * x) / (n * np.sum(x)))


def diffusion_index(attribution: np.ndarray | Tensor) -> float:
    """``DI = (1 - Gini(attribution)) * 100``, in [0, 100]; higher means more pixels contribute."""
    return (1.0 - gini(attribution)) * 100.0


def local_attribution_map(net: nn.Module, image: Tensor, window: Window, *, sigma: float = DEFAULT_SIGMA,
                          fold: int = DEFAULT_FOLD, kernel_size: int = DEFAULT_KERNEL, batch: int = DEFAULT_BATCH,
                          objective: Objective | None = None, progress: bool = False) -> LAMResult:
    """LAM of ``net`` for the window of its output on ``image``.

    Args:
        net: SR network taking [B, C, H, W] in [0, 1]; evaluated in eval mode (its mode is restored afterwards).
        image: [C, H, W] LR image in [0, 1]; moved to the network's device and dtype.
        window: the square of the output to explain, in output pixels.
        sigma, fold, kernel_size: blur path (baseline sigma, number of steps, kernel side).
        batch: path steps per forward/backward pass.
        objective: [B, C, sH, sW] -> [B]; default: the window's gradient magnitude (:func:`window_gradient_objective`).
        progress: show a progress bar.
    """
    if image.ndim != 3:
        raise ValueError(f'image must be [C, H, W], got shape {list(image.shape)}.')
    param = next(net.parameters(), None)
    if param is not None:
        image = image.to(device=param.device, dtype=param.dtype)
    with _eval_mode(net), torch.no_grad():
        try:
            sr = net(image[None])[0]
        except RuntimeError as err:
            raise RuntimeError(f'{type(net).__name__} failed on a {image.shape[-1]}x{image.shape[-2]} image: {err}. '
                               'Some architectures (e.g. SwinIR) need the image size to be a multiple of their window '
                               'size; crop the LR image accordingly.') from err
    window.check_inside(sr.shape[-2], sr.shape[-1])
    objective = objective or window_gradient_objective(window)
    path_gradient = path_integrated_gradient(net, image, objective, sigma=sigma, fold=fold, kernel_size=kernel_size,
                                             batch=batch, progress=progress)
    attribution = normalised_attribution(path_gradient)
    return LAMResult(attribution=attribution, path_gradient=path_gradient.cpu().numpy(),
                     di=diffusion_index(attribution), sr=sr.float().cpu())


def save_outputs(result: LAMResult, image: Tensor, window: Window, out_dir: str | Path) -> dict:
    """Write ``lam.npy`` ([H, W] float32), ``lam.png`` (the map on the LR image, enlarged to the output size, window
    footprint outlined) and ``window.png`` (the SR output, window outlined). Returns {name: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sr_h, sr_w = result.sr.shape[-2:]
    files = {'lam_npy': out / 'lam.npy', 'lam_png': out / 'lam.png', 'window_png': out / 'window.png'}
    np.save(files['lam_npy'], result.attribution.astype(np.float32))
    overlay = render.attribution_overlay(result.attribution, render.to_bgr_uint8(image), size=(sr_h, sr_w))
    render.write_png(files['lam_png'], render.draw_window(overlay, window.x, window.y, window.size))
    sr = render.to_bgr_uint8(result.sr)
    render.write_png(files['window_png'], render.draw_window(sr, window.x, window.y, window.size))
    return {name: str(path) for name, path in files.items()}


def add_lam_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by the LAM and comparison command lines (all but the model)."""
    parser.add_argument('-i', '--image', required=True, help='low-resolution input image')
    parser.add_argument('--window', nargs=3, type=int, required=True, metavar=('X', 'Y', 'SIZE'),
                        help='top-left column, row and side of the square window, in output (HR) pixels')
    parser.add_argument('--out', required=True, help='output folder')
    parser.add_argument('--sigma', type=float, default=DEFAULT_SIGMA, help='blur of the baseline (default 1.2)')
    parser.add_argument('--fold', type=int, default=DEFAULT_FOLD, help='number of path steps (default 50)')
    parser.add_argument('--kernel', type=int, default=DEFAULT_KERNEL, help='blur kernel side, odd (default 9)')
    parser.add_argument('--batch', type=int, default=DEFAULT_BATCH,
                        help=f'path steps per forward/backward pass (default {DEFAULT_BATCH}); raise it on a GPU')
    parser.add_argument('--device', default=None, help='cuda, cuda:1, cpu, ... (default: cuda when available)')
    parser.add_argument('--param-key', default=None,
                        help='state-dict key in the checkpoint (default params_ema, then params)')
    parser.add_argument('--json', action='store_true', help='print one JSON object with the results on stdout')


def run_lam(model: str, args: argparse.Namespace, out_dir: str | Path) -> tuple[dict, LAMResult, Tensor]:
    """Load ``model``, compute its LAM for ``args.image``/``args.window`` and write the files.

    Returns (summary for JSON, the result, the LR image [C, H, W] as the network read it).
    """
    net = load_model(model, param_key=args.param_key, device=resolve_device(args.device))
    image = read_image_tensor(args.image, channels=input_channels(net))
    window = Window(*args.window)
    result = local_attribution_map(net, image, window, sigma=args.sigma, fold=args.fold, kernel_size=args.kernel,
                                   batch=args.batch, progress=sys.stderr.isatty())
    files = save_outputs(result, image, window, out_dir)
    summary = {
        'model': str(model),
        'arch': type(net).__name__,
        'image': str(args.image),
        'window': asdict(window),
        'lr_size': [int(image.shape[-2]), int(image.shape[-1])],
        'sr_size': [int(result.sr.shape[-2]), int(result.sr.shape[-1])],
        'di': result.di,
        'sigma': args.sigma,
        'fold': args.fold,
        'kernel': args.kernel,
        'files': files,
    }
    logger.info('%s (%s): DI %.3f, files in %s', model, summary['arch'], result.di, out_dir)
    return summary, result, image


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog='python -m hat.analysis.lam',
        description='Local attribution map (LAM) and diffusion index of an SR network for a window of its output.')
    parser.add_argument('-m', '--model', required=True,
                        help='checkpoint (.pth, architecture detected) or option file (.yml with network_g and '
                        'path.pretrain_network_g)')
    add_lam_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    try:
        summary, _, _ = run_lam(args.model, args, args.out)
    except USER_ERRORS as err:
        parser.exit(2, f'{parser.prog}: error: {err}\n')
    if args.json:
        sys.stdout.write(json.dumps(summary) + '\n')
    return summary


if __name__ == '__main__':
    main()

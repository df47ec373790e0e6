"""``hat-upscale``: super-resolve your own images with a HAT (any variant), SRVGGNetCompact or exported ONNX model.

    hat-upscale -i photos/ -o photos_x4/ -m experiments/pretrained_models/HAT_SRx4_ImageNet-pretrain.pth
    python -m hat.upscale -i scan.tif -o out/ -m HAT-L_SRx2_ImageNet-pretrain.pth --self-ensemble

This module is the command line only: arguments, which files are written where, progress and exit codes. Reading
and writing images is :mod:`hat.io.images`; loading the model :func:`hat.inference.load_model`; running it (padding,
precision, tiles sized to the memory, the out-of-memory retry, self-ensemble, the non-finite check)
:class:`hat.inference.Upscaler`.

``-i`` is one image or a folder, searched recursively; the outputs mirror its sub-folders under ``-o`` as
``<name><suffix>.<ext>`` (``photo.jpg`` -> ``photo_x4.png`` by default). An input file is never overwritten: the run
is refused when an output path would be one of the inputs, and an output folder inside the input folder is not
searched for inputs. Grey images stay grey, alpha is upscaled with bicubic interpolation and re-attached, 16-bit
stays 16-bit where the output format holds it, EXIF orientation is applied.

Every run logs the model, the device, the precision (and why: ``auto`` is bf16 where the hardware computes it
natively and faster, else fp32) and the tile policy; with ``--tile auto`` each image's chosen tile too.

Exit status: 0 when every image was written; 1 when some could not be read, upscaled or written (each is logged with
its path and the reason, and the others are processed); 2 for bad arguments (missing model or input, an
unrecognised checkpoint, an output that would overwrite an input, fp16 on the CPU), with the message and no
traceback (``--debug`` shows it).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import cv2
import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from hat import __version__
from hat.inference.descriptor import ModelDescriptor, load_model
from hat.inference.memory import is_out_of_memory
from hat.inference.precision import PRECISION_CHOICES, default_device, resolve_device
from hat.inference.upscaler import DEFAULT_TILE_PAD, Upscaler, parse_tile
from hat.io.images import (IMAGE_EXTENSIONS, OUTPUT_FORMATS, ImageError, UnreadableImageError, read_picture,
                           write_picture)
from hat.utils.cli import parse_or_status, set_up_logging
from hat.utils.heap import keep_freed_memory

logger = logging.getLogger('hat.upscale')

EXT_AUTO = 'auto'
DEFAULT_EXT = 'png'
DEFAULT_SUFFIX = '_x{scale}'

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A bad argument: nothing is processed and the exit status is 2."""


# ---------------------------------------------------------------------------------------------------------------
# Which files, written where
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One input image and the path its result is written to.

    Attributes:
        source: the input file.
        target: the output file.
        conflict: another input that already writes ``target`` (the job is then reported, not run).
    """

    source: Path
    target: Path
    conflict: Path | None = None


def find_images(root: Path, *, exclude: Path | None = None) -> list[Path]:
    """Image files under ``root`` (recursively, sorted, hidden files and the ``exclude`` folder left out).

    A file given directly is returned as it is, whatever its extension: the user asked for it.
    """
    if root.is_file():
        return [root]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        folder = Path(dirpath)
        dirnames[:] = sorted(n for n in dirnames
                             if not n.startswith('.') and (exclude is None or (folder / n).resolve() != exclude))
        found.extend(folder / name for name in sorted(filenames)
                     if not name.startswith('.') and Path(name).suffix.lower() in IMAGE_EXTENSIONS)
    return found


def plan_jobs(input_path: Path, output_dir: Path, *, suffix: str, ext: str) -> list[Job]:
    """Pair every input image with its output path, mirroring the input's sub-folders under ``output_dir``.

    Raises:
        UsageError: no input, no image in it, or an output path that is one of the inputs.
    """
    if not input_path.exists():
        raise UsageError(f'input not found: {input_path}')
    output_resolved = output_dir.resolve()
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f'-o {output_dir} is a file; pass a folder for the outputs')
    sources = find_images(input_path, exclude=output_resolved)
    if not sources:
        raise UsageError(f'no images in {input_path} (searched recursively for '
                         f'{", ".join(IMAGE_EXTENSIONS)})')
    base = input_path if input_path.is_dir() else input_path.parent
    inputs = {p.resolve() for p in sources}
    jobs: list[Job] = []
    writers: dict[Path, Path] = {}
    for source in sources:
        extension = source.suffix if ext == EXT_AUTO else f'.{ext}'
        relative = source.relative_to(base)
        target = output_dir / relative.parent / f'{source.stem}{suffix}{extension}'
        resolved = target.resolve()
        if resolved in inputs:
            raise UsageError(f'refusing to overwrite the input {source}: with -o {output_dir}, --suffix '
                             f'{suffix!r} and --ext {ext} its output would be written onto it. Choose another -o, '
                             'a --suffix or an --ext.')
        key = Path(os.path.normcase(resolved))
        jobs.append(Job(source, target, conflict=writers.get(key)))
        writers.setdefault(key, source)
    return jobs


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def _tile_argument(value: str) -> int | str | None:
    try:
        return parse_tile(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f'must be 0 or more, got {number}')
    return number


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f'must be positive, got {value}')
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='hat-upscale',
        description='Super-resolve images with a HAT (any variant), SRVGGNetCompact or exported ONNX model; the '
        'architecture and scale are read from the model file.',
        epilog='Exit status: 0 all images written, 1 some images failed (reported, the rest processed), '
        '2 bad arguments.')
    parser.add_argument('--version', action='version', version=f'%(prog)s {__version__}')
    parser.add_argument('-i', '--input', type=Path, required=True,
                        help=f'an image, or a folder searched recursively ({" ".join(IMAGE_EXTENSIONS)})')
    parser.add_argument('-o', '--output', type=Path, required=True,
                        help='output folder; the input\'s sub-folders are mirrored inside it')
    parser.add_argument('-m', '--model', type=Path, required=True,
                        help='checkpoint (.pth/.safetensors: HAT-S/HAT/HAT-L or a custom HAT, SRVGGNetCompact), '
                        'option file (.yml) or exported .onnx file')
    parser.add_argument('--param-key', default=None,
                        help='entry of the checkpoint holding the weights (default: params_ema, then params)')
    parser.add_argument('--tile', type=_tile_argument, default='auto',
                        help='tile side in LR pixels, "auto" (default: the largest that fits in memory) or 0 (whole '
                        'images)')
    parser.add_argument('--tile-pad', type=_non_negative_int, default=DEFAULT_TILE_PAD,
                        help=f'overlap of neighbouring tiles / 2, in LR pixels (default {DEFAULT_TILE_PAD}; at most a '
                        'quarter of the tile)')
    parser.add_argument('--max-memory', type=_positive_float, default=None, metavar='GIB',
                        help='memory budget of --tile auto, in GiB (default: 80%% of the free GPU memory, 50%% of the '
                        'available RAM on the CPU)')
    parser.add_argument('--precision', choices=PRECISION_CHOICES, default='auto',
                        help='auto (default: bf16 where the GPU or CPU computes it natively and faster, else fp32), '
                        'fp32, bf16 '
                        '(runs fp32 with a warning where bf16 would be emulated; HAT_FORCE_BF16=1 forces it) or fp16 '
                        '(CUDA only; HAT may overflow)')
    parser.add_argument('--device', default=None,
                        help=f'cpu, cuda, cuda:1, mps (Apple silicon) or xpu (default: cuda if available, else '
                        f'cpu; here {default_device()}); a device this machine lacks is refused before anything is '
                        'written')
    parser.add_argument('--suffix', default=DEFAULT_SUFFIX,
                        help=f'appended to each output name; {{scale}} is replaced (default {DEFAULT_SUFFIX!r})')
    parser.add_argument('--ext', default=DEFAULT_EXT, choices=(*OUTPUT_FORMATS, EXT_AUTO), type=str.lower,
                        help=f'output format (default {DEFAULT_EXT}); "auto" keeps each input\'s extension')
    parser.add_argument('--self-ensemble', action='store_true',
                        help='average the outputs of the 8 flips/rotations (x8 slower, slightly better)')
    parser.add_argument('--skip-existing', action='store_true', help='leave images whose output already exists')
    parser.add_argument('-q', '--quiet', action='store_true', help='no progress bars; warnings and errors only')
    parser.add_argument('--debug', action='store_true', help='show tracebacks and debug messages')
    return parser


def _resolve_device(name: str | None) -> torch.device:
    try:
        return resolve_device(name)
    except ValueError as error:
        raise UsageError(str(error)) from None


def load_upscaler(args: argparse.Namespace, device: torch.device) -> Upscaler:
    """The model of ``-m`` and the Upscaler the options ask for.

    Raises:
        UsageError: missing, unreadable or unrecognised model; a precision the device or model cannot run.
    """
    try:
        model: ModelDescriptor = load_model(args.model, param_key=args.param_key, device=device)
    except (FileNotFoundError, ValueError, ImportError) as error:
        raise UsageError(f'-m {args.model}: {error}') from None
    try:
        return Upscaler(model, device=device, precision=args.precision, tile=args.tile, tile_pad=args.tile_pad,
                        self_ensemble=args.self_ensemble,
                        max_memory=None if args.max_memory is None else args.max_memory * 2**30,
                        progress=not args.quiet, precision_option='--precision')
    except ValueError as error:
        raise UsageError(str(error)) from None


def process(job: Job, upscaler: Upscaler) -> list[str]:
    """Read, upscale and write one image. Returns notes about the output.

    Raises:
        ImageError: for any failure of this image (the message says what and why).
    """
    try:
        picture = read_picture(job.source)
    except UnreadableImageError as error:
        raise ImageError(error.problem) from None  # the caller names the file
    try:
        height, width = picture.pixels.shape[:2]
        if upscaler.tile == 'auto':
            tile = upscaler.tile_for(height, width)
            logger.info(f'{job.source}: {width}x{height}, tile {tile or "none (whole image)"}')
        result = upscaler.upscale_picture(picture)
        return write_picture(job.target, result)
    except ImageError:
        raise
    except Exception as error:  # noqa: BLE001 (an error in one image must not stop the others)
        advice = ' (use a smaller --tile or --max-memory)' if is_out_of_memory(error) else ''
        first_line = (str(error).strip().splitlines() or ['(no message)'])[0]
        raise ImageError(f'{type(error).__name__}: {first_line}{advice}') from error


def run(args: argparse.Namespace) -> int:
    """Process the parsed command line. Returns the exit status."""
    try:
        device = _resolve_device(args.device)
        if not args.model.is_file():
            raise UsageError(f'-m {args.model}: model file not found')
        suffix_template = args.suffix
        if '{' in suffix_template and suffix_template.replace('{scale}', '').count('{'):
            raise UsageError(f'--suffix {suffix_template!r}: the only placeholder is {{scale}}')
        upscaler = load_upscaler(args, device)
        suffix = suffix_template.replace('{scale}', str(upscaler.scale))
        jobs = plan_jobs(args.input, args.output, suffix=suffix, ext=args.ext)
    except UsageError as error:
        logger.error(str(error))
        return EXIT_USAGE
    logger.info(f'{len(jobs)} image(s) -> {args.output} with {upscaler.describe()}.')

    failures: list[tuple[Path, str]] = []
    written = skipped = 0
    with logging_redirect_tqdm(loggers=[logging.getLogger()]):
        for job in tqdm(jobs, desc='hat-upscale', unit='image', disable=args.quiet):
            if job.conflict is not None:
                reason = (f'its output {job.target} is also the output of {job.conflict}; use --ext auto or '
                          'rename one of them')
            elif args.skip_existing and job.target.exists():
                skipped += 1
                continue
            else:
                try:
                    for note in process(job, upscaler):
                        logger.warning(f'{job.source}: {note}')
                    written += 1
                    continue
                except ImageError as error:
                    reason = str(error)
            logger.error(f'{job.source}: skipped: {reason}')
            failures.append((job.source, reason))

    summary = f'{written} written' + (f', {skipped} skipped (output exists)' if skipped else '')
    if failures:
        logger.error(f'{summary}, {len(failures)} failed:\n' +
                     '\n'.join(f'  {path}: {reason}' for path, reason in failures))
        return EXIT_FAILED
    logger.info(f'{summary}.')
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """``hat-upscale``: returns the exit status (0 all written, 1 some images failed, 2 bad arguments)."""
    args = parse_or_status(build_parser(), argv)
    if isinstance(args, int):
        return args
    set_up_logging(logger, logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO)
    with contextlib.suppress(AttributeError):  # OpenCV's own warnings (libtiff, ...) duplicate ours
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    try:
        return run(args)
    except Exception:  # noqa: BLE001 (an unexpected failure: say it in one line, the traceback with --debug)
        if args.debug:
            raise
        kind, error = sys.exc_info()[:2]
        logger.error(f'{kind.__name__}: {error} (run again with --debug for the traceback)')
        return EXIT_FAILED


def cli() -> None:
    """Console-script entry point (``hat-upscale``). A command of its own, it first sets the C allocator to keep
    freed memory for the next forward (:mod:`hat.utils.heap`: 11% faster at 256x256 on the CPU); :func:`main`, which
    programs and tests call, leaves the allocator as it is."""
    keep_freed_memory()
    sys.exit(main())


if __name__ == '__main__':
    cli()

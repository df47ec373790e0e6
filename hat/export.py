"""Export a HAT (any variant) or SRVGGNetCompact checkpoint to one ONNX file that runs at any input size.

    python -m hat.export -m experiments/pretrained_models/HAT_SRx4.pth -o HAT_SRx4.onnx
    hat-export -m HAT-L_SRx2_ImageNet-pretrain.pth -o HAT-L_SRx2.onnx --opset 18

The file takes ``input``: [N, C, H, W] float32 in [0, 1], N, H and W dynamic (any H, W >= 1), and returns ``output``:
[N, C, H * scale, W * scale]. For HAT everything the network does around its windows is inside the graph, computed
from the input size: the padding to the window multiple (reflect, or replicate for inputs smaller than the pad), the
shift masks, the overlapping windows of OCAB and the final crop (see :mod:`hat.archs.export_forward`).

Before anything is written, the graph is checked: ONNX Runtime (CPU) runs it at three sizes (one not a multiple of
the window, one a multiple with a batch of two, one smaller than the window pad) and its outputs must match the
PyTorch network's to ``--tolerance`` (max abs difference, 1e-4). The file is written under a temporary name next to
the output, checked from disk, and only then renamed; a graph that does not reproduce the network is not written.

Metadata (``metadata_props``): ``architecture``, ``variant``, ``scale``, ``window_size`` (the multiple the input is
padded to inside the graph; 1 for SRVGGNetCompact), ``source_sha256`` (of the checkpoint file), ``hat_version``,
``network_options`` (JSON constructor keywords), ``input_range``.

Precision: the graph is fp32. ``--fp16`` is refused (see :data:`FP16_REFUSAL`).

Exit status: 0 when the file was written; 1 when the export or its check failed (nothing written); 2 for bad
arguments (missing or unrecognised checkpoint, missing output folder, missing onnx/onnxruntime/onnxscript, --fp16).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

import hat
from hat.archs.detect import build_from_checkpoint, detect_architecture
from hat.archs.export_forward import ExportableHAT
from hat.archs.hat_arch import HAT
from hat.archs.srvgg_arch import SRVGGNetCompact
from hat.inference.descriptor import network_channels
from hat.utils.atomic import give_normal_permissions
from hat.utils.cli import parse_or_status, set_up_logging

if TYPE_CHECKING:  # onnx, onnxruntime and onnxscript are imported once the command line has checked they exist
    import onnx
    import onnx_ir

logger = logging.getLogger('hat.export')

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
# The exporter builds opset 18 graphs and converts upwards only (ONNX has no down-conversion of Pad to 17).
DEFAULT_OPSET = MIN_OPSET = 18
TOLERANCE = 1e-4
INPUT_NAME, OUTPUT_NAME = 'input', 'output'
INPUT_DIM_NAMES = {0: 'batch', 2: 'height', 3: 'width'}
REQUIRED_MODULES = {'onnx': 'onnx', 'onnxruntime': 'onnxruntime', 'onnxscript': 'onnxscript'}
# Window used to choose check sizes for networks without windows (SRVGGNetCompact).
WINDOWLESS_CHECK_UNIT = 16

FP16_REFUSAL = (
    'fp16 export is not offered: HAT overflows in fp16 (its attention exceeds the fp16 range, 65504, in trained '
    'models, and the output turns to inf/NaN). Keeping the attention in fp32 keeps most of the network in fp32, and '
    'whether the rest stays in range depends on the weights, so an fp16 file could not be shown to reproduce the '
    'network. Export fp32 (the default) and choose the precision in the runtime: TensorRT --bf16 (Ampere or newer '
    'GPUs) keeps fp32\'s range; in PyTorch, hat-upscale --precision bf16.')


class UsageError(Exception):
    """A problem with the command line or its files that the user can fix (exit status 2)."""


class ExportCheckError(Exception):
    """The exported graph does not reproduce the network (nothing is written)."""


@dataclass
class SizeCheck:
    """One comparison of ONNX Runtime with PyTorch: input shape [N, C, H, W], output shape, max abs difference."""

    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    max_abs_diff: float

    def describe(self) -> str:
        return f'{"x".join(map(str, self.input_shape))}: {self.max_abs_diff:.2e}'


@dataclass
class ExportResult:
    """What :func:`export_network` wrote and how it was checked."""

    path: Path
    opset: int
    metadata: dict[str, str]
    checks: list[SizeCheck] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def max_abs_diff(self) -> float:
        return max(check.max_abs_diff for check in self.checks)


def missing_modules() -> list[str]:
    """The pip names of the export's dependencies that are not installed."""
    return [pip_name for module, pip_name in REQUIRED_MODULES.items() if importlib.util.find_spec(module) is None]


def sha256_of(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, 'rb') as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def padding_multiple(network: nn.Module) -> int:
    """The multiple an input is padded to inside the graph: HAT's window size, 1 for other networks."""
    return int(getattr(network, 'window_size', 1))


def exportable_module(network: nn.Module) -> nn.Module:
    """The module to trace for ``network``: :class:`ExportableHAT` around a HAT, SRVGGNetCompact as it is.

    Raises:
        ValueError: another architecture, or a HAT that cannot run at every size (``ape=True``).
    """
    if isinstance(network, HAT):
        return ExportableHAT(network=network).eval()
    if isinstance(network, SRVGGNetCompact):
        return network.eval()  # convolutions, pixel shuffle and a nearest resize: nothing depends on the size
    raise ValueError(f'cannot export {type(network).__name__}: only HAT and SRVGGNetCompact are supported')


def default_check_sizes(network: nn.Module) -> list[tuple[int, int, int]]:
    """(batch, height, width) of the inputs the export is checked at.

    One size that is not a multiple of the window (reflect padding), one that is, with a batch of two (no padding,
    dynamic batch), and one smaller than the pad (replicate padding): each branch of the padding in the graph runs.
    """
    unit = padding_multiple(network)
    unit = unit if unit > 1 else WINDOWLESS_CHECK_UNIT
    return [(1, unit + 3, 2 * unit - 5), (2, 2 * unit, unit), (1, 3, 5)]


def metadata_for(network: nn.Module, *, source_sha256: str | None) -> dict[str, str]:
    """The ``metadata_props`` of the exported file, from what the weights say about the network."""
    detected = getattr(network, 'detected', None) or detect_architecture(network.state_dict())
    options = dict(detected.kwargs)
    if isinstance(network, HAT):  # what the weights cannot tell, from the network itself rather than the defaults
        blocks = [block for layer in network.layers for block in layer.residual_group.blocks]
        options['img_range'] = network.img_range
        if blocks:
            options['conv_scale'] = blocks[0].conv_scale
    metadata = {
        'architecture': detected.type,
        'variant': detected.variant,
        'scale': str(detected.scale),
        'window_size': str(padding_multiple(network)),
        'hat_version': hat.__version__,
        'network_options': json.dumps(options, sort_keys=True),
        'input_range': '[0, 1]',
    }
    if source_sha256 is not None:
        metadata['source_sha256'] = source_sha256
    return metadata


def trace_to_onnx(module: nn.Module, *, in_chans: int, opset: int) -> onnx.ModelProto:
    """Trace ``module`` with dynamic batch, height and width and translate it to ONNX.

    Args:
        module: takes [N, in_chans, H, W] float32, returns [N, out, H * s, W * s].
        opset: ONNX opset of the default domain (>= :data:`MIN_OPSET`).
    Returns:
        the model, input ``input`` and output ``output``, dimensions named ``batch``, ``height``, ``width``.
    """
    # An example with batch 2 and sizes off the window grid: torch.export specialises dimensions of size 0 or 1.
    example = torch.rand(2, in_chans, 19, 21)
    dynamic = {axis: torch.export.Dim.DYNAMIC for axis in INPUT_DIM_NAMES}
    # Stride and contiguity checks of intermediate tensors would otherwise specialise (e.g. 'one window row or
    # more'); the ONNX graph has no strides, so these decisions do not change what it computes.
    with torch.fx.experimental._config.patch(backed_size_oblivious=True):
        program = torch.export.export(module, (example, ), dynamic_shapes=(dynamic, ), strict=False)
    # optimize=False: the exporter's optimiser includes a pattern rewriter whose time grows with the square of the
    # graph (HAT-S: about 5 CPU minutes of its 6); the linear passes of simplify_graph do the useful part of it.
    onnx_program = torch.onnx.export(program, (example, ), dynamo=True, opset_version=opset,
                                     input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], optimize=False,
                                     verbose=False, external_data=False)
    simplify_graph(onnx_program.model)
    model = onnx_program.model_proto
    produced = next((entry.version for entry in model.opset_import if entry.domain in ('', 'ai.onnx')), None)
    if produced != opset:
        raise ValueError(f'asked for opset {opset}, the exporter produced opset {produced}')
    _name_dynamic_dims(model)
    return model


def simplify_graph(model: onnx_ir.Model) -> None:
    """Constant folding (shape arithmetic on constants, small bias gathers), common subexpressions, unused nodes.

    Changes ``model`` in place.
    """
    import onnx_ir.passes.common as passes
    from onnxscript.optimizer import fold_constants

    passes.InlinePass()(model)
    fold_constants(model)
    passes.RemoveUnusedNodesPass()(model)
    passes.LiftConstantsToInitializersPass(lift_all_constants=False)(model)
    passes.DeduplicateInitializersPass()(model)
    passes.CommonSubexpressionEliminationPass()(model)
    passes.RemoveUnusedNodesPass()(model)


def _name_dynamic_dims(model: onnx.ModelProto) -> None:
    """Replace the tracer's symbols (``s77``, ``4*s53``) in dimension names by ``batch``, ``height``, ``width``."""
    names = {}
    for axis, dim in enumerate(model.graph.input[0].type.tensor_type.shape.dim):
        if dim.dim_param and axis in INPUT_DIM_NAMES:
            names[dim.dim_param] = INPUT_DIM_NAMES[axis]
    symbol = re.compile(r'\b[su]\d+\b')
    for value in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = symbol.sub(lambda m: names.get(m.group(0), m.group(0)), dim.dim_param)


def set_metadata(model: onnx.ModelProto, metadata: Mapping[str, str]) -> None:
    """Set ``metadata_props`` (replacing entries of the same key)."""
    kept = [(p.key, p.value) for p in model.metadata_props if p.key not in metadata]
    del model.metadata_props[:]
    for key, value in [*kept, *metadata.items()]:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, str(value)


def check_onnx_file(path: str | os.PathLike, network: nn.Module, *, sizes: Sequence[tuple[int, int, int]],
                    tolerance: float = TOLERANCE, seed: int = 0) -> list[SizeCheck]:
    """Run the file with ONNX Runtime (CPU) and the network with PyTorch on random inputs in [0, 1]; compare.

    Args:
        sizes: (batch, height, width) of each input.
    Returns:
        one :class:`SizeCheck` per size.
    Raises:
        ExportCheckError: an output of another shape, a non-finite output, or a difference above ``tolerance``.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(os.fspath(path), providers=['CPUExecutionProvider'])
    generator = torch.Generator().manual_seed(seed)
    in_chans = network_channels(network)[0]
    checks = []
    for batch, height, width in sizes:
        x = torch.rand(batch, in_chans, height, width, generator=generator)
        with torch.no_grad():
            expected = network(x).numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
        shape = f'input {batch}x{in_chans}x{height}x{width}'
        if got.shape != expected.shape:
            raise ExportCheckError(f'{shape}: ONNX Runtime returned {list(got.shape)}, PyTorch {list(expected.shape)}')
        if not np.isfinite(got).all():
            raise ExportCheckError(f'{shape}: ONNX Runtime returned non-finite values')
        diff = float(np.abs(got - expected).max())
        if not diff <= tolerance:
            raise ExportCheckError(f'{shape}: ONNX Runtime and PyTorch differ by up to {diff:.3g} '
                                   f'(tolerance {tolerance:g})')
        checks.append(SizeCheck(tuple(x.shape), tuple(got.shape), diff))
    return checks


def export_network(network: nn.Module, output: str | os.PathLike, *, metadata: Mapping[str, str] | None = None,
                   source_sha256: str | None = None, opset: int = DEFAULT_OPSET,
                   check_sizes: Sequence[tuple[int, int, int]] | None = None,
                   tolerance: float = TOLERANCE) -> ExportResult:
    """Export a HAT or SRVGGNetCompact to ``output`` (fp32), checked with ONNX Runtime before it is written.

    Args:
        network: the network (moved to the CPU in fp32 and put in eval mode).
        output: path of the ``.onnx`` file; its folder must exist. An existing file is replaced only on success.
        metadata: ``metadata_props``; default :func:`metadata_for` (with ``source_sha256``).
        opset: ONNX opset (>= 18).
        check_sizes: (batch, height, width) of the check inputs; default :func:`default_check_sizes`.
        tolerance: largest max abs difference accepted between ONNX Runtime and PyTorch.
    Returns:
        the :class:`ExportResult`.
    Raises:
        ValueError: an architecture or opset that cannot be exported.
        ExportCheckError: the graph does not reproduce the network (no file written).
    """
    if opset < MIN_OPSET:
        raise ValueError(f'opset {opset} is not supported: the exporter writes opset {MIN_OPSET} or later')
    start = time.perf_counter()
    network = network.float().cpu().eval()
    module = exportable_module(network)
    metadata = dict(metadata) if metadata is not None else metadata_for(network, source_sha256=source_sha256)
    sizes = list(check_sizes) if check_sizes is not None else default_check_sizes(network)

    model = trace_to_onnx(module, in_chans=network_channels(network)[0], opset=opset)
    model.doc_string = (f'{metadata.get("variant", "")} {metadata.get("architecture", "")} '
                        f'x{metadata.get("scale", "?")}: [N, C, H, W] float32 in [0, 1] -> [N, C, H*s, W*s]').strip()
    set_metadata(model, metadata)

    output = Path(output)
    handle, temporary = tempfile.mkstemp(dir=output.parent, prefix=f'.{output.name}.', suffix='.tmp')
    try:
        with os.fdopen(handle, 'wb') as stream:
            stream.write(model.SerializeToString())
            stream.flush()
            os.fsync(stream.fileno())
        # Checked from disk: what is renamed is exactly what ONNX Runtime ran.
        checks = check_onnx_file(temporary, network, sizes=sizes, tolerance=tolerance)
        give_normal_permissions(temporary)
        os.replace(temporary, output)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return ExportResult(path=output, opset=opset, metadata=metadata, checks=checks,
                        seconds=time.perf_counter() - start)


def export_checkpoint(checkpoint: str | os.PathLike, output: str | os.PathLike, *, param_key: str | None = None,
                      opset: int = DEFAULT_OPSET, tolerance: float = TOLERANCE) -> ExportResult:
    """Load a checkpoint (architecture detected, strict load) and :func:`export_network` it.

    Raises:
        UsageError: the checkpoint is missing, unreadable or not a HAT/SRVGGNetCompact; the output folder is missing.
        ExportCheckError: see :func:`export_network`.
    """
    checkpoint, output = Path(checkpoint), Path(output)
    if not checkpoint.is_file():
        raise UsageError(f'-m {checkpoint}: checkpoint not found')
    if not output.parent.is_dir():
        raise UsageError(f'-o {output}: the folder {output.parent} does not exist')
    if output.exists() and output.resolve() == checkpoint.resolve():
        raise UsageError(f'-o {output}: that is the checkpoint; choose another output path')
    try:
        network = build_from_checkpoint(checkpoint, param_key=param_key)
    except (ValueError, ImportError, OSError) as error:
        raise UsageError(f'-m {checkpoint}: {error}') from None
    try:
        exportable_module(network)  # refuse what cannot be traced before the slow part
    except ValueError as error:
        raise UsageError(f'-m {checkpoint}: {error}') from None
    return export_network(network, output, source_sha256=sha256_of(checkpoint), opset=opset, tolerance=tolerance)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='hat-export', description='Export a HAT or SRVGGNetCompact checkpoint to ONNX (fp32, any input size); '
        'the file is checked with ONNX Runtime against PyTorch before it is written.')
    parser.add_argument('-m', '--model', type=Path, required=True, help='checkpoint (.pth or .safetensors)')
    parser.add_argument('-o', '--output', type=Path, required=True, help='ONNX file to write')
    parser.add_argument('--opset', type=int, default=DEFAULT_OPSET,
                        help=f'ONNX opset, {MIN_OPSET} or later (default {DEFAULT_OPSET})')
    parser.add_argument('--param-key', default=None,
                        help='weights inside the checkpoint (default: params_ema, then params)')
    parser.add_argument('--tolerance', type=float, default=TOLERANCE,
                        help=f'max abs difference accepted between ONNX Runtime and PyTorch (default {TOLERANCE:g})')
    parser.add_argument('--fp16', action='store_true', help='refused, with the reason (HAT overflows in fp16)')
    parser.add_argument('-q', '--quiet', action='store_true', help='only warnings and errors')
    return parser


def run(args: argparse.Namespace) -> int:
    """Process the parsed command line. Returns the exit status."""
    try:
        if args.fp16:
            raise UsageError(f'--fp16: {FP16_REFUSAL}')
        if args.opset < MIN_OPSET:
            raise UsageError(f'--opset {args.opset}: the exporter writes opset {MIN_OPSET} or later (it cannot '
                             'convert its graphs down)')
        if not args.tolerance > 0:
            raise UsageError(f'--tolerance {args.tolerance}: must be positive')
        missing = missing_modules()
        if missing:
            raise UsageError(f'the export needs {", ".join(missing)}: pip install {" ".join(missing)}')
        logger.info(f'Exporting {args.model} (tracing takes a few seconds per block: minutes for HAT-L) ...')
        result = export_checkpoint(args.model, args.output, param_key=args.param_key, opset=args.opset,
                                   tolerance=args.tolerance)
    except UsageError as error:
        logger.error(str(error))
        return EXIT_USAGE
    except ExportCheckError as error:
        logger.error(f'{args.output} not written: the exported graph does not reproduce the network: {error}')
        return EXIT_FAILED
    except Exception as error:  # noqa: BLE001 (a tracer or translator failure: say what failed, not a traceback)
        first_line = (str(error).strip().splitlines() or ['(no message)'])[0]
        logger.error(f'{args.output} not written: the export failed: {type(error).__name__}: {first_line}')
        logger.debug('export failure', exc_info=True)
        return EXIT_FAILED
    meta = result.metadata
    size_mib = result.path.stat().st_size / 2**20
    logger.info(f'Wrote {result.path} ({size_mib:.1f} MiB, opset {result.opset}): {meta["variant"]} '
                f'{meta["architecture"]} x{meta["scale"]}, window {meta["window_size"]}, in {result.seconds:.0f} s.')
    logger.info('Checked with ONNX Runtime against PyTorch, max abs difference per input: ' +
                ', '.join(check.describe() for check in result.checks) + '.')
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """``hat-export``: returns the exit status (0 written, 1 export or check failed, 2 bad arguments)."""
    args = parse_or_status(build_parser(), argv)
    if isinstance(args, int):
        return args
    set_up_logging(logger, logging.WARNING if args.quiet else logging.INFO)
    # The graph passes log every initializer they merge at INFO.
    logging.getLogger('onnx_ir').setLevel(logging.WARNING)
    logging.getLogger('onnxscript').setLevel(logging.WARNING)
    return run(args)


def cli() -> None:
    """Console-script entry point (``hat-export``)."""
    sys.exit(main())


if __name__ == '__main__':
    cli()

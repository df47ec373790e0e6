"""Convert a checkpoint between PyTorch's .pth and .safetensors, without running code from it.

    python scripts/convert_checkpoint.py experiments/pretrained_models/HAT_SRx4.pth
        -> experiments/pretrained_models/HAT_SRx4.safetensors
    python scripts/convert_checkpoint.py HAT_SRx4.safetensors --to pth --output HAT_SRx4_from_st.pth

A .pth is read with ``torch.load(weights_only=True)``, which rebuilds tensors and plain containers only: a pickle that
asks for anything else (and could run code while loading) is refused with the reason. A .safetensors file holds
nothing but tensors and is safe by design.

Layout. A released checkpoint is ``{'params_ema': state_dict, 'params': state_dict}`` (one of the two, or both). A
.safetensors file holds one flat ``{name: tensor}`` dict, so by default every one of those entries is stored with its
name as a prefix: ``params_ema.conv_first.weight``, ``params.conv_first.weight``. ``hat.io.checkpoints.load_state_dict``
(and so ``pretrain_network_g`` in an option file, with ``param_key_g`` as usual) reads such a file back as the nested
dict. ``--param-key NAME`` converts that entry only, stored as a plain state dict (unprefixed keys, the layout other
tools such as chaiNNer expect); a .pth that is itself a plain state dict is stored the same way.

Back to .pth: prefixed entries become ``{'params_ema': ..., 'params': ...}`` again; a plain state dict becomes
``{'params': state_dict}``, which basicsr and this project load whatever ``param_key_g`` says (a missing
``params_ema`` falls back to ``params``). ``--param-key`` picks one entry here too.

The output never replaces an existing file, is written through a temporary file (an interrupted run leaves no
half-written checkpoint) and is read back and compared with the input before the command reports success.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping, Sequence
from os import path as osp
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ''):  # run as a script: make the project importable without installing it
    sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from hat.io.checkpoints import (DEFAULT_PARAM_KEYS, load_checkpoint, load_state_dict, save_checkpoint,  # noqa: E402
                                 unwrap_state_dict)

logger = logging.getLogger('convert_checkpoint')

FORMATS = {'pth': ('.pth', '.pt', '.ckpt', '.bin'), 'safetensors': ('.safetensors', )}
# When the input holds none of DEFAULT_PARAM_KEYS, the weights go into this entry of a .pth.
PLAIN_PTH_KEY = 'params'


class ConversionError(Exception):
    """A problem with the input or output that the user can fix; the message says which and how."""


def format_of(path: Path) -> Optional[str]:
    suffix = path.suffix.lower()
    return next((name for name, suffixes in FORMATS.items() if suffix in suffixes), None)


def read_entries(path: Path, param_key: Optional[str]) -> dict[Optional[str], dict[str, Tensor]]:
    """The state dicts to convert, by entry name (``None``: the file is a plain state dict).

    Args:
        path: a .pth or .safetensors checkpoint.
        param_key: one entry to convert, or None for every entry of :data:`DEFAULT_PARAM_KEYS` present.
    """
    try:
        # Read without running code (weights_only, or safetensors); a refusal is explained.
        if param_key is not None:
            return {param_key: load_state_dict(path, param_key)}
        whole = load_checkpoint(path)
    except (FileNotFoundError, ValueError, ImportError) as error:
        raise ConversionError(str(error)) from None
    if isinstance(whole, Mapping) and any(k in whole for k in DEFAULT_PARAM_KEYS):
        others = [str(k) for k in whole if k not in DEFAULT_PARAM_KEYS]
        if others:
            logger.info('Not converted (not weights of the released format): %s', ', '.join(others))
        return {k: unwrap_state_dict(whole, k) for k in DEFAULT_PARAM_KEYS if k in whole}
    try:
        return {None: unwrap_state_dict(whole)}
    except ValueError as error:
        raise ConversionError(f'{path}: {error} (use --param-key NAME)') from None


def to_storable(entries: dict[Optional[str], dict[str, Tensor]], target: str, flat: bool) -> dict[str, Any]:
    """What :func:`hat.io.checkpoints.save_checkpoint` writes: a plain state dict (``flat``), or
    ``{entry: state_dict}`` (a .safetensors file stores those as ``<entry>.<key>``)."""
    if flat:
        (state_dict, ) = entries.values()
        return state_dict
    return {(name or PLAIN_PTH_KEY): sd for name, sd in entries.items()}


def verify(output: Path, entries: dict[Optional[str], dict[str, Tensor]], flat: bool) -> None:
    """Read ``output`` back the way the project reads checkpoints and compare every tensor with the input."""
    for name, expected in entries.items():
        key = None if flat else (name or PLAIN_PTH_KEY)
        try:
            found = load_state_dict(output, key)
        except ValueError as error:
            raise ConversionError(f'the written file {output} does not read back: {error}') from None
        if found.keys() != expected.keys():
            raise ConversionError(f'{output}: entry {key} reads back with other keys than the input has')
        bad = [k for k, v in expected.items() if found[k].dtype != v.dtype or not torch.equal(found[k], v)]
        if bad:
            raise ConversionError(f'{output}: {len(bad)} tensors of entry {key} differ from the input, e.g. {bad[0]}')


def convert(source: Path, output: Optional[Path] = None, to: Optional[str] = None,
            param_key: Optional[str] = None) -> Path:
    """Convert ``source`` (see the module docstring); returns the written file.

    Raises:
        ConversionError: unreadable or refused input, an existing output, a failed read-back (nothing is left
            written).
    """
    source, output = Path(source), (Path(output) if output is not None else None)
    source_format = format_of(source)
    if to is None:
        if source_format is None:
            raise ConversionError(f'cannot tell the format of {source} from its suffix; pass --to pth|safetensors')
        to = 'safetensors' if source_format == 'pth' else 'pth'
    if output is None:
        output = source.with_suffix(FORMATS[to][0])
    if format_of(output) != to:
        raise ConversionError(f'--output {output} should end with {FORMATS[to][0]} for --to {to}')
    if output.exists():
        raise ConversionError(f'{output} already exists; not overwriting it (delete it or pass another --output)')
    if not source.is_file():
        raise ConversionError(f'checkpoint not found: {source}')

    entries = read_entries(source, param_key)
    flat = to == 'safetensors' and (param_key is not None or None in entries)
    metadata = {'format': 'pt', 'converted_from': source.name,
                'layout': 'state_dict' if flat else ','.join(f'{name}.<key>' for name in entries)}
    try:
        save_checkpoint(to_storable(entries, to, flat), output, metadata=metadata, overwrite=False)
    except FileExistsError:
        raise ConversionError(f'{output} already exists; not overwriting it') from None
    except ImportError as error:
        raise ConversionError(str(error)) from None
    try:
        verify(output, entries, flat)
    except ConversionError:
        output.unlink(missing_ok=True)
        raise
    count = sum(len(sd) for sd in entries.values())
    logger.info('Wrote %s (%s; %d tensors from %s).', output,
                ', '.join(name or 'plain state dict' for name in entries), count, source)
    return output


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description='Convert a checkpoint between .pth and .safetensors without running code from it '
        '(weights-only loading). Never overwrites a file.',
        epilog='Example: python scripts/convert_checkpoint.py experiments/pretrained_models/HAT_SRx4.pth')
    parser.add_argument('input', type=Path, help='checkpoint to convert (.pth/.pt/.ckpt or .safetensors)')
    parser.add_argument('--to', choices=sorted(FORMATS), default=None,
                        help='output format (default: the other one than the input)')
    parser.add_argument('--output', '-o', type=Path, default=None,
                        help='file to write (default: the input with the new suffix); must not exist')
    parser.add_argument('--param-key', default=None, metavar='NAME',
                        help='convert only this entry (e.g. params_ema), stored as a plain state dict in a '
                        '.safetensors file; default: every entry of the released format (params_ema, params), '
                        'stored as params_ema.<key> / params.<key>')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point. Returns 0 on success, 1 when nothing was written."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(levelname)s: %(message)s')
    try:
        convert(args.input, args.output, args.to, args.param_key)
    except ConversionError as error:
        logger.error('%s', error)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())

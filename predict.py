"""The Cog predictor: HAT super-resolution as an HTTP service (Replicate, ``cog build``, ``make serve``).

    COG_PREDICT_TYPE_STUB=predict.py:Predictor PORT=5000 python -m cog.server.http --host 127.0.0.1

Every prediction runs in this process through :mod:`hat.inference`, the engine of ``hat-upscale``: the upload is
decoded by :func:`hat.io.images.read_picture`, upscaled by an :class:`~hat.inference.Upscaler` and written by
:func:`hat.io.images.write_picture`, so the service returns exactly the pixels ``hat-upscale`` writes for the same
model and options.

``setup()`` loads the default model once. The last model asked for stays loaded (with the last upscaler, so that
``tile=auto`` measures the memory once): a request for the same file reuses it, another file replaces it. Each
prediction writes into a temporary folder of its own, removed when the next prediction starts (Cog has read the
output by then; predictions of this synchronous predictor never overlap); the last one goes with the predictor
(garbage collection or the end of the process). A bad request (an image that does not
decode, a model name outside ``experiments/pretrained_models/``, a tile that is no number) fails that prediction
with a message saying what is wrong; the server goes on serving.
"""
import logging
import shutil
import tempfile
import weakref
from pathlib import Path as FilePath
from typing import Optional, Union

import torch
from cog import BaseRunner, Input, Path

from hat.inference import ModelDescriptor, Upscaler, load_model
from hat.inference.precision import default_device
from hat.inference.upscaler import parse_tile
from hat.inference.memory import is_out_of_memory
from hat.io.images import ImageError, UnreadableImageError, read_picture, write_picture
from hat.utils.heap import keep_freed_memory

logger = logging.getLogger('hat.predict')

MODELS_DIR = FilePath(__file__).resolve().parent / 'experiments' / 'pretrained_models'
DEFAULT_MODEL = 'HAT-demo_SRx4.pth'
MODEL_SUFFIXES = ('.pth', '.safetensors')
# The Input() declarations below repeat these as literals: `cog build` may read the schema from the source text.
PRECISIONS = ('auto', 'fp32', 'bf16', 'fp16')
OUTPUT_FORMATS = ('png', 'webp', 'jpg')

TileSetting = Union[int, str, None]


def available_models(folder: FilePath) -> list[str]:
    """The checkpoint file names in ``folder`` (sorted)."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith('.') and p.suffix.lower() in MODEL_SUFFIXES)


def model_path(name: str, folder: FilePath) -> FilePath:
    """The checkpoint ``name`` in ``folder``.

    Raises:
        ValueError: ``name`` is not a plain file name of ``folder`` (a path, ``..``, another suffix) or no such file
            exists; the message lists the available ones.
    """
    choices = ', '.join(available_models(folder)) or f'none: put .pth or .safetensors files in {folder}'
    plain = name and name == FilePath(name).name and name not in ('.', '..') and '\\' not in name
    if not plain:
        raise ValueError(f'model must be a file name in experiments/pretrained_models/, not a path: {name!r}. '
                         f'Available: {choices}')
    if FilePath(name).suffix.lower() not in MODEL_SUFFIXES:
        raise ValueError(f'model {name!r}: expected a {" or ".join(MODEL_SUFFIXES)} checkpoint. Available: {choices}')
    path = folder / name
    if not path.is_file() or path.resolve().parent != folder.resolve():
        raise ValueError(f'model {name!r} not found in experiments/pretrained_models/. Available: {choices}')
    return path


class Predictor(BaseRunner):
    """HAT super-resolution of one uploaded image per prediction.

    Attributes:
        models_dir: the folder whose checkpoints the ``model`` input names.
        default_model: the checkpoint ``setup()`` loads.
    """

    models_dir: FilePath = MODELS_DIR
    default_model: str = DEFAULT_MODEL

    def setup(self) -> None:
        """Load the default model (``experiments/pretrained_models/HAT-demo_SRx4.pth``) once."""
        if not logging.getLogger().handlers:  # Cog's worker forwards stderr as the server's (and prediction's) log
            logging.basicConfig(level=logging.INFO, format='%(levelname)s: %(message)s')
        logger.setLevel(logging.INFO)
        # As the commands do (HAT_KEEP_FREED_MEMORY=0 turns it off): freed maps reused within a request, the memory
        # given back after each image by the Upscaler (hat/utils/heap.py).
        if keep_freed_memory():
            logger.info('glibc malloc keeps freed memory for reuse within each image (HAT_KEEP_FREED_MEMORY=0: off)')
        self.device = torch.device(default_device())
        self._model_key: Optional[tuple] = None
        self._model: Optional[ModelDescriptor] = None
        self._upscaler_key: Optional[tuple] = None
        self._upscaler: Optional[Upscaler] = None
        self._remove_workdir: Optional[weakref.finalize] = None
        self.model_for(self.default_model)

    def model_for(self, name: str) -> ModelDescriptor:
        """The loaded model of checkpoint ``name``: the one in memory when it is the same file, unchanged."""
        path = model_path(name, self.models_dir)
        stat = path.stat()
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
        if key != self._model_key:
            self._model = self._upscaler = self._model_key = self._upscaler_key = None
            if self.device.type == 'cuda':
                torch.cuda.empty_cache()  # the previous model's memory, before the next one is loaded
            try:
                self._model = load_model(path, device=self.device)
            except (FileNotFoundError, ValueError, ImportError) as error:
                raise ValueError(f'model {name!r}: {error}') from None
            self._model_key = key
            logger.info(f'Loaded model {name}: {self._model.summary()} on {self.device}')
        return self._model

    def upscaler_for(self, name: str, *, precision: str, tile: TileSetting, self_ensemble: bool) -> Upscaler:
        """The Upscaler of model ``name`` with these settings; the previous one when nothing changed, so that
        ``tile='auto'`` keeps its memory measurement."""
        model = self.model_for(name)
        key = (self._model_key, precision, tile, self_ensemble)
        if key != self._upscaler_key:
            self._upscaler = Upscaler(model, device=self.device, precision=precision, tile=tile,
                                      self_ensemble=self_ensemble, progress=False, precision_option='precision')
            self._upscaler_key = key
            logger.info(f'Upscaler: {self._upscaler.describe()}')
        return self._upscaler

    def _fresh_workdir(self) -> FilePath:
        """A new temporary folder for this prediction; the previous prediction's is removed (its output has been
        read: predictions run one after another). The new one is removed with the predictor at the latest."""
        if self._remove_workdir is not None:
            self._remove_workdir()
        workdir = FilePath(tempfile.mkdtemp(prefix='hat-predict-'))
        self._remove_workdir = weakref.finalize(self, shutil.rmtree, workdir, ignore_errors=True)
        return workdir

    def run(
        self,
        image: Path = Input(description='Image to upscale (PNG, JPEG, WebP, TIFF or BMP; 8 or 16 bits; grey, '
                            'colour or with alpha).'),
        model: str = Input(default='HAT-demo_SRx4.pth',
                           description='Checkpoint file name in experiments/pretrained_models/ (.pth or '
                           '.safetensors: HAT-S, HAT, HAT-L, Real-HAT-GAN or SRVGGNetCompact); its architecture and '
                           'scale are read from the file. The default is the small demo model shipped with the '
                           'code.'),
        tile: str = Input(default='auto',
                          description="Tile side in input pixels: 'auto' (the largest tile that fits in memory), "
                          "0 (the whole image at once) or a number such as 256."),
        precision: str = Input(default='auto', choices=['auto', 'fp32', 'bf16', 'fp16'],
                               description='auto: bf16 where the GPU or CPU computes it natively and faster than '
                               'fp32, else fp32. fp16 '
                               'runs on CUDA only and may overflow in HAT\'s attention.'),
        self_ensemble: bool = Input(default=False,
                                    description='Average the outputs of the 8 flips and rotations of the image '
                                    '(8 times slower, slightly better).'),
        output_format: str = Input(default='png', choices=['png', 'webp', 'jpg'],
                                   description='Format of the upscaled image. png keeps 16 bits and alpha, webp '
                                   'keeps alpha, jpg neither.'),
    ) -> Path:
        """Upscale one image; returns the upscaled image file."""
        if precision not in PRECISIONS:
            raise ValueError(f'precision must be one of {", ".join(PRECISIONS)}, got {precision!r}')
        if output_format not in OUTPUT_FORMATS:
            raise ValueError(f'output_format must be one of {", ".join(OUTPUT_FORMATS)}, got {output_format!r}')
        upscaler = self.upscaler_for(model, precision=precision, tile=parse_tile(tile),
                                     self_ensemble=bool(self_ensemble))
        workdir = self._fresh_workdir()
        try:
            picture = read_picture(FilePath(image))
        except UnreadableImageError as error:
            raise ImageError(f'cannot read the uploaded image: {error.problem}') from None
        height, width = picture.pixels.shape[:2]
        chosen = upscaler.tile_for(height, width)
        logger.info(f'{width}x{height} image, tile {chosen or "none (whole image)"}')
        try:
            result = upscaler.upscale_picture(picture)
        except Exception as error:  # noqa: BLE001 (only out-of-memory errors get advice; the rest go as they are)
            if not is_out_of_memory(error):
                raise
            advice = {None: "use tile 'auto' or a tile side such as 256",
                      'auto': 'even the smallest tile did not fit in the free memory'}.get(upscaler.tile,
                                                                                            'use a smaller tile')
            first_line = (str(error).strip().splitlines() or [''])[0]
            raise MemoryError(f'out of memory upscaling a {width}x{height} image ({first_line}): {advice}') from None
        target = workdir / f'upscaled_x{upscaler.scale}.{output_format}'
        for note in write_picture(target, result):
            logger.warning(note)
        return Path(target)

"""Running a model: what a loaded model is (:mod:`.descriptor`), the precision that fits the hardware
(:mod:`.precision`), memory (:mod:`.memory`), and the one runner, :class:`~hat.inference.upscaler.Upscaler`."""
from hat.inference.descriptor import ModelDescriptor, load_model  # noqa: F401
from hat.inference.precision import resolve_precision  # noqa: F401
from hat.inference.upscaler import Upscaler  # noqa: F401

__all__ = ['ModelDescriptor', 'Upscaler', 'load_model', 'resolve_precision']

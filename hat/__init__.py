"""HAT: Hybrid Attention Transformer for image super-resolution.

Importing ``hat`` makes basicsr importable on current torchvision (see :mod:`hat.compat`) and registers this
project's architectures, datasets and models into basicsr's registries.
"""
__version__ = '0.1.0'

from hat import compat  # noqa: E402

compat.apply()

from hat import archs  # noqa: E402,F401  (registers architectures)
from hat import data  # noqa: E402,F401  (registers datasets)
from hat import models  # noqa: E402,F401  (registers models)

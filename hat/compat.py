"""Compatibility shims that let basicsr 1.4.2 run on current torchvision.

basicsr 1.4.2 (its last release) imports ``torchvision.transforms.functional_tensor`` in
``basicsr/data/degradations.py``. torchvision removed that private module in 0.17 and moved the one function basicsr
uses from it, ``rgb_to_grayscale``, to ``torchvision.transforms.functional`` with the same signature. Without an alias,
``import basicsr`` fails on every current torchvision.

``apply()`` must run before the first ``import basicsr``; ``import hat`` calls it first thing.
"""
from __future__ import annotations

import importlib
import sys

_REMOVED_MODULE = 'torchvision.transforms.functional_tensor'


def apply() -> None:
    """Alias the removed torchvision module to its successor when it is missing. Idempotent."""
    if _REMOVED_MODULE in sys.modules:
        return
    try:
        importlib.import_module(_REMOVED_MODULE)
    except ModuleNotFoundError:
        import torchvision.transforms.functional as functional

        sys.modules[_REMOVED_MODULE] = functional

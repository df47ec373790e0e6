"""Files in and out: images (:mod:`hat.io.images`) and checkpoints (:mod:`hat.io.checkpoints`).

Every entry point (training, testing, hat-upscale, the analysis tools, the scripts) reads and writes through these
two modules, so a file format, a layout or a trust rule is handled in one place.
"""

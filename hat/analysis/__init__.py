"""Analysis tools of the paper: local attribution maps with the diffusion index, intermediate feature maps.

Command lines: ``python -m hat.analysis.lam``, ``python -m hat.analysis.compare``, ``python -m hat.analysis.features``.
"""

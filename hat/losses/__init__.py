"""Losses, registered into basicsr's ``LOSS_REGISTRY`` on import.

``LocalVGGPerceptualLoss`` is basicsr's perceptual loss with its VGG weights read from a local file (no download).
"""
from hat.losses.perceptual import LocalVGGPerceptualLoss, build_perceptual_loss, find_vgg_weights  # noqa: F401

__all__ = ['LocalVGGPerceptualLoss', 'build_perceptual_loss', 'find_vgg_weights']

"""Training datasets, registered into basicsr's ``DATASET_REGISTRY`` on import.

``ImageNetPairedDataset`` pairs GT images with their bicubic downscale made on the fly (ImageNet pre-training);
``RealESRGANDataset`` yields GT patches with the random kernels of Real-ESRGAN's degradation (Real-HAT). Validation
and test sets use basicsr's own ``PairedImageDataset``/``SingleImageDataset``.
"""
from hat.data.imagenet_paired_dataset import ImageNetPairedDataset  # noqa: F401
from hat.data.realesrgan_dataset import RealESRGANDataset  # noqa: F401

__all__ = ['ImageNetPairedDataset', 'RealESRGANDataset']

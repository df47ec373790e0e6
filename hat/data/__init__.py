"""Datasets, registered into basicsr's ``DATASET_REGISTRY`` on import.

``ImageNetPairedDataset`` pairs GT images with their bicubic downscale made on the fly (ImageNet pre-training);
``RealESRGANDataset`` yields GT patches with the random kernels of Real-ESRGAN's degradation (Real-HAT).
``PairedImageDataset``/``SingleImageDataset`` (DF2K training, validation and test sets) are basicsr's datasets with
their input checked; they replace basicsr's registry entries of the same names, so option files keep
``type: PairedImageDataset``. A file that does not decode raises ``UnreadableImageError`` (with ``.path``).
"""
from hat.data.errors import ImagePairSizeError, UnreadableImageError  # noqa: F401
from hat.data.imagenet_paired_dataset import ImageNetPairedDataset  # noqa: F401
from hat.data.paired_image_dataset import PairedImageDataset  # noqa: F401
from hat.data.realesrgan_dataset import RealESRGANDataset  # noqa: F401
from hat.data.single_image_dataset import SingleImageDataset  # noqa: F401

__all__ = ['ImageNetPairedDataset', 'ImagePairSizeError', 'PairedImageDataset', 'RealESRGANDataset',
           'SingleImageDataset', 'UnreadableImageError']

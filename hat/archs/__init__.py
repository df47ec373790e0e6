"""Architectures, registered into basicsr's ``ARCH_REGISTRY`` on import."""
from hat.archs.hat_arch import HAT  # noqa: F401

__all__ = ['HAT']

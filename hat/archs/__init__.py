"""Architectures, registered into basicsr's ``ARCH_REGISTRY`` on import."""
from hat.archs.discriminator_arch import UNetDiscriminatorSN  # noqa: F401
from hat.archs.hat_arch import HAT  # noqa: F401
from hat.archs.srvgg_arch import SRVGGNetCompact  # noqa: F401

__all__ = ['HAT', 'SRVGGNetCompact', 'UNetDiscriminatorSN']

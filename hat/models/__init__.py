"""Models (training/inference wrappers around networks), registered into basicsr's ``MODEL_REGISTRY`` on import."""
from hat.models.hat_model import HATModel  # noqa: F401
from hat.models.realhatgan_model import RealHATGANModel  # noqa: F401
from hat.models.realhatmse_model import RealHATMSEModel  # noqa: F401

__all__ = ['HATModel', 'RealHATGANModel', 'RealHATMSEModel']

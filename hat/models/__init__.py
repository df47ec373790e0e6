"""Models (training/inference wrappers around networks), registered into basicsr's ``MODEL_REGISTRY`` on import."""
from hat.models.hat_model import HATModel  # noqa: F401

__all__ = ['HATModel']

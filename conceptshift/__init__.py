"""conceptshift: latent-concept-shift mixtures in NumPyro/JAX."""

__version__ = "0.1.0"

from . import inference, models  # noqa: E402

__all__ = ["inference", "models", "__version__"]

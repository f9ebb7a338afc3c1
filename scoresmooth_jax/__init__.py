"""scoresmooth_jax: certified robustness for any pretrained classifier by randomized smoothing over a
score-based denoiser (JAX/Flax). See README.md; the public surface is ``noise``, ``denoise``, ``smoothing``."""

from scoresmooth_jax import denoise, noise, smoothing

__all__ = ["denoise", "noise", "smoothing"]
__version__ = "0.1.0"

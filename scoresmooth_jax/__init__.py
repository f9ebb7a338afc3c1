"""scoresmooth_jax: certified robustness for any pretrained classifier by randomized smoothing over a
score-based denoiser (JAX/Flax). See README.md; the public surface is ``noise``, ``denoise``, ``smoothing``
and ``sequential``, with the result type and bounds they share in ``certificate``.

Everything else lives in a subpackage by job: ``training``, ``certification``, ``modelio``, ``datasets``,
``runtime``, ``models``. The benchmarks live outside the package, in ``benchmarks/`` beside it.
"""

from scoresmooth_jax import denoise, noise, smoothing

__all__ = ["denoise", "noise", "smoothing"]
__version__ = "0.1.0"

"""scoresmooth_jax: certified robustness for any pretrained classifier by randomized smoothing over a
score-based denoiser (JAX/Flax). See README.md; the public surface is ``noise``, ``denoise``, ``smoothing``
and ``sequential``, with the result type and bounds they share in ``certificate``.

Everything else lives in a subpackage by job: ``training``, ``certification``, ``modelio``, ``datasets``,
``runtime``, ``models``.

Importing the package imports nothing else: ``scoresmooth_jax.smoothing`` (and ``denoise``, ``noise``) load on
first use, so that a module without JAX, such as ``runtime.config_schema`` which every ``configs/*.py`` file
uses, does not pay for JAX.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what static tools see; at run time __getattr__ imports these on first use
  from scoresmooth_jax import denoise, noise, smoothing

__all__ = ["denoise", "noise", "smoothing"]
__version__ = "0.1.0"


def __getattr__(name: str):
  if name in __all__:
    return importlib.import_module(f"{__name__}.{name}")  # the import also binds it here for later lookups
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(__all__))

"""The compute dtype of a score model: float32, or bfloat16 for the tensor cores of a GPU or TPU.

Promises:
  * ``canonical(value)`` is "float32" or "bfloat16" for a name, a dtype or None (float32); anything else fails
    with a one-line ValueError naming the value and the choices.
  * ``with_compute_dtype(score_fn, value)`` is the same score function computing in that dtype: every score model
    family this package loads (``export.ScoreFunction`` over a score_unet or NCSN++ module,
    ``pretrained.ScoreSdeScoreFn``, ``openai_diffusion.OpenAIScoreFn``) rebuilds its Flax module with
    ``dtype=...`` and keeps its parameters as they are (float32, cast where used). The score it returns is float32
    either way, and nothing outside the network changes: the noise, the denoiser's arithmetic (Tweedie's
    y + sigma^2 s) and the statistics stay float32 / float64. The float32 call returns the object itself.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def canonical(value: Any) -> str:
  """"float32" or "bfloat16" from a name, a dtype (jnp.bfloat16, np.float32, ...) or None (float32)."""
  if value is None:
    return "float32"
  if isinstance(value, str):
    name = value
  else:
    try:
      name = np.dtype(value).name
    except TypeError:
      name = repr(value)
  if name not in COMPUTE_DTYPES:
    raise ValueError(f"compute_dtype={value!r}: choose one of {sorted(COMPUTE_DTYPES)} (bfloat16 for GPU / TPU "
                     "tensor cores; parameters stay float32 either way).")
  return name


def dtype_of(value: Any):
  """The jnp dtype of ``canonical(value)``."""
  return COMPUTE_DTYPES[canonical(value)]


def with_module_dtype(module, value: Any):
  """``module`` rebuilt with ``dtype=...`` (unchanged when it already computes in that dtype)."""
  dtype = dtype_of(value)
  if not hasattr(module, "dtype"):
    raise ValueError(f"{type(module).__name__} has no compute dtype to set; compute_dtype={canonical(value)!r} "
                     "needs a score_unet, NCSN++ or OpenAI UNet module.")
  return module if jnp.dtype(module.dtype) == jnp.dtype(dtype) else module.clone(dtype=dtype)


def with_compute_dtype(score_fn, value: Any):
  """``score_fn`` computing its network in ``value``'s dtype (module docstring).

  Works on the loaders' score functions by their shape, without importing them (they import this module): a
  dataclass with a Flax ``module`` (``export.ScoreFunction``) or with a ``preset`` holding the ``model``
  (``pretrained.ScoreSdeScoreFn``, ``openai_diffusion.OpenAIScoreFn``).
  """
  if dataclasses.is_dataclass(score_fn) and hasattr(score_fn, "module") and hasattr(score_fn, "params"):
    module = with_module_dtype(score_fn.module, value)
    return score_fn if module is score_fn.module else dataclasses.replace(score_fn, module=module)
  preset = getattr(score_fn, "preset", None)
  if dataclasses.is_dataclass(score_fn) and dataclasses.is_dataclass(preset) and hasattr(preset, "model"):
    model = with_module_dtype(preset.model, value)
    return score_fn if model is preset.model else dataclasses.replace(
        score_fn, preset=dataclasses.replace(preset, model=model))
  raise TypeError(f"with_compute_dtype takes a ScoreFunction, ScoreSdeScoreFn or OpenAIScoreFn, not "
                  f"{type(score_fn).__name__}; build the network with dtype=... yourself.")

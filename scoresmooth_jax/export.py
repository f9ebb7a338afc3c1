"""Score-model exports: what training writes to ``<workdir>/export`` and the callable that loads it back.

An export is a ``scoresmooth_jax.checkpoint`` model directory with metadata
``{"kind": "score", "model", "model_kwargs", "image_shape", "sigma_min", "sigma_max", "ema": true, ...}``
and variables ``{"params": EMA parameters, "online_params": the raw parameters}``.

``load_score_fn(path)`` returns a ``ScoreFunction``: ``score_fn(x, sigma)`` for NHWC batches in [0, 1] and a
scalar or per-example sigma, pure and jittable, hashable by identity (so compile caches keyed on it work), and
carrying the sigma range it was trained on. It plugs straight into ``denoise.one_step`` / ``denoise.annealed``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from scoresmooth_jax import checkpoint, denoise, models

KIND = "score"
EMA_PARAMS = "params"
ONLINE_PARAMS = "online_params"


@dataclasses.dataclass(frozen=True, eq=False)
class ScoreFunction:
  """A trained noise-conditional score model as a function: ``score_fn(x, sigma) -> grad_x log p_sigma(x)``.

  Attributes:
    module: the Flax module; ``module.apply({"params": params}, x, sigma [B])``.
    params: its parameters.
    sigma_min, sigma_max: the noise range it was trained on; outside it the score is an extrapolation.
    image_shape: (H, W, C) of the images it was trained on.
    metadata: the export's metadata.
  """

  module: Any
  params: Any
  sigma_min: float
  sigma_max: float
  image_shape: tuple[int, int, int]
  metadata: dict = dataclasses.field(default_factory=dict)

  def __call__(self, x: jax.Array, sigma) -> jax.Array:
    """Score of a batch ``x`` [B, H, W, C] at ``sigma`` (scalar or [B]); returned in x's dtype."""
    if x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape:
      raise ValueError(f"the score model takes batches [B, H, W, C] with (H, W, C) = {self.image_shape}; got "
                       f"shape {tuple(x.shape)}.")
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (x.shape[0],))
    return self.module.apply({"params": self.params}, x, sigma).astype(x.dtype)

  def check_sigmas(self, sigmas) -> None:
    """Fails (on the host) when a noise level lies outside the trained range [sigma_min, sigma_max]."""
    denoise.check_trained_range(self, sigmas)


def export_score_model(path, model_name: str, model_kwargs: dict, ema_params: Any, params: Any,
                       image_shape, sigma_min: float, sigma_max: float, extra_metadata: dict | None = None):
  """Writes a score export (module docstring) to ``path``; returns its absolute path."""
  metadata = {
      **(extra_metadata or {}),
      "kind": KIND,
      "model": model_name,
      "model_kwargs": dict(model_kwargs),
      "image_shape": [int(d) for d in image_shape],
      "sigma_min": float(sigma_min),
      "sigma_max": float(sigma_max),
      "ema": True,
  }
  variables = jax.tree.map(np.asarray, jax.device_get({EMA_PARAMS: ema_params, ONLINE_PARAMS: params}))
  return checkpoint.save_model(path, variables, metadata)


def _as_tuples(value):
  return tuple(_as_tuples(v) for v in value) if isinstance(value, list) else value


def load_score_fn(path, use_ema: bool = True) -> ScoreFunction:
  """Loads a score export as a ``ScoreFunction``.

  Args:
    path: the export directory (``<workdir>/export`` of a training run).
    use_ema: the EMA parameters (default, what the paper and score_sde evaluate) or the raw ones.

  Returns:
    A ``ScoreFunction`` with ``sigma_min``, ``sigma_max`` and ``image_shape`` from the export.
  """
  variables, metadata = checkpoint.load_model(path, kind=KIND)
  missing = [k for k in ("model", "model_kwargs", "image_shape", "sigma_min", "sigma_max") if k not in metadata]
  if missing:
    raise checkpoint.CheckpointError(f"score export {path}: metadata lacks {missing}; export it again.")
  which = EMA_PARAMS if use_ema else ONLINE_PARAMS
  if which not in variables:
    raise checkpoint.CheckpointError(f"score export {path} has no {which!r} parameters (it has {sorted(variables)}); "
                                     f"load it with use_ema={not use_ema}.")
  # JSON turned the constructor's tuples into lists; modules want hashable, immutable attributes back.
  kwargs = {k: _as_tuples(v) for k, v in metadata["model_kwargs"].items()}
  module = models.get_model(metadata["model"], **kwargs)
  image_shape = tuple(int(d) for d in metadata["image_shape"])
  params = jax.tree.map(jnp.asarray, variables[which])
  expected = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, *image_shape)), jnp.ones((1,)))
  expected_shapes = jax.tree.map(lambda a: tuple(a.shape), expected["params"])
  got_shapes = jax.tree.map(lambda a: tuple(a.shape), params)
  if expected_shapes != got_shapes:
    raise checkpoint.CheckpointError(f"score export {path}: the stored parameters do not fit "
                                     f"{metadata['model']}({metadata['model_kwargs']}); export it again.")
  return ScoreFunction(module=module, params=params, sigma_min=float(metadata["sigma_min"]),
                       sigma_max=float(metadata["sigma_max"]), image_shape=image_shape, metadata=metadata)

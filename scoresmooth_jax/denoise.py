"""Denoisers built from any noise-conditional score function ``score_fn(x, sigma) ~ grad_x log p_sigma(x)``.

``score_fn`` takes a batch of images in [0, 1] and a sigma (a scalar, or one per example) and returns an
array shaped like the batch. Both denoisers are pure JAX: they work under ``jit`` and ``vmap``, and
``annealed`` compiles to one program (a ``lax.scan`` over levels around a ``lax.fori_loop`` over steps)
whatever the number of levels L and steps T.

* ``one_step`` (Gaussian noise only): Tweedie's formula, D(y) = y + sigma^2 s(y; sigma), the posterior mean
  E[x | y] when s is the exact score of the noisy data.
* ``annealed`` (any noise in ``scoresmooth_jax.noise``): gradient ascent on log p_sigma_i(x) + log q(y - x)
  over a decreasing schedule sigma_1 > ... > sigma_L, T steps per level, step a_i = a sigma_i^2 / sigma_L^2,
  starting at x = y. It approaches the MAP point of p_sigma_L(x) q(y - x), which tends to the MAP of the
  clean prior as sigma_L -> 0.

Defaults, and why:
  * schedule ``default_sigmas(nz)``: geometric from the noise's own sigma down to ``DEFAULT_SIGMA_MIN`` = 0.01
    in ``DEFAULT_NUM_LEVELS`` = 10 levels. Starting at the noise level means the first level's smoothed prior
    is matched to how far y is from the data; 0.01 is below the quantisation step of 8-bit images (1/255 ~
    0.004 is the next scale down) and is the smallest sigma the CIFAR-10 score models of NCSN/score_sde were
    trained at.
  * step ``default_step_size(sigmas)`` = ``DEFAULT_RELATIVE_STEP`` * sigma_L^2 with relative step 0.5. Then
    a_i = 0.5 sigma_i^2. Near the data manifold the score's Lipschitz constant is about 1 / sigma_i^2, and at
    the first level the Gaussian likelihood's is 1 / sigma^2 = 1 / sigma_1^2, so the update's contraction
    factor is about 1 - 0.5 (1 + 1) = 0: stable (below 2) with a factor-2 margin, and it removes most of the
    error in one step per level.
  * ``DEFAULT_STEPS_PER_LEVEL`` = 3: with that step size a few steps per level suffice, and certification
    pays L * T score evaluations per noisy sample, so T is kept small.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from scoresmooth_jax import noise as noise_lib

ScoreFn = Callable[[jax.Array, jax.Array], jax.Array]

DEFAULT_SIGMA_MIN = 0.01
DEFAULT_NUM_LEVELS = 10
DEFAULT_RELATIVE_STEP = 0.5
DEFAULT_STEPS_PER_LEVEL = 3


def sigma_per_example(sigma, y: jax.Array) -> jax.Array:
  """``sigma`` (a scalar or one value per example) as a [B] vector in y's dtype, for the batch ``y`` [B, ...].

  Every score function that takes a scalar or per-example sigma checks it here (the score models' wrappers too).
  """
  sigma = jnp.asarray(sigma, y.dtype)
  if sigma.ndim == 0:
    return jnp.broadcast_to(sigma, (y.shape[0],))
  if sigma.shape != (y.shape[0],):
    raise ValueError(f"sigma has shape {sigma.shape}; pass a scalar or one sigma per example "
                     f"(shape ({y.shape[0]},)) for a batch of shape {y.shape}.")
  return sigma


def _broadcastable(sigma, y: jax.Array) -> jax.Array:
  """A scalar sigma as it is, a per-example one reshaped to broadcast against the batch ``y``."""
  sigma = jnp.asarray(sigma, y.dtype)
  if sigma.ndim == 0:
    return sigma
  return sigma_per_example(sigma, y).reshape((-1,) + (1,) * (y.ndim - 1))


def one_step(score_fn: ScoreFn, y: jax.Array, sigma) -> jax.Array:
  """Tweedie denoiser for Gaussian noise: y + sigma^2 * score_fn(y, sigma).

  Args:
    score_fn: noise-conditional score function.
    y: batch of noisy images (clean image + N(0, sigma^2 I)).
    sigma: the Gaussian noise's standard deviation, a scalar or one per example.

  Returns:
    The posterior-mean estimate of the clean batch, shaped like ``y``.
  """
  return y + _broadcastable(sigma, y) ** 2 * score_fn(y, sigma)


def check_trained_range(score_fn, sigmas, what: str = "sigma", source: str = "") -> None:
  """Fails on the host when a sigma lies outside ``[score_fn.sigma_min, score_fn.sigma_max]``.

  Any score function that carries its trained range (our exports, score_sde checkpoints) can be checked; outside
  that range its score is an extrapolation, so denoising there would silently degrade.
  """
  low, high = float(score_fn.sigma_min), float(score_fn.sigma_max)
  for sigma in np.atleast_1d(np.asarray(sigmas, np.float64)):
    # A relative slack of 1e-5 lets float32 round-trips of the end points pass.
    if not low * (1 - 1e-5) <= sigma <= high * (1 + 1e-5):
      where = f" ({source})" if source else ""
      raise ValueError(f"{what}={sigma:.4g} is outside the score model's trained range [{low:.4g}, {high:.4g}]"
                       f"{where}; choose sigmas inside it or train a score model with a wider sigma_min/sigma_max.")


def geometric_sigmas(sigma_max: float, sigma_min: float, num_levels: int) -> jax.Array:
  """A decreasing geometric schedule sigma_max = sigma_1 > ... > sigma_L = sigma_min (float32 [L]).

  ``num_levels == 1`` gives the single level ``[sigma_min]``.
  """
  if not (0.0 < sigma_min <= sigma_max < float("inf")):
    raise ValueError(f"geometric_sigmas(sigma_max={sigma_max!r}, sigma_min={sigma_min!r}): need "
                     "0 < sigma_min <= sigma_max < inf.")
  if int(num_levels) != num_levels or num_levels < 1:
    raise ValueError(f"num_levels={num_levels!r} must be an integer >= 1.")
  # Built on the host: the schedule is a constant of the compiled program, also when called under jit.
  if num_levels == 1:
    return jnp.asarray([sigma_min], jnp.float32)
  return jnp.asarray(np.geomspace(sigma_max, sigma_min, int(num_levels)), jnp.float32)


def default_sigmas(nz: noise_lib.Noise, sigma_min: float = DEFAULT_SIGMA_MIN,
                   num_levels: int = DEFAULT_NUM_LEVELS) -> jax.Array:
  """The default schedule for denoising noise ``nz``: geometric from nz.sigma down to ``sigma_min``."""
  return geometric_sigmas(max(nz.sigma, sigma_min), sigma_min, num_levels)


def default_step_size(sigmas) -> jax.Array:
  """The default base step a = DEFAULT_RELATIVE_STEP * sigma_L^2, i.e. a_i = 0.5 sigma_i^2 (module docstring)."""
  return DEFAULT_RELATIVE_STEP * jnp.asarray(sigmas, jnp.float32)[-1] ** 2


def _check_annealed_args(nz, sigmas, step_size, steps_per_level):
  if not isinstance(nz, noise_lib.Noise):
    raise TypeError(f"nz={nz!r} must be a scoresmooth_jax.noise distribution.")
  if int(steps_per_level) != steps_per_level or steps_per_level < 1:
    raise ValueError(f"steps_per_level={steps_per_level!r} must be an integer >= 1.")
  sigmas = default_sigmas(nz) if sigmas is None else jnp.asarray(sigmas, jnp.float32)
  if sigmas.ndim != 1 or sigmas.shape[0] < 1:
    raise ValueError(f"sigmas must be a non-empty 1-D schedule; got shape {sigmas.shape}.")
  step_size = default_step_size(sigmas) if step_size is None else jnp.asarray(step_size, jnp.float32)
  return sigmas, step_size * (sigmas / sigmas[-1]) ** 2


def _anneal(score_fn, y, nz, sigmas, steps, steps_per_level, keep_levels):
  def level(x, sigma_and_step):
    sigma, step = (v.astype(y.dtype) for v in sigma_and_step)

    def one(_, x):
      return nz.denoise_step(x, y, score_fn(x, sigma), step)

    x = lax.fori_loop(0, int(steps_per_level), one, x)
    return x, (x if keep_levels else None)

  return lax.scan(level, y, (sigmas, steps))


def annealed(score_fn: ScoreFn, y: jax.Array, nz: noise_lib.Noise, sigmas=None, step_size=None,
             steps_per_level: int = DEFAULT_STEPS_PER_LEVEL) -> jax.Array:
  """Annealed MAP denoiser for any noise: ascent on log p_sigma_i(x) + log q(y - x), level by level.

  At level i (sigma_i, step a_i = step_size * sigma_i^2 / sigma_L^2) it applies ``steps_per_level`` times
  ``x <- nz.denoise_step(x, y, score_fn(x, sigma_i), a_i)``: x + a_i (s + (y - x) / sigma^2) for Gaussian,
  x + a_i (s + sign(y - x) / b) for Laplace, clip(x + a_i s, y - lam, y + lam) for uniform noise.

  Args:
    score_fn: noise-conditional score function; it must be trained over every sigma in ``sigmas``.
    y: batch of noisy images.
    nz: the noise that corrupted ``y`` (its likelihood enters every step).
    sigmas: decreasing schedule [L] (default ``default_sigmas(nz)``).
    step_size: base step a, the step at the last level (default ``default_step_size(sigmas)``).
    steps_per_level: T, a Python int >= 1.

  Returns:
    The denoised batch, shaped like ``y``.
  """
  sigmas, steps = _check_annealed_args(nz, sigmas, step_size, steps_per_level)
  x, _ = _anneal(score_fn, y, nz, sigmas, steps, steps_per_level, keep_levels=False)
  return x


def annealed_trajectory(score_fn: ScoreFn, y: jax.Array, nz: noise_lib.Noise, sigmas=None, step_size=None,
                        steps_per_level: int = DEFAULT_STEPS_PER_LEVEL) -> jax.Array:
  """Like ``annealed``, but returns the estimate at the end of every level: [L, *y.shape] (last = annealed)."""
  sigmas, steps = _check_annealed_args(nz, sigmas, step_size, steps_per_level)
  _, levels = _anneal(score_fn, y, nz, sigmas, steps, steps_per_level, keep_levels=True)
  return levels

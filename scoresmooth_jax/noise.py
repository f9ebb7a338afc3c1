"""Noise distributions for randomized smoothing: sampling, likelihood terms and certified radii.

Every distribution is parameterised by ``sigma``, the per-coordinate standard deviation, in the units of
images in [0, 1]. That one number fixes the scale of each family (Gaussian sigma, Laplace b = sigma/sqrt(2),
uniform half-width lam = sqrt(3) sigma), so a single score network trained over a range of sigma serves
all three.

Each distribution promises:
  * ``sample(key, shape, dtype)``: i.i.d. noise, jittable, in any floating dtype;
  * ``denoise_step(x, y, score, step)``: one step of gradient ascent on
    ``log p(x) + log q(y - x)`` given the prior score ``score`` at ``x``; for Gaussian and Laplace noise this
    adds ``step * (score + likelihood_grad(x, y))``, for uniform noise (whose likelihood is flat on a box)
    it projects onto the box instead;
  * ``certified_radius(p_lower)``: the radius (in ``norm``) certified by a smoothed classifier whose top
    class has probability at least ``p_lower``; 0.0 when ``p_lower <= 1/2``. Computed in float64 on the host.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats


def _check_sigma(name: str, sigma) -> float:
  try:
    value = float(sigma)
  except (TypeError, ValueError):
    raise ValueError(f"{name}(sigma={sigma!r}): sigma must be a positive finite number, the per-coordinate "
                     "standard deviation of the noise in [0, 1] image units (e.g. 0.25).") from None
  if not math.isfinite(value) or value <= 0.0:
    raise ValueError(f"{name}(sigma={sigma!r}): sigma must be a positive finite number, the per-coordinate "
                     "standard deviation of the noise in [0, 1] image units (e.g. 0.25).")
  return value


def _wide(dtype):
  """Samplers run in at least float32: JAX's bfloat16/float16 samplers truncate tails and bias the mean (a
  draw built from an 8-bit mantissa); drawing wide and rounding gives correctly rounded samples."""
  return jnp.promote_types(dtype, jnp.float32)


def _check_p_lower(p_lower) -> float:
  value = float(p_lower)
  if not (0.0 <= value <= 1.0):  # also rejects NaN
    raise ValueError(f"p_lower={p_lower!r} is not a probability: pass the lower confidence bound on the "
                     "top class's probability, a number in [0, 1] (see smoothing.clopper_pearson_lower).")
  return value


@dataclasses.dataclass(frozen=True)
class Noise(abc.ABC):
  """Base class: a zero-mean i.i.d. noise with per-coordinate standard deviation ``sigma``."""

  sigma: float
  name: ClassVar[str] = ""
  norm: ClassVar[str] = ""

  def __post_init__(self):
    object.__setattr__(self, "sigma", _check_sigma(type(self).__name__, self.sigma))

  @abc.abstractmethod
  def sample(self, key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    """Draws noise of ``shape`` and floating ``dtype``; the same key gives the same draw."""

  @abc.abstractmethod
  def likelihood_grad(self, x: jax.Array, y: jax.Array) -> jax.Array:
    """grad_x log q(y - x) on the support of q: pulls the estimate ``x`` toward the observation ``y``."""

  def denoise_step(self, x: jax.Array, y: jax.Array, score: jax.Array, step) -> jax.Array:
    """One ascent step on log p(x) + log q(y - x), given ``score`` = grad log p at ``x``."""
    return x + step * (score + self.likelihood_grad(x, y))

  def certified_radius(self, p_lower: float) -> float:
    """Certified radius in ``self.norm`` for a top-class probability lower bound ``p_lower``."""
    p = _check_p_lower(p_lower)
    if p <= 0.5:
      return 0.0
    return float(self._radius(p))

  @abc.abstractmethod
  def _radius(self, p: float) -> float:
    """The radius for 1/2 < p <= 1."""


@dataclasses.dataclass(frozen=True)
class Gaussian(Noise):
  """N(0, sigma^2 I). Certifies l2 radius sigma * Phi^-1(p_lower) (Cohen et al. 2019)."""

  name: ClassVar[str] = "gaussian"
  norm: ClassVar[str] = "l2"

  def sample(self, key, shape, dtype=jnp.float32):
    return (self.sigma * jax.random.normal(key, shape, _wide(dtype))).astype(dtype)

  def likelihood_grad(self, x, y):
    return (y - x) / self.sigma**2

  def _radius(self, p):
    return self.sigma * stats.norm.ppf(p)


@dataclasses.dataclass(frozen=True)
class Laplace(Noise):
  """i.i.d. Laplace(0, b), b = sigma / sqrt(2). Certifies l1 radius -b ln(2 (1 - p_lower)) (Teng et al. 2020)."""

  name: ClassVar[str] = "laplace"
  norm: ClassVar[str] = "l1"

  @property
  def scale(self) -> float:
    """The Laplace scale b, whose variance 2 b^2 equals sigma^2."""
    return self.sigma / math.sqrt(2.0)

  def sample(self, key, shape, dtype=jnp.float32):
    return (self.scale * jax.random.laplace(key, shape, _wide(dtype))).astype(dtype)

  def likelihood_grad(self, x, y):
    return jnp.sign(y - x) / self.scale

  def _radius(self, p):
    # log1p keeps precision when p is close to 1, where 1 - p loses digits.
    return -self.scale * (math.log(2.0) + math.log1p(-p)) if p < 1.0 else math.inf


@dataclasses.dataclass(frozen=True)
class Uniform(Noise):
  """i.i.d. U[-lam, lam], lam = sqrt(3) sigma. Certifies l1 radius 2 lam (p_lower - 1/2) (Yang et al. 2020)."""

  name: ClassVar[str] = "uniform"
  norm: ClassVar[str] = "l1"

  @property
  def half_width(self) -> float:
    """The half-width lam of the box, whose variance lam^2 / 3 equals sigma^2."""
    return math.sqrt(3.0) * self.sigma

  def sample(self, key, shape, dtype=jnp.float32):
    lam = self.half_width
    return jax.random.uniform(key, shape, _wide(dtype), minval=-lam, maxval=lam).astype(dtype)

  def likelihood_grad(self, x, y):
    # Flat inside the box; the box itself is enforced by the projection in denoise_step.
    return jnp.zeros_like(x)

  def denoise_step(self, x, y, score, step):
    # q(y - x) is constant on the box |y - x| <= lam and zero outside: ascend the prior, then project.
    lam = self.half_width
    return jnp.clip(x + step * score, y - lam, y + lam)

  def _radius(self, p):
    return 2.0 * self.half_width * (p - 0.5)


NOISES: dict[str, type[Noise]] = {cls.name: cls for cls in (Gaussian, Laplace, Uniform)}


def make(name: str, sigma: float) -> Noise:
  """Builds a noise by name ("gaussian", "laplace" or "uniform") and sigma."""
  try:
    cls = NOISES[name.lower()]
  except KeyError:
    raise ValueError(f"unknown noise {name!r}: choose one of {sorted(NOISES)}.") from None
  return cls(sigma=sigma)


def convert_radius(radius: float, from_norm: str, to_norm: str, dim: int) -> float:
  """Converts a certified l_p radius into a certified l_q radius in dimension ``dim``.

  For q > p the l_p ball of radius r contains the l_q ball of radius r / d^(1/p - 1/q), so the certificate
  carries over with that radius; for q < p the l_p ball contains the l_q ball of the same radius.
  """
  exponent = {"l1": 1.0, "l2": 2.0, "linf": math.inf}
  if from_norm not in exponent or to_norm not in exponent:
    raise ValueError(f"norms must be among {sorted(exponent)}; got {from_norm!r} -> {to_norm!r}.")
  p, q = exponent[from_norm], exponent[to_norm]
  if q <= p:
    return float(radius)
  return float(radius) / float(np.power(dim, 1.0 / p - (0.0 if q == math.inf else 1.0 / q)))

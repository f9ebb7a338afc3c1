"""Training losses: multi-scale denoising score matching (score networks), noisy cross-entropy (classifiers).

Denoising score matching (paper eq. 16-17, Vincent 2011; Song & Ermon 2019), with lambda(sigma) = sigma^2:

    L(theta) = E_sigma E_x E_z  || sigma * s_theta(x + sigma z; sigma) + z ||^2 / (2 D),   z ~ N(0, I),

where D is the number of pixel values per image. Its minimiser over all functions is the score of the
noisy data, s*(y; sigma) = grad_y log p_sigma(y) = (E[x | y] - y) / sigma^2, for every sigma the sampler
covers. The sigma^2 weight makes every scale contribute O(1): without it the small sigmas, whose target
-z / sigma is huge, would dominate. Dividing by D (a constant, so the minimiser is unchanged) makes values
comparable across resolutions: 0.5 is the loss of the zero score, and lower is better.

sigma is drawn per example, either log-uniformly in [sigma_min, sigma_max] (continuous conditioning) or
uniformly from a geometric set of ``num_scales`` levels (NCSN's discrete schedule).

Noisy cross-entropy (Cohen et al. 2019): cross-entropy of the classifier on x + sigma z, with images kept in
[0, 1] pixel space before normalisation, which is the training that makes a classifier robust under
Gaussian smoothing at that sigma; sigma = 0 is plain training.

Every function here is pure: the same params, batch and key give the same loss.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

# (params, x, sigma) -> score shaped like x; sigma has one entry per example.
ScoreApplyFn = Callable[[Any, jax.Array, jax.Array], jax.Array]
# (variables, x, train) -> (logits, new mutable collections or {}).
ClassifierApplyFn = Callable[[Any, jax.Array, bool], tuple[jax.Array, Any]]


@dataclasses.dataclass(frozen=True)
class SigmaDistribution:
  """Where training draws noise levels: log-uniform in [sigma_min, sigma_max], or a geometric set.

  Attributes:
    sigma_min: smallest noise level (> 0), in [0, 1] image units.
    sigma_max: largest noise level (> sigma_min).
    num_scales: 0 for continuous log-uniform sigma; >= 2 for the geometric set of that many levels.
    focus_min, focus_prob: continuous sigma only. With probability ``focus_prob`` an example's sigma is drawn
      log-uniformly in [focus_min, sigma_max] instead of the whole range. The sigma^2-weighted loss of the
      smallest sigmas is ~20x that of sigma >= 0.3 (the noise there is barely removable), so plain log-uniform
      sampling spends most of the gradient where certification never denoises; focusing keeps the model valid
      down to sigma_min (annealed schedules end there) while giving the certified range more of the training.
  """

  sigma_min: float
  sigma_max: float
  num_scales: int = 0
  focus_min: float = 0.0
  focus_prob: float = 0.0

  def __post_init__(self):
    if not (0.0 < self.sigma_min < self.sigma_max < math.inf):
      raise ValueError(f"sigma_min={self.sigma_min!r}, sigma_max={self.sigma_max!r}: need "
                       "0 < sigma_min < sigma_max (the range of noise levels the score model is trained on).")
    if self.num_scales == 1 or self.num_scales < 0:
      raise ValueError(f"num_scales={self.num_scales!r}: use 0 for continuous log-uniform sigma, or >= 2 "
                       "geometric levels.")
    if not 0.0 <= self.focus_prob <= 1.0:
      raise ValueError(f"focus_prob={self.focus_prob!r} must lie in [0, 1] (0 = plain log-uniform sampling).")
    if self.focus_prob and not (self.num_scales == 0 and self.sigma_min < self.focus_min < self.sigma_max):
      raise ValueError(f"focus_min={self.focus_min!r} with focus_prob={self.focus_prob!r}: focusing needs "
                       f"continuous sigma (num_scales=0, got {self.num_scales}) and sigma_min < focus_min < "
                       f"sigma_max ({self.sigma_min}, {self.sigma_max}).")

  def sample(self, key: jax.Array, num: int) -> jax.Array:
    """``num`` noise levels, float32 [num]."""
    log_min, log_max = math.log(self.sigma_min), math.log(self.sigma_max)
    if self.num_scales:
      levels = jnp.linspace(log_max, log_min, self.num_scales)
      return jnp.exp(levels[jax.random.randint(key, (num,), 0, self.num_scales)])
    if not self.focus_prob:
      return jnp.exp(jax.random.uniform(key, (num,), minval=log_min, maxval=log_max))
    choice_key, key = jax.random.split(key)
    low = jnp.where(jax.random.uniform(choice_key, (num,)) < self.focus_prob, math.log(self.focus_min), log_min)
    return jnp.exp(low + (log_max - low) * jax.random.uniform(key, (num,)))


def dsm_loss_per_example(apply_fn: ScoreApplyFn, params, x: jax.Array, sigma: jax.Array,
                         z: jax.Array) -> jax.Array:
  """The sigma^2-weighted DSM loss of each example for given noise levels and noise draws.

  Args:
    apply_fn: the score model, ``apply_fn(params, y, sigma) -> score``.
    params: model parameters.
    x: clean batch [B, ...].
    sigma: noise levels [B].
    z: standard normal draws shaped like ``x``.

  Returns:
    float32 [B]: || sigma s(x + sigma z; sigma) + z ||^2 / (2 D) per example.
  """
  sigma_b = sigma.reshape((-1,) + (1,) * (x.ndim - 1))
  score = apply_fn(params, x + sigma_b * z, sigma)
  residual = (sigma_b * score + z).astype(jnp.float32)
  return 0.5 * jnp.mean(jnp.square(residual).reshape(x.shape[0], -1), axis=-1)


def get_dsm_loss_fn(apply_fn: ScoreApplyFn, sigmas: SigmaDistribution):
  """Multi-scale denoising score matching, sigma^2-weighted (module docstring).

  Args:
    apply_fn: the score model, ``apply_fn(params, y, sigma) -> score`` with sigma of shape [B].
    sigmas: where the noise levels are drawn from.

  Returns:
    ``loss_fn(params, x, key) -> (loss, aux)``: the batch mean of the per-example loss for a clean batch
    ``x`` in [0, 1]; ``aux`` is ``{"sigma": [B], "loss": [B]}`` for per-scale diagnostics.
  """

  def loss_fn(params, x, key):
    sigma_key, noise_key = jax.random.split(key)
    sigma = sigmas.sample(sigma_key, x.shape[0])
    z = jax.random.normal(noise_key, x.shape, x.dtype)
    per_example = dsm_loss_per_example(apply_fn, params, x, sigma, z)
    return jnp.mean(per_example), {"sigma": sigma, "loss": per_example}

  return loss_fn


def get_score_task_loss_fn(module, sigmas: SigmaDistribution):
  """The score task's training loss in the form ``train_state.get_train_step_fn`` takes.

  Args:
    module: the Flax score network, called as ``module.apply({"params": p}, y, sigma, train=True)`` with a
      "dropout" RNG split off each step's key.
    sigmas: where the noise levels are drawn from.

  Returns:
    ``loss_fn(params, model_state, images, labels, key) -> (loss, (model_state, {}))``: ``get_dsm_loss_fn`` on
    the clean ``images``; labels are ignored and ``model_state`` passes through (score networks keep none).
  """

  def loss_fn(params, model_state, images, labels, key):
    del labels
    key, dropout_key = jax.random.split(key)
    apply = lambda p, x, s: module.apply({"params": p}, x, s, train=True, rngs={"dropout": dropout_key})
    loss, _ = get_dsm_loss_fn(apply, sigmas)(params, images, key)
    return loss, (model_state, {})

  return loss_fn


def get_noisy_cross_entropy_fn(apply_fn: ClassifierApplyFn, noise_sigma: float):
  """Cross-entropy on Gaussian-noise-augmented inputs (Cohen et al.'s training; plain when sigma is 0).

  Args:
    apply_fn: ``apply_fn(variables, x, train) -> (logits, updated mutable collections)`` for images in
      [0, 1]; the caller's closure does input normalisation and BatchNorm bookkeeping.
    noise_sigma: standard deviation of the Gaussian noise added in [0, 1] pixel space (>= 0).

  Returns:
    ``loss_fn(variables, x, labels, key) -> (loss, (updates, accuracy))``, the loss averaged over the
    batch, ``updates`` the new mutable collections (e.g. BatchNorm statistics) from the training pass.
  """
  if not (noise_sigma >= 0.0 and math.isfinite(noise_sigma)):
    raise ValueError(f"noise_sigma={noise_sigma!r} must be a finite number >= 0 (0 for plain training).")

  def loss_fn(variables, x, labels, key):
    if noise_sigma > 0.0:
      x = x + noise_sigma * jax.random.normal(key, x.shape, x.dtype)
    logits, updates = apply_fn(variables, x, True)
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels))
    accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == labels)
    return loss, (updates, accuracy)

  return loss_fn

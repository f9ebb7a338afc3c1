"""ScoreUNet's EDM preconditioning (sigma_data): its formula, its analytic optimum, its argument check."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scoresmooth_jax import models
from scoresmooth_jax.training import losses

KWARGS = dict(channels=8, channel_mults=(1, 2), max_groups=4)
SIGMA_DATA = 0.25


def _init(module, shape=(3, 8, 8, 3)):
  x = jax.random.uniform(jax.random.key(0), shape)
  return module.init(jax.random.key(1), x, jnp.full((shape[0],), 0.5))["params"]


def _zero_output_conv(params):
  """The output conv is the network's last-created Conv_<k> (Flax numbers modules in call order)."""
  last = max((k for k in params if k.startswith("Conv_")), key=lambda k: int(k.split("_")[1]))
  return {**params, last: jax.tree.map(jnp.zeros_like, params[last])}


def test_preconditioning_is_the_stated_wrap_of_the_plain_network():
  """Same parameters: preconditioned s(x) = -(x - .5)/T + sd/(sigma sqrt T) * F, F = sigma * plain(x'),
  where the plain network's input 2x' - 1 equals the preconditioned input (x - .5)/sqrt T, T = sigma^2 + sd^2."""
  plain = models.get_model("score_unet", **KWARGS)
  edm = models.get_model("score_unet", **KWARGS, sigma_data=SIGMA_DATA)
  params = _init(plain)
  x = jax.random.uniform(jax.random.key(2), (3, 8, 8, 3))
  sigma = jnp.array([0.05, 0.25, 1.0])
  sb = sigma[:, None, None, None]
  total = sb ** 2 + SIGMA_DATA ** 2
  x_plain = 0.5 + (x - 0.5) / (2.0 * jnp.sqrt(total))
  f = sb * plain.apply({"params": params}, x_plain, sigma)
  expected = -(x - 0.5) / total + SIGMA_DATA / (sb * jnp.sqrt(total)) * f
  got = edm.apply({"params": params}, x, sigma)
  np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5 * float(jnp.abs(expected).max()))


@pytest.mark.parametrize("sigma", [0.05, 0.25, 1.0])
def test_preconditioned_network_with_zero_output_is_optimal_for_gaussian_pixels(sigma):
  """Pixels iid N(0.5, sd^2): the true score is the Gaussian part alone, whose DSM loss is
  sd^2 / (2 (sigma^2 + sd^2)) in closed form; a zeroed last conv must attain it (Monte Carlo, 4 sigma)."""
  edm = models.get_model("score_unet", **KWARGS, sigma_data=SIGMA_DATA)
  params = _init(edm)
  params = _zero_output_conv(params)
  num = 64
  x = 0.5 + SIGMA_DATA * jax.random.normal(jax.random.key(3), (num, 8, 8, 3))
  z = jax.random.normal(jax.random.key(4), x.shape)
  apply = lambda p, y, s: edm.apply({"params": p}, y, s)
  per_example = losses.dsm_loss_per_example(apply, params, x, jnp.full((num,), sigma), z)
  expected = 0.5 * SIGMA_DATA ** 2 / (sigma ** 2 + SIGMA_DATA ** 2)
  # Each example's loss is a mean of 192 squared normals scaled by 2 * expected: std 2 * expected / sqrt(192 * num).
  tolerance = 4 * 2 * expected / math.sqrt(192 * num)
  assert abs(float(jnp.mean(per_example)) - expected) < tolerance


def test_plain_network_with_zero_output_is_not_that_optimum():
  """The check above can fail: without preconditioning a zeroed last conv is the zero score, loss 1/2, far from
  the Gaussian optimum's 1/4 at sigma = sd (Monte Carlo std of this mean: 0.013)."""
  plain = models.get_model("score_unet", **KWARGS)
  params = _init(plain)
  params = _zero_output_conv(params)
  x = 0.5 + SIGMA_DATA * jax.random.normal(jax.random.key(3), (16, 8, 8, 3))
  z = jax.random.normal(jax.random.key(4), x.shape)
  apply = lambda p, y, s: plain.apply({"params": p}, y, s)
  loss = float(jnp.mean(losses.dsm_loss_per_example(apply, params, x, jnp.full((16,), 0.25), z)))
  assert abs(loss - 0.5) < 0.06


@pytest.mark.parametrize("bad", [0.0, -0.25])
def test_bad_sigma_data_fails(bad):
  edm = models.get_model("score_unet", **KWARGS, sigma_data=bad)
  with pytest.raises(ValueError, match=rf"sigma_data={bad!r} must be a positive"):
    _init(edm)

"""Losses: the DSM minimiser is the analytic score of Gaussian data; sigma sampling; noisy cross-entropy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from scoresmooth_jax.training import losses


def test_dsm_optimum_is_the_gaussian_score():
  # Data x ~ N(mu, tau^2) per pixel; the noisy marginal is N(mu, tau^2 + sigma^2), whose score is
  # -(y - mu) / (tau^2 + sigma^2). Fit s(y; sigma_k) = a_k y + b_k per level by minimising the DSM loss itself.
  mu, tau = 0.4, 0.2
  dist = losses.SigmaDistribution(0.05, 0.8, num_scales=3)
  levels = np.geomspace(0.8, 0.05, 3)

  def apply_fn(params, y, sigma):
    level = jnp.argmin(jnp.abs(jnp.log(sigma)[:, None] - jnp.log(levels)[None, :]), axis=1)
    a, b = params["a"][level], params["b"][level]
    return a[:, None, None, None] * y + b[:, None, None, None]

  loss_fn = losses.get_dsm_loss_fn(apply_fn, dist)
  x = mu + tau * jax.random.normal(jax.random.key(0), (60000, 2, 2, 1))
  key = jax.random.key(1)  # one fixed sample of (sigma, z): the empirical objective, quadratic in (a, b)
  objective = lambda flat: loss_fn({"a": flat[:3], "b": flat[3:]}, x, key)[0]
  # One Newton step from 0 lands exactly on the minimiser of a quadratic.
  zero = jnp.zeros(6)
  flat = zero - jnp.linalg.solve(jax.jit(jax.hessian(objective))(zero), jax.jit(jax.grad(objective))(zero))
  params = {"a": flat[:3], "b": flat[3:]}
  var = tau**2 + levels**2
  np.testing.assert_allclose(params["a"], -1.0 / var, rtol=0.03)
  np.testing.assert_allclose(params["b"], mu / var, rtol=0.03)
  # At the optimum the per-dimension loss is 0.5 * tau^2 / (tau^2 + sigma^2) on average over the levels.
  expected = np.mean(0.5 * tau**2 / var)
  assert float(loss_fn(params, x, key)[0]) == pytest.approx(expected, rel=0.03)


def test_zero_score_has_loss_one_half():
  loss_fn = losses.get_dsm_loss_fn(lambda p, y, s: jnp.zeros_like(y), losses.SigmaDistribution(0.01, 1.0))
  loss, aux = loss_fn(None, jnp.full((4096, 4, 4, 1), 0.5), jax.random.key(0))
  assert float(loss) == pytest.approx(0.5, rel=0.02)
  assert aux["loss"].shape == (4096,) and aux["sigma"].shape == (4096,)


def test_sigma_sampling_ranges():
  continuous = losses.SigmaDistribution(0.01, 1.0).sample(jax.random.key(0), 20000)
  assert float(continuous.min()) >= 0.01 and float(continuous.max()) <= 1.0
  # log-uniform: the median is the geometric mean of the end points
  assert float(jnp.median(continuous)) == pytest.approx(0.1, rel=0.05)
  discrete = losses.SigmaDistribution(0.01, 1.0, num_scales=3).sample(jax.random.key(1), 3000)
  np.testing.assert_allclose(np.unique(np.asarray(discrete)), [0.01, 0.1, 1.0], rtol=1e-5)
  counts = np.unique(np.asarray(discrete), return_counts=True)[1]
  assert counts.min() > 900


def test_focused_sigma_sampling_is_the_stated_mixture():
  # With prob 1/2 log-uniform on [0.1, 1], else on [0.01, 1]: P(sigma >= 0.1) = 1/2 + 1/2 * 1/2 = 3/4, and
  # P(sigma >= 0.5) = 1/2 * log(2)/log(10) + 1/2 * log(2)/log(100).
  dist = losses.SigmaDistribution(0.01, 1.0, focus_min=0.1, focus_prob=0.5)
  s = np.asarray(dist.sample(jax.random.key(0), 40000))
  assert s.min() >= 0.01 and s.max() <= 1.0
  assert np.mean(s >= 0.1) == pytest.approx(0.75, abs=0.01)
  assert np.mean(s >= 0.5) == pytest.approx(0.5 * np.log(2) / np.log(10) + 0.5 * np.log(2) / np.log(100), abs=0.01)
  np.testing.assert_array_equal(s, np.asarray(dist.sample(jax.random.key(0), 40000)))


@pytest.mark.parametrize("kwargs", [
    dict(sigma_min=0.01, sigma_max=1.0, focus_min=2.0, focus_prob=0.5),
    dict(sigma_min=0.01, sigma_max=1.0, focus_min=0.1, focus_prob=1.5),
    dict(sigma_min=0.01, sigma_max=1.0, num_scales=3, focus_min=0.1, focus_prob=0.5)])
def test_bad_focus_fails(kwargs):
  with pytest.raises(ValueError, match="focus"):
    losses.SigmaDistribution(**kwargs)


@pytest.mark.parametrize("kwargs", [
    dict(sigma_min=0.5, sigma_max=0.5), dict(sigma_min=1.0, sigma_max=0.1), dict(sigma_min=0.0, sigma_max=1.0),
    dict(sigma_min=0.1, sigma_max=1.0, num_scales=1)])
def test_bad_sigma_range_fails(kwargs):
  with pytest.raises(ValueError, match="sigma_min|num_scales"):
    losses.SigmaDistribution(**kwargs)


def test_noisy_cross_entropy():
  w = jnp.asarray(np.random.default_rng(0).normal(size=(16, 3)), jnp.float32)
  apply_fn = lambda variables, x, train: (x.reshape(x.shape[0], -1) @ variables["w"], {})
  x = jnp.asarray(np.random.default_rng(1).uniform(size=(8, 4, 4, 1)), jnp.float32)
  labels = jnp.arange(8) % 3
  plain = losses.get_noisy_cross_entropy_fn(apply_fn, 0.0)
  loss, (_, acc) = plain({"w": w}, x, labels, jax.random.key(0))
  expected = optax.softmax_cross_entropy_with_integer_labels(apply_fn({"w": w}, x, True)[0], labels).mean()
  assert float(loss) == pytest.approx(float(expected), rel=1e-6)
  assert 0.0 <= float(acc) <= 1.0
  noisy = losses.get_noisy_cross_entropy_fn(apply_fn, 0.5)
  a = noisy({"w": w}, x, labels, jax.random.key(0))[0]
  assert float(a) == float(noisy({"w": w}, x, labels, jax.random.key(0))[0])  # same key, same loss
  assert float(a) != pytest.approx(float(loss))  # the noise is really added
  with pytest.raises(ValueError, match="noise_sigma"):
    losses.get_noisy_cross_entropy_fn(apply_fn, -0.1)


def test_dsm_loss_of_exact_score_of_point_mass():
  # All data at c: the noisy score is -(y - c) / sigma^2, so sigma s + z = 0 exactly and the loss is 0.
  c = 0.3
  loss_fn = losses.get_dsm_loss_fn(lambda p, y, s: -(y - c) / s[:, None, None, None] ** 2,
                                   losses.SigmaDistribution(0.01, 1.0))
  assert float(loss_fn(None, jnp.full((64, 3, 3, 2), c), jax.random.key(0))[0]) < 1e-8 * (1 / 0.01**2)
  assert math.isfinite(float(loss_fn(None, jnp.full((64, 3, 3, 2), c), jax.random.key(0))[0]))


def test_the_score_task_loss_is_dsm_with_a_dropout_key_split_off():
  # train.build_task and the benchmark's training row both train through this one function.
  seen = {}

  class Module:  # the score network's apply, recording the dropout key it is given
    def apply(self, variables, y, sigma, train, rngs):
      seen.update(train=train, dropout=rngs["dropout"])
      return variables["params"]["a"] * y

  sigmas = losses.SigmaDistribution(0.1, 1.0)
  images = jax.random.uniform(jax.random.key(1), (4, 3, 3, 1))
  params, state, key = {"a": jnp.float32(-2.0)}, {"anything": 1}, jax.random.key(2)
  loss, (new_state, metrics) = losses.get_score_task_loss_fn(Module(), sigmas)(params, state, images, None, key)
  loss_key, dropout_key = jax.random.split(key)
  expected, _ = losses.get_dsm_loss_fn(lambda p, y, s: p["a"] * y, sigmas)(params, images, loss_key)
  assert float(loss) == pytest.approx(float(expected), rel=1e-6) and new_state is state and metrics == {}
  assert seen["train"] is True and (jax.random.key_data(seen["dropout"]) == jax.random.key_data(dropout_key)).all()

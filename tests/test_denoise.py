"""Denoisers on data ~ N(mu, tau^2 I), whose smoothed score is exact: -(x - mu) / (tau^2 + sigma^2).

For that prior the posterior mean under Gaussian noise and the MAP points under Laplace and uniform noise are
known in closed form, so the denoisers are checked against them, not against themselves.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scoresmooth_jax import denoise, noise

TAU = 0.2
MU = jnp.linspace(0.3, 0.7, 64).reshape(4, 4, 4, 1)  # a "batch" of 4 images of 4x4x1


def gaussian_prior_score(x, sigma):
  sigma = jnp.asarray(sigma)
  if sigma.ndim == 1:
    sigma = sigma.reshape((-1,) + (1,) * (x.ndim - 1))
  return -(x - MU) / (TAU**2 + sigma**2)


def noisy(nz, seed=0):
  return MU + nz.sample(jax.random.key(seed), MU.shape)


def test_one_step_is_the_posterior_mean():
  for sigma in [0.12, 0.25, 0.5, 1.0]:
    y = noisy(noise.Gaussian(sigma))
    posterior_mean = (TAU**2 * y + sigma**2 * MU) / (TAU**2 + sigma**2)
    np.testing.assert_allclose(denoise.one_step(gaussian_prior_score, y, sigma), posterior_mean, atol=1e-6)


def test_one_step_takes_one_sigma_per_example():
  sigmas = jnp.asarray([0.1, 0.2, 0.4, 0.8])
  y = noisy(noise.Gaussian(0.3))
  out = denoise.one_step(gaussian_prior_score, y, sigmas)
  for i, s in enumerate(sigmas):
    np.testing.assert_allclose(out[i], (TAU**2 * y[i] + s**2 * MU[i]) / (TAU**2 + s**2), atol=1e-6)
  with pytest.raises(ValueError, match="one sigma per example"):
    denoise.one_step(gaussian_prior_score, y, jnp.ones(3))


# The annealed ascent converges to the MAP point of p_{sigma_L}(x) q(y - x), whose prior is N(mu, tau_L^2)
# with tau_L^2 = tau^2 + sigma_L^2. Those closed forms are the targets; they differ from the sigma_L -> 0 MAP
# by O(sigma_L^2 / b) at most (0.0006 here), checked separately. Schedule: geometric from the noise's sigma
# to sigma_L = 0.02, step a_i = 0.5 sigma_i^2, T = 600 steps per level: the slowest contraction, at the last
# level, is 1 - 0.5 sigma_L^2 (1 / tau_L^2 + 1 / sigma^2), so 600 steps leave < 1e-3 of the last level's
# (already small) displacement; the Laplace sign term oscillates by up to a_L / b (1.1e-3 at sigma = 0.25)
# around its optimum. Measured worst errors: 4e-5 (Gaussian), 1.5e-3 (Laplace 0.25), 2e-7 (uniform).
SIGMA_L = 0.02
TAU_L2 = TAU**2 + SIGMA_L**2
TOL = 2e-3


def run_annealed(nz, y):
  sigmas = denoise.geometric_sigmas(nz.sigma, SIGMA_L, 10)
  return jax.jit(lambda y: denoise.annealed(gaussian_prior_score, y, nz, sigmas, 0.5 * SIGMA_L**2, 600))(y)


def map_point(nz, y, tau2):
  if isinstance(nz, noise.Gaussian):
    return (tau2 * y + nz.sigma**2 * MU) / (tau2 + nz.sigma**2)
  if isinstance(nz, noise.Laplace):
    bound = tau2 / nz.scale
    return MU + jnp.clip(y - MU, -bound, bound)
  return jnp.clip(MU, y - nz.half_width, y + nz.half_width)


@pytest.mark.parametrize("nz", [noise.Gaussian(0.5), noise.Laplace(0.25), noise.Laplace(0.5),
                                noise.Uniform(0.12), noise.Uniform(0.5)], ids=str)
def test_annealed_lands_on_the_closed_form_map_point(nz):
  # Observations at offsets up to +-1 from the prior mean, so every clip branch is exercised.
  offsets = jax.random.permutation(jax.random.key(0), jnp.linspace(-1.0, 1.0, MU.size)).reshape(MU.shape)
  y = MU + offsets
  out = run_annealed(nz, y)
  np.testing.assert_allclose(out, map_point(nz, y, TAU_L2), atol=TOL)
  np.testing.assert_allclose(out, map_point(nz, y, TAU**2), atol=TOL + SIGMA_L**2 / (nz.sigma / 2**0.5))
  # The data term matters: the result is neither the prior mean nor the observation (both clip branches).
  assert float(jnp.abs(out - MU).max()) > 0.02 and float(jnp.abs(out - y).max()) > 0.02


def test_annealed_with_a_flipped_likelihood_sign_misses():
  # Guards the test itself: the sign error that the seed paper prints lands far from the MAP point.
  class FlippedGaussian(noise.Gaussian):
    def likelihood_grad(self, x, y):
      return -super().likelihood_grad(x, y)

  nz = noise.Gaussian(0.5)
  y = noisy(nz)
  flipped = run_annealed(FlippedGaussian(0.5), y)
  assert not np.allclose(flipped, map_point(nz, y, TAU_L2), atol=0.05)


def test_annealed_is_one_program_whatever_levels_and_steps():
  calls = []

  def counting_score(x, sigma):
    calls.append(1)  # runs once per trace, not once per step
    return gaussian_prior_score(x, sigma)

  nz = noise.Gaussian(0.25)
  y = noisy(nz)
  for levels, steps in [(1, 1), (3, 2), (25, 40)]:
    calls.clear()
    sigmas = denoise.geometric_sigmas(0.25, 0.01, levels)
    jax.make_jaxpr(lambda y: denoise.annealed(counting_score, y, nz, sigmas, 1e-4, steps))(y)
    assert len(calls) == 1, (levels, steps)


def test_annealed_works_under_vmap_and_jit():
  nz = noise.Laplace(0.25)
  ys = jnp.stack([noisy(nz, seed) for seed in range(3)])  # [3, 4, 4, 4, 1]
  one = lambda y: denoise.annealed(gaussian_prior_score, y, nz, steps_per_level=2)
  batched = jax.jit(jax.vmap(one))(ys)
  for i in range(3):
    np.testing.assert_allclose(batched[i], one(ys[i]), atol=1e-5)


def test_trajectory_ends_at_the_annealed_result():
  nz = noise.Gaussian(0.5)
  y = noisy(nz)
  levels = denoise.annealed_trajectory(gaussian_prior_score, y, nz)
  assert levels.shape == (denoise.DEFAULT_NUM_LEVELS, *y.shape)
  np.testing.assert_allclose(levels[-1], denoise.annealed(gaussian_prior_score, y, nz), atol=1e-6)


def test_annealed_uniform_stays_in_the_noise_box():
  nz = noise.Uniform(0.5)
  y = noisy(nz)
  out = denoise.annealed(lambda x, s: 100.0 * jnp.ones_like(x), y, nz)  # a score that pushes hard
  assert float(jnp.max(jnp.abs(out - y))) <= nz.half_width * (1 + 1e-6)


def test_geometric_sigmas_and_defaults():
  s = denoise.geometric_sigmas(1.0, 0.01, 5)
  np.testing.assert_allclose(s, [1.0, 0.1**0.5, 0.1, 0.1**1.5, 0.01], rtol=1e-6)
  np.testing.assert_allclose(denoise.geometric_sigmas(0.5, 0.01, 1), [0.01])
  d = denoise.default_sigmas(noise.Laplace(0.5))
  assert d.shape == (denoise.DEFAULT_NUM_LEVELS,)
  assert float(d[0]) == pytest.approx(0.5) and float(d[-1]) == pytest.approx(denoise.DEFAULT_SIGMA_MIN)
  assert float(denoise.default_step_size(d)) == pytest.approx(denoise.DEFAULT_RELATIVE_STEP * 0.01**2)
  for bad in [(0.01, 0.5, 3), (0.5, 0.0, 3), (0.5, 0.01, 0), (float("inf"), 0.01, 3)]:
    with pytest.raises(ValueError):
      denoise.geometric_sigmas(*bad)
  with pytest.raises(ValueError, match="steps_per_level"):
    denoise.annealed(gaussian_prior_score, MU, noise.Gaussian(0.25), steps_per_level=0)


def test_default_schedule_denoises_gaussian_prior():
  # With the documented defaults (10 levels, T = 3, a_i = 0.5 sigma_i^2) the annealed denoiser removes most
  # of the distance to the MAP point that the noise put there.
  nz = noise.Gaussian(0.5)
  y = noisy(nz)
  target = map_point(nz, y, TAU**2)
  out = denoise.annealed(gaussian_prior_score, y, nz)
  assert float(jnp.linalg.norm(out - target)) < 0.2 * float(jnp.linalg.norm(y - target))

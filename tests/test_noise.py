"""Noise distributions: closed-form radii, likelihood gradients against autodiff, sample moments and support."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from scoresmooth_jax import noise, smoothing

ALL = [noise.Gaussian, noise.Laplace, noise.Uniform]


@pytest.mark.parametrize("sigma", [0.12, 0.25, 0.5, 1.0])
def test_radius_closed_forms(sigma):
  for p in [0.5000001, 0.6, 0.75, 0.9, 0.99, 0.999309]:
    assert noise.Gaussian(sigma).certified_radius(p) == pytest.approx(sigma * stats.norm.ppf(p), rel=1e-12)
    b = sigma / math.sqrt(2)
    assert noise.Laplace(sigma).certified_radius(p) == pytest.approx(-b * math.log(2 * (1 - p)), rel=1e-9)
    lam = math.sqrt(3) * sigma
    assert noise.Uniform(sigma).certified_radius(p) == pytest.approx(2 * lam * (p - 0.5), rel=1e-12)


def test_maximum_radii_at_n_10000_alpha_0001():
  p_lower = smoothing.clopper_pearson_lower(10_000, 10_000, 0.001)
  assert p_lower == pytest.approx(0.001 ** (1 / 10_000), rel=1e-12)
  assert round(p_lower, 6) == 0.999309
  for cls, expected in [(noise.Gaussian, 3.199), (noise.Laplace, 4.656), (noise.Uniform, 1.730)]:
    for sigma in [0.25, 1.0]:
      assert cls(sigma).certified_radius(p_lower) / sigma == pytest.approx(expected, abs=6e-4)


@pytest.mark.parametrize("cls", ALL)
def test_no_radius_at_or_below_one_half_and_bad_p_rejected(cls):
  nz = cls(0.5)
  assert nz.certified_radius(0.5) == 0.0
  assert nz.certified_radius(0.1) == 0.0
  assert nz.certified_radius(0.0) == 0.0
  for bad in [-0.1, 1.5, float("nan")]:
    with pytest.raises(ValueError, match="p_lower"):
      nz.certified_radius(bad)


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("bad", [0.0, -0.25, float("nan"), float("inf"), "abc", None])
def test_invalid_sigma_names_the_value(cls, bad):
  with pytest.raises(ValueError, match=r"sigma=.*positive finite"):
    cls(bad)


def test_make_and_norms():
  assert noise.make("Gaussian", 0.25) == noise.Gaussian(0.25)
  assert [noise.make(n, 1.0).norm for n in ["gaussian", "laplace", "uniform"]] == ["l2", "l1", "l1"]
  with pytest.raises(ValueError, match="unknown noise 'cauchy'"):
    noise.make("cauchy", 0.5)


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_samples_have_dtype_mean_std_and_support(cls, dtype):
  sigma = 0.5
  nz = cls(sigma)
  draw = jax.jit(nz.sample, static_argnums=(1, 2))(jax.random.key(0), (200_000,), dtype)
  assert draw.dtype == dtype and draw.shape == (200_000,)
  values = np.asarray(draw, np.float64)
  assert abs(values.mean()) < 5 * sigma / math.sqrt(values.size) 
  assert values.std() == pytest.approx(sigma, rel=0.01)
  if cls is noise.Uniform:
    assert np.abs(values).max() <= nz.half_width * (1 + 1e-2)
    assert np.abs(values).max() > 0.99 * nz.half_width
  if cls is noise.Laplace:
    assert np.abs(values).mean() == pytest.approx(nz.scale, rel=0.01)  # E|X| = b
  if cls is noise.Gaussian:
    assert stats.kurtosis(values) == pytest.approx(0.0, abs=0.05)  # tails intact in every dtype


@pytest.mark.parametrize("cls", ALL)
def test_same_key_same_draw_other_key_other_draw(cls):
  nz = cls(0.3)
  a = nz.sample(jax.random.key(3), (64,))
  assert np.array_equal(a, nz.sample(jax.random.key(3), (64,)))
  assert not np.array_equal(a, nz.sample(jax.random.key(4), (64,)))


def _log_q(nz, u):
  """Log density of the noise at u, up to a constant, written from the textbook forms."""
  if isinstance(nz, noise.Gaussian):
    return -jnp.sum(u**2) / (2 * nz.sigma**2)
  return -jnp.sum(jnp.abs(u)) / nz.scale


@pytest.mark.parametrize("cls", [noise.Gaussian, noise.Laplace])
def test_likelihood_gradient_is_autodiff_of_log_density(cls):
  nz = cls(0.3)
  y = jax.random.uniform(jax.random.key(0), (32,))
  x = jax.random.uniform(jax.random.key(1), (32,))
  expected = jax.grad(lambda x: _log_q(nz, y - x))(x)
  np.testing.assert_allclose(nz.likelihood_grad(x, y), expected, rtol=1e-6)
  # It must pull x toward y: one small step reduces the distance.
  stepped = nz.denoise_step(x, y, jnp.zeros_like(x), 1e-3)
  assert jnp.sum(jnp.abs(stepped - y)) < jnp.sum(jnp.abs(x - y))


def test_uniform_step_projects_onto_the_box():
  nz = noise.Uniform(0.1)
  y = jnp.full((5,), 0.5)
  x = y
  score = jnp.asarray([-100.0, -1.0, 0.0, 1.0, 100.0])
  out = nz.denoise_step(x, y, score, 0.01)
  lam = nz.half_width
  np.testing.assert_allclose(out, [0.5 - lam, 0.49, 0.5, 0.51, 0.5 + lam], rtol=1e-6)


def test_convert_radius():
  assert noise.convert_radius(1.0, "l1", "l2", 100) == pytest.approx(1 / 10)
  assert noise.convert_radius(1.0, "l2", "linf", 100) == pytest.approx(1 / 10)
  assert noise.convert_radius(1.0, "l2", "l1", 100) == 1.0
  with pytest.raises(ValueError):
    noise.convert_radius(1.0, "l3", "l1", 4)

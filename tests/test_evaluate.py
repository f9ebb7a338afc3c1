"""Evaluation statistics are summed in float64 on the host (closed forms, many batches)."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from scoresmooth_jax.training import evaluate

# Many small batches: adding 3,000 batch sums in float32 on the device was 1.3e-6 dB off the float64 closed form
# below (1.3e-7 dB with batches of 1,000); the float64 host sum of per-image float32 sums is 3e-9 dB off.
_IMAGES = np.random.default_rng(0).uniform(size=(3000, 2, 2, 1)).astype(np.float32)
_TARGET = 0.25  # exact in float32, like sigma 0.5


def _pulls_to_target(y, sigma):
  # one_step(y) = y + sigma^2 score = _TARGET (sigma 0.5: its square and the division are exact in float32)
  return (_TARGET - y) / sigma**2


def test_denoising_psnr_matches_a_float64_closed_form_over_many_batches():
  table = evaluate.denoising_psnr(_pulls_to_target, _IMAGES, [0.5], jax.random.key(0), batch_size=1,
                                  annealed=False)
  expected = evaluate.psnr(float(np.mean(np.square(_TARGET - _IMAGES.astype(np.float64)))))
  assert math.isclose(table[0.5]["one_step"], expected, rel_tol=0, abs_tol=2e-8)


def test_run_sums_batches_in_float64_on_the_host():
  eval_fn = jax.jit(lambda variables, images, key: {"sq": jnp.sum(jnp.square(images)), "count": images.shape[0]})
  batches = [(_IMAGES[i:i + 1],) for i in range(len(_IMAGES))]
  sums = evaluate.run(eval_fn, None, batches, jax.random.key(0))
  assert sums["count"] == len(_IMAGES)
  assert isinstance(sums["sq"], float)
  # float32 sums of 4 squares, added in float64: 1e-8 relative; added in float32 on the device: 3e-7
  assert math.isclose(sums["sq"], float(np.sum(np.square(_IMAGES.astype(np.float64)))), rel_tol=1e-8)

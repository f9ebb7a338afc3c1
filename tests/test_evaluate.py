"""Evaluation statistics are summed in float64 on the host (closed forms, many batches)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


def test_per_image_psnr_is_the_mean_of_each_images_closed_form_and_not_the_pooled_figure():
  table = evaluate.denoising_psnr(_pulls_to_target, _IMAGES, [0.5], jax.random.key(0), batch_size=3,
                                  annealed=False, per_image=True)[0.5]
  per_image_mse = np.mean(np.square(_TARGET - _IMAGES.astype(np.float64)).reshape(len(_IMAGES), -1), axis=-1)
  expected = float(np.mean(-10.0 * np.log10(per_image_mse)))
  assert math.isclose(table["one_step/per_image"], expected, rel_tol=0, abs_tol=2e-7)
  # Jensen: above the pooled figure, by a margin that needs the images' errors to differ (they do here)
  assert table["one_step/per_image"] > table["one_step"] + 0.01
  assert set(table) == {"noisy", "one_step", "noisy/per_image", "one_step/per_image"}


def test_run_sums_batches_in_float64_on_the_host():
  eval_fn = jax.jit(lambda variables, images, key: {"sq": jnp.sum(jnp.square(images)), "count": images.shape[0]})
  batches = [(_IMAGES[i:i + 1],) for i in range(len(_IMAGES))]
  sums = evaluate.run(eval_fn, None, batches, jax.random.key(0))
  assert sums["count"] == len(_IMAGES)
  assert isinstance(sums["sq"], float)
  # float32 sums of 4 squares, added in float64: 1e-8 relative; added in float32 on the device: 3e-7
  assert math.isclose(sums["sq"], float(np.sum(np.square(_IMAGES.astype(np.float64)))), rel_tol=1e-8)


def _textured(seed, shape=(2, 16, 16, 3)):
  return np.random.default_rng(seed).integers(0, 256, size=shape).astype(np.float32) / 255.0


def test_jpeg_roundtrip_keeps_a_flat_image_and_loses_more_detail_at_lower_quality():
  flat = np.full((1, 16, 16, 3), 0.5, np.float32)  # only the DC coefficient: survives any quality
  np.testing.assert_allclose(evaluate.jpeg_roundtrip(flat), flat, atol=1.5 / 255)

  images = _textured(0)
  db = {q: evaluate.psnr(float(np.mean(np.square(evaluate.jpeg_roundtrip(images, q) - images.astype(np.float64)))))
        for q in (25, 75, 95)}
  assert db[25] < db[75] < db[95] < 40  # lossy at every quality, less so as it rises
  out = evaluate.jpeg_roundtrip(images)
  assert out.dtype == np.float32 and out.shape == images.shape and 0 <= out.min() and out.max() <= 1
  np.testing.assert_array_equal(out, evaluate.jpeg_roundtrip(images))  # deterministic


def test_jpeg_roundtrip_rejects_what_jpeg_cannot_hold():
  with pytest.raises(ValueError, match=r"\[N, H, W, 3\].*\(2, 16, 16, 1\)"):
    evaluate.jpeg_roundtrip(np.zeros((2, 16, 16, 1), np.float32))
  with pytest.raises(ValueError, match="1..95.*got 100"):
    evaluate.jpeg_roundtrip(_textured(1), quality=100)
  with pytest.raises(ValueError, match=r"in \[0, 1\].*255"):
    evaluate.jpeg_roundtrip(_textured(1) * 255)

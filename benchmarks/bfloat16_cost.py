"""What computing a score network in bfloat16 costs: denoising PSNR and changed predictions against float32.

Both measurements put the float32 and the bfloat16 network (``compute_dtype.with_compute_dtype``: the same
parameters, only the compute dtype differs) on the very same noisy images, so every difference comes from the
arithmetic, none from the noise.

Promises:
  * ``psnr_cost(score_fn, images, sigmas, key)``: per sigma, the one-step (Tweedie) PSNR of both precisions as
    ``training.evaluate.denoising_psnr`` computes it (pooled over all pixels of all images, no clipping, the same
    noise for both) and their difference in dB.
  * ``prediction_changes(score_fn, classifier, images, labels, sigmas, draws_per_image, key)``: per sigma, the
    share of noisy draws whose predicted label differs from the all-float32 pipeline's when the denoiser runs in
    bfloat16 (classifier float32), and when both run in bfloat16; each variant's accuracy on the draws beside it.
    The pipeline is the certification job's one-step base classifier: f(clip(y + sigma^2 s(y; sigma), 0, 1)).
    Counts are integers summed on the host; shares are computed in float64.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from scoresmooth_jax import denoise, noise as noise_lib
from scoresmooth_jax.modelio import compute_dtype
from scoresmooth_jax.training import evaluate

VARIANTS = ("float32", "bfloat16_denoiser", "bfloat16_both")


def psnr_cost(score_fn, images: np.ndarray, sigmas, key: jax.Array, batch_size: int = 128) -> dict:
  """{sigma: {"float32": dB, "bfloat16": dB, "difference_db": bfloat16 - float32}} of the one-step denoiser."""
  common = dict(batch_size=batch_size, annealed=False)
  f32 = evaluate.denoising_psnr(compute_dtype.with_compute_dtype(score_fn, "float32"), images, sigmas, key, **common)
  bf16 = evaluate.denoising_psnr(compute_dtype.with_compute_dtype(score_fn, "bfloat16"), images, sigmas, key,
                                 **common)
  return {sigma: {"float32": f32[sigma]["one_step"], "bfloat16": bf16[sigma]["one_step"],
                  "difference_db": bf16[sigma]["one_step"] - f32[sigma]["one_step"]} for sigma in f32}


def prediction_changes(score_fn, classifier, images: np.ndarray, labels: np.ndarray, sigmas,
                       draws_per_image: int, key: jax.Array, batch_size: int = 256) -> dict:
  """Per sigma, how many draws change label under bfloat16 (module docstring).

  Args:
    score_fn: a score function any loader returns (its float32 and bfloat16 versions are built here).
    classifier: a ``modelio.classifier.Classifier`` (float32; its bfloat16 copy is built here).
    images: [N, H, W, C] in [0, 1]; labels: [N] ints, for the accuracies.
    sigmas: Gaussian noise levels.
    draws_per_image: noisy copies of each image per sigma.
    key: the draws of sigma i, batch b come from fold_in(fold_in(key, i), b).
    batch_size: draws per batch (rounded down to whole images, at least one image).

  Returns:
    {sigma: {"draws": int, "changed": {variant: int}, "changed_share": {variant: float},
             "accuracy": {variant: float}}} with variants "bfloat16_denoiser" and "bfloat16_both" (accuracy also
    for "float32").
  """
  if draws_per_image < 1:
    raise ValueError(f"draws_per_image={draws_per_image!r} must be >= 1.")
  images = np.asarray(images, np.float32)
  labels = np.asarray(labels, np.int64)
  score32 = compute_dtype.with_compute_dtype(score_fn, "float32")
  score16 = compute_dtype.with_compute_dtype(score_fn, "bfloat16")
  clf16 = dataclasses.replace(classifier, compute_dtype=jnp.bfloat16)
  per_batch = max(1, batch_size // draws_per_image)
  out = {}
  for i, sigma in enumerate(sigmas):
    nz = noise_lib.Gaussian(sigma=float(sigma))
    sigma_key = jax.random.fold_in(key, i)

    @jax.jit
    def predict(x, batch_key, nz=nz):
      x = jnp.repeat(x, draws_per_image, axis=0)
      y = x + nz.sample(batch_key, x.shape, x.dtype)
      denoised = lambda fn: jnp.clip(denoise.one_step(fn, y, nz.sigma), 0.0, 1.0)
      d32, d16 = denoised(score32), denoised(score16)
      return {"float32": jnp.argmax(classifier(d32), -1), "bfloat16_denoiser": jnp.argmax(classifier(d16), -1),
              "bfloat16_both": jnp.argmax(clf16(d16), -1)}

    changed = {v: 0 for v in VARIANTS[1:]}
    correct = {v: 0 for v in VARIANTS}
    draws = 0
    for b, start in enumerate(range(0, len(images), per_batch)):
      got = jax.device_get(predict(jnp.asarray(images[start:start + per_batch]), jax.random.fold_in(sigma_key, b)))
      truth = np.repeat(labels[start:start + per_batch], draws_per_image)
      draws += truth.size
      for variant in VARIANTS:
        correct[variant] += int(np.sum(got[variant] == truth))
        if variant != "float32":
          changed[variant] += int(np.sum(got[variant] != got["float32"]))
    out[float(sigma)] = {"draws": draws, "changed": changed,
                         "changed_share": {v: c / draws for v, c in changed.items()},
                         "accuracy": {v: c / draws for v, c in correct.items()}}
  return out

"""Periodic evaluation during training, on held-out images (mask-weighted, so padded batches do not count).

Score task:
  * ``psnr/noisy/<sigma>`` and ``psnr/denoised/<sigma>``: PSNR (peak 1.0) of y = x + sigma z and of the
    one-step (Tweedie) denoiser ``denoise.one_step`` applied to y, over all pixels of all images, no
    clipping; ``psnr/gain/<sigma>`` is their difference. This is the number the done-when criteria use.
  * ``loss/bucket_<i>``: the DSM loss of ``losses.py`` with sigma log-uniform within bucket i of
    [sigma_min, sigma_max] split log-uniformly, showing which scales are learned worst.
Classifier task: ``accuracy/clean`` and ``accuracy/noise_<sigma>`` under Gaussian noise in pixel space.

The noise of evaluation is a fixed function of (key, batch index), so successive evaluations of a run are
comparable.
"""

from __future__ import annotations

import math
import pathlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from scoresmooth_jax import denoise
from scoresmooth_jax.training import losses


def _key(sigma: float) -> str:
  return f"{sigma:g}"


def get_score_eval_fn(apply_fn: losses.ScoreApplyFn, eval_sigmas, sigma_min: float, sigma_max: float,
                      num_buckets: int):
  """Per-batch sums for score-model evaluation.

  Args:
    apply_fn: ``apply_fn(params, x, sigma [B]) -> score``.
    eval_sigmas: Gaussian noise levels for the PSNR of the one-step denoiser.
    sigma_min, sigma_max: the trained range, split into ``num_buckets`` log-uniform buckets for the loss.
    num_buckets: number of loss buckets (>= 1).

  Returns:
    ``eval_batch(params, images, labels, mask, key) -> dict of scalar sums`` (labels unused); pass the
    summed dicts to ``finalize_score``.
  """
  edges = np.geomspace(sigma_min, sigma_max, num_buckets + 1)

  def eval_batch(params, images, labels, mask, key):
    del labels  # unconditional model
    score_fn = lambda x, sigma: apply_fn(params, x, jnp.broadcast_to(sigma, (x.shape[0],)))
    per_image = lambda err: jnp.sum(jnp.square(err).reshape(err.shape[0], -1), axis=-1)
    sums = {"count": jnp.sum(mask)}
    for i, sigma in enumerate(eval_sigmas):
      y = images + sigma * jax.random.normal(jax.random.fold_in(key, i), images.shape, images.dtype)
      clean = denoise.one_step(score_fn, y, sigma)
      sums[f"sq_err/noisy/{_key(sigma)}"] = jnp.sum(mask * per_image(y - images))
      sums[f"sq_err/denoised/{_key(sigma)}"] = jnp.sum(mask * per_image(clean - images))
    for b in range(num_buckets):
      sigma_key, noise_key = jax.random.split(jax.random.fold_in(key, 1000 + b))
      log_sigma = jax.random.uniform(sigma_key, (images.shape[0],), minval=math.log(edges[b]),
                                     maxval=math.log(edges[b + 1]))
      z = jax.random.normal(noise_key, images.shape, images.dtype)
      loss = losses.dsm_loss_per_example(apply_fn, params, images, jnp.exp(log_sigma), z)
      sums[f"loss/bucket_{b}"] = jnp.sum(mask * loss)
    return sums

  return eval_batch


def finalize_score(sums: dict, pixels_per_image: int, eval_sigmas, sigma_min: float, sigma_max: float,
                   num_buckets: int) -> dict:
  """PSNRs and bucket losses from summed ``eval_batch`` outputs."""
  count = float(sums["count"])
  out = {"examples": int(count)}  # so that a curve read back from metrics.jsonl says what it was measured on
  for sigma in eval_sigmas:
    for kind in ("noisy", "denoised"):
      mse = float(sums[f"sq_err/{kind}/{_key(sigma)}"]) / (count * pixels_per_image)
      out[f"psnr/{kind}/{_key(sigma)}"] = psnr(mse)
    out[f"psnr/gain/{_key(sigma)}"] = out[f"psnr/denoised/{_key(sigma)}"] - out[f"psnr/noisy/{_key(sigma)}"]
  edges = np.geomspace(sigma_min, sigma_max, num_buckets + 1)
  for b in range(num_buckets):
    out[f"loss/bucket_{b}"] = float(sums[f"loss/bucket_{b}"]) / count
    out[f"loss/bucket_{b}_range"] = [float(edges[b]), float(edges[b + 1])]
  return out


def get_classifier_eval_fn(apply_fn: Callable, noise_sigmas):
  """Per-batch correct counts of a classifier, clean and under Gaussian noise.

  Args:
    apply_fn: ``apply_fn(variables, x in [0, 1]) -> logits`` in inference mode (normalisation inside).
    noise_sigmas: Gaussian noise levels (pixel space) to also evaluate at.

  Returns:
    ``eval_batch(variables, images, labels, mask, key) -> dict of scalar sums``; see ``finalize_classifier``.
  """

  def eval_batch(variables, images, labels, mask, key):
    hits = lambda x: jnp.sum(mask * (jnp.argmax(apply_fn(variables, x), axis=-1) == labels))
    sums = {"count": jnp.sum(mask), "correct/clean": hits(images)}
    for i, sigma in enumerate(noise_sigmas):
      noise = sigma * jax.random.normal(jax.random.fold_in(key, i), images.shape, images.dtype)
      sums[f"correct/noise_{_key(sigma)}"] = hits(images + noise)
    return sums

  return eval_batch


def finalize_classifier(sums: dict) -> dict:
  count = float(sums["count"])
  return {"accuracy/" + k.split("/", 1)[1]: float(v) / count for k, v in sums.items() if k.startswith("correct/")}


def run(eval_batch_jit, variables, batches, key) -> dict:
  """Sums ``eval_batch_jit(variables, *batch, fold_in(key, i))`` over the batches, in float64 on the host.

  The per-batch sums stay on the device until every batch is dispatched (the host never waits in the loop),
  then are fetched together and added exactly (``math.fsum``): statistics are float64, not float32 sums.
  """
  per_batch = [eval_batch_jit(variables, *batch, jax.random.fold_in(key, i)) for i, batch in enumerate(batches)]
  if not per_batch:
    raise ValueError("evaluation got no batches: the evaluation split is empty.")
  return host_sum(per_batch)


def host_sum(per_batch: list) -> dict:
  """``{name: float}``, the exact float64 sum over a list of dicts of device arrays (every element counts)."""
  fetched = jax.device_get(per_batch)
  return {name: math.fsum(np.concatenate([np.asarray(part[name], np.float64).ravel() for part in fetched]))
          for name in fetched[0]}


def psnr(mse: float) -> float:
  """PSNR in dB of a mean squared error on [0, 1] images (peak 1.0)."""
  return -10.0 * math.log10(mse)


def denoising_psnr(score_fn, images: np.ndarray, sigmas, key, *, batch_size: int = 128,
                   annealed: bool = True, per_image: bool = False) -> dict:
  """PSNR (dB, peak 1.0, no clipping) of noisy, one-step and annealed-denoised images under Gaussian noise.

  The numbers of a model card: ``y = x + sigma z`` for every image in ``images`` [N, H, W, C] (in [0, 1]) at
  each sigma, then ``denoise.one_step`` and ``denoise.annealed`` with the library's default schedule. The noise
  of batch b at sigma i is drawn from ``fold_in(fold_in(key, i), b)``, so the figures are a function of the key.

  The PSNR is that of the mean squared error over all images (pooled), the figure of this package's cards.
  Denoising papers (BM3D, DnCNN, FFDNet tables) average each image's PSNR instead; that mean is never below
  the pooled figure (Jensen: -log is convex) and is higher the more the images' errors differ. ``per_image``
  adds it, so results can be set beside those papers'.

  Returns:
    ``{sigma: {"noisy": dB, "one_step": dB, "annealed": dB (when annealed)}}``, with ``per_image`` also
    ``"<kind>/per_image"``: the mean over images of each image's PSNR, for each kind.
  """
  from scoresmooth_jax import noise as noise_lib

  out = {}
  for i, sigma in enumerate(sigmas):
    nz = noise_lib.Gaussian(sigma=float(sigma))
    sigma_key = jax.random.fold_in(key, i)

    @jax.jit
    def sq_errors(x, batch_key, nz=nz):
      y = x + nz.sample(batch_key, x.shape, x.dtype)
      outputs = {"noisy": y, "one_step": denoise.one_step(score_fn, y, nz.sigma)}
      if annealed:
        outputs["annealed"] = denoise.annealed(score_fn, y, nz)
      # per image: the batch and the image count are summed in float64 on the host
      return {k: jnp.sum(jnp.square(v - x).reshape(x.shape[0], -1), axis=-1) for k, v in outputs.items()}

    # one fetch of every batch's per-image errors serves both the pooled sum and the per-image PSNRs
    fetched = jax.device_get([sq_errors(jnp.asarray(images[start:start + batch_size]),
                                        jax.random.fold_in(sigma_key, b))
                              for b, start in enumerate(range(0, len(images), batch_size))])
    pixels = float(np.prod(images.shape))
    out[float(sigma)] = {k: psnr(v / pixels) for k, v in host_sum(fetched).items()}
    if per_image:
      for kind in fetched[0]:
        errors = np.concatenate([np.asarray(part[kind], np.float64) for part in fetched])
        out[float(sigma)][f"{kind}/per_image"] = float(np.mean(-10.0 * np.log10(errors * len(images) / pixels)))
  return out


def jpeg_roundtrip(images: np.ndarray, quality: int = 75) -> np.ndarray:
  """``images`` [N, H, W, 3] in [0, 1] after a JPEG encode and decode by Pillow, as float32 in [0, 1].

  Pillow's defaults otherwise (libjpeg, 4:2:0 chroma subsampling): at quality 75 that is how the JPEG copy of the
  CIFAR-10 training split that ``cifar10-cpu`` learned from was saved (luma table 8, 6, 5, 8, 12, 20, 26, 31, ...), so
  denoising these versions of the lossless test images measures the model in the domain it was trained on.
  Pixels are rounded to uint8 first, which is exact for images that came from uint8.
  """
  import io

  from PIL import Image

  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"jpeg_roundtrip takes RGB images [N, H, W, 3], got shape {images.shape}")
  if not 1 <= int(quality) <= 95:
    raise ValueError(f"JPEG quality must be in 1..95 (Pillow's range; above 95 libjpeg only grows the file), "
                     f"got {quality}")
  if images.size and (images.min() < 0 or images.max() > 1):
    raise ValueError(f"jpeg_roundtrip takes images in [0, 1], got values in [{images.min()}, {images.max()}]")
  out = np.empty(images.shape, np.float32)
  for i, image in enumerate(np.rint(images * 255.0).astype(np.uint8)):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=int(quality))
    with Image.open(buffer) as decoded:
      out[i] = np.asarray(decoded.convert("RGB"), np.float32) / 255.0
  return out


def psnr_setup(test_file, num_images: int, sigmas, seed: int) -> dict:
  """What fixes a ``denoising_psnr`` table whose annealed column covers every image: a model card records it.

  The noise depends on the seed and on each sigma's position in ``sigmas``, so the list's order is part of it.
  """
  return {"test_file": pathlib.PurePath(test_file).name, "images": int(num_images),
          "sigmas": [float(s) for s in sigmas], "seed": int(seed)}


def card_psnr_table(metadata: dict, setup: dict) -> dict | None:
  """The ``denoising_psnr`` table of a shipped model's card if it was measured with ``setup``, else None.

  Shipping measures the table on the stored parameters; a later report of the same setup reuses it rather than
  running the annealed denoiser over every image again.
  """
  card = metadata.get("model_card") or {}
  if card.get("psnr_setup") != setup:
    return None
  return {float(sigma): row for sigma, row in card["psnr_db"].items()}

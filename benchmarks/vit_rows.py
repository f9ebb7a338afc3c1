"""ViT-B/16 rows (``scripts/benchmark.py --vit``): Carlini et al.'s CIFAR-10 classifier, with random weights.

Two rows at one per-device batch size B, on the current backend:
  forward       the classifier (Hugging Face ViT-B/16, 10 labels, 224 x 224, normalisation included) jitted on a
                batch of B images per device;
  sample_counts the CIFAR-10 pipeline of ``configs/certify_cifar10_carlini.py`` inside ``smoothing.sample_counts``:
                Gaussian noise on one 32 x 32 image, one-step denoising by improved-diffusion's
                cifar10_uncond_50M_500K UNet, the bicubic antialiased resize to 224 x 224 (``resize``), ViT-B/16,
                argmax and counts, for num = 2 B draws per device (two loop steps).
Each row reports draws/s (images per second through the whole row) from the median of ``repeats`` interleaved
steady calls (``measure.interleaved``), the spread (max - min) / median, the compile time (first call minus a
steady one) and XLA's FLOPs per draw of the single-batch forward (the lowered program's cost analysis).
"""

from __future__ import annotations

import time

DEFAULT_BATCH = 4  # per device: the ViT at 224 is ~17.6 GFLOP per image, so small batches already fill a CPU
SIGMA = 0.25


def vit_b16_classifier(seed: int = 0):
  """Hugging Face's ViT-B/16 (10 labels, 224 x 224, mean = std = 0.5) with random weights, as a Classifier."""
  import jax
  import jax.numpy as jnp

  from scoresmooth_jax import models
  from scoresmooth_jax.modelio import classifier

  module = models.get_model("vit", num_classes=10, layer_norm_eps=1e-12)
  variables = jax.jit(module.init)(jax.random.key(seed), jnp.zeros((1, 224, 224, 3), jnp.float32))
  return classifier.Classifier(module=module, variables=variables, mean=(0.5,) * 3, std=(0.5,) * 3, num_classes=10,
                               image_shape=(224, 224, 3))


def _flops(fn, *args) -> float:
  import jax

  cost = jax.jit(fn).lower(*args).cost_analysis() or {}
  return float(cost.get("flops", float("nan")))


def vit_rows(batch_size: int = DEFAULT_BATCH, repeats: int = 3, log=print) -> list[dict]:
  """Both rows (module docstring), measured in this process."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from scoresmooth_jax import denoise, noise, resize, smoothing
  from benchmarks import measure
  from benchmarks.networks import random_openai_params
  from scoresmooth_jax.modelio import openai_diffusion

  devices = jax.device_count()
  per_call = batch_size * devices
  clf = vit_b16_classifier()
  preset = openai_diffusion.get_preset("cifar10_uncond_50M_500K")
  score_fn = openai_diffusion.OpenAIScoreFn(preset, random_openai_params(preset))
  rng = np.random.default_rng(0)

  def pipeline(fn, y):  # the score function as an argument, so that the cost analysis holds no weight constants
    denoised = jnp.clip(denoise.one_step(fn, y, SIGMA), 0.0, 1.0)
    return clf(resize.resize(denoised, (224, 224), "bicubic_antialias"))

  def base_classifier(y):
    return pipeline(score_fn, y)

  batch = jnp.asarray(rng.uniform(size=(per_call, 224, 224, 3)).astype(np.float32))
  image = jnp.asarray(rng.uniform(size=(32, 32, 3)).astype(np.float32))
  noisy = jnp.asarray(rng.uniform(size=(batch_size, 32, 32, 3)).astype(np.float32))
  forward = jax.jit(clf.apply)
  nz = noise.Gaussian(SIGMA)
  calls = {"forward": lambda: forward(clf.variables, batch),
           "sample_counts": lambda: smoothing.sample_counts(base_classifier, image, nz, 2 * per_call,
                                                            jax.random.key(0), num_classes=10,
                                                            batch_size=batch_size)}
  draws = {"forward": per_call, "sample_counts": 2 * per_call}
  compile_s = {}
  for name, fn in calls.items():
    log(f"vit: compiling and running {name} once (batch {batch_size} per device, {devices} devices)")
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(fn())
    compile_s[name] = first - (time.perf_counter() - start)
  timing = measure.interleaved(calls, repeats)
  flops = {"forward": _flops(clf.apply, clf.variables, batch[:batch_size]) / batch_size,
           "sample_counts": _flops(pipeline, score_fn, noisy) / batch_size}
  rows = []
  for name in calls:
    seconds = np.asarray(timing.seconds[name])
    median = float(np.median(seconds))
    rows.append({"row": f"vit_b16_224.{name}", "batch_size": batch_size, "devices": devices,
                 "backend": jax.default_backend(), "draws_per_call": draws[name], "call_s": median,
                 "spread": float((seconds.max() - seconds.min()) / median), "draws_per_s": draws[name] / median,
                 "compile_s": compile_s[name], "gflops_per_draw": flops[name] / 1e9})
    log(f"vit: {rows[-1]}")
  return rows


def markdown(rows: list[dict]) -> str:
  lines = ["| row | backend | devices | batch / device | draws/s | spread | GFLOP / draw | compile s |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['row']} | {r['backend']} | {r['devices']} | {r['batch_size']} | {r['draws_per_s']:.2f} | "
                 f"{100 * r['spread']:.0f} % | {r['gflops_per_draw']:.1f} | {r['compile_s']:.1f} |")
  return "\n".join(lines)

"""One JAX row of the GPU preset, measured in this process: the certification job's base classifier inside
``smoothing.sample_counts``.

``measure_jax_row(spec, settings)`` builds the row's networks with random weights (``preset_rows``: an OpenAI
diffusion preset, the shipped score model or none; a ResNet), each in the row's precision as the job builds them
(``denoiser.compute_dtype`` / ``classifier.compute_dtype``, BatchNorm folded), the base classifier with
``certify_job.make_base_classifier`` (the ADM's 256 x 256 images centre-cropped to the ResNet-50's 224), and:
  batch_size       the job's choice for certify.batch_size = 0 (``batching.choose_batch_size``), unless fixed;
                   batch_choice_s is what choosing it took (it compiles the sampling step at three batch sizes);
  flops_per_draw   XLA's cost analysis of the lowered (unoptimised) base classifier on one batch, weights as
                   arguments, divided by the batch: the networks' FLOPs, whatever kernels run them;
  draws_per_s, compile_s, ...  ``draw_rate.time_draws`` of sample_counts (one round = one batch per device);
  s_per_image      (n0 + n) / draws_per_s, the time the job spends per image at Cohen et al.'s n;
  peak_memory_gib  accelerators: the device's peak_bytes_in_use over the whole process (weights, the programs'
                   buffers, XLA's autotuning scratch); CPU: the process's peak RSS, compilation included.
"""

from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import draw_rate, preset_rows
from benchmarks.networks import random_openai_params, random_variables
from scoresmooth_jax import denoise, noise as noise_lib, smoothing
from scoresmooth_jax.certification import certify_job
from scoresmooth_jax.modelio import classifier as classifier_lib, compute_dtype, export, openai_diffusion
from scoresmooth_jax.models import resnet, score_unet
from scoresmooth_jax.runtime import batching


def build_score_fn(name: str | None, settings: preset_rows.PresetSettings, precision: str):
  """The row's score function in ``precision`` (random weights, or the shipped model at full size), or None."""
  if name is None:
    return None
  if name in ("iddpm_cifar10", "adm256"):
    preset = preset_rows.openai_preset(name, settings.toy)
    score_fn = openai_diffusion.OpenAIScoreFn(preset, random_openai_params(preset, settings.seed))
  elif name == preset_rows.SHIPPED_SCORE and not settings.toy:
    score_fn = export.load_score_fn(name)
  elif name == preset_rows.SHIPPED_SCORE:
    module = score_unet.ScoreUNet(**preset_rows.toy_score_unet())
    params = random_variables(module, jnp.zeros((1, 8, 8, 3)), jnp.ones((1,)), seed=settings.seed)["params"]
    score_fn = export.ScoreFunction(module=module, params=jax.tree.map(jnp.asarray, params), sigma_min=0.01,
                                    sigma_max=1.0, image_shape=(8, 8, 3))
  else:
    raise ValueError(f"unknown preset denoiser {name!r}: use 'iddpm_cifar10', 'adm256' or "
                     f"{preset_rows.SHIPPED_SCORE!r}.")
  return compute_dtype.with_compute_dtype(score_fn, precision)


def build_classifier(name: str, settings: preset_rows.PresetSettings, precision: str,
                     conv_impl: str | None = None) -> classifier_lib.Classifier:
  """The row's ResNet with random weights, as the job loads a classifier: compute dtype, then BatchNorm folded
  (``conv_impl`` None: the job's choice, oneDNN where it runs the dtype, else XLA's convolutions)."""
  spec = preset_rows.classifier_spec(name, settings.toy)
  module = (resnet.CifarResNet if spec["kind"] == "cifar_resnet" else resnet.ResNet)(**spec["kwargs"])
  variables = random_variables(module, jnp.zeros((1, *spec["image_shape"])), seed=settings.seed)
  clf = classifier_lib.Classifier(module=module, variables=jax.tree.map(jnp.asarray, variables), mean=spec["mean"],
                                  std=spec["std"], num_classes=spec["num_classes"], image_shape=spec["image_shape"],
                                  compute_dtype=None if precision == "float32" else precision)
  return clf.folded(conv_impl=conv_impl)


def lowered_flops(base_classifier, batch_size: int, image_shape) -> float:
  """XLA's FLOPs of ``base_classifier`` on one batch, lowered with the arrays it closes over as arguments (so no
  weight is copied into the program)."""
  example = jax.ShapeDtypeStruct((batch_size, *image_shape), jnp.float32)
  closed = jax.make_jaxpr(base_classifier)(example)
  weights = [jax.ShapeDtypeStruct(jnp.shape(c), jnp.result_type(c)) for c in closed.consts]
  lowered = jax.jit(lambda w, z: jax.core.eval_jaxpr(closed.jaxpr, w, z)[0]).lower(weights, example)
  cost = lowered.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  return float(cost.get("flops", float("nan")))


def _peak_rss_bytes() -> int | None:
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def peak_memory() -> dict:
  """The process's peak device memory (accelerators) or peak RSS (CPU), in GiB, and which it is."""
  device = jax.local_devices()[0]
  stats = device.memory_stats() if device.platform != "cpu" else None
  if stats and "peak_bytes_in_use" in stats:
    return {"peak_memory_gib": stats["peak_bytes_in_use"] / 2**30, "memory_method": "device peak_bytes_in_use"}
  rss = _peak_rss_bytes()
  return {"peak_memory_gib": None if rss is None else rss / 2**30, "memory_method": "process peak RSS (VmHWM)"}


def measure_jax_row(spec: preset_rows.RowSpec, settings: preset_rows.PresetSettings,
                    deadline: float = float("inf")) -> dict:
  """The row's measurements (module docstring); ``deadline`` in ``time.monotonic()`` seconds."""
  start = time.perf_counter()
  score_fn = build_score_fn(spec.denoiser, settings, spec.precision)
  clf = build_classifier(spec.classifier, settings, spec.precision)
  image_shape = tuple(score_fn.image_shape) if score_fn is not None else tuple(clf.image_shape)
  fit = None
  if tuple(clf.image_shape) != image_shape:
    fit = functools.partial(certify_job.fit_images, shape=tuple(clf.image_shape), how="center_crop")
  nz = noise_lib.Gaussian(settings.sigma)
  kind = "none" if score_fn is None else "one_step"
  # The score function already computes in the row's precision (build_score_fn), as load_score builds it.
  denoiser = certify_job.DenoiserSpec(kind, spec.denoiser, denoise.DEFAULT_SIGMA_MIN, denoise.DEFAULT_NUM_LEVELS,
                                      denoise.DEFAULT_STEPS_PER_LEVEL, denoise.DEFAULT_RELATIVE_STEP)
  base = certify_job.make_base_classifier(clf, denoiser, nz, score_fn, fit)
  # The FLOPs are counted on a twin with XLA's convolutions: XLA's cost analysis cannot see oneDNN's custom calls.
  twin = certify_job.make_base_classifier(build_classifier(spec.classifier, settings, spec.precision, "xla"),
                                          denoiser, nz, score_fn, fit)
  device = jax.local_devices()[0]
  row = {"name": spec.name, "framework": "jax", "precision": spec.precision, "pair": spec.pair,
         "backend": jax.default_backend(), "device_kind": device.device_kind, "devices": jax.device_count(),
         "image_shape": list(image_shape), "classifier_input": list(clf.image_shape),
         "denoiser_params": (None if score_fn is None
                             else int(sum(np.size(p) for p in jax.tree.leaves(score_fn.params)))),
         "build_s": time.perf_counter() - start}
  if settings.batch_size:
    row.update(batch_size=settings.batch_size, batch_source="fixed")
  else:
    start = time.perf_counter()
    choice = batching.choose_batch_size(base, image_shape, max_batch_size=settings.max_batch_size,
                                        probe_sizes=settings.probe_sizes)
    row.update(batch_size=choice.batch_size, batch_source="job (certify.batch_size=0)",
               batch_choice_s=time.perf_counter() - start, estimated_step_gib=choice.estimated_bytes / 2**30)
  batch = row["batch_size"]
  row["flops_per_draw"] = lowered_flops(twin, batch, image_shape) / batch
  image = jnp.asarray(np.random.default_rng(settings.seed).uniform(size=image_shape).astype(np.float32))
  key = jax.random.key(settings.seed)
  count = lambda num: smoothing.sample_counts(base, image, nz, num, key, num_classes=clf.num_classes,
                                              batch_size=batch)
  row.update(draw_rate.time_draws(count, batch * jax.device_count(), settings.target_s, settings.repeats, deadline))
  row["s_per_image"] = (settings.n0 + settings.n) / row["draws_per_s"]
  row.update(peak_memory())
  row["xla_flags"] = os.environ.get("XLA_FLAGS", "")
  return row

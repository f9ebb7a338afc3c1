"""Certification and prediction jobs over a dataset: ``run_certification(config, workdir)``.

The job certifies (Cohen et al.'s CERTIFY) or predicts (PREDICT) every selected image of a dataset with a
smoothed classifier g(x) = argmax_c P[f(D(x + u)) = c], where f is a classifier export, D an optional
denoiser (``none``, ``one_step`` or ``annealed`` over a score model) and u the configured noise.

Promises:
  * Everything that can be wrong with the inputs (missing or corrupt checkpoints, shapes that differ between
    dataset, score model and classifier, a sigma outside the score model's trained range, one_step with
    non-Gaussian noise, n0 or n < 1, alpha outside (0, 1), a workdir made with other settings) fails in
    ``build_job`` before any sampling.
  * Per image one JSON line and one Cohen-format TSV line are appended and flushed (``records.RecordWriter``);
    the same command with the same workdir skips finished images and never duplicates or loses a record.
  * Image i always uses the key ``fold_in(key(seed), i)``, so results do not depend on which images were
    done before an interruption, nor on which process does image i. A resumed job may change how the same
    function is computed (batch size, devices, ``classifier.fold_batchnorm``), nothing else.
  * ``certify.batch_size = 0`` is resolved once per run from XLA's memory estimate (``batching``) and printed.
  * ``certify.sequential.enabled`` certifies with ``sequential.certify_sequential`` (``certify.n`` is then the
    budget n_max): same guarantee, each image stops once settled; its record holds the draws it used (``n``).
  * Multi-host: with ``config.distributed.enabled`` each process certifies the images i with
    ``i % process_count == process_index`` on its own local devices and writes its own record files;
    ``report`` merges them.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from scoresmooth_jax import certificate, denoise, noise as noise_lib, resize, sequential, smoothing
from scoresmooth_jax.resize import fit_images  # the classifier.input step: a central crop or a resize
from scoresmooth_jax.certification import records
from scoresmooth_jax.modelio import compute_dtype as compute_dtype_lib
from scoresmooth_jax.runtime import batching, sharding

DENOISERS = ("none", "one_step", "annealed")
CLASSIFIER_INPUTS = ("none", "center_crop", "resize")
MODES = ("certify", "predict")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  name: str          # "digits", "npz:/path.npz" or a tfds name
  split: str
  data_dir: str | None
  image_size: int | None
  skip: int          # Cohen's --skip: only every skip-th image
  max: int           # Cohen's --max: stop at this index (-1: no limit)


@dataclasses.dataclass(frozen=True)
class DenoiserSpec:
  kind: str                  # none | one_step | annealed
  score: str | None          # a score export directory, or "score_sde:<preset>:<checkpoint>"
  sigma_min: float           # annealed: last level of the schedule
  num_levels: int            # annealed: L
  steps_per_level: int       # annealed: T
  relative_step: float       # annealed: a_i = relative_step * sigma_i^2 (denoise module docstring)
  compute_dtype: str = "float32"  # the score network's: float32 | bfloat16 (compute_dtype.COMPUTE_DTYPES)


@dataclasses.dataclass(frozen=True)
class SequentialSpec:
  radius: float | None       # decision mode at this radius; None: radius mode
  radii: tuple[float, ...] | None  # radius mode: the radii reported; stop once settled at each
  max_radius: float | None   # radius mode: stop once the radius reaches it
  tolerance: float | None    # radius mode: stop once more draws add at most this; None: the default
  first_look: int            # estimation draws at the first look

  @classmethod
  def from_config(cls, s) -> "SequentialSpec | None":
    if not s.enabled:
      return None
    return cls(radius=None if s.radius < 0 else float(s.radius),
               radii=tuple(float(r) for r in s.radii) or None,
               max_radius=None if s.max_radius < 0 else float(s.max_radius),
               tolerance=None if s.tolerance < 0 else float(s.tolerance), first_look=int(s.first_look))


@dataclasses.dataclass(frozen=True)
class JobSpec:
  mode: str
  dataset: DatasetSpec
  classifier: str
  compute_dtype: str
  fold_batchnorm: bool
  classifier_input: str      # none | center_crop | resize: dataset-size images -> the classifier's size
  denoiser: DenoiserSpec
  noise: str
  sigma: float
  n0: int
  n: int
  alpha: float
  batch_size: int
  seed: int
  sequential: SequentialSpec | None = None  # None: every image gets n draws
  resize_method: str = "bicubic_antialias"  # classifier_input=resize: a resize.METHODS entry
  resize_clip: bool = True                  # classifier_input=resize: clip the resized image to [0, 1]

  @classmethod
  def from_config(cls, config) -> "JobSpec":
    d, dn, c = config.dataset, config.denoiser, config.certify
    return cls(
        mode=str(config.mode),
        dataset=DatasetSpec(str(d.name), str(d.split), d.data_dir or None, d.image_size or None,
                            int(d.skip), int(d.max)),
        classifier=str(config.classifier.path),
        compute_dtype=str(config.classifier.compute_dtype),
        fold_batchnorm=bool(config.classifier.fold_batchnorm),
        classifier_input=str(config.classifier.get("input", "none")),
        denoiser=DenoiserSpec(str(dn.kind), dn.score or None, float(dn.sigma_min), int(dn.num_levels),
                              int(dn.steps_per_level), float(dn.relative_step),
                              str(dn.get("compute_dtype", "float32"))),
        noise=str(config.noise.type), sigma=float(config.noise.sigma),
        n0=int(c.n0), n=int(c.n), alpha=float(c.alpha), batch_size=int(c.batch_size), seed=int(c.seed),
        sequential=SequentialSpec.from_config(c.sequential),
        resize_method=str(config.classifier.get("resize_method", "bicubic_antialias")),
        resize_clip=bool(config.classifier.get("resize_clip", True)))

  def settings(self) -> dict:
    """What determines the records; a resumed job must match it.

    Batch size, devices and BatchNorm folding may change between runs: they decide how the same function is
    computed, which moves logits by float rounding only.
    """
    out = dataclasses.asdict(self)
    for key in ("batch_size", "fold_batchnorm"):
      out.pop(key)
    if out["classifier_input"] == "none":  # absent means none, so workdirs made before the key still resume
      out.pop("classifier_input")
    # Absent means the resize that came before the keys (bicubic antialiased, clipped), so those workdirs resume.
    for key, default in (("resize_method", "bicubic_antialias"), ("resize_clip", True)):
      if out[key] == default or self.classifier_input != "resize":
        out.pop(key)
    for key in ("skip", "max"):  # more or fewer images is a legitimate way to extend a run
      out["dataset"].pop(key)
    if out["sequential"] is None:  # so workdirs of fixed-n runs made before the option existed still resume
      out.pop("sequential")
    if out["denoiser"]["compute_dtype"] == "float32":  # absent means float32, so older workdirs still resume
      out["denoiser"].pop("compute_dtype")
    return out


def validate(spec: JobSpec) -> None:
  """Checks the numbers of a job; raises ValueError naming the value and the fix."""
  if spec.mode not in MODES:
    raise ValueError(f"mode={spec.mode!r}: choose one of {MODES}.")
  if spec.classifier_input not in CLASSIFIER_INPUTS:
    raise ValueError(f"classifier.input={spec.classifier_input!r}: choose one of {CLASSIFIER_INPUTS}.")
  if spec.resize_method not in resize.METHODS:
    raise ValueError(f"classifier.resize_method={spec.resize_method!r}: choose one of {resize.METHODS}.")
  if spec.denoiser.kind not in DENOISERS:
    raise ValueError(f"denoiser.kind={spec.denoiser.kind!r}: choose one of {DENOISERS}.")
  if spec.denoiser.compute_dtype not in compute_dtype_lib.COMPUTE_DTYPES:
    raise ValueError(f"denoiser.compute_dtype={spec.denoiser.compute_dtype!r}: choose one of "
                     f"{sorted(compute_dtype_lib.COMPUTE_DTYPES)}.")
  # The library's own checks, named as the config spells the values, so they fail before any sampling.
  if spec.mode == "certify":
    certificate.check_count("certify.n0", spec.n0)
  certificate.check_count("certify.n", spec.n)
  certificate.check_alpha(spec.alpha, "certify.alpha")
  if spec.batch_size < 0:
    raise ValueError(f"certify.batch_size={spec.batch_size} must be >= 1 (draws per device per step), or 0 to "
                     "choose it from XLA's memory estimate.")
  if spec.sequential is not None:
    seq = spec.sequential
    if spec.mode != "certify":
      raise ValueError(f"certify.sequential.enabled=True applies to mode='certify', not {spec.mode!r}; disable it "
                       "for prediction.")
    sequential.check_rules(seq.radius, seq.max_radius, seq.tolerance, seq.radii, prefix="certify.sequential.")
    certificate.check_count("certify.sequential.first_look", seq.first_look)
  if spec.dataset.skip < 1:
    raise ValueError(f"dataset.skip={spec.dataset.skip} must be >= 1 (1 takes every image).")
  if spec.denoiser.kind == "one_step" and spec.noise != "gaussian":
    raise ValueError(f"denoiser.kind='one_step' is Tweedie's formula, exact only for Gaussian noise, but "
                     f"noise.type={spec.noise!r}; use denoiser.kind='annealed' for {spec.noise} noise.")
  if spec.denoiser.kind != "none" and not spec.denoiser.score:
    raise ValueError(f"denoiser.kind={spec.denoiser.kind!r} needs denoiser.score: a score-model export "
                     "directory (scripts/train_score.py writes <workdir>/export), 'score_sde:<preset>:<path>' or "
                     "'openai:<preset>:<path.pt>'.")
  if spec.denoiser.kind == "annealed":
    if spec.denoiser.num_levels < 1 or spec.denoiser.steps_per_level < 1:
      raise ValueError("denoiser.num_levels and denoiser.steps_per_level must be >= 1; got "
                       f"{spec.denoiser.num_levels} and {spec.denoiser.steps_per_level}.")
    if not spec.denoiser.relative_step > 0:
      raise ValueError(f"denoiser.relative_step={spec.denoiser.relative_step} must be > 0 (default 0.5).")


def make_base_classifier(classifier: Callable, denoiser: DenoiserSpec, nz: noise_lib.Noise,
                         score_fn=None, fit: Callable | None = None) -> Callable:
  """f o fit o D: the base classifier that smoothing samples, with the denoiser (if any) in front.

  The denoised image is clipped to [0, 1], the range the classifier was trained on; clipping, like the
  denoiser and ``fit`` (a crop or resize to the classifier's input size), is deterministic, so it is part of
  the base classifier and keeps the guarantee for the dataset-size input.
  """
  if fit is not None:
    sized, classifier = classifier, lambda z: sized(fit(z))
  if denoiser.kind == "none":
    return classifier
  if denoiser.kind == "one_step":
    def denoised(z):
      return jnp.clip(denoise.one_step(score_fn, z, nz.sigma), 0.0, 1.0)
  else:
    sigmas = schedule(denoiser, nz)
    step = denoiser.relative_step * float(sigmas[-1]) ** 2

    def denoised(z):
      return jnp.clip(denoise.annealed(score_fn, z, nz, sigmas, step, denoiser.steps_per_level), 0.0, 1.0)

  def base_classifier(z):
    return classifier(denoised(z))

  return base_classifier


def schedule(denoiser: DenoiserSpec, nz: noise_lib.Noise) -> np.ndarray:
  return np.asarray(denoise.default_sigmas(nz, denoiser.sigma_min, denoiser.num_levels))


@dataclasses.dataclass
class Job:
  spec: JobSpec
  source: Any
  base_classifier: Callable
  nz: noise_lib.Noise
  indices: list[int]
  num_classes: int
  batchnorm_folded: bool  # whether the classifier runs with BatchNorm folded into its convolutions


def build_job(config) -> Job:
  """Parses, loads and checks everything; no sampling happens here."""
  from scoresmooth_jax.datasets import data
  from scoresmooth_jax.modelio import classifier as classifier_lib, score_models  # heavy imports kept off the library path

  spec = JobSpec.from_config(config)
  validate(spec)
  nz = noise_lib.make(spec.noise, spec.sigma)
  source = data.get_source(spec.dataset.name, spec.dataset.split, data_dir=spec.dataset.data_dir,
                           image_size=spec.dataset.image_size)
  compute_dtype = None if spec.compute_dtype == "float32" else spec.compute_dtype
  clf = classifier_lib.load_classifier(spec.classifier, compute_dtype=compute_dtype)
  if spec.fold_batchnorm and clf.foldable:
    clf = clf.folded()
  image_shape = tuple(source.image_shape)
  fit = None
  if tuple(clf.image_shape) != image_shape:
    clf_shape = tuple(clf.image_shape)
    if spec.classifier_input == "none" or clf_shape[-1] != image_shape[-1] or (
        spec.classifier_input == "center_crop" and (clf_shape[0] > image_shape[0] or clf_shape[1] > image_shape[1])):
      raise ValueError(f"dataset {spec.dataset.name!r} has images of shape {image_shape} but the classifier "
                       f"{spec.classifier} expects {clf_shape} (classifier.input={spec.classifier_input!r}); use a "
                       "classifier trained at that shape, set dataset.image_size, or set classifier.input to "
                       "'center_crop' (a smaller classifier input) or 'resize'.")
    fit = functools.partial(fit_images, shape=clf_shape, how=spec.classifier_input, method=spec.resize_method,
                            clip=spec.resize_clip)
  score_fn = None
  if spec.denoiser.kind != "none":
    score_fn = score_models.load_score(spec.denoiser.score, spec.denoiser.compute_dtype)
    if tuple(score_fn.image_shape) != image_shape:
      raise ValueError(f"dataset images have shape {image_shape} but the score model {spec.denoiser.score} "
                       f"was trained on {tuple(score_fn.image_shape)}; use a score model for this dataset.")
    if spec.denoiser.kind == "one_step":
      denoise.check_trained_range(score_fn, nz.sigma, "noise sigma", spec.denoiser.score)
    else:
      denoise.check_trained_range(score_fn, schedule(spec.denoiser, nz), "annealing-schedule sigma",
                                  spec.denoiser.score)
  indices = [i for i in range(len(source))
             if i % spec.dataset.skip == 0 and (spec.dataset.max < 0 or i < spec.dataset.max)]
  return Job(spec, source, make_base_classifier(clf, spec.denoiser, nz, score_fn, fit), nz, indices,
             int(clf.num_classes), clf.batchnorm_folded)


def _record(job: Job, idx: int, key, mesh) -> dict:
  spec = job.spec
  common = dict(num_classes=job.num_classes, batch_size=spec.batch_size, mesh=mesh)
  x, label = job.source[idx]
  start = time.perf_counter()
  if spec.mode == "certify" and spec.sequential is not None:
    seq = spec.sequential
    cert = sequential.certify_sequential(job.base_classifier, x, job.nz, spec.n0, spec.n, spec.alpha, key,
                                        radius=seq.radius, max_radius=seq.max_radius, tolerance=seq.tolerance,
                                        radii=seq.radii, first_look=seq.first_look, **common)
  elif spec.mode == "certify":
    cert = smoothing.certify(job.base_classifier, x, job.nz, spec.n0, spec.n, spec.alpha, key, **common)
  if spec.mode == "certify":
    prediction = cert.prediction
    # n: the estimation draws this image used (n_max: the budget, which a fixed-n run always uses up).
    out = dict(radius=cert.radius, p_lower=cert.p_lower, count=cert.count, n0=spec.n0,
               n0_counts=cert.n0_counts.tolist(), n=cert.n, n_max=spec.n)
    samples = spec.n0 + cert.n
  else:
    prediction = smoothing.predict(job.base_classifier, x, job.nz, spec.n, spec.alpha, key, **common)
    out = dict(n=spec.n)
    samples = spec.n
  elapsed = time.perf_counter() - start
  out.update(idx=idx, label=int(label), predict=int(prediction), correct=int(prediction == int(label)),
             time=elapsed, alpha=spec.alpha, noise=spec.noise, sigma=spec.sigma, norm=job.nz.norm,
             denoiser=spec.denoiser.kind, samples_per_s=samples / elapsed, batch_size=spec.batch_size,
             num_devices=mesh.size, batchnorm_folded=job.batchnorm_folded)
  return out


def _with_batch_size(job: Job) -> Job:
  """``job`` itself, or with ``certify.batch_size = 0`` resolved from a memory estimate (compiles, never samples)."""
  if job.spec.batch_size:
    return job
  choice = batching.choose_batch_size(job.base_classifier, tuple(job.source.image_shape))
  print(f"[{job.spec.mode}] batch size {choice.batch_size} per device (certify.batch_size=0): XLA estimates "
        f"{choice.estimated_bytes / 2**20:,.0f} MiB of a {choice.budget_bytes / 2**20:,.0f} MiB budget", flush=True)
  return dataclasses.replace(job, spec=dataclasses.replace(job.spec, batch_size=choice.batch_size))


def run_certification(config, workdir, *, progress_every_s: float = 10.0) -> list[dict]:
  """Runs (or resumes) the job described by ``config`` in ``workdir``; returns this process's records."""
  if config.distributed.enabled:
    d = config.distributed
    sharding.initialize_distributed(d.coordinator_address, d.num_processes, d.process_id)
  job = build_job(config)
  process_index, process_count = jax.process_index(), jax.process_count()
  records.check_job_settings(workdir, job.spec.settings())
  mine = job.indices[process_index::process_count]
  # Each process samples on its own devices: processes certify disjoint images, not shards of one image.
  mesh = sharding.data_mesh(jax.local_devices())
  base_key = jax.random.key(job.spec.seed)
  with records.RecordWriter(workdir, job.spec.mode, process_index, process_count) as writer:
    todo = [i for i in mine if i not in writer.done]
    if todo:  # a finished run needs no batch size, and choosing one compiles
      job = _with_batch_size(job)
    logging.info("%s: %d images for process %d/%d, %d already done, %d to go", job.spec.mode, len(mine),
                 process_index, process_count, len(mine) - len(todo), len(todo))
    start = last = time.perf_counter()
    samples = 0
    for count, idx in enumerate(todo, 1):
      record = _record(job, idx, jax.random.fold_in(base_key, idx), mesh)
      writer.append(record)
      samples += record.get("n0", 0) + record["n"]
      now = time.perf_counter()
      if now - last >= progress_every_s or count == len(todo):
        last = now
        rate = samples / (now - start)
        eta = (now - start) / count * (len(todo) - count)
        print(f"[{job.spec.mode}] {len(mine) - len(todo) + count}/{len(mine)} images, {rate:,.0f} samples/s, "
              f"ETA {records.format_time(eta).split('.')[0]}", flush=True)
    return list(writer.records)


def run_prediction(config, workdir, **kwargs) -> list[dict]:
  """``run_certification`` with ``config.mode = "predict"``."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.mode = "predict"
  return run_certification(config, workdir, **kwargs)

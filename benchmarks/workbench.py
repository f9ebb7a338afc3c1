"""Models with random weights and the benchmarked cases: ``random_variables`` and ``calibrate_classifier`` build
well-conditioned random-weight networks; ``Workbench`` builds (once) the models, classifiers and ``Case``s of a
config, and ``case(case_id)`` is what rows time and what the memory subprocess rebuilds on its own.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from scoresmooth_jax import denoise, noise, smoothing
from benchmarks import precision, torch_baseline
from benchmarks.config import BenchmarkConfig
from benchmarks.environment import xla_cpu_threads
from benchmarks.measure import _flops, _xla_bytes
from scoresmooth_jax.modelio import classifier as classifier_lib, export
from scoresmooth_jax.models import resnet, score_unet
from scoresmooth_jax.runtime import sharding
from scoresmooth_jax.training import losses, train_state

def random_variables(module, *example_inputs, seed: int = 0) -> dict:
  """Random numpy variables for ``module``: He-normal kernels, small random biases, BatchNorm statistics near
  (0, 1). Built from ``eval_shape``, so no initialiser is compiled (that costs seconds for big models)."""
  abstract = jax.eval_shape(module.init, jax.random.key(0), *example_inputs)
  rng = np.random.default_rng(seed)

  def leaf(path, value):
    name = jax.tree_util.keystr(path)
    shape = value.shape
    if name.endswith("['var']"):
      return rng.uniform(0.75, 1.25, shape).astype(np.float32)
    if name.endswith("['scale']"):
      return rng.uniform(0.75, 1.25, shape).astype(np.float32)
    if len(shape) >= 2:
      fan_in = int(np.prod(shape[:-1]))
      return (rng.standard_normal(shape) * np.sqrt(2.0 / max(fan_in, 1))).astype(np.float32)
    return (0.05 * rng.standard_normal(shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(leaf, abstract)


def calibrate_classifier(clf: classifier_lib.Classifier, images) -> classifier_lib.Classifier:
  """A random-weight ResNet made well-conditioned, like a trained one: BatchNorm running statistics set to the
  batch statistics of ``images`` (data-dependent initialisation), and the head rescaled so the logits have zero
  mean per class and unit standard deviation over ``images``. Without this a random deep ResNet predicts one
  class for every input, and label agreement between precisions would be trivially 100 %."""
  momentum = resnet.BN_MOMENTUM
  variables = clf.variables
  normalised = (jnp.asarray(images) - jnp.asarray(clf.mean)) / jnp.asarray(clf.std)

  @jax.jit
  def batch_stats(variables, x):
    _, updates = clf.module.apply(variables, x, train=True, mutable=["batch_stats"])
    # running <- momentum * running + (1 - momentum) * batch, so this recovers the batch statistics exactly.
    return jax.tree.map(lambda new, old: (new - momentum * old) / (1.0 - momentum), updates["batch_stats"],
                        variables["batch_stats"])

  variables = {**variables, "batch_stats": batch_stats(variables, normalised)}
  logits = np.asarray(jax.jit(lambda v, x: clf.module.apply(v, x))(variables, normalised), np.float64)
  fc = dict(variables["params"]["fc"])
  scale = 1.0 / max(float(logits.std()), 1e-12)
  fc["kernel"] = jnp.asarray(np.asarray(fc["kernel"], np.float64) * scale, jnp.float32)
  fc["bias"] = jnp.asarray((np.asarray(fc["bias"], np.float64) - logits.mean(axis=0)) * scale, jnp.float32)
  variables = {**variables, "params": {**variables["params"], "fc": fc}}
  return dataclasses.replace(clf, variables=jax.tree.map(jnp.asarray, variables))


@dataclasses.dataclass
class Case:
  """One benchmarked configuration: ``run()`` is one timed call of ``samples`` samples (per device x devices)."""

  run: Callable[[], Any]
  warmup: Callable[[], Any]
  samples: int
  batch_size: int
  flops_per_sample: float
  flops_source: str
  xla_bytes: int | None = None
  compile_seconds: float | None = None
  compute_types: dict | None = None  # the compiled convolutions and dots by operand type (benchmarks.precision)


class Workbench:
  """Builds (once) the models, classifiers and cases of a config; ``case(case_id)`` is what rows time and what
  the memory subprocess rebuilds on its own."""

  def __init__(self, config: BenchmarkConfig, calibrate: bool = True, measure_flops: bool = True):
    self.config = config
    self.calibrate = calibrate
    self.measure_flops = measure_flops
    self.mesh = sharding.data_mesh()
    self.devices = self.mesh.size
    self.nz = noise.Gaussian(config.sigma)
    self._cache: dict = {}
    rng = np.random.default_rng(config.seed)
    self.image = jnp.asarray(rng.uniform(size=config.image_shape).astype(np.float32))

  def _cached(self, key, build):
    if key not in self._cache:
      self._cache[key] = build()
    return self._cache[key]

  # --- models ------------------------------------------------------------------------------------------
  def classifier(self, variant: str = "f32", depth: int | None = None) -> classifier_lib.Classifier:
    """The CIFAR ResNet as a Classifier: variant "f32", "f32_folded" or "bf16_folded"."""
    cfg = self.config
    depth = cfg.depth if depth is None else depth

    def base():
      module = resnet.CifarResNet(depth=depth, num_classes=cfg.num_classes, shortcut="B", width=cfg.width)
      variables = random_variables(module, jnp.zeros((1, *cfg.image_shape)), seed=cfg.seed)
      clf = classifier_lib.Classifier(module=module, variables=jax.tree.map(jnp.asarray, variables),
                                      mean=(0.5,) * cfg.image_shape[-1], std=(0.25,) * cfg.image_shape[-1],
                                      num_classes=cfg.num_classes, image_shape=cfg.image_shape)
      if self.calibrate:
        rng = np.random.default_rng(cfg.seed + 1)
        images = rng.uniform(size=(64, *cfg.image_shape)) + cfg.sigma * rng.standard_normal((64, *cfg.image_shape))
        clf = calibrate_classifier(clf, images.astype(np.float32))
      return clf

    if variant == "f32":
      return self._cached(("clf", depth, "f32"), base)
    if variant == "f32_folded":
      return self._cached(("clf", depth, variant), lambda: self.classifier("f32", depth).folded())
    if variant == "bf16_folded":
      return self._cached(("clf", depth, variant), lambda: dataclasses.replace(
          self.classifier("f32_folded", depth), compute_dtype=jnp.bfloat16))
    raise ValueError(f"unknown classifier variant {variant!r}: use 'f32', 'f32_folded' or 'bf16_folded'.")

  def imagenet_classifier(self, variant: str) -> classifier_lib.Classifier:
    def base():
      module = resnet.ResNet50(num_classes=1000)
      variables = random_variables(module, jnp.zeros((1, 224, 224, 3)), seed=self.config.seed)
      return classifier_lib.Classifier(module=module, variables=jax.tree.map(jnp.asarray, variables),
                                       mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), num_classes=1000,
                                       image_shape=(224, 224, 3))

    if variant == "f32":
      return self._cached(("imagenet", "f32"), base)
    if variant == "f32_folded":
      return self._cached(("imagenet", variant), lambda: self.imagenet_classifier("f32").folded())
    if variant == "bf16_folded":
      return self._cached(("imagenet", variant), lambda: dataclasses.replace(
          self.imagenet_classifier("f32_folded"), compute_dtype=jnp.bfloat16))
    raise ValueError(f"unknown classifier variant {variant!r}.")

  def unet(self):
    cfg = self.config

    def build():
      module = score_unet.ScoreUNet(channels=cfg.unet_channels, channel_mults=cfg.unet_mults)
      params = random_variables(module, jnp.zeros((1, *cfg.image_shape)), jnp.ones((1,)), seed=cfg.seed)["params"]
      return module, jax.tree.map(jnp.asarray, params)

    return self._cached("unet", build)

  def score_fn(self) -> export.ScoreFunction:
    def build():
      module, params = self.unet()
      return export.ScoreFunction(module=module, params=params, sigma_min=0.01, sigma_max=1.0,
                                  image_shape=self.config.image_shape)

    return self._cached("score_fn", build)

  def _one_step_over(self, score_fn):
    """Tweedie denoiser over ``score_fn`` + the folded float32 classifier."""
    clf, sigma = self.classifier("f32_folded"), self.config.sigma
    return lambda y: clf(denoise.one_step(score_fn, y, sigma))

  def one_step_classifier(self):
    """The ScoreUNet one-step pipeline, one object (sample_counts caches by identity)."""
    return self._cached("one_step", lambda: self._one_step_over(self.score_fn()))

  def annealed_classifier(self):
    def build():
      score_fn, clf, nz, cfg = self.score_fn(), self.classifier("f32_folded"), self.nz, self.config
      sigmas = denoise.default_sigmas(nz, num_levels=cfg.levels)
      return lambda y: clf(denoise.annealed(score_fn, y, nz, sigmas, None, cfg.steps_per_level))

    return self._cached("annealed", build)

  def ncsnpp_score_fn(self):
    from scoresmooth_jax.modelio import pretrained  # pylint: disable=import-outside-toplevel

    def build():
      preset = pretrained.get_preset("cifar10_ncsnpp_continuous")
      h, w, c = preset.image_shape
      params = random_variables(preset.model, jnp.zeros((1, h, w, c)), jnp.ones((1,)),
                                seed=self.config.seed)["params"]
      # He-normal weights through ~100 layers give huge activations; scale kernels down, the speed is the same.
      params = jax.tree.map(lambda p: jnp.asarray(p * (0.3 if p.ndim >= 2 else 1.0)), params)
      return pretrained.ScoreSdeScoreFn(preset=preset, params=params)

    return self._cached("ncsnpp", build)

  def ncsnpp_one_step_classifier(self):
    return self._cached("ncsnpp_one_step", lambda: self._one_step_over(self.ncsnpp_score_fn()))

  def memory_classifier(self) -> classifier_lib.Classifier:
    def build():
      cfg = self.config
      shape = cfg.memory_check_shape
      module = resnet.CifarResNet(depth=8, num_classes=cfg.num_classes, shortcut="B", width=8)
      variables = random_variables(module, jnp.zeros((1, *shape)), seed=cfg.seed)
      return classifier_lib.Classifier(module=module, variables=jax.tree.map(jnp.asarray, variables),
                                       mean=(0.5,) * shape[-1], std=(0.25,) * shape[-1],
                                       num_classes=cfg.num_classes, image_shape=shape).folded()

    return self._cached("memory_clf", build)

  def noisy_batch(self, per_device: int, image=None) -> jax.Array:
    """A noisy batch of ``per_device`` images on every device, split over the "data" axis."""
    image = self.image if image is None else image
    eps = self.nz.sample(jax.random.key(self.config.seed + 7), (per_device * self.devices, *image.shape))
    return jax.device_put(image[None] + eps, sharding.batch_sharding(self.mesh))

  # --- cases ---------------------------------------------------------------------------------------------
  def _forward_case(self, fn, batch_size: int, calls: int, image=None) -> Case:
    x = self.noisy_batch(batch_size, image)
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(x).compile()
    seconds = time.perf_counter() - start

    def run():
      out = None
      for _ in range(calls):
        out = compiled(x)
      return out

    return Case(run=run, warmup=lambda: compiled(x), samples=calls * batch_size * self.devices,
                batch_size=batch_size, flops_per_sample=_flops(compiled) / batch_size,
                flops_source="XLA cost analysis", xla_bytes=_xla_bytes(compiled), compile_seconds=seconds,
                compute_types=precision.compute_types(compiled.as_text()))

  def _counts_case(self, fn, batch_size: int, num_per_device: int, flops_per_sample: float,
                   image=None, num_classes: int | None = None, source: str = "forward's XLA cost") -> Case:
    image = self.image if image is None else image
    num = num_per_device * self.devices
    key = jax.random.key(self.config.seed + 11)
    num_classes = num_classes or self.config.num_classes
    count = lambda n: smoothing.sample_counts(fn, image, self.nz, n, key, num_classes=num_classes,
                                              batch_size=batch_size, mesh=self.mesh)
    return Case(run=lambda: count(num), warmup=lambda: count(1), samples=num, batch_size=batch_size,
                flops_per_sample=flops_per_sample, flops_source=source)

  def _flops_of(self, case_id: str) -> float:
    """FLOPs per sample of another (single-batch) case; NaN in the memory subprocess, which needs none."""
    return self.case(case_id).flops_per_sample if self.measure_flops else float("nan")

  def case(self, case_id: str) -> Case:
    """The case named ``case_id`` (e.g. "a.f32_folded", "b.bf16_folded", "c.counts", "mem.large")."""
    return self._cached(("case", case_id), lambda: self._build_case(case_id))

  def _build_case(self, case_id: str) -> Case:
    cfg = self.config
    batch, calls = cfg.batch_size, cfg.batches_per_call
    section, _, variant = case_id.partition(".")
    if section == "a":
      return self._forward_case(self.classifier(variant), batch, calls)
    if section == "b":
      return self._counts_case(self.classifier(variant), batch, calls * batch, self._flops_of(f"a.{variant}"))
    if case_id == "torch.f32":
      return self._torch_case(xla_cpu_threads())
    if case_id == "torch.f32_1thread":
      return self._torch_case(1)
    if section == "sweep":  # "sweep.torch.B" or "sweep.jax.VARIANT.B": the PyTorch loop against sample_counts
      side, _, rest = variant.partition(".")
      name, _, size = rest.rpartition(".")
      size = int(size)
      if side == "torch":
        return self._torch_case(xla_cpu_threads(), size)
      return self._counts_case(self.classifier(name), size, cfg.torch_batches * size, self._flops_of(f"a.{name}"))
    if case_id == "c.raw":
      return self._forward_case(self.one_step_classifier(), batch, calls)
    if case_id == "c.counts":
      return self._counts_case(self.one_step_classifier(), batch, calls * batch, self._flops_of("c.raw"))
    if case_id == "c.ncsnpp_raw":
      return self._forward_case(self.ncsnpp_one_step_classifier(), cfg.ncsnpp_batch_size, 1)
    if case_id == "c.ncsnpp_counts":
      return self._counts_case(self.ncsnpp_one_step_classifier(), cfg.ncsnpp_batch_size, cfg.ncsnpp_num,
                               self._flops_of("c.ncsnpp_raw"))
    if case_id == "d.score":
      score_fn, sigma = self.score_fn(), cfg.sigma
      return self._forward_case(lambda y: score_fn(y, sigma), cfg.annealed_batch_size, calls)
    if case_id == "d.classifier":
      return self._forward_case(self.classifier("f32_folded"), cfg.annealed_batch_size, calls)
    if case_id in ("d.raw", "d.counts"):
      evaluations = cfg.levels * cfg.steps_per_level
      flops = evaluations * self._flops_of("d.score") + self._flops_of("d.classifier")
      if case_id == "d.raw":
        case = self._forward_case(self.annealed_classifier(), cfg.annealed_batch_size, 1)
        return dataclasses.replace(case, flops_per_sample=flops, flops_source="L*T score + classifier (XLA cost)")
      return self._counts_case(self.annealed_classifier(), cfg.annealed_batch_size, cfg.annealed_batch_size,
                               flops, source="L*T score + classifier (XLA cost)")
    if case_id == "e.train":
      return self._train_case()
    if case_id in ("mem.small", "mem.large"):
      clf = self.memory_classifier()
      num = cfg.memory_check_num[0 if case_id == "mem.small" else 1]
      shape = cfg.memory_check_shape
      image = jnp.asarray(np.random.default_rng(cfg.seed).uniform(size=shape).astype(np.float32))
      return self._counts_case(clf, cfg.memory_check_batch, max(1, num // self.devices), float("nan"), image=image)
    if section == "imagenet":
      kind, _, precision = variant.partition(".")
      image = jnp.asarray(np.random.default_rng(cfg.seed).uniform(size=(224, 224, 3)).astype(np.float32))
      clf = self.imagenet_classifier(precision)
      if kind == "a":
        return self._forward_case(clf, cfg.imagenet_batch_size, 1, image=image)
      return self._counts_case(clf, cfg.imagenet_batch_size, cfg.imagenet_batch_size,
                               self._flops_of(f"imagenet.a.{precision}"), image=image,
                               num_classes=1000)
    raise ValueError(f"unknown benchmark case {case_id!r}.")

  def torch_model(self):
    def build():
      cfg = self.config
      clf = self.classifier("f32")
      model = torch_baseline.build_cifar_resnet(cfg.depth, cfg.num_classes, clf.mean, clf.std, width=cfg.width,
                                                in_channels=cfg.image_shape[-1])
      torch_baseline.load_flax_variables(model, clf.variables)
      return model

    return self._cached("torch_model", build)

  def _torch_case(self, threads: int, batch_size: int | None = None) -> Case:
    cfg = self.config
    model = self.torch_model()
    image = np.asarray(self.image)
    batch = (batch_size or cfg.batch_size) * self.devices
    num = cfg.torch_batches * batch  # the same draws the JAX side makes per call

    def count(n):
      torch_baseline.configure_threads(threads)  # per call: the 1- and 2-thread cases run interleaved
      return torch_baseline.sample_counts(model, image, cfg.sigma, n, batch, cfg.num_classes, seed=cfg.seed)

    flops = self._flops_of("a.f32")
    return Case(run=lambda: count(num), warmup=lambda: count(batch), samples=num, batch_size=batch,
                flops_per_sample=flops, flops_source="JAX forward's XLA cost (same network)")

  def _train_case(self) -> Case:
    cfg = self.config
    module, params = self.unet()
    sigmas = losses.SigmaDistribution(0.01, 1.0)
    loss_fn = losses.get_score_task_loss_fn(module, sigmas)  # the loss train.build_task gives the score task
    optim = train_state.OptimConfig(learning_rate=2e-4, warmup_steps=0, schedule="constant", grad_clip=1.0,
                                    weight_decay=0.0, ema_decay=0.999)
    optimizer = train_state.make_optimizer(optim, 1000)
    replicated = sharding.replicated(self.mesh)
    state = jax.jit(lambda p: train_state.create_state({"params": p}, optimizer), out_shardings=replicated)(params)
    step = train_state.jit_train_step(train_state.get_train_step_fn(loss_fn, optimizer, optim.ema_decay), self.mesh)
    batch = cfg.train_batch_size * self.devices
    rng = np.random.default_rng(cfg.seed)
    stacked = NamedSharding(self.mesh, P(None, sharding.DATA_AXIS))
    images = jax.device_put(rng.uniform(size=(1, batch, *cfg.image_shape)).astype(np.float32), stacked)
    labels = jax.device_put(np.zeros((1, batch), np.int32), stacked)
    key = jax.random.key(cfg.seed)
    start = time.perf_counter()
    compiled = step.lower(state, images, labels, key).compile()
    seconds = time.perf_counter() - start
    holder = {"state": state}

    def run():
      holder["state"], metrics = compiled(holder["state"], images, labels, key)
      return metrics["loss"]

    return Case(run=run, warmup=run, samples=batch, batch_size=cfg.train_batch_size,
                flops_per_sample=_flops(compiled) / cfg.train_batch_size, flops_source="XLA cost analysis",
                xla_bytes=_xla_bytes(compiled), compile_seconds=seconds)

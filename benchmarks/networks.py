"""The benchmark's networks, with random weights: ``random_variables`` (any Flax module, without compiling its
initialiser), ``random_openai_params`` (an OpenAI diffusion preset), ``calibrate_classifier`` (a random ResNet made
well-conditioned like a trained one), and ``Networks``, which builds each model of a ``BenchmarkConfig`` once.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import torch_baseline
from benchmarks.config import BenchmarkConfig
from scoresmooth_jax import denoise, noise
from scoresmooth_jax.modelio import classifier as classifier_lib, export
from scoresmooth_jax.models import resnet, score_unet


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


def random_openai_params(preset, seed: int = 0):
  """Random weights of an OpenAI diffusion preset's shapes without compiling ``init`` (slow for 550M parameters):
  kernels N(0, 1 / fan_in) so activations stay finite, norms' scales 1, biases 0."""
  from flax import traverse_util  # pylint: disable=import-outside-toplevel

  from scoresmooth_jax.modelio import openai_diffusion  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(openai_diffusion.expected_params(preset))
  out = {}
  for path, shape in flat.items():
    if path[-1] == "kernel":
      fan_in = int(np.prod(shape.shape[:-1]))
      value = rng.standard_normal(shape.shape, dtype=np.float32) / np.float32(np.sqrt(fan_in))
    elif path[-1] == "scale":
      value = np.ones(shape.shape, np.float32)
    else:
      value = np.zeros(shape.shape, np.float32)
    out[path] = jnp.asarray(value)
  return traverse_util.unflatten_dict(out)


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


class Networks:
  """The models of a ``BenchmarkConfig`` with random weights, each built once (``sample_counts`` caches its
  programs by the classifier's identity, so rows that share a model must share the object)."""

  def __init__(self, config: BenchmarkConfig, calibrate: bool = True):
    self.config = config
    self.calibrate = calibrate
    self.nz = noise.Gaussian(config.sigma)
    self._built: dict = {}

  def _once(self, key, build):
    if key not in self._built:
      self._built[key] = build()
    return self._built[key]

  def _variant(self, name: str, variant: str, base) -> classifier_lib.Classifier:
    """``variant`` ("f32", "f32_folded", "bf16_folded") of the float32 classifier ``base()`` builds."""
    if variant == "f32":
      return self._once((name, "f32"), base)
    if variant == "f32_folded":
      return self._once((name, variant), lambda: self._variant(name, "f32", base).folded())
    if variant == "bf16_folded":
      return self._once((name, variant), lambda: dataclasses.replace(self._variant(name, "f32_folded", base),
                                                                     compute_dtype=jnp.bfloat16))
    raise ValueError(f"unknown classifier variant {variant!r}: use 'f32', 'f32_folded' or 'bf16_folded'.")

  def classifier(self, variant: str = "f32", depth: int | None = None) -> classifier_lib.Classifier:
    """The CIFAR ResNet (option-B shortcuts) as a Classifier: variant "f32", "f32_folded" or "bf16_folded"."""
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

    return self._variant(f"resnet{depth}", variant, base)

  def imagenet_classifier(self, variant: str) -> classifier_lib.Classifier:
    """The ImageNet ResNet-50 at 224 x 224 as a Classifier, in ``variant`` (as ``classifier``)."""
    def base():
      module = resnet.ResNet50(num_classes=1000)
      variables = random_variables(module, jnp.zeros((1, 224, 224, 3)), seed=self.config.seed)
      return classifier_lib.Classifier(module=module, variables=jax.tree.map(jnp.asarray, variables),
                                       mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), num_classes=1000,
                                       image_shape=(224, 224, 3))

    return self._variant("imagenet", variant, base)

  def unet(self):
    """The ScoreUNet of rows c, d and e: (module, params)."""
    cfg = self.config

    def build():
      module = score_unet.ScoreUNet(channels=cfg.unet_channels, channel_mults=cfg.unet_mults)
      params = random_variables(module, jnp.zeros((1, *cfg.image_shape)), jnp.ones((1,)), seed=cfg.seed)["params"]
      return module, jax.tree.map(jnp.asarray, params)

    return self._once("unet", build)

  def score_fn(self) -> export.ScoreFunction:
    def build():
      module, params = self.unet()
      return export.ScoreFunction(module=module, params=params, sigma_min=0.01, sigma_max=1.0,
                                  image_shape=self.config.image_shape)

    return self._once("score_fn", build)

  def _one_step_over(self, score_fn):
    """Tweedie denoiser over ``score_fn`` + the folded float32 classifier."""
    clf, sigma = self.classifier("f32_folded"), self.config.sigma
    return lambda y: clf(denoise.one_step(score_fn, y, sigma))

  def one_step_classifier(self):
    """The ScoreUNet one-step pipeline, one object (sample_counts caches by identity)."""
    return self._once("one_step", lambda: self._one_step_over(self.score_fn()))

  def annealed_classifier(self):
    def build():
      score_fn, clf, nz, cfg = self.score_fn(), self.classifier("f32_folded"), self.nz, self.config
      sigmas = denoise.default_sigmas(nz, num_levels=cfg.levels)
      return lambda y: clf(denoise.annealed(score_fn, y, nz, sigmas, None, cfg.steps_per_level))

    return self._once("annealed", build)

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

    return self._once("ncsnpp", build)

  def ncsnpp_one_step_classifier(self):
    return self._once("ncsnpp_one_step", lambda: self._one_step_over(self.ncsnpp_score_fn()))

  def memory_classifier(self) -> classifier_lib.Classifier:
    """The small folded ResNet-8 of the memory check, on ``memory_check_shape`` images."""
    def build():
      cfg = self.config
      shape = cfg.memory_check_shape
      module = resnet.CifarResNet(depth=8, num_classes=cfg.num_classes, shortcut="B", width=8)
      variables = random_variables(module, jnp.zeros((1, *shape)), seed=cfg.seed)
      return classifier_lib.Classifier(module=module, variables=jax.tree.map(jnp.asarray, variables),
                                       mean=(0.5,) * shape[-1], std=(0.25,) * shape[-1],
                                       num_classes=cfg.num_classes, image_shape=shape).folded()

    return self._once("memory_clf", build)

  def torch_model(self):
    """The float32 CIFAR ResNet in PyTorch (``torch_baseline``), with the JAX classifier's weights."""
    def build():
      cfg = self.config
      clf = self.classifier("f32")
      model = torch_baseline.build_cifar_resnet(cfg.depth, cfg.num_classes, clf.mean, clf.std, width=cfg.width,
                                                in_channels=cfg.image_shape[-1])
      torch_baseline.load_flax_variables(model, clf.variables)
      return model

    return self._once("torch_model", build)

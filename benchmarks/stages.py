"""Where the time goes: the CIFAR ResNet cut into its parts (stem, the three stages, head), each timed on its own
in JAX and in the PyTorch baseline on the same weights and the same activations.

``jax_parts(clf)`` splits a BatchNorm-folded ``CifarResNet`` classifier into jitted functions whose composition is
the classifier, ``torch_parts(model)`` does the same for the ``torch_baseline`` model, ``run_parts`` runs parts in
order and ``check_composition`` verifies that they compose to the classifier. The parts differ in channel count
(width, 2 width, 4 width), which is what decides which kernel library XLA:CPU gives a convolution, so a per-part
ratio says where a whole-network gap comes from.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from scoresmooth_jax.modelio import classifier as classifier_lib
from scoresmooth_jax.models import resnet

PARTS = ("stem", "layer1", "layer2", "layer3", "head")


class _Stem(nn.Module):
  """The network's stem on its own, under the network's parameter name (conv1)."""

  width: int
  dtype: Any
  conv_impl: str

  @nn.compact
  def __call__(self, x):
    return resnet.cifar_stem(x.astype(self.dtype), self.width, self.dtype, impl=self.conv_impl)


def jax_parts(clf: classifier_lib.Classifier) -> dict[str, Callable]:
  """The folded ResNet ``clf`` as jitted parts: images in [0, 1] -> stem -> layer1 -> layer2 -> layer3 -> logits."""
  module = clf.module
  if not isinstance(module, resnet.CifarResNet) or not module.fold_bn:
    raise ValueError(f"jax_parts needs a BatchNorm-folded CifarResNet classifier (clf.folded()), not {module!r}.")
  params = clf.variables["params"]
  blocks = (module.depth - 2) // 6
  dtype = module.dtype  # the classifier's compute dtype (Classifier clones the module with it)
  mean, std = jnp.asarray(clf.mean, jnp.float32), jnp.asarray(clf.std, jnp.float32)

  def stem(x):
    stem_module = _Stem(module.width, dtype, module.conv_impl)
    return stem_module.apply({"params": {"conv1": params["conv1"]}}, (x - mean) / std)

  def stage(index: int):
    def run(y):
      for block in range(blocks):
        stride = 2 if (index > 0 and block == 0) else 1
        layer = resnet.CifarBasicBlock(module.width * 2**index, stride, module.shortcut, dtype, True,
                                       conv_impl=module.conv_impl)
        y = layer.apply({"params": params[f"layer{index + 1}_{block}"]}, y)
      return y
    return run

  def head(y):
    return nn.Dense(module.num_classes, dtype=dtype).apply({"params": params["fc"]}, jnp.mean(y, axis=(1, 2)))

  fns = {"stem": stem, "layer1": stage(0), "layer2": stage(1), "layer3": stage(2), "head": head}
  return {name: jax.jit(fns[name]) for name in PARTS}


def torch_parts(model) -> dict[str, Callable]:
  """The same parts of a ``torch_baseline.build_cifar_resnet`` model (NCHW tensors, run under no_grad)."""
  import torch  # pylint: disable=import-outside-toplevel

  net = model.model
  fns = {"stem": lambda x: torch.relu(net.bn1(net.conv1((x - model.mean) / model.std))),
         "layer1": net.layer1, "layer2": net.layer2, "layer3": net.layer3,
         "head": lambda y: net.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(y, 1), 1))}

  def no_grad(fn):
    def run(x):
      with torch.no_grad():
        return fn(x)
    return run

  return {name: no_grad(fns[name]) for name in PARTS}


def run_parts(parts: dict[str, Callable], images) -> tuple[dict[str, object], object]:
  """Runs the parts in order on ``images``: (the input each part sees, the last part's output)."""
  inputs, x = {}, images
  for name in PARTS:
    inputs[name] = x
    x = parts[name](x)
  return inputs, x


def check_composition(logits, clf: classifier_lib.Classifier, images, atol: float) -> float:
  """Max |``logits`` of the composed parts - clf(images)|; raises if over ``atol`` (the parts must be the network)."""
  error = float(np.max(np.abs(np.asarray(logits, np.float32) - np.asarray(clf(images), np.float32))))
  if not error <= atol:
    raise AssertionError(f"the ResNet's parts compose to logits {error:.2e} away from the classifier's (tolerance "
                         f"{atol:.0e}): the stage breakdown would not time the benchmarked network.")
  return error

"""bfloat16 against float32 on the same noisy samples: ``labels_agreement`` of any two classifiers, and
``fixture_agreement`` of the trained ResNet-20 fixture on real CIFAR-10 test images (when the fixtures are there).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from scoresmooth_jax import noise
from benchmarks.config import BenchmarkConfig


def labels_agreement(reference: Callable, other: Callable, images, nz: noise.Noise, draws: int, batch: int,
                     key: jax.Array) -> dict:
  """Fraction of identical top-1 labels of two classifiers on the same noisy copies of each image."""
  pair = jax.jit(lambda x: (jnp.argmax(reference(x), -1), jnp.argmax(other(x), -1)))
  same = total = 0
  majority = []
  for i, image in enumerate(images):
    labels = []
    for b in range(-(-draws // batch)):
      eps = nz.sample(jax.random.fold_in(jax.random.fold_in(key, i), b), (batch, *image.shape))
      a, o = pair(jnp.asarray(image)[None] + eps)
      a, o = np.asarray(a), np.asarray(o)
      same += int((a == o).sum())
      total += a.size
      labels.append(a)
    labels = np.concatenate(labels)
    majority.append(float(np.bincount(labels).max() / labels.size))
  return {"agreement": same / total, "samples": total, "mean_top_class_fraction": float(np.mean(majority))}


def fixture_agreement(config: BenchmarkConfig, nz: noise.Noise, log) -> dict | None:
  """bfloat16 vs float32 label agreement of the trained ResNet-20 fixture on real CIFAR-10 test images."""
  if not config.fixtures_dir:
    return None
  from scoresmooth_jax.modelio import convert  # pylint: disable=import-outside-toplevel

  directory = os.path.expanduser(config.fixtures_dir)
  checkpoint = os.path.join(directory, "resnet20-12fca82f.th")
  data = os.path.join(directory, "cifar10_test_first1017.npz")
  if not (os.path.isfile(checkpoint) and os.path.isfile(data)):
    log(f"fixtures not found in {directory}: skipping the trained ResNet-20 agreement")
    return None
  try:
    clf = convert.convert_torch_checkpoint(checkpoint).to_classifier().folded()
  except ImportError as err:
    log(f"skipping the trained ResNet-20 agreement: {err}")
    return None
  with np.load(data, allow_pickle=False) as arrays:
    images = arrays["images"][:config.agreement_images * 4].astype(np.float32) / 255.0
  bf16 = dataclasses.replace(clf, compute_dtype=jnp.bfloat16)
  result = labels_agreement(clf, bf16, images, nz, config.agreement_draws, min(config.agreement_draws, 128),
                            jax.random.key(config.seed + 5))
  return {"classifier": "akamaster ResNet-20 (trained), BN folded", "images": len(images), **result}

"""What a row times: a ``Case`` (one timed call of a known number of samples, with its FLOPs and compile time), the
``Inputs`` every JAX case shares (mesh, noise, image), and the two JAX measurements: ``forward_case`` (a jitted
function on one noisy batch, ``calls`` times) and ``counts_case`` (``smoothing.sample_counts`` of a classifier).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import precision
from benchmarks.config import BenchmarkConfig
from benchmarks.measure import compiled_flops, compiled_memory_bytes
from scoresmooth_jax import noise, smoothing
from scoresmooth_jax.runtime import sharding


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


class Inputs:
  """The mesh over every device, the config's Gaussian noise and the one image the JAX cases draw around."""

  def __init__(self, config: BenchmarkConfig):
    self.config = config
    self.mesh = sharding.data_mesh()
    self.devices = self.mesh.size
    self.nz = noise.Gaussian(config.sigma)
    rng = np.random.default_rng(config.seed)
    self.image = jnp.asarray(rng.uniform(size=config.image_shape).astype(np.float32))

  def noisy_batch(self, per_device: int, image=None) -> jax.Array:
    """A noisy batch of ``per_device`` images on every device, split over the "data" axis."""
    image = self.image if image is None else image
    eps = self.nz.sample(jax.random.key(self.config.seed + 7), (per_device * self.devices, *image.shape))
    return jax.device_put(image[None] + eps, sharding.batch_sharding(self.mesh))


def forward_case(inputs: Inputs, fn, batch_size: int, calls: int, image=None) -> Case:
  """``fn`` jitted on one noisy batch of ``batch_size`` per device, called ``calls`` times per timed call; FLOPs,
  memory and compute types from the compiled program."""
  x = inputs.noisy_batch(batch_size, image)
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(x).compile()
  seconds = time.perf_counter() - start

  def run():
    out = None
    for _ in range(calls):
      out = compiled(x)
    return out

  return Case(run=run, warmup=lambda: compiled(x), samples=calls * batch_size * inputs.devices,
              batch_size=batch_size, flops_per_sample=compiled_flops(compiled) / batch_size,
              flops_source="XLA cost analysis", xla_bytes=compiled_memory_bytes(compiled), compile_seconds=seconds,
              compute_types=precision.compute_types(compiled.as_text()))


def counts_case(inputs: Inputs, fn, batch_size: int, num_per_device: int, flops_per_sample: float, image=None,
                num_classes: int | None = None, source: str = "forward's XLA cost") -> Case:
  """``smoothing.sample_counts`` of ``fn`` drawing ``num_per_device`` samples per device at ``batch_size``; the
  FLOPs per sample are given (XLA counts a loop's body once)."""
  image = inputs.image if image is None else image
  num = num_per_device * inputs.devices
  key = jax.random.key(inputs.config.seed + 11)
  num_classes = num_classes or inputs.config.num_classes
  count = lambda n: smoothing.sample_counts(fn, image, inputs.nz, n, key, num_classes=num_classes,
                                            batch_size=batch_size, mesh=inputs.mesh)
  return Case(run=lambda: count(num), warmup=lambda: count(1), samples=num, batch_size=batch_size,
              flops_per_sample=flops_per_sample, flops_source=source)

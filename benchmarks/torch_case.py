"""The PyTorch rows' case: ``torch_baseline``'s eager Monte-Carlo loop over the same ResNet and weights as the JAX
rows, drawing as many samples per timed call as the JAX side does."""

from __future__ import annotations

import numpy as np

from benchmarks import torch_baseline
from benchmarks.cases import Case, Inputs


def torch_counts_case(inputs: Inputs, model, threads: int, batch_size: int, flops_per_sample: float) -> Case:
  """The PyTorch loop on ``threads`` threads at ``batch_size`` per device (times the devices JAX uses), drawing
  ``torch_batches`` batches per timed call; FLOPs are the JAX forward's (same network)."""
  cfg = inputs.config
  image = np.asarray(inputs.image)
  batch = batch_size * inputs.devices
  num = cfg.torch_batches * batch  # the same draws the JAX side makes per call

  def count(n):
    torch_baseline.configure_threads(threads)  # per call: the 1- and all-thread cases run interleaved
    return torch_baseline.sample_counts(model, image, cfg.sigma, n, batch, cfg.num_classes, seed=cfg.seed)

  return Case(run=lambda: count(num), warmup=lambda: count(batch), samples=num, batch_size=batch,
              flops_per_sample=flops_per_sample, flops_source="JAX forward's XLA cost (same network)")

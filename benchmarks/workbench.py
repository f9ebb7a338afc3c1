"""The benchmark's cases by name: ``Workbench(config).case(case_id)`` is what rows time and what the memory
subprocess rebuilds on its own. The networks come from ``networks.Networks``, the JAX measurements from ``cases``
(forward passes, ``sample_counts``), the PyTorch loop from ``torch_case`` and the training step from ``train_case``.

Case ids: "a.<variant>" / "b.<variant>" (the ResNet's forward / inside sample_counts; variant "f32", "f32_folded" or
"bf16_folded"), "torch.f32" / "torch.f32_1thread", "sweep.torch.<B>" / "sweep.jax.<variant>.<B>", "c.raw" /
"c.counts" / "c.ncsnpp_raw" / "c.ncsnpp_counts" (one-step denoiser + ResNet), "d.score" / "d.classifier" / "d.raw" /
"d.counts" (annealed denoiser), "e.train", "mem.small" / "mem.large", "imagenet.<a|b>.<variant>".
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from benchmarks.cases import Case, Inputs, counts_case, forward_case
from benchmarks.config import BenchmarkConfig
from benchmarks.networks import Networks
from benchmarks.torch_case import torch_counts_case
from benchmarks.train_case import train_step_case
from scoresmooth_jax.runtime.xla_cpu import xla_cpu_threads


class Workbench:
  """The networks (``nets``), the shared inputs (``inputs``) and every case of a config, each built once."""

  def __init__(self, config: BenchmarkConfig, calibrate: bool = True, measure_flops: bool = True):
    self.config = config
    self.measure_flops = measure_flops
    self.nets = Networks(config, calibrate=calibrate)
    self.inputs = Inputs(config)
    self._cases: dict = {}

  def case(self, case_id: str) -> Case:
    """The case named ``case_id`` (module docstring), built on first use."""
    if case_id not in self._cases:
      self._cases[case_id] = self._build(case_id)
    return self._cases[case_id]

  def flops_of(self, case_id: str) -> float:
    """FLOPs per sample of another (single-batch) case; NaN in the memory subprocess, which needs none."""
    return self.case(case_id).flops_per_sample if self.measure_flops else float("nan")

  def _build(self, case_id: str) -> Case:
    section = case_id.split(".")[0]
    builder = {"a": self._classifier_case, "b": self._classifier_case, "torch": self._torch_case,
               "sweep": self._torch_case, "c": self._one_step_case, "d": self._annealed_case,
               "e": self._train_case, "mem": self._memory_case, "imagenet": self._imagenet_case}.get(section)
    case = builder(case_id) if builder else None
    if case is None:
      raise ValueError(f"unknown benchmark case {case_id!r}.")
    return case

  def _classifier_case(self, case_id: str) -> Case:
    cfg, inputs = self.config, self.inputs
    section, _, variant = case_id.partition(".")
    clf = self.nets.classifier(variant)
    if section == "a":
      return forward_case(inputs, clf, cfg.batch_size, cfg.batches_per_call)
    return counts_case(inputs, clf, cfg.batch_size, cfg.batches_per_call * cfg.batch_size,
                       self.flops_of(f"a.{variant}"))

  def _torch_case(self, case_id: str) -> Case | None:
    """"torch.f32" (all threads), "torch.f32_1thread", and the sweep: "sweep.torch.B" against "sweep.jax.V.B"."""
    cfg = self.config
    if case_id in ("torch.f32", "torch.f32_1thread"):
      threads = 1 if case_id == "torch.f32_1thread" else xla_cpu_threads()
      return torch_counts_case(self.inputs, self.nets.torch_model(), threads, cfg.batch_size, self.flops_of("a.f32"))
    parts = case_id.split(".")
    if parts[0] != "sweep" or len(parts) < 3 or not parts[-1].isdigit():
      return None
    side, name, size = parts[1], ".".join(parts[2:-1]), int(parts[-1])
    if side == "torch" and not name:
      return torch_counts_case(self.inputs, self.nets.torch_model(), xla_cpu_threads(), size, self.flops_of("a.f32"))
    if side == "jax" and name:
      return counts_case(self.inputs, self.nets.classifier(name), size, cfg.torch_batches * size,
                         self.flops_of(f"a.{name}"))
    return None

  def _one_step_case(self, case_id: str) -> Case | None:
    cfg, inputs = self.config, self.inputs
    batch, calls = cfg.batch_size, cfg.batches_per_call
    if case_id == "c.raw":
      return forward_case(inputs, self.nets.one_step_classifier(), batch, calls)
    if case_id == "c.counts":
      return counts_case(inputs, self.nets.one_step_classifier(), batch, calls * batch, self.flops_of("c.raw"))
    if case_id == "c.ncsnpp_raw":
      return forward_case(inputs, self.nets.ncsnpp_one_step_classifier(), cfg.ncsnpp_batch_size, 1)
    if case_id == "c.ncsnpp_counts":
      return counts_case(inputs, self.nets.ncsnpp_one_step_classifier(), cfg.ncsnpp_batch_size, cfg.ncsnpp_num,
                         self.flops_of("c.ncsnpp_raw"))
    return None

  def _annealed_case(self, case_id: str) -> Case | None:
    """Row d: the annealed pipeline, and its parts (one score forward, one classifier forward) on their own."""
    cfg, inputs, batch = self.config, self.inputs, self.config.annealed_batch_size
    if case_id == "d.score":
      score_fn, sigma = self.nets.score_fn(), cfg.sigma
      return forward_case(inputs, lambda y: score_fn(y, sigma), batch, cfg.batches_per_call)
    if case_id == "d.classifier":
      return forward_case(inputs, self.nets.classifier("f32_folded"), batch, cfg.batches_per_call)
    if case_id not in ("d.raw", "d.counts"):
      return None
    # XLA counts a loop's body once: the pipeline's FLOPs are L * T score forwards + one classifier forward.
    flops = cfg.levels * cfg.steps_per_level * self.flops_of("d.score") + self.flops_of("d.classifier")
    source = "L*T score + classifier (XLA cost)"
    if case_id == "d.raw":
      case = forward_case(inputs, self.nets.annealed_classifier(), batch, 1)
      return dataclasses.replace(case, flops_per_sample=flops, flops_source=source)
    return counts_case(inputs, self.nets.annealed_classifier(), batch, batch, flops, source=source)

  def _train_case(self, case_id: str) -> Case | None:
    if case_id != "e.train":
      return None
    module, params = self.nets.unet()
    return train_step_case(self.inputs, module, params, self.config.train_batch_size)

  def _memory_case(self, case_id: str) -> Case | None:
    """The memory check: sample_counts of a small ResNet at n = memory_check_num (small, large)."""
    if case_id not in ("mem.small", "mem.large"):
      return None
    cfg = self.config
    num = cfg.memory_check_num[0 if case_id == "mem.small" else 1]
    image = jnp.asarray(np.random.default_rng(cfg.seed).uniform(size=cfg.memory_check_shape).astype(np.float32))
    return counts_case(self.inputs, self.nets.memory_classifier(), cfg.memory_check_batch,
                       max(1, num // self.inputs.devices), float("nan"), image=image)

  def _imagenet_case(self, case_id: str) -> Case | None:
    cfg = self.config
    parts = case_id.split(".")
    if len(parts) != 3 or parts[1] not in ("a", "b"):
      return None
    _, kind, variant = parts
    image = jnp.asarray(np.random.default_rng(cfg.seed).uniform(size=(224, 224, 3)).astype(np.float32))
    clf = self.nets.imagenet_classifier(variant)
    if kind == "a":
      return forward_case(self.inputs, clf, cfg.imagenet_batch_size, 1, image=image)
    return counts_case(self.inputs, clf, cfg.imagenet_batch_size, cfg.imagenet_batch_size,
                       self.flops_of(f"imagenet.a.{variant}"), image=image, num_classes=1000)

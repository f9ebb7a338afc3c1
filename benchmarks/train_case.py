"""Row e: one score-training step as ``training.train`` runs it (the score task's loss from
``losses.get_score_task_loss_fn``, Adam + EMA from ``train_state``, one jitted step over the mesh)."""

from __future__ import annotations

import time

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from benchmarks.cases import Case, Inputs
from benchmarks.measure import compiled_flops, compiled_memory_bytes
from scoresmooth_jax.runtime import sharding
from scoresmooth_jax.training import losses, train_state


def train_step_case(inputs: Inputs, module, params, batch_size: int) -> Case:
  """One DSM training step of ``module`` from ``params`` at ``batch_size`` images per device; each timed call
  advances the state by one step."""
  cfg, mesh = inputs.config, inputs.mesh
  loss_fn = losses.get_score_task_loss_fn(module, losses.SigmaDistribution(0.01, 1.0))
  optim = train_state.OptimConfig(learning_rate=2e-4, warmup_steps=0, schedule="constant", grad_clip=1.0,
                                  weight_decay=0.0, ema_decay=0.999)
  optimizer = train_state.make_optimizer(optim, 1000)
  state = jax.jit(lambda p: train_state.create_state({"params": p}, optimizer),
                  out_shardings=sharding.replicated(mesh))(params)
  step = train_state.jit_train_step(train_state.get_train_step_fn(loss_fn, optimizer, optim.ema_decay), mesh)
  batch = batch_size * inputs.devices
  rng = np.random.default_rng(cfg.seed)
  stacked = NamedSharding(mesh, P(None, sharding.DATA_AXIS))  # one step per dispatch: a leading axis of 1
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

  return Case(run=run, warmup=run, samples=batch, batch_size=batch_size,
              flops_per_sample=compiled_flops(compiled) / batch_size, flops_source="XLA cost analysis",
              xla_bytes=compiled_memory_bytes(compiled), compile_seconds=seconds)

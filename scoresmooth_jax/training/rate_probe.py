"""How fast training configs step on this machine, and the largest of them a time budget affords.

A run given a fixed time (an accelerator lent for minutes) should train the largest network that still takes
enough steps in that time. The rate of a size is measured, not guessed: on accelerators it depends on how well
each width fills the chip, which no FLOP count predicts.

Promises:
  * ``measure_steps_per_sec(configs, seconds)`` returns {name: steps/s} for each training config: the train step
    that ``train.train_and_evaluate`` runs for it (the same task, optimizer, sharding, steps per dispatch and
    compute dtype), compiled for all configs first (in parallel threads: XLA compiles outside the GIL), then
    timed for ``seconds`` each after one untimed dispatch, each dispatch waiting for the previous one's loss as
    training does. The batches are synthetic (uniform images of the config's shape: a step's cost does not
    depend on pixel values), so no data is read; nothing is written.
  * ``plan(rates, order, ...)`` is the first name in ``order`` (largest first) whose rate fills
    ``fraction`` of ``train_seconds`` with at least ``min_steps`` steps, and that step count in whole dispatches;
    a ValueError names every rate when none does.
"""

from __future__ import annotations

import concurrent.futures
import math
import time
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from scoresmooth_jax.runtime import sharding
from scoresmooth_jax.training import train, train_state


def _compiled_step(config, mesh):
  """(compiled train step, initial state, images, labels, key) of ``config`` on synthetic data."""
  task = train.build_task(config)
  optimizer = train_state.make_optimizer(train_state.OptimConfig(**config.optim.to_dict()), int(config.train.num_steps))
  key = jax.random.key(config.seed)
  state = train_state.jit_init(lambda k: train_state.create_state(task.init_variables(k), optimizer), mesh, key)(key)
  k, batch = int(config.train.steps_per_dispatch), int(config.train.batch_size)
  shape = (k, batch, *tuple(config.data.image_shape))
  batch_sharding = NamedSharding(mesh, P(None, sharding.DATA_AXIS))
  images = jax.device_put(jax.random.uniform(jax.random.key(1), shape), batch_sharding)
  labels = jax.device_put(jnp.zeros((k, batch), jnp.int32), batch_sharding)
  step_fn = train_state.jit_train_step(
      train_state.get_train_step_fn(task.loss_fn, optimizer, float(config.optim.ema_decay)), mesh)
  return step_fn.lower(state, images, labels, key).compile(), state, images, labels, key


def _time(compiled, state, images, labels, key, seconds: float, steps_per_dispatch: int) -> float:
  state, metrics = compiled(state, images, labels, key)  # untimed: first-call allocations
  jax.block_until_ready(metrics)
  steps, start = 0, time.perf_counter()
  while True:
    state, next_metrics = compiled(state, images, labels, key)
    jax.block_until_ready(metrics)  # the previous dispatch: the device always has one queued, as in training
    metrics = next_metrics
    steps += steps_per_dispatch
    if time.perf_counter() - start >= seconds:
      break
  jax.block_until_ready(metrics)
  loss = float(jnp.mean(metrics["loss"]))
  if not math.isfinite(loss):
    raise FloatingPointError(f"the probe's loss is {loss}: the configuration does not train; fix it before timing.")
  return steps / (time.perf_counter() - start)


def measure_steps_per_sec(configs: Mapping[str, object], seconds: float) -> dict[str, float]:
  """Steps per second of each named training config (module docstring)."""
  if not seconds > 0:
    raise ValueError(f"seconds={seconds!r} must be > 0: how long to time each config's steps.")
  mesh = sharding.data_mesh()
  with concurrent.futures.ThreadPoolExecutor(max(1, len(configs))) as pool:
    compiled = dict(zip(configs, pool.map(lambda c: _compiled_step(c, mesh), configs.values())))
  rates = {}
  for name, config in configs.items():
    rates[name] = _time(*compiled.pop(name), seconds, int(config.train.steps_per_dispatch))
  return rates


def plan(rates: Mapping[str, float], order: Sequence[str], train_seconds: float, min_steps: int,
         steps_per_dispatch: int, fraction: float = 0.9) -> tuple[str, int]:
  """(name, steps): the first of ``order`` that trains >= ``min_steps`` in ``fraction * train_seconds``.

  ``fraction`` leaves the rest of the budget to compiling, evaluating and checkpointing; the steps are rounded
  down to whole dispatches of ``steps_per_dispatch``.
  """
  for name in order:
    steps = int(rates[name] * train_seconds * fraction) // steps_per_dispatch * steps_per_dispatch
    if steps >= min_steps:
      return name, steps
  measured = ", ".join(f"{name}: {rates[name]:.2f} steps/s" for name in order)
  raise ValueError(f"no candidate trains {min_steps} steps in {fraction:g} x {train_seconds:g} s ({measured}); "
                   "raise the time budget, lower the minimum step count, or add a smaller candidate.")

"""The training state and the jitted, sharded update step shared by score and classifier training.

Promises:
  * ``TrainState`` is a pytree (step, params, EMA params, optimizer state, mutable model collections such as
    BatchNorm statistics) that Orbax saves and restores as one item. Its parameters, EMA and optimizer state are
    float32 whatever the model computes in (mixed precision: a bfloat16 network casts the float32 master
    weights where it uses them, and its gradients arrive in float32).
  * ``make_optimizer`` is Adam (AdamW when weight decay > 0) after global-norm gradient clipping, with a
    linear warmup into a constant or cosine-decayed learning rate.
  * ``get_train_step_fn`` returns a pure function that applies ``k`` updates in one call (``lax.scan`` over a
    stacked [k, B, ...] batch); the key of step t is ``fold_in(rng, t)``, so a run resumed at step t draws
    exactly the noise an uninterrupted run would have.
  * ``jit_train_step`` compiles it with the batch split over "data", everything else replicated, and the
    state donated (updated in place on device).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from scoresmooth_jax.runtime import sharding

SCHEDULES = ("constant", "cosine")


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: number of updates applied
  params: Any
  ema_params: Any
  opt_state: Any
  model_state: Any  # mutable collections other than params ({"batch_stats": ...}), {} for score models


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Optimizer settings (the ``optim`` section of a training config).

  Attributes:
    learning_rate: peak learning rate, reached after ``warmup_steps``.
    warmup_steps: linear warmup from 0.
    schedule: "constant" after warmup (score_sde), or "cosine" decay to 0 at ``num_steps`` (classifiers).
    grad_clip: global-norm clipping threshold; 0 disables clipping.
    weight_decay: decoupled weight decay (AdamW); 0 is plain Adam.
    ema_decay: EMA decay of the parameters; 0 makes the EMA equal the parameters.
  """

  learning_rate: float
  warmup_steps: int
  schedule: str
  grad_clip: float
  weight_decay: float
  ema_decay: float

  def __post_init__(self):
    if not self.learning_rate > 0:
      raise ValueError(f"optim.learning_rate={self.learning_rate!r} must be > 0.")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"optim.schedule={self.schedule!r}: choose one of {SCHEDULES}.")
    if self.warmup_steps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
      raise ValueError(f"optim.warmup_steps={self.warmup_steps}, grad_clip={self.grad_clip} and weight_decay="
                       f"{self.weight_decay} must all be >= 0.")
    if not 0.0 <= self.ema_decay < 1.0:
      raise ValueError(f"optim.ema_decay={self.ema_decay!r} must be in [0, 1) (e.g. 0.999; 0 disables EMA).")


def learning_rate_schedule(config: OptimConfig, num_steps: int) -> optax.Schedule:
  """step -> learning rate: linear warm-up from 0, then constant or cosine decay to 0 at ``num_steps``."""
  warmup = max(config.warmup_steps, 0)
  if config.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, warmup, max(num_steps, warmup + 1))
  if warmup:
    return optax.join_schedules(
        [optax.linear_schedule(0.0, config.learning_rate, warmup), optax.constant_schedule(config.learning_rate)],
        [warmup])
  return optax.constant_schedule(config.learning_rate)


def check_resumed_learning_rate(step: int, saved: tuple[OptimConfig, int], new: tuple[OptimConfig, int]):
  """Refuses to resume at ``step`` where the new (optim, num_steps) raise the learning rate well above the saved.

  Changing ``train.num_steps`` (or ``optim``) moves the schedule. A small move is harmless (a run extended
  mid-way), but restarting a decayed cosine at a high rate, with no warm-up, throws away what was learnt: a
  3,500-step run resumed with num_steps 15,000 jumped from 0 to 0.87x the peak and its loss went from 0.05 to
  0.45 in 50 steps.
  """
  (saved_optim, saved_steps), (optim, num_steps) = saved, new
  before = float(learning_rate_schedule(saved_optim, saved_steps)(step))
  after = float(learning_rate_schedule(optim, num_steps)(step))
  if after > 1.25 * before + 1e-3 * optim.learning_rate:
    raise ValueError(
        f"resuming at step {step} would raise the learning rate from {before:.3g} (the checkpoint's settings: "
        f"train.num_steps={saved_steps}, optim.learning_rate={saved_optim.learning_rate:g}, schedule "
        f"{saved_optim.schedule!r}) to {after:.3g} (train.num_steps={num_steps}, optim.learning_rate="
        f"{optim.learning_rate:g}); such a jump without warm-up wrecks the trained weights. Resume with the "
        "checkpoint's settings, or train in a new workdir.")


def make_optimizer(config: OptimConfig, num_steps: int) -> optax.GradientTransformation:
  """Clip -> Adam(W) with the configured learning-rate schedule."""
  schedule = learning_rate_schedule(config, num_steps)
  parts = [optax.clip_by_global_norm(config.grad_clip)] if config.grad_clip > 0 else []
  if config.weight_decay > 0:
    parts.append(optax.adamw(schedule, weight_decay=config.weight_decay))
  else:
    parts.append(optax.adam(schedule))
  return optax.chain(*parts)


def create_state(variables: Any, optimizer: optax.GradientTransformation) -> TrainState:
  """The state at step 0 from freshly initialised Flax variables."""
  variables = dict(variables)
  # float32 master weights even if a module initialised its parameters in a lower precision: Adam's moments and
  # the EMA's small updates (1 - decay = 5e-4 of a difference) vanish in bfloat16's 8-bit mantissa.
  params = jax.tree.map(lambda a: a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                        variables.pop("params"))
  # A copy, not the same buffers: the state is donated, and one buffer cannot be donated twice.
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=jax.tree.map(jnp.copy, params),
                    opt_state=optimizer.init(params), model_state=variables)


# loss_fn(params, model_state, images, labels, key) -> (loss, (new_model_state, metrics dict of scalars))
LossFn = Callable[..., tuple[jax.Array, tuple[Any, dict]]]


def get_train_step_fn(loss_fn: LossFn, optimizer: optax.GradientTransformation, ema_decay: float):
  """One dispatch of training: ``k`` optimizer updates, where k is the leading axis of the batch.

  Args:
    loss_fn: ``loss_fn(params, model_state, images, labels, key) -> (loss, (model_state, metrics))``.
    optimizer: the optax transformation ``state.opt_state`` belongs to.
    ema_decay: EMA decay; the effective decay at step t is min(ema_decay, (1 + t) / (10 + t)), so that
      short runs are not dominated by the initial parameters.

  Returns:
    ``train_step(state, images [k, B, ...], labels [k, B], rng) -> (state, metrics)`` with ``metrics`` a dict
    of float32 [k] arrays (``"loss"`` plus whatever ``loss_fn`` reports).
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def one_update(rng, state: TrainState, batch):
    images, labels = batch
    key = jax.random.fold_in(rng, state.step)
    (loss, (model_state, metrics)), grads = grad_fn(state.params, state.model_state, images, labels, key)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    step = state.step.astype(jnp.float32)
    decay = jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))
    ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
    state = state.replace(step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state,
                          model_state=model_state)
    return state, {"loss": loss, "grad_norm": optax.tree.norm(grads), **metrics}

  def train_step(state, images, labels, rng):
    if images.shape[0] == 1:
      # No loop for a single step: XLA:CPU runs convolutions inside while-loop bodies several times slower
      # than at top level (jax-ml/jax#12868), and one step per dispatch is what CPU configs use.
      state, metrics = one_update(rng, state, (images[0], labels[0]))
      return state, jax.tree.map(lambda m: m[None], metrics)
    return lax.scan(functools.partial(one_update, rng), state, (images, labels))

  return train_step


def jit_train_step(train_step, mesh: Mesh):
  """``train_step`` compiled for ``mesh``: batches split on "data" (axis 1 of [k, B, ...]), state replicated
  and donated, metrics replicated."""
  batch = NamedSharding(mesh, P(None, sharding.DATA_AXIS))
  replicated = sharding.replicated(mesh)
  return jax.jit(train_step, in_shardings=(replicated, batch, batch, replicated),
                 out_shardings=(replicated, replicated), donate_argnums=0)


def jit_init(init_fn, mesh: Mesh, key: jax.Array):
  """``init_fn(key) -> TrainState`` compiled once, its output replicated over ``mesh``.

  On CPU the program is compiled without backend optimisations: initialisation runs once, and XLA:CPU spends
  most of the compile time optimising the many threefry draws of the initialisers (~5x faster this way).
  """
  options = {"xla_backend_optimization_level": 0} if mesh.devices.flat[0].platform == "cpu" else {}
  return jax.jit(init_fn, out_shardings=sharding.replicated(mesh)).lower(key).compile(compiler_options=options)

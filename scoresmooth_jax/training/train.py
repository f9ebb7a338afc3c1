"""``train_and_evaluate(config, workdir)``: trains a score network (``config.task = "score"``) or a classifier
(``"classifier"``) and exports it for inference.

Promises:
  * Everything that can be wrong with the config (unknown dataset or model, sigma_min >= sigma_max, an image
    shape that does not match the data, evaluation sigmas outside the trained range, step counts that do not
    fit ``steps_per_dispatch``) fails with a message before any training step.
  * Batches are sharded over the "data" mesh axis, parameters replicated, the state donated; each jitted
    dispatch applies ``train.steps_per_dispatch`` updates. A NaN or infinite loss stops training with an error
    (and is never checkpointed).
  * ``<workdir>/checkpoints``: Orbax checkpoints of the full state every ``train.checkpoint_every`` steps, the
    last ``train.keep_checkpoints`` kept. The same command with the same workdir resumes from the latest one
    and, since batches and keys depend only on (seed, step), continues exactly as an uninterrupted run would.
  * ``<workdir>/metrics.jsonl``: one JSON record per log / evaluation step; a progress line goes to stdout.
  * ``train.init_from``: a fresh run starts from the EMA parameters of a score export or a shipped model, or
    from a classifier export, of the same architecture, with a fresh optimizer and schedule (``warm_start.py``).
  * ``<workdir>/export``: the inference model, written at the end: ``export.load_score_fn`` reads score
    models, ``classifier.load_classifier`` classifiers.
  * Score models train in mixed precision with ``model.kwargs.dtype = "bfloat16"`` (``precision.py``); the
    export records it as ``train_compute_dtype``.

Config sections (every key: ``runtime.config_schema.training_config``; documented examples: configs/score_digits.py
and configs/classifier_digits.py):
``task, seed, distributed, data, model, optim, train, eval`` and, per task, ``sigma`` (score) or
``noise_sigma`` and ``normalization`` (classifier).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from scoresmooth_jax import models
from scoresmooth_jax.datasets import data
from scoresmooth_jax.modelio import checkpoint, classifier
from scoresmooth_jax.runtime import sharding
from scoresmooth_jax.runtime.config_schema import TASKS
from scoresmooth_jax.training import evaluate, losses, precision, train_state, warm_start
from scoresmooth_jax.modelio.export import ScoreFunction, export_score_model, load_score_fn  # noqa: F401 (re-export)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  name: str
  eval_name: str
  train_split: str
  eval_split: str
  data_dir: str | None
  image_size: int | None
  image_shape: tuple[int, int, int]
  random_flip: bool
  random_crop_padding: int
  in_memory: bool


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  batch_size: int
  num_steps: int
  steps_per_dispatch: int
  log_every: int
  eval_every: int
  checkpoint_every: int
  keep_checkpoints: int

  def __post_init__(self):
    k = self.steps_per_dispatch
    if k < 1 or self.batch_size < 1 or self.num_steps < 1:
      raise ValueError(f"train.batch_size={self.batch_size}, num_steps={self.num_steps} and steps_per_dispatch={k} "
                       "must be >= 1.")
    for name in ("num_steps", "log_every", "eval_every", "checkpoint_every"):
      value = getattr(self, name)
      if value < 1 or value % k:
        raise ValueError(f"train.{name}={value} must be a positive multiple of train.steps_per_dispatch={k} "
                         "(steps advance k at a time).")


@dataclasses.dataclass(frozen=True)
class Task:
  """What differs between the two tasks, built once from the config before training."""

  model_name: str
  model_kwargs: dict  # the constructor's keywords as exported (what train.init_from must match)
  init_variables: Any  # key -> Flax variables
  loss_fn: Any  # train_state.LossFn
  eval_batch: Any  # evaluate.*_eval_fn result
  finalize: Any  # summed eval dict -> metrics
  eval_variables: Any  # TrainState -> what eval_batch takes
  export: Any  # (path, state, metrics) -> None
  flops_fn: Any  # (variables, one image) -> output, for the FLOPs report


def _data_config(config) -> DataConfig:
  d = config.data
  return DataConfig(name=d.name, eval_name=d.eval_name or d.name, train_split=d.train_split,
                    eval_split=d.eval_split, data_dir=d.data_dir or None,
                    image_size=d.image_size, image_shape=tuple(int(v) for v in d.image_shape),
                    random_flip=bool(d.random_flip), random_crop_padding=int(d.random_crop_padding),
                    in_memory=bool(d.in_memory))


def _loop_config(config) -> LoopConfig:
  t = config.train
  return LoopConfig(batch_size=t.batch_size, num_steps=t.num_steps, steps_per_dispatch=t.steps_per_dispatch,
                    log_every=t.log_every, eval_every=t.eval_every, checkpoint_every=t.checkpoint_every,
                    keep_checkpoints=t.keep_checkpoints)


def _optim_config(config) -> train_state.OptimConfig:
  o = config.optim
  return train_state.OptimConfig(learning_rate=o.learning_rate, warmup_steps=o.warmup_steps, schedule=o.schedule,
                                 grad_clip=o.grad_clip, weight_decay=o.weight_decay, ema_decay=o.ema_decay)


def _model(config):
  name = config.model.name
  kwargs = config.model.kwargs.to_dict()
  return name, kwargs, models.get_model(name, **kwargs)


def _score_task(config, image_shape) -> Task:
  name, kwargs, compute_dtype, train_module, module = precision.score_modules(config)
  sigmas = losses.SigmaDistribution(config.sigma.sigma_min, config.sigma.sigma_max, config.sigma.num_scales,
                                    config.sigma.focus_min, config.sigma.focus_prob)
  eval_sigmas = tuple(float(s) for s in config.eval.sigmas)
  for s in eval_sigmas:
    if not sigmas.sigma_min <= s <= sigmas.sigma_max:
      raise ValueError(f"eval.sigmas has {s}, outside the trained range [{sigmas.sigma_min}, {sigmas.sigma_max}]; "
                       "drop it or widen sigma.sigma_min/sigma_max.")
  eval_apply = lambda params, x, sigma: module.apply({"params": params}, x, sigma)
  buckets = config.eval.loss_buckets
  pixels = int(np.prod(image_shape))

  def export(path, state, metrics):
    export_score_model(path, name, kwargs, state.ema_params, state.params, image_shape, sigmas.sigma_min,
                       sigmas.sigma_max, extra_metadata={"train_steps": int(state.step), "eval": metrics,
                                                         "train_compute_dtype": compute_dtype})

  return Task(
      model_name=name, model_kwargs=kwargs,
      init_variables=lambda key: module.init(key, jnp.zeros((1, *image_shape)), jnp.ones((1,))),
      loss_fn=losses.get_score_task_loss_fn(train_module, sigmas),
      eval_batch=evaluate.get_score_eval_fn(eval_apply, eval_sigmas, sigmas.sigma_min, sigmas.sigma_max, buckets),
      finalize=lambda sums: evaluate.finalize_score(sums, pixels, eval_sigmas, sigmas.sigma_min,
                                                    sigmas.sigma_max, buckets),
      eval_variables=lambda state: state.ema_params, export=export,
      flops_fn=lambda variables, x: train_module.apply(variables, x, jnp.ones((1,))))


def _classifier_task(config, image_shape) -> Task:
  name, kwargs, module = _model(config)
  num_classes = kwargs.get("num_classes")
  mean, std = tuple(config.normalization.mean), tuple(config.normalization.std)
  # Validates mean/std against the channels now, and gives the inference path that evaluation shares.
  wrapper = classifier.Classifier(module=module, variables=None, mean=mean, std=std, num_classes=num_classes,
                                  image_shape=image_shape)
  norm_mean, norm_std = jnp.asarray(wrapper.mean), jnp.asarray(wrapper.std)

  def train_apply(variables, x, train):
    mutable = [k for k in variables if k != "params"]
    logits, updates = module.apply(variables, (x - norm_mean) / norm_std, train=train, mutable=mutable)
    return logits, updates

  noisy_ce = losses.get_noisy_cross_entropy_fn(train_apply, float(config.noise_sigma))

  def loss_fn(params, model_state, images, labels, key):
    loss, (updates, accuracy) = noisy_ce({"params": params, **model_state}, images, labels, key)
    return loss, ({**model_state, **updates}, {"accuracy": accuracy})

  noise_sigmas = tuple(float(s) for s in config.eval.noise_sigmas)

  def export(path, state, metrics):
    classifier.export_classifier(
        path, name, kwargs, {"params": state.ema_params, **state.model_state}, mean, std, num_classes, image_shape,
        extra_metadata={"noise_sigma": float(config.noise_sigma), "train_steps": int(state.step), "eval": metrics})

  return Task(
      model_name=name, model_kwargs=kwargs,
      init_variables=lambda key: module.init(key, jnp.zeros((1, *image_shape)), train=False),
      loss_fn=loss_fn, eval_batch=evaluate.get_classifier_eval_fn(wrapper.apply, noise_sigmas),
      finalize=evaluate.finalize_classifier,
      eval_variables=lambda state: {"params": state.ema_params, **state.model_state}, export=export,
      flops_fn=lambda variables, x: module.apply(variables, x, train=False))


def build_task(config) -> Task:
  """The task of ``config`` (model, loss, evaluation, export), validated; no data is read."""
  if config.task not in TASKS:
    raise ValueError(f"task={config.task!r}: choose one of {TASKS}.")
  image_shape = _data_config(config).image_shape
  if config.task == "score":
    return _score_task(config, image_shape)
  return _classifier_task(config, image_shape)


def model_report(config) -> dict:
  """Parameter count and forward FLOPs per image (XLA's cost analysis) of the config's model; reads no data."""
  task = build_task(config)
  image_shape = _data_config(config).image_shape
  variables = jax.eval_shape(task.init_variables, jax.random.key(0))
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  cost = jax.jit(task.flops_fn).lower(variables, x).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {"model": task.model_name, "params": int(sum(np.prod(a.shape) for a in jax.tree.leaves(variables["params"]))),
          "flops_per_image": float(cost["flops"]) if cost and "flops" in cost else float("nan"),
          "image_shape": list(image_shape)}


def describe_model(report: dict) -> str:
  """One line for people: ``model_report``'s name, parameter count and FLOPs per image."""
  flops = report["flops_per_image"]
  shape = tuple(report["image_shape"])
  if not np.isfinite(flops):  # XLA:GPU's cost analysis of the unoptimised program (jax 0.11) has no "flops"
    return (f"model {report['model']}: {report['params']:,} parameters; XLA's cost analysis gives no FLOP count "
            f"on this backend ({jax.default_backend()}) for a {shape} image")
  flops = f"{flops / 1e9:,.2f} GFLOPs" if flops >= 1e9 else f"{flops / 1e6:,.2f} MFLOPs"
  return (f"model {report['model']}: {report['params']:,} parameters, {flops} per {shape} image "
          "(forward pass, XLA cost analysis)")


def initialize_distributed(config) -> None:
  """Joins the cluster when ``config.distributed``, once, before any other JAX call (JAX detects the cluster)."""
  if config.distributed and not jax.distributed.is_initialized():
    sharding.initialize_distributed()  # not wrapped: a failure to reach the coordinator must stop the run


def run_training_command(config, workdir) -> dict:
  """What ``scripts/train_score.py`` and ``scripts/train_classifier.py`` do: report the model's size, then
  train (or resume) and print the final evaluation; ``config.report_only`` stops after the report."""
  initialize_distributed(config)  # before model_report, which already uses the devices
  print(describe_model(model_report(config)), flush=True)
  if config.report_only:
    return {}
  metrics = train_and_evaluate(config, workdir)
  print("final evaluation:", {k: v for k, v in metrics.items() if not isinstance(v, list)}, flush=True)
  return metrics


def _check_finite(losses_since, first_step: int):
  values = np.asarray(jax.device_get(losses_since)).reshape(-1)
  bad = np.flatnonzero(~np.isfinite(values))
  if bad.size:
    raise FloatingPointError(f"loss became {values[bad[0]]} at step {first_step + int(bad[0]) + 1}; training "
                             "stopped. Lower optim.learning_rate, set optim.grad_clip, or check the data for "
                             "NaNs; the last checkpoint before it is intact.")


class _Progress:
  """The stdout progress line and the JSONL metrics file (process 0 only)."""

  def __init__(self, workdir: pathlib.Path, num_steps: int, start: int):
    self.num_steps, self.last_step, self.last_time = num_steps, start, time.perf_counter()
    self.main = jax.process_index() == 0
    self.file = open(workdir / "metrics.jsonl", "a") if self.main else None

  def write(self, record: dict):
    if self.main:
      self.file.write(json.dumps(record) + "\n")
      self.file.flush()

  def log(self, step: int, metrics: dict):
    now = time.perf_counter()
    rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    eta = (self.num_steps - step) / rate if rate > 0 else math.inf
    self.write({"step": step, "steps_per_sec": rate, **metrics})
    if self.main:
      text = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())
      print(f"step {step}/{self.num_steps}  {text}  {rate:.2f} steps/s  ETA {eta:.0f}s", flush=True)

  def close(self):
    if self.file:
      self.file.close()


def train_and_evaluate(config, workdir) -> dict:
  """Trains the model ``config`` describes, in ``workdir`` (resuming if it holds checkpoints), and exports it.

  Args:
    config: an ml_collections ConfigDict (module docstring; configs/*.py).
    workdir: directory for checkpoints, metrics.jsonl and the export.

  Returns:
    The final evaluation metrics.
  """
  initialize_distributed(config)
  workdir = pathlib.Path(workdir).expanduser().resolve()
  workdir.mkdir(parents=True, exist_ok=True)

  # Everything the config alone decides is checked before any data is opened (or downloaded).
  data_config, loop, optim = _data_config(config), _loop_config(config), _optim_config(config)
  task = build_task(config)
  source_kwargs = dict(data_dir=data_config.data_dir, image_size=data_config.image_size)
  train_source = data.get_source(data_config.name, data_config.train_split, **source_kwargs)
  eval_source = data.get_source(data_config.eval_name, data_config.eval_split, **source_kwargs)
  if eval_source.image_shape != train_source.image_shape:
    raise ValueError(f"{data_config.eval_name} has images of shape {eval_source.image_shape}, the training data "
                     f"{train_source.image_shape}; evaluate on data of the trained size.")
  if train_source.image_shape != data_config.image_shape:
    raise ValueError(f"data.image_shape={data_config.image_shape} but {data_config.name} has images of shape "
                     f"{train_source.image_shape}; set data.image_shape={train_source.image_shape} (or "
                     "data.image_size to resize a tfds dataset).")
  if config.task == "classifier" and config.model.kwargs.num_classes != train_source.num_classes:
    raise ValueError(f"model.kwargs.num_classes={config.model.kwargs.num_classes} but {data_config.name} has "
                     f"{train_source.num_classes} classes; set it to {train_source.num_classes}.")
  if data_config.in_memory:  # after the checks above, so a wrong config fails before minutes of decoding
    train_source = data.load_into_memory(train_source)

  mesh = sharding.data_mesh()
  replicated = sharding.replicated(mesh)
  optimizer = train_state.make_optimizer(optim, loop.num_steps)
  rng = jax.random.key(config.seed)
  init_key, train_key, eval_key = (jax.random.fold_in(rng, i) for i in range(3))
  make_state = lambda key: train_state.create_state(task.init_variables(key), optimizer)
  batches = data.TrainBatches(train_source, loop.batch_size, mesh, seed=config.seed,
                              random_flip=data_config.random_flip,
                              random_crop_padding=data_config.random_crop_padding,
                              steps_per_dispatch=loop.steps_per_dispatch)

  ckpts = checkpoint.TrainCheckpoints(workdir / "checkpoints", save_every=loop.checkpoint_every,
                                      keep=loop.keep_checkpoints)
  if ckpts.latest_step() is not None:
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                            jax.eval_shape(make_state, init_key))
    state, saved = ckpts.restore(abstract)
    saved = ml_collections.ConfigDict(saved)
    train_state.check_resumed_learning_rate(int(state.step), (_optim_config(saved), saved.train.num_steps),
                                            (optim, loop.num_steps))
    if jax.process_index() == 0:
      print(f"resuming from {ckpts.directory} at step {int(state.step)}", flush=True)
  else:
    state = train_state.jit_init(make_state, mesh, init_key)(init_key)
    if config.train.get("init_from"):  # a fresh run only: a resumed one continues from its checkpoint
      normalization = None if config.task == "score" else (config.normalization.mean, config.normalization.std)
      state = warm_start.started_from(config.train.init_from, task.model_name, task.model_kwargs,
                                      data_config.image_shape, state, replicated, normalization)
      if jax.process_index() == 0:
        print(f"starting from the parameters of {config.train.init_from}", flush=True)
  step = int(state.step)
  config_json = json.loads(config.to_json())

  step_fn = train_state.jit_train_step(train_state.get_train_step_fn(task.loss_fn, optimizer, optim.ema_decay), mesh)
  eval_fn = jax.jit(task.eval_batch)
  eval_batch_size = config.eval.batch_size

  def run_eval():
    sums = evaluate.run(eval_fn, task.eval_variables(state), data.eval_batches(
        eval_source, eval_batch_size, mesh, config.eval.num_examples), eval_key)
    return task.finalize(sums)

  progress = _Progress(workdir, loop.num_steps, step)
  metrics, pending, since_log = {}, None, []
  iterator = batches.iterate(step)
  try:
    while step < loop.num_steps:
      images, labels = next(iterator)
      first = step
      state, step_metrics = step_fn(state, images, labels, train_key)
      step += loop.steps_per_dispatch
      if pending is not None:  # checked one dispatch late, so the host never waits on the device here
        _check_finite(*pending)
      pending = (step_metrics["loss"], first)
      since_log.append(step_metrics)
      due_eval = step % loop.eval_every == 0 or step == loop.num_steps
      due_ckpt = step % loop.checkpoint_every == 0 or step == loop.num_steps
      if step % loop.log_every == 0 or due_eval or due_ckpt:
        _check_finite(*pending)
      if step % loop.log_every == 0:
        means = jax.device_get(jax.tree.map(lambda *v: jnp.mean(jnp.stack(v)), *since_log))
        progress.log(step, {k: float(v) for k, v in means.items()})
        since_log = []
      if due_eval:
        metrics = run_eval()
        progress.write({"step": step, **{f"eval/{k}": v for k, v in metrics.items()}})
        if progress.main:
          shown = {k: round(v, 3) for k, v in metrics.items() if not isinstance(v, list)}
          print(f"eval step {step}: {shown}", flush=True)
      ckpts.save(step, state, config_json, force=step == loop.num_steps)
    if not metrics:  # resumed a finished run: evaluate what gets exported
      metrics = run_eval()
    ckpts.wait()
  finally:
    iterator.close()  # stops the prefetch thread
    progress.close()
    ckpts.close()
  task.export(workdir / "export", state, metrics)
  return metrics

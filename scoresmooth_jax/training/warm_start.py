"""Starting a score-model run from trained parameters (``train.init_from``).

For fine-tuning a trained model, or for training a finished run further under a new learning-rate schedule:
a finished cosine run cannot simply be resumed with more steps (``train_state.check_resumed_learning_rate``
refuses the jump), but a new run that starts from its EMA parameters, with its own warm-up, can.

Promises:
  * ``initial_params(spec, model_name, model_kwargs, image_shape, like)`` returns the EMA parameters of a score
    export or a shipped model (anything ``export.load_score_fn`` loads), after checking that they belong to the
    configured network: the same model name, constructor arguments and image shape. Anything else is a
    ValueError that names the difference and the fix.
  * ``warm_started(state, params, sharding)``: the parameters and their EMA both start from ``params``; the
    step and the optimizer state stay those of a fresh run, so the new run's warm-up and schedule apply from
    step 0.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp

from scoresmooth_jax.modelio import checkpoint, export


def _canonical(kwargs: dict) -> dict:
  # Exports keep the constructor arguments as JSON (tuples became lists); compare both sides that way.
  return json.loads(json.dumps(kwargs, sort_keys=True))


def initial_params(spec: str, model_name: str, model_kwargs: dict, image_shape, like: Any) -> Any:
  """The EMA parameters of the score model ``spec``, checked against the configured network.

  Args:
    spec: a score export directory (``<workdir>/export``) or a shipped model's short name.
    model_name: ``config.model.name`` of the new run.
    model_kwargs: ``config.model.kwargs`` of the new run, as a dict.
    image_shape: the new run's (H, W, C).
    like: the new run's freshly initialised parameters: the tree and dtypes to return.
  """
  try:
    score_fn = export.load_score_fn(spec)
  except checkpoint.CheckpointError as err:
    raise ValueError(f"train.init_from={spec!r} could not be loaded: {err}") from None
  saved_name, saved_kwargs = score_fn.metadata["model"], score_fn.metadata["model_kwargs"]
  if saved_name != model_name or _canonical(saved_kwargs) != _canonical(model_kwargs):
    raise ValueError(f"train.init_from={spec!r} is {saved_name}({_canonical(saved_kwargs)}) but the config trains "
                     f"{model_name}({_canonical(model_kwargs)}); start from a model of the configured architecture "
                     "or set model.name/model.kwargs to the saved ones.")
  if tuple(score_fn.image_shape) != tuple(image_shape):
    raise ValueError(f"train.init_from={spec!r} was trained on images of shape {tuple(score_fn.image_shape)}, the "
                     f"config trains on {tuple(image_shape)}; start from a model of the data's image shape.")
  # The loader fitted the parameters to that network; the same network on the same shape has the same tree.
  return jax.tree.map(lambda saved, fresh: jnp.asarray(saved, fresh.dtype), score_fn.params, like)


def warm_started(state, params: Any, sharding: jax.sharding.Sharding):
  """``state`` (a fresh ``TrainState``) with its parameters and their EMA replaced by copies of ``params``."""
  placed = jax.device_put(params, sharding)
  # Two copies, not one buffer twice: the state is donated to the train step.
  return state.replace(params=placed, ema_params=jax.tree.map(jnp.copy, placed))

"""Starting a run from trained parameters (``train.init_from``): score models and classifiers.

For fine-tuning a trained model, or for training a finished run further under a new learning-rate schedule:
a finished cosine run cannot simply be resumed with more steps (``train_state.check_resumed_learning_rate``
refuses the jump), but a new run that starts from its EMA parameters, with its own warm-up, can.

Promises:
  * ``initial_params(spec, model_name, model_kwargs, image_shape, like)`` returns the EMA parameters of a score
    export or a shipped model (anything ``export.load_score_fn`` loads), after checking that they belong to the
    configured network: the same model name, constructor arguments and image shape. Anything else is a
    ValueError that names the difference and the fix.
  * One kind of difference is allowed: a ``score_unet`` grown from the saved one starts as the saved network,
    exactly. It may have more residual blocks at any level (``num_res_blocks``) and self-attention at more
    resolutions (``attention_resolutions``, a superset of the saved ones); the saved blocks of both kinds keep
    their places. The added blocks keep their fresh initialisation, whose zero last convolution (zero output
    projection, for attention) makes each the identity. So a trained model can be deepened, or given non-local
    attention, and trained on without first losing what it learned.
  * ``initial_classifier_variables(spec, ...)`` returns the parameters and BatchNorm statistics of a classifier
    export (training's or the PyTorch converter's), after checking the model name, constructor arguments,
    image shape and normalisation against the config: fine-tuning a pretrained classifier, e.g. with Gaussian
    noise augmentation for white-box smoothing (Cohen et al. 2019).
  * ``warm_started(state, params, sharding, model_state)``: the parameters and their EMA both start from
    ``params`` (and the BatchNorm statistics from ``model_state``); the step and the optimizer state stay
    those of a fresh run, so the new run's warm-up and schedule apply from step 0.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from scoresmooth_jax.modelio import checkpoint, classifier, export
from scoresmooth_jax.models import score_unet


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
  same = _canonical(saved_kwargs) == _canonical(model_kwargs)
  but_growth = lambda kwargs: _canonical({**kwargs, "num_res_blocks": None, "attention_resolutions": None})
  grown = not same and model_name == "score_unet" and but_growth(saved_kwargs) == but_growth(model_kwargs)
  if saved_name != model_name or not (same or grown):
    raise ValueError(f"train.init_from={spec!r} is {saved_name}({_canonical(saved_kwargs)}) but the config trains "
                     f"{model_name}({_canonical(model_kwargs)}); start from a model of the configured architecture "
                     "or set model.name/model.kwargs to the saved ones.")
  if tuple(score_fn.image_shape) != tuple(image_shape):
    raise ValueError(f"train.init_from={spec!r} was trained on images of shape {tuple(score_fn.image_shape)}, the "
                     f"config trains on {tuple(image_shape)}; start from a model of the data's image shape.")
  saved_params = score_fn.params
  if grown:
    saved_params = _grown(spec, saved_params, saved_kwargs, model_kwargs, image_shape[0], like)
  # The loader fitted the parameters to that network; the same network on the same shape has the same tree.
  return jax.tree.map(lambda saved, fresh: jnp.asarray(saved, fresh.dtype), saved_params, like)


def _grown(spec: str, saved: dict, saved_kwargs: dict, model_kwargs: dict, height: int, like: dict) -> dict:
  """The saved ``score_unet`` parameters placed in a network with more residual blocks or attention at more
  resolutions (module docstring)."""
  levels = len(model_kwargs["channel_mults"])
  saved_blocks = score_unet.blocks_per_level(saved_kwargs.get("num_res_blocks", 1), levels)
  new_blocks = score_unet.blocks_per_level(model_kwargs.get("num_res_blocks", 1), levels)
  saved_attention = tuple(saved_kwargs.get("attention_resolutions", ()))
  new_attention = tuple(model_kwargs.get("attention_resolutions", ()))
  if any(new < old for new, old in zip(new_blocks, saved_blocks)):
    raise ValueError(f"train.init_from={spec!r} has {saved_blocks} residual blocks per level but the config's "
                     f"network has {new_blocks}: a network can start from one with as many blocks or fewer at every "
                     "level, not more; set model.kwargs.num_res_blocks to at least the saved counts.")
  if not set(saved_attention) <= set(new_attention):
    raise ValueError(f"train.init_from={spec!r} has attention at resolutions {saved_attention} but the config's "
                     f"network has it at {new_attention}: a network can start from one with attention at the same "
                     "resolutions or fewer, not more; set model.kwargs.attention_resolutions to include the saved ones.")
  # Flax numbers ResBlock_<k> and AttnBlock_<k> in call order, so growth renumbers them: map each by its slot.
  def slots(blocks, attention):
    return {"ResBlock_": score_unet.res_block_slots(blocks, levels),
            "AttnBlock_": score_unet.attention_block_slots(blocks, levels, attention, height)}
  new_slots = slots(new_blocks, new_attention)
  renumbered = {f"{kind}{k}": f"{kind}{new_slots[kind].index(slot)}"
                for kind, saved_slots in slots(saved_blocks, saved_attention).items()
                for k, slot in enumerate(saved_slots)}
  params = dict(like)  # the added blocks keep their fresh initialisation: the identity
  for name, value in saved.items():
    params[renumbered.get(name, name)] = value
  return params


def initial_classifier_variables(spec: str, model_name: str, model_kwargs: dict, image_shape, mean, std,
                                 like: Any) -> Any:
  """The variables ({"params": ..., "batch_stats": ...}) of the classifier export ``spec``, checked against
  the configured network and normalisation; ``like`` is the fresh variables tree whose dtypes are returned."""
  try:
    variables, metadata = checkpoint.load_model(spec, kind=classifier.KIND)
  except (checkpoint.CheckpointError, FileNotFoundError) as err:
    raise ValueError(f"train.init_from={spec!r} could not be loaded as a classifier export: {err}") from None
  saved_name, saved_kwargs = metadata.get("model"), metadata.get("model_kwargs", {})
  if saved_name != model_name or _canonical(saved_kwargs) != _canonical(model_kwargs):
    raise ValueError(f"train.init_from={spec!r} is {saved_name}({_canonical(saved_kwargs)}) but the config trains "
                     f"{model_name}({_canonical(model_kwargs)}); set model.name/model.kwargs to the saved ones.")
  if tuple(metadata.get("image_shape", ())) != tuple(image_shape):
    raise ValueError(f"train.init_from={spec!r} takes images of shape {tuple(metadata.get('image_shape', ()))}, "
                     f"the config trains on {tuple(image_shape)}; start from a classifier of the data's shape.")
  for name, saved, configured in (("mean", metadata.get("mean"), mean), ("std", metadata.get("std"), std)):
    # The network learned features of inputs normalised its way; another normalisation would shift them all.
    if saved is None or not np.allclose(saved, configured, rtol=0, atol=1e-6):
      raise ValueError(f"train.init_from={spec!r} normalises with {name}={saved} but the config has "
                       f"normalization.{name}={tuple(configured)}; set normalization.{name} to the saved values.")
  try:
    return jax.tree.map(lambda saved, fresh: jnp.asarray(saved, fresh.dtype), dict(variables), dict(like))
  except ValueError as err:  # the trees differ: an export that does not fit its own metadata
    raise ValueError(f"train.init_from={spec!r}: its variables do not fit {model_name}: {err}") from None


def warm_started(state, params: Any, sharding: jax.sharding.Sharding, model_state: Any = None):
  """``state`` (a fresh ``TrainState``) with its parameters and their EMA replaced by copies of ``params``, and
  its mutable collections (BatchNorm statistics) by ``model_state`` when given."""
  placed = jax.device_put(params, sharding)
  # Two copies, not one buffer twice: the state is donated to the train step.
  state = state.replace(params=placed, ema_params=jax.tree.map(jnp.copy, placed))
  if model_state is not None:
    state = state.replace(model_state=jax.device_put(model_state, sharding))
  return state


def started_from(spec: str, model_name: str, model_kwargs: dict, image_shape, state, sharding,
                 normalization=None):
  """A fresh ``TrainState`` started from ``spec``: a score model's EMA parameters (``normalization`` None), or a
  classifier export's parameters and BatchNorm statistics (``normalization`` = the config's (mean, std))."""
  if normalization is None:
    return warm_started(state, initial_params(spec, model_name, model_kwargs, image_shape, state.params), sharding)
  mean, std = (tuple(v) for v in normalization)
  variables = initial_classifier_variables(spec, model_name, model_kwargs, image_shape, mean, std,
                                           {"params": state.params, **state.model_state})
  params = variables.pop("params")
  return warm_started(state, params, sharding, model_state=variables)

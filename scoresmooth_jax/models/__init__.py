"""Flax Linen models, by explicit name.

Score networks: ``module.apply({"params": p}, x, sigma)`` with ``x`` a batch of NHWC images in [0, 1] and
``sigma`` one noise level per example ([B]); returns the score grad_x log p_sigma(x), shaped like ``x``.
Classifiers: ``module.apply(variables, x, train=False)`` with NHWC images (already normalised by the
classifier wrapper) -> logits [B, num_classes].

``MODELS`` is the one explicit map from a name to its constructor ("module:attribute", imported on first
use so that importing one model never pulls in the others). Constructors take typed keyword arguments,
never a config.
"""

from __future__ import annotations

import importlib

MODELS: dict[str, str] = {
    "cifar_resnet": "scoresmooth_jax.models.resnet:CifarResNet",
    "resnet50": "scoresmooth_jax.models.resnet:ResNet50",
    "score_unet": "scoresmooth_jax.models.score_unet:ScoreUNet",
    "ncsnpp": "scoresmooth_jax.models.ncsnpp:NCSNpp",
    "openai_unet": "scoresmooth_jax.models.openai_unet:OpenAIUNet",
    "vit": "scoresmooth_jax.models.vit:VisionTransformer",
    "beit": "scoresmooth_jax.models.beit:Beit",
}


def get_constructor(name: str):
  """The constructor registered as ``name``; an unknown name lists the known ones."""
  try:
    target = MODELS[name]
  except KeyError:
    raise ValueError(f"unknown model {name!r}: choose one of {sorted(MODELS)}.") from None
  module_name, attribute = target.split(":")
  return getattr(importlib.import_module(module_name), attribute)


def get_model(name: str, **kwargs):
  """Builds the model registered as ``name`` with keyword arguments ``kwargs``."""
  return get_constructor(name)(**kwargs)

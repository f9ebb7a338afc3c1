"""Mixed-precision training of score models: ``model.kwargs.dtype`` is the compute dtype of the training steps only.

Promises:
  * ``score_modules(config)`` returns (name, exported kwargs, compute dtype, training module, float32 module).
    With ``model.kwargs.dtype = "bfloat16"`` the training module computes in bfloat16 while its parameters stay
    float32: Flax creates them in float32 whatever the compute dtype and casts them where they are used, so the
    gradients, the optimizer state and the EMA are float32 too (``train_state.create_state`` keeps them so). The
    float32 module evaluates and is exported: the export's kwargs hold no dtype (the loader chooses one), so the
    curve and the exported model do not depend on the training precision. Without ``dtype`` both modules are the
    configured one; any dtype but float32 or bfloat16 fails with a message before training.
"""

from __future__ import annotations

from scoresmooth_jax import models

TRAIN_COMPUTE_DTYPES = ("float32", "bfloat16")


def score_modules(config):
  """(name, exported kwargs, compute dtype, training module, float32 module) of ``config.model`` (module docstring)."""
  name = config.model.name
  kwargs = config.model.kwargs.to_dict()
  if "dtype" not in kwargs:
    module = models.get_model(name, **kwargs)
    return name, kwargs, "float32", module, module
  compute = kwargs.pop("dtype")
  if compute not in TRAIN_COMPUTE_DTYPES:
    raise ValueError(f"model.kwargs.dtype={compute!r}: choose one of {TRAIN_COMPUTE_DTYPES} (the compute dtype of "
                     "the training steps; parameters, EMA and optimizer state are float32 either way).")
  return name, kwargs, compute, models.get_model(name, **kwargs, dtype=compute), models.get_model(name, **kwargs)

"""Score-model exports: what training writes to ``<workdir>/export`` and the callable that loads it back.

An export is a ``scoresmooth_jax.modelio.checkpoint`` model directory with metadata
``{"kind": "score", "model", "model_kwargs", "image_shape", "sigma_min", "sigma_max", "ema": true, ...}``
and variables ``{"params": EMA parameters, "online_params": the raw parameters}``.

Models shipped inside the package are loaded by short name: ``load_score_fn("cifar10-cpu")``. Each is one
``scoresmooth_jax/shipped/<name>.npz`` (the EMA parameters, keys joined by "/") beside ``<name>.json`` (the
export's metadata plus its model card) and ``<name>.md`` (the card for people); ``ship_score_model`` writes
them from a training run's export. Nothing is downloaded. Parameters may be stored in float16 (half the bytes,
so a model twice the size fits the package) or int8 with a scale per output channel (a quarter; ``quantize``);
the card's PSNR is measured on the stored copy, and they are always loaded back as float32, so compute is
unchanged apart from that rounding. A shipped model's file also loads by its path (``.../<name>.npz``, with
``<name>.json`` beside it), e.g. from a training job's output folder before it joins the package.

``load_score_fn(path)`` returns a ``ScoreFunction``: ``score_fn(x, sigma)`` for NHWC batches in [0, 1] and a
scalar or per-example sigma, pure and jittable, hashable by identity (so compile caches keyed on it work), and
carrying the sigma range it was trained on. It plugs straight into ``denoise.one_step`` / ``denoise.annealed``.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from scoresmooth_jax import denoise, models
from scoresmooth_jax.modelio import checkpoint, compute_dtype as compute_dtype_lib
from scoresmooth_jax.modelio import quantize

KIND = "score"
EMA_PARAMS = "params"
ONLINE_PARAMS = "online_params"


@dataclasses.dataclass(frozen=True, eq=False)
class ScoreFunction:
  """A trained noise-conditional score model as a function: ``score_fn(x, sigma) -> grad_x log p_sigma(x)``.

  Attributes:
    module: the Flax module; ``module.apply({"params": params}, x, sigma [B])``.
    params: its parameters.
    sigma_min, sigma_max: the noise range it was trained on; outside it the score is an extrapolation.
    image_shape: (H, W, C) of the images it was trained on.
    metadata: the export's metadata.
  """

  module: Any
  params: Any
  sigma_min: float
  sigma_max: float
  image_shape: tuple[int, int, int]
  metadata: dict = dataclasses.field(default_factory=dict)

  def __call__(self, x: jax.Array, sigma) -> jax.Array:
    """Score of a batch ``x`` [B, H, W, C] at ``sigma`` (scalar or [B]); returned in x's dtype."""
    if x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape:
      raise ValueError(f"the score model takes batches [B, H, W, C] with (H, W, C) = {self.image_shape}; got "
                       f"shape {tuple(x.shape)}.")
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (x.shape[0],))
    return self.module.apply({"params": self.params}, x, sigma).astype(x.dtype)

  def check_sigmas(self, sigmas) -> None:
    """Fails (on the host) when a noise level lies outside the trained range [sigma_min, sigma_max]."""
    denoise.check_trained_range(self, sigmas)


def export_score_model(path, model_name: str, model_kwargs: dict, ema_params: Any, params: Any,
                       image_shape, sigma_min: float, sigma_max: float, extra_metadata: dict | None = None):
  """Writes a score export (module docstring) to ``path``; returns its absolute path."""
  metadata = {
      **(extra_metadata or {}),
      "kind": KIND,
      "model": model_name,
      "model_kwargs": dict(model_kwargs),
      "image_shape": [int(d) for d in image_shape],
      "sigma_min": float(sigma_min),
      "sigma_max": float(sigma_max),
      "ema": True,
  }
  variables = jax.tree.map(np.asarray, jax.device_get({EMA_PARAMS: ema_params, ONLINE_PARAMS: params}))
  return checkpoint.save_model(path, variables, metadata)


def _as_tuples(value):
  return tuple(_as_tuples(v) for v in value) if isinstance(value, list) else value


def shipped_dir() -> pathlib.Path:
  """The folder of the score models shipped with the package."""
  return pathlib.Path(str(importlib.resources.files("scoresmooth_jax") / "shipped"))


def shipped_names() -> list[str]:
  """Short names of the shipped score models (``load_score_fn(name)``)."""
  return sorted(p.stem for p in shipped_dir().glob("*.npz"))


STORE_DTYPES = quantize.STORE_DTYPES
# Names the package will ship but does not hold yet, and what to do meanwhile (said when one is asked for).
NOT_YET_SHIPPED = {
    "cifar10": "'cifar10' (the CIFAR-10 score model trained on a GPU) is not shipped in this version of the "
               "package yet: use 'cifar10-cpu', or train it with scripts/gpu_cifar10.sh and load the "
               "<out>/cifar10.npz it writes by that path.",
}


def ship_score_model(export_path, name: str, model_card: dict, out_dir=None,
                     store_dtype: str = "float32") -> pathlib.Path:
  """Writes an export's EMA parameters as a shipped model ``name`` (module docstring); returns the .npz path.

  Args:
    export_path: a training run's ``<workdir>/export``.
    name: the short name users load it by (e.g. "cifar10-cpu").
    model_card: JSON-serialisable facts for the card (data, command, steps, wall time, PSNR table, ...).
    out_dir: where to write (default: the package's ``shipped`` folder).
    store_dtype: "float32", "float16" to halve the file, or "int8" (per-channel scales, ``quantize``) to quarter
      it; loading gives float32 back.
  """
  if store_dtype not in STORE_DTYPES:
    raise ValueError(f"store_dtype={store_dtype!r}: use one of {STORE_DTYPES}.")
  variables, metadata = checkpoint.load_model(export_path, kind=KIND)
  out_dir = pathlib.Path(out_dir) if out_dir is not None else shipped_dir()
  out_dir.mkdir(parents=True, exist_ok=True)
  npz = out_dir / f"{name}.npz"
  flat = traverse_util.flatten_dict(jax.device_get(variables[EMA_PARAMS]), sep="/")
  np.savez(npz, **quantize.encode(flat, store_dtype))
  (out_dir / f"{name}.json").write_text(json.dumps({**metadata, "stored_dtype": store_dtype,
                                                    "model_card": model_card}, indent=1, sort_keys=True))
  return npz


def _load_shipped(npz: pathlib.Path):
  with np.load(npz, allow_pickle=False) as arrays:
    params = traverse_util.unflatten_dict(quantize.decode({key: arrays[key] for key in arrays.files}), sep="/")
  metadata = json.loads(npz.with_suffix(".json").read_text())
  return {EMA_PARAMS: params}, metadata


def load_score_fn(path, use_ema: bool = True, compute_dtype=None) -> ScoreFunction:
  """Loads a score export, or a shipped model by short name, as a ``ScoreFunction``.

  Args:
    path: the export directory (``<workdir>/export`` of a training run), or the short name of a model shipped
      with the package (``shipped_names()``, e.g. "cifar10-cpu"); an existing directory of that name wins; or the
      path of a shipped model's ``<name>.npz`` (``<name>.json`` beside it).
    use_ema: the EMA parameters (default, what the paper and score_sde evaluate) or the raw ones (exports
      only: shipped models keep just the EMA parameters).
    compute_dtype: None or "float32" (default), or "bfloat16": the network's compute dtype; parameters stay
      float32 and the score is returned in float32 (``compute_dtype.with_compute_dtype``).

  Returns:
    A ``ScoreFunction`` with ``sigma_min``, ``sigma_max`` and ``image_shape`` from the export.
  """
  if isinstance(path, str) and path in shipped_names() and not pathlib.Path(path).is_dir():
    variables, metadata = _load_shipped(shipped_dir() / f"{path}.npz")
  elif str(path).endswith(".npz") and pathlib.Path(path).with_suffix(".json").is_file():  # a shipped file's path
    variables, metadata = _load_shipped(pathlib.Path(path))
  else:
    try:
      variables, metadata = checkpoint.load_model(path, kind=KIND)
    except checkpoint.CheckpointError as err:
      if isinstance(path, str) and path in NOT_YET_SHIPPED and not pathlib.Path(path).exists():
        raise checkpoint.CheckpointError(NOT_YET_SHIPPED[path]) from None
      if isinstance(path, str) and "/" not in path and not pathlib.Path(path).exists():
        raise checkpoint.CheckpointError(f"{err} {path!r} is not the name of a shipped model either "
                                         f"(shipped: {shipped_names()}).") from None
      raise
  missing = [k for k in ("model", "model_kwargs", "image_shape", "sigma_min", "sigma_max") if k not in metadata]
  if missing:
    raise checkpoint.CheckpointError(f"score export {path}: metadata lacks {missing}; export it again.")
  which = EMA_PARAMS if use_ema else ONLINE_PARAMS
  if which not in variables:
    raise checkpoint.CheckpointError(f"score export {path} has no {which!r} parameters (it has {sorted(variables)}); "
                                     f"load it with use_ema={not use_ema}.")
  # JSON turned the constructor's tuples into lists; modules want hashable, immutable attributes back.
  kwargs = {k: _as_tuples(v) for k, v in metadata["model_kwargs"].items()}
  module = models.get_model(metadata["model"], **kwargs)
  if compute_dtype is not None:
    module = compute_dtype_lib.with_module_dtype(module, compute_dtype)
  image_shape = tuple(int(d) for d in metadata["image_shape"])
  params = jax.tree.map(jnp.asarray, variables[which])
  expected = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, *image_shape)), jnp.ones((1,)))
  expected_shapes = jax.tree.map(lambda a: tuple(a.shape), expected["params"])
  got_shapes = jax.tree.map(lambda a: tuple(a.shape), params)
  if expected_shapes != got_shapes:
    raise checkpoint.CheckpointError(f"score export {path}: the stored parameters do not fit "
                                     f"{metadata['model']}({metadata['model_kwargs']}); export it again.")
  return ScoreFunction(module=module, params=params, sigma_min=float(metadata["sigma_min"]),
                       sigma_max=float(metadata["sigma_max"]), image_shape=image_shape, metadata=metadata)

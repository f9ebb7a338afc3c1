"""score_sde's published NCSN++ / DDPM++ checkpoints (Song et al. 2021) as score functions for our denoisers.

What this module promises:
  * ``load_score_sde(path, preset)`` reads a checkpoint file written by score_sde (its
    ``flax.training.checkpoints.save_checkpoint`` of the training ``State``: a msgpack map
    {step, optimizer: {state, target}, lr, model_state, ema_rate, params_ema, rng}) with
    ``flax.serialization.msgpack_restore``: plain msgpack plus raw numpy buffers, so no pickled code runs.
    It takes the EMA parameters by default (the ones score_sde samples and evaluates with), checks every
    parameter's path and shape against the preset's architecture before any computation (the first mismatch
    is named with both shapes), and returns ``(score_fn, sigma_min, sigma_max)``.
  * ``score_fn(x, sigma)`` is a ``ScoreSdeScoreFn``: images x in [0, 1] (NHWC), sigma a scalar or one per
    example in our convention (per-coordinate standard deviation of Gaussian noise in [0, 1] units), returns
    grad_x log p_sigma(x) shaped like x. It is jittable, hashable by identity, and a pytree whose leaves are
    the parameters, so it plugs into ``denoise.one_step``, ``denoise.annealed`` and the certification job.
    (sigma_min, sigma_max) is the range of sigma the model was trained on.
  * ``load_score_sde_from_spec("score_sde:<preset>:<path>")`` does the same from one config string.

Units of the two model families
-------------------------------
VE (NCSN++ continuous): score_sde trains VE models on images in [0, 1] (``data.centered=False``: its data
scaler is the identity; the network maps [0, 1] -> [-1, 1] internally) perturbed as x + sigma z, with
sigma_min = 0.01 and sigma_max = 50 in those same units. So its sigma *is* our sigma and the network output
(its last layer divided by sigma) is already the score on [0, 1] images: score_fn(x, sigma) = net(x, sigma).

VP (DDPM++ continuous): trained on centred images z0 = 2 x0 - 1 in [-1, 1] with the VP SDE
beta(t) = b0 + (b1 - b0) t (b0 = beta_min = 0.1, b1 = beta_max = 20), whose marginal is
    x_t = a_t z0 + s_t eps,   a_t = sqrt(abar_t),  s_t = sqrt(1 - abar_t),
    log abar_t = -(b0 t + (b1 - b0) t^2 / 2).
Our observation is y = x0 + sigma n in [0, 1]. Then z = 2 y - 1 = z0 + 2 sigma n, and
    a_t z = a_t z0 + (2 sigma a_t) n
has exactly the law of x_t (with eps = n) iff 2 sigma a_t = s_t, i.e. sqrt((1 - abar_t) / abar_t) = 2 sigma,
i.e. abar_t = 1 / (1 + 4 sigma^2). With L = log(1 + 4 sigma^2) the time solves (b1 - b0)/2 t^2 + b0 t - L = 0:
    t(sigma) = 2 L / (b0 + sqrt(b0^2 + 2 (b1 - b0) L))       (the positive root, without cancellation)
Input scaling:  x_t = a_t (2 y - 1) = (2 y - 1) / sqrt(1 + 4 sigma^2).
Output scaling: p_Y(y) = p_t(a_t (2 y - 1)) (2 a_t)^d, so grad_y log p_Y(y) = 2 a_t grad_{x_t} log p_t(x_t):
  * a score network s(x_t, t):            score_y = 2 a_t s = 2 s / sqrt(1 + 4 sigma^2);
  * a noise-prediction network eps(x_t, t) (grad log p_t = -eps / s_t, as score_sde reads it):
                                          score_y = -2 a_t eps / s_t = -eps / sigma.
  (Tweedie then reads y - sigma eps: subtract the predicted noise in [0, 1] units.) score_sde feeds its
continuous VP networks the label 999 t and reads their output as eps. Training times t in [1e-5, 1] cover
sigma = sqrt(expm1(b0 t + (b1 - b0) t^2 / 2)) / 2 in [5.0e-4, 76.1]. ``vp_to_score_fn`` implements this once for
any VP network.

Where the checkpoints are: the score_sde README links a Google Drive folder
(https://drive.google.com/drive/folders/10pQygNzF7hOOLwP3q8GiNxSnFRpArUxQ) with one directory per config name
(``cifar10_ncsnpp_continuous``, ``cifar10_ddpmpp_continuous``, ...); each ``checkpoint_<n>`` file in it loads
here with the preset of the same name (the README: the smaller n is the best-FID checkpoint, the larger the last).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import re
from typing import Any, Callable, Mapping, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization, traverse_util

from scoresmooth_jax import denoise
from scoresmooth_jax.modelio import compute_dtype as compute_dtype_lib
from scoresmooth_jax.models.ncsnpp import NCSNpp

SPEC_PREFIX = "score_sde"


class PretrainedError(ValueError):
  """A pretrained checkpoint is missing, unreadable or does not fit the preset it is loaded with."""


# --------------------------------------------------------------------------------------------------------
# SDEs and presets.


@dataclasses.dataclass(frozen=True)
class VESDE:
  """Variance-exploding SDE: x + sigma z on [0, 1] images, sigma in [sigma_min, sigma_max]."""

  sigma_min: float = 0.01
  sigma_max: float = 50.0


@dataclasses.dataclass(frozen=True)
class VPSDE:
  """Variance-preserving SDE on [-1, 1] images with beta(t) = beta_min + (beta_max - beta_min) t.

  ``t_min``/``t_max``: the training times (score_sde samples t ~ U[1e-5, 1]). ``time_scale``: the network
  gets the label time_scale * t (999 in score_sde's continuous VP models). ``prediction``: what the network
  outputs, "eps" (noise, as score_sde's DDPM++) or "score" (grad_{x_t} log p_t).
  """

  beta_min: float = 0.1
  beta_max: float = 20.0
  t_min: float = 1e-5
  t_max: float = 1.0
  time_scale: float = 999.0
  prediction: str = "eps"

  @property
  def sigma_min(self) -> float:
    return vp_sigma(self.t_min, self.beta_min, self.beta_max)

  @property
  def sigma_max(self) -> float:
    return vp_sigma(self.t_max, self.beta_min, self.beta_max)


@dataclasses.dataclass(frozen=True)
class Preset:
  """A published architecture: the network (a Linen module, itself a frozen dataclass), its SDE and the
  image shape it was trained on."""

  name: str
  model: NCSNpp
  sde: Union[VESDE, VPSDE]
  image_shape: tuple[int, int, int] = (32, 32, 3)


_NCSNPP_VE = dict(nf=128, ch_mult=(1, 2, 2, 2), attn_resolutions=(16,), dropout=0.1, resamp_with_conv=True,
                  conditional=True, fir=True, fir_kernel=(1, 3, 3, 1), skip_rescale=True, resblock_type="biggan",
                  progressive="none", progressive_input="residual", progressive_combine="sum", init_scale=0.0,
                  embedding_type="fourier", fourier_scale=16.0, scale_by_sigma=True, centered=False,
                  nonlinearity="swish")
_DDPMPP_VP = dict(_NCSNPP_VE, fir=False, progressive_input="none", embedding_type="positional",
                  scale_by_sigma=False, centered=True)

# score_sde's configs/ve/cifar10_ncsnpp{,_deep}_continuous.py and configs/vp/cifar10_ddpmpp{,_deep}_continuous.py.
PRESETS: dict[str, Preset] = {
    "cifar10_ncsnpp_continuous": Preset("cifar10_ncsnpp_continuous", NCSNpp(num_res_blocks=4, **_NCSNPP_VE),
                                        VESDE(sigma_min=0.01, sigma_max=50.0)),
    "cifar10_ncsnpp_deep_continuous": Preset("cifar10_ncsnpp_deep_continuous",
                                             NCSNpp(num_res_blocks=8, **_NCSNPP_VE),
                                             VESDE(sigma_min=0.01, sigma_max=50.0)),
    "cifar10_ddpmpp_continuous": Preset("cifar10_ddpmpp_continuous", NCSNpp(num_res_blocks=4, **_DDPMPP_VP),
                                        VPSDE(beta_min=0.1, beta_max=20.0)),
    "cifar10_ddpmpp_deep_continuous": Preset("cifar10_ddpmpp_deep_continuous",
                                             NCSNpp(num_res_blocks=8, **_DDPMPP_VP),
                                             VPSDE(beta_min=0.1, beta_max=20.0)),
}

# score_sde config.model keys that NCSNpp takes as they are; the rest of config.model is SDE or training data.
# (dtype is ours, the compute dtype, not a score_sde setting.)
_MODEL_KEYS = tuple(f.name for f in dataclasses.fields(NCSNpp)
                    if f.name not in ("parent", "name", "centered", "dtype"))
_TUPLE_KEYS = ("ch_mult", "attn_resolutions", "fir_kernel")


def preset_from_config(model_config: Mapping[str, Any], *, sde: str, centered: bool = False,
                       image_shape: tuple[int, int, int] = (32, 32, 3), name: str = "custom") -> Preset:
  """A preset from a score_sde ``config.model`` mapping (e.g. a JSON dump of it).

  Args:
    model_config: score_sde model settings; keys NCSNpp does not know (ema_rate, num_scales, ...) are ignored
      except sigma_min/sigma_max (VE) and beta_min/beta_max (VP).
    sde: "ve" (continuous VE, Fourier embedding of sigma) or "vp" (continuous VP, label 999 t, eps output).
    centered: score_sde's ``config.data.centered`` (False for its VE configs, True for VP).
    image_shape: (H, W, C) of the training images.
    name: the preset's name in messages.
  """
  kwargs = {k: model_config[k] for k in _MODEL_KEYS if k in model_config}
  for key in _TUPLE_KEYS:
    if key in kwargs:
      kwargs[key] = tuple(kwargs[key])  # JSON gives lists; the module must stay hashable
  model = NCSNpp(centered=centered, **kwargs)
  if sde == "ve":
    sde_obj = VESDE(sigma_min=float(model_config.get("sigma_min", 0.01)),
                    sigma_max=float(model_config.get("sigma_max", 50.0)))
  elif sde == "vp":
    sde_obj = VPSDE(beta_min=float(model_config.get("beta_min", 0.1)),
                    beta_max=float(model_config.get("beta_max", 20.0)))
  else:
    raise ValueError(f"sde={sde!r}: use 've' (score_sde vesde, continuous) or 'vp' (vpsde, continuous).")
  return Preset(name=name, model=model, sde=sde_obj, image_shape=tuple(image_shape))


def get_preset(preset: Union[str, Preset]) -> Preset:
  """A preset by name (a key of ``PRESETS``), or ``preset`` itself when it already is one."""
  if isinstance(preset, Preset):
    return preset
  try:
    return PRESETS[preset]
  except KeyError:
    raise PretrainedError(f"unknown score_sde preset {preset!r}: choose one of {sorted(PRESETS)}, or build "
                          "one with preset_from_config(...).") from None


# --------------------------------------------------------------------------------------------------------
# VP -> score at our sigma.


def vp_sigma(t, beta_min: float = 0.1, beta_max: float = 20.0):
  """Our sigma matched to VP time t: sqrt((1 - abar_t) / abar_t) / 2 (module docstring). Works on floats and
  arrays."""
  integral = beta_min * t + 0.5 * (beta_max - beta_min) * t * t  # -log abar_t
  if isinstance(t, (int, float)):
    return 0.5 * math.sqrt(math.expm1(integral))
  return 0.5 * jnp.sqrt(jnp.expm1(integral))


def vp_time(sigma, beta_min: float = 0.1, beta_max: float = 20.0):
  """The VP time t with sqrt((1 - abar_t) / abar_t) = 2 sigma: t = 2 L / (b0 + sqrt(b0^2 + 2 (b1 - b0) L)),
  L = log(1 + 4 sigma^2). Inverse of ``vp_sigma``."""
  log_term = jnp.log1p(4.0 * jnp.square(sigma))
  return 2.0 * log_term / (beta_min + jnp.sqrt(beta_min**2 + 2.0 * (beta_max - beta_min) * log_term))


def vp_to_score_fn(vp_model_fn: Callable[[jax.Array, jax.Array], jax.Array], *, beta_min: float = 0.1,
                   beta_max: float = 20.0, prediction: str = "eps") -> Callable[[jax.Array, Any], jax.Array]:
  """Turns a VP network on [-1, 1] images into a score function on [0, 1] images at our sigma.

  Args:
    vp_model_fn: ``vp_model_fn(x_t, t)`` with x_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps for centred data
      z0 in [-1, 1] and t [B] the VP time in (0, 1]; returns eps (``prediction="eps"``) or
      grad_{x_t} log p_t (``prediction="score"``), shaped like x_t.
    beta_min, beta_max: the linear beta schedule of the VP SDE it was trained with.
    prediction: "eps" or "score".

  Returns:
    ``score_fn(y, sigma)``: y [B, H, W, C] in [0, 1], sigma a scalar or [B] -> grad_y log p_sigma(y), with
    t = vp_time(sigma), x_t = (2 y - 1) / sqrt(1 + 4 sigma^2), and score = -eps / sigma or
    2 s / sqrt(1 + 4 sigma^2) (derivation in the module docstring).
  """
  if prediction not in ("eps", "score"):
    raise ValueError(f"prediction={prediction!r}: use 'eps' (noise-prediction network) or 'score'.")

  def score_fn(y, sigma):
    sigma = denoise.sigma_per_example(sigma, y)
    t = vp_time(sigma, beta_min, beta_max)
    mean_coeff = jax.lax.rsqrt(1.0 + 4.0 * jnp.square(sigma))  # a_t = sqrt(abar_t)
    expand = (-1,) + (1,) * (y.ndim - 1)
    out = vp_model_fn((2.0 * y - 1.0) * mean_coeff.reshape(expand), t)
    if prediction == "eps":
      return -out / sigma.reshape(expand)
    return 2.0 * mean_coeff.reshape(expand) * out

  return score_fn


# --------------------------------------------------------------------------------------------------------
# The loaded score function.


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True, eq=False)
class ScoreSdeScoreFn:
  """``score_fn(x, sigma)`` of a score_sde network with its parameters (see the module docstring for units).

  Hashable by identity (eq=False), so it can be a static argument; a pytree over ``params``, so it can also
  be passed to ``jax.jit`` as an ordinary argument without baking the weights into the program.
  """

  preset: Preset
  params: Any

  @property
  def sigma_min(self) -> float:
    return float(self.preset.sde.sigma_min)

  @property
  def sigma_max(self) -> float:
    return float(self.preset.sde.sigma_max)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return self.preset.image_shape

  def network(self, x: jax.Array, cond: jax.Array) -> jax.Array:
    """The raw network: score (VE, x in [0, 1], cond = sigma) or eps (VP, x = x_t, cond = 999 t)."""
    return self.preset.model.apply({"params": self.params}, x, cond)

  def __call__(self, x: jax.Array, sigma) -> jax.Array:
    sde = self.preset.sde
    if isinstance(sde, VESDE):
      return self.network(x, denoise.sigma_per_example(sigma, x))
    score_fn = vp_to_score_fn(lambda x_t, t: self.network(x_t, sde.time_scale * t), beta_min=sde.beta_min,
                              beta_max=sde.beta_max, prediction=sde.prediction)
    return score_fn(x, sigma)

  def tree_flatten(self):
    return (self.params,), self.preset

  @classmethod
  def tree_unflatten(cls, preset, children):
    return cls(preset=preset, params=children[0])


# --------------------------------------------------------------------------------------------------------
# Reading checkpoints.


def resolve_checkpoint_file(path) -> pathlib.Path:
  """``path`` itself when it is a file; for a directory, its newest ``checkpoint_<n>`` file (score_sde's
  ``checkpoints/`` folder)."""
  path = pathlib.Path(path).expanduser()
  if path.is_file():
    return path
  if path.is_dir():
    found = [(int(m.group(1)), p) for p in path.iterdir()
             if p.is_file() and (m := re.fullmatch(r"checkpoint_(\d+)", p.name))]
    if not found:
      raise PretrainedError(f"directory {path} has no checkpoint_<n> file: pass the path of a score_sde "
                            "checkpoint file (e.g. .../cifar10_ncsnpp_continuous/checkpoint_<n>).")
    return max(found)[1]
  raise PretrainedError(f"score_sde checkpoint {path} does not exist: download it from the score_sde README's "
                        "Google Drive folder (see scoresmooth_jax.modelio.pretrained) and pass its path.")


def read_checkpoint_params(path, *, use_ema: bool = True) -> dict:
  """The parameter tree (numpy arrays) of a score_sde checkpoint file: ``params_ema`` when ``use_ema``, else
  ``optimizer/target``. Reads msgpack only; nothing in the file is executed."""
  file = resolve_checkpoint_file(path)
  try:
    state = serialization.msgpack_restore(file.read_bytes())
  except Exception as err:  # msgpack raises several types for truncated or foreign data
    raise PretrainedError(f"cannot read {file} as a score_sde (Flax msgpack) checkpoint: {type(err).__name__}: "
                          f"{err}. Is the download complete?") from err
  if not isinstance(state, dict):
    raise PretrainedError(f"{file} holds a {type(state).__name__}, not score_sde's training State map.")
  if use_ema:
    params = state.get("params_ema")
    where = "params_ema"
  else:
    optimizer = state.get("optimizer")
    params = optimizer.get("target") if isinstance(optimizer, dict) else state.get("params")
    where = "optimizer/target"
  if not isinstance(params, dict) or not params:
    raise PretrainedError(f"{file} has no {where!r} parameters (top-level keys: {sorted(state)}); it is not a "
                          "score_sde training checkpoint, or pass use_ema=" + str(not use_ema) + ".")
  return params


def _path_str(path: tuple) -> str:
  return "/".join(str(p) for p in path)


def check_params(params: Mapping, preset: Preset) -> dict:
  """Checks ``params`` against the preset's architecture and returns them as float32 arrays.

  Raises PretrainedError naming the first (in sorted path order) parameter that is missing, has the wrong
  shape, or is not expected.
  """
  h, w, c = preset.image_shape
  expected = jax.eval_shape(preset.model.init, jax.random.key(0), jnp.zeros((1, h, w, c), jnp.float32),
                            jnp.ones((1,), jnp.float32))["params"]
  expected = traverse_util.flatten_dict(expected)
  got = traverse_util.flatten_dict(dict(params))
  for key in sorted(expected):
    if key not in got:
      raise PretrainedError(f"checkpoint does not fit preset {preset.name!r}: parameter {_path_str(key)} "
                            f"(shape {expected[key].shape}) is missing. Is it a checkpoint of another model?")
    shape = tuple(np.shape(got[key]))
    if shape != tuple(expected[key].shape):
      raise PretrainedError(f"checkpoint does not fit preset {preset.name!r}: parameter {_path_str(key)} has "
                            f"shape {shape} in the checkpoint but {tuple(expected[key].shape)} in the preset. "
                            "Pick the preset that matches the config the checkpoint was trained with.")
  extra = sorted(set(got) - set(expected))
  if extra:
    raise PretrainedError(f"checkpoint does not fit preset {preset.name!r}: parameter {_path_str(extra[0])} "
                          f"(shape {tuple(np.shape(got[extra[0]]))}) is not in the preset's architecture"
                          + (f" ({len(extra) - 1} more)" if len(extra) > 1 else "") + ".")
  return traverse_util.unflatten_dict({k: jnp.asarray(v, jnp.float32) for k, v in got.items()})


def load_score_sde(checkpoint_path, preset: Union[str, Preset], *, use_ema: bool = True,
                   compute_dtype=None) -> tuple[ScoreSdeScoreFn, float, float]:
  """Loads a score_sde checkpoint as a score function on [0, 1] images at our sigma.

  Args:
    checkpoint_path: a score_sde ``checkpoint_<n>`` file (or a directory: its newest one).
    preset: a name in ``PRESETS`` (e.g. "cifar10_ncsnpp_continuous", "cifar10_ddpmpp_continuous") or a
      ``Preset`` (see ``preset_from_config``).
    use_ema: take the EMA parameters (score_sde's evaluation weights) rather than the raw ones.
    compute_dtype: None or "float32" (default), or "bfloat16": the network's compute dtype (parameters stay
      float32, the score is float32; ``compute_dtype.with_compute_dtype``).

  Returns:
    ``(score_fn, sigma_min, sigma_max)``: the ``ScoreSdeScoreFn`` and the sigma range it was trained on.
  """
  preset = get_preset(preset)
  params = check_params(read_checkpoint_params(checkpoint_path, use_ema=use_ema), preset)
  score_fn = ScoreSdeScoreFn(preset=preset, params=params)
  if compute_dtype is not None:
    score_fn = compute_dtype_lib.with_compute_dtype(score_fn, compute_dtype)
  return score_fn, score_fn.sigma_min, score_fn.sigma_max


def is_score_sde_spec(spec: str) -> bool:
  """True for a string of the form "score_sde:<preset>:<path>"."""
  return isinstance(spec, str) and spec.startswith(SPEC_PREFIX + ":")


def split_spec(spec: str, prefix: str, example: str, presets) -> tuple[str, str]:
  """Splits "<prefix>:<preset>:<path>" into (preset, path); the path may itself contain ':' (gs://...).

  The error shows ``example`` and the ``presets`` names; published-checkpoint readers share it.
  """
  parts = spec.split(":", 2) if isinstance(spec, str) else []
  if len(parts) != 3 or parts[0] != prefix or not parts[1] or not parts[2]:
    raise ValueError(f"score model spec {spec!r} is not of the form '{prefix}:<preset>:<path>', e.g. "
                     f"'{example}'; presets: {sorted(presets)}.")
  return parts[1], parts[2]


def parse_score_sde_spec(spec: str) -> tuple[str, str]:
  """Splits "score_sde:<preset>:<path>" into (preset, path) (``split_spec``)."""
  return split_spec(spec, SPEC_PREFIX, "score_sde:cifar10_ncsnpp_continuous:/data/cifar10_ncsnpp_continuous/"
                    "checkpoint_<n>", PRESETS)


def load_score_sde_from_spec(spec: str, *, use_ema: bool = True,
                             compute_dtype=None) -> tuple[ScoreSdeScoreFn, float, float]:
  """``load_score_sde`` from a config string "score_sde:<preset>:<path>"."""
  preset, path = parse_score_sde_spec(spec)
  return load_score_sde(path, preset, use_ema=use_ema, compute_dtype=compute_dtype)

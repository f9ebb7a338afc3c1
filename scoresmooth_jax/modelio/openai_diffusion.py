"""OpenAI's discrete-time diffusion checkpoints (improved-diffusion, guided-diffusion) as score functions.

What this module promises:
  * ``load_openai(path, preset)`` reads a PyTorch state dict of ``UNetModel`` (``torch.load(...,
    weights_only=True)``: tensors and plain containers only, no pickled code runs), checks every key and shape
    against the preset's ``OpenAIUNet`` in the model's order (the first missing, mis-shaped or unexpected key
    is named, with both shapes), converts it to Flax parameters, and returns ``(score_fn, sigma_min, sigma_max)``.
  * ``score_fn(x, sigma)`` is an ``OpenAIScoreFn``: images x in [0, 1] (NHWC), sigma a scalar or one per example
    in our convention (per-coordinate standard deviation of Gaussian noise on [0, 1] images); it returns
    grad_x log p_sigma(x). It is jittable, hashable by identity, and a pytree over the parameters (as
    ``pretrained.ScoreSdeScoreFn``), so it plugs into ``denoise.one_step``, ``denoise.annealed`` and the
    certification job. (sigma_min, sigma_max) are the noise levels of the first and last training timestep.
  * ``load_openai_from_spec("openai:<preset>:<path.pt>")`` does the same from one config string.

The map from a discrete-time eps-prediction model to our score
---------------------------------------------------------------
The models are trained on z0 = 2 x0 - 1 in [-1, 1] with x_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps at integer
steps t = 0 .. N - 1 (abar_t = prod_{s <= t} (1 - beta_s), the named beta schedules recomputed in float64 exactly
as upstream's ``get_named_beta_schedule``). Our observation is y = x0 + sigma n on [0, 1], so 2 y - 1 = z0 + 2 sigma n
and sqrt(abar) (2 y - 1) = sqrt(abar) z0 + sqrt(abar) 2 sigma n has exactly the law of x_t (with eps = n) iff
sqrt((1 - abar) / abar) = 2 sigma, i.e. abar = 1 / (1 + 4 sigma^2). The network then predicts eps ~ n, and since
p_Y(y) = p_t(sqrt(abar) (2 y - 1)) (2 sqrt(abar))^d,
    grad_y log p_Y = 2 sqrt(abar) grad_x log p_t = 2 sqrt(abar) (-eps / sqrt(1 - abar)) = -eps / sigma.
So: input sqrt(abar) (2 y - 1) with abar = 1 / (1 + 4 sigma^2) (exact for every sigma), eps = the first 3 of the 6
output channels (the other 3 are the learned variance, unused), score = -eps / sigma.

Which timestep. The level g_t = sqrt((1 - abar_t) / abar_t) is strictly increasing in t but 2 sigma almost never
equals g_t at an integer t. We give the network the fractional t at which the schedule, interpolated linearly in
lambda_t = log g_t^2 = log((1 - abar_t) / abar_t) (the log noise-to-signal ratio) between neighbouring integer steps,
reaches lambda = log(4 sigma^2): t = i + (log(4 sigma^2) - lambda_i) / (lambda_{i+1} - lambda_i). Why log-SNR: it is
the coordinate in which a VP model's noise level is parameterised (the loss weighting and the schedules are
designed in it; Kingma et al. 2021); both schedules are smooth and nearly linear in it between neighbouring steps
(the cosine schedule's lambda is 2 log tan(...) of a linear function of t; the linear one changes lambda by < 3 %
per step above t = 10), so linear interpolation there is the natural, monotone, exactly invertible choice; it is
exact at the integers and the input scaling above does not depend on it. The network's own timestep rescaling
is then applied (improved-diffusion: t * 1000 / N, ``rescale_timesteps=True``; guided-diffusion: t as it is).
Below the first or above the last training level the timestep is clamped to 0 or N - 1 (the input scaling stays
exact); ``denoise.check_trained_range`` rejects such sigmas in the certification job.

Carlini et al. (2023) instead take the smallest integer t >= 1 with g_t >= 2 sigma and add the noise themselves
with ``q_sample`` at that t: their smoothing noise is g_t / 2 >= sigma while their certificate uses sigma, which is
valid but certifies a slightly noisier classifier than the one sampled (a radius for sigma under noise g_t / 2).
Here the noise is exactly sigma and the network is told exactly that level, at a fractional step; the integer
rule's t is ``carlini_timestep`` (docs/openai.md tabulates both).

Where the checkpoints are: improved-diffusion's README links cifar10_uncond_50M_500K.pt
(https://openaipublic.blob.core.windows.net/diffusion/march-2021/cifar10_uncond_50M_500K.pt), guided-diffusion's
256x256_diffusion_uncond.pt (https://openaipublic.blob.core.windows.net/diffusion/jul-2021/256x256_diffusion_uncond.pt).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from scoresmooth_jax import denoise
from scoresmooth_jax.modelio import compute_dtype as compute_dtype_lib
from scoresmooth_jax.models.openai_unet import OpenAIUNet, torch_key, torch_order  # noqa: F401 (re-exported)
from scoresmooth_jax.modelio.pretrained import PretrainedError, split_spec

SPEC_PREFIX = "openai"
SCHEDULES = ("linear", "cosine")


@dataclasses.dataclass(frozen=True)
class Diffusion:
  """A discrete-time VP diffusion as upstream's ``create_gaussian_diffusion`` sets it up.

  schedule: "linear" (Ho et al., scaled to num_steps) or "cosine" (Nichol & Dhariwal). num_steps: N.
  rescale_timesteps: the network receives t * 1000 / N rather than t (improved-diffusion's default).
  """

  schedule: str
  num_steps: int
  rescale_timesteps: bool

  def __post_init__(self):
    if self.schedule not in SCHEDULES:
      raise ValueError(f"schedule={self.schedule!r}: choose one of {SCHEDULES}.")
    if self.num_steps < 2:
      raise ValueError(f"num_steps={self.num_steps} must be >= 2.")

  def alphas_cumprod(self) -> np.ndarray:
    return alphas_cumprod(self.schedule, self.num_steps)

  def log_noise_ratio(self) -> np.ndarray:
    """lambda_t = log((1 - abar_t) / abar_t), float64, strictly increasing."""
    abar = self.alphas_cumprod()
    return np.log1p(-abar) - np.log(abar)

  @property
  def sigma_min(self) -> float:
    return 0.5 * math.exp(0.5 * float(self.log_noise_ratio()[0]))

  @property
  def sigma_max(self) -> float:
    return 0.5 * math.exp(0.5 * float(self.log_noise_ratio()[-1]))

  def model_time(self, t):
    """The timestep the network receives for (fractional) step t."""
    return t * (1000.0 / self.num_steps) if self.rescale_timesteps else t


@dataclasses.dataclass(frozen=True)
class OpenAIPreset:
  """A published checkpoint's architecture, diffusion, training image shape and download address."""

  name: str
  model: OpenAIUNet
  diffusion: Diffusion
  image_shape: tuple[int, int, int]
  url: str = ""


PRESETS: dict[str, OpenAIPreset] = {
    # improved-diffusion README: --image_size 32 --num_channels 128 --num_res_blocks 3 --learn_sigma True
    # --dropout 0.3, --diffusion_steps 4000 --noise_schedule cosine; defaults: 4 heads, attention at 16,8 px,
    # scale-shift norm, rescaled timesteps; create_model's channel_mult for 32 px is (1, 2, 2, 2).
    "cifar10_uncond_50M_500K": OpenAIPreset(
        "cifar10_uncond_50M_500K",
        OpenAIUNet(model_channels=128, num_res_blocks=3, attention_resolutions=(2, 4), channel_mult=(1, 2, 2, 2),
                   out_channels=6, num_heads=4, use_scale_shift_norm=True),
        Diffusion("cosine", 4000, rescale_timesteps=True), (32, 32, 3),
        "https://openaipublic.blob.core.windows.net/diffusion/march-2021/cifar10_uncond_50M_500K.pt"),
    # guided-diffusion README (256x256 unconditional): --attention_resolutions 32,16,8 --diffusion_steps 1000
    # --image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64
    # --num_res_blocks 2 --resblock_updown True --use_scale_shift_norm True; channel_mult (1, 1, 2, 2, 4, 4).
    "256x256_diffusion_uncond": OpenAIPreset(
        "256x256_diffusion_uncond",
        OpenAIUNet(model_channels=256, num_res_blocks=2, attention_resolutions=(8, 16, 32),
                   channel_mult=(1, 1, 2, 2, 4, 4), out_channels=6, num_heads=4, num_head_channels=64,
                   use_scale_shift_norm=True, resblock_updown=True),
        Diffusion("linear", 1000, rescale_timesteps=False), (256, 256, 3),
        "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/256x256_diffusion_uncond.pt"),
}


# UNetModel constructor arguments that OpenAIUNet takes under the same name; the rest (in_channels, dropout,
# use_fp16, ...) do not change the inference function of an unconditional 2-D RGB model.
_UNET_KEYS = ("model_channels", "num_res_blocks", "attention_resolutions", "channel_mult", "out_channels",
              "num_heads", "num_head_channels", "num_heads_upsample", "use_scale_shift_norm", "resblock_updown",
              "conv_resample", "use_new_attention_order")


def preset_from_unet_kwargs(unet_kwargs: Mapping[str, Any], diffusion: Diffusion,
                            image_shape: tuple[int, int, int], name: str = "custom") -> OpenAIPreset:
  """A preset from upstream ``UNetModel(...)`` constructor arguments (e.g. a JSON dump of them).

  Raises ValueError for what this port does not cover: class-conditional models (num_classes), other than 2-D
  or 3-channel inputs.
  """
  if unet_kwargs.get("num_classes") is not None:
    raise ValueError(f"num_classes={unet_kwargs['num_classes']}: class-conditional models are not supported; "
                     "use an unconditional checkpoint.")
  if unet_kwargs.get("dims", 2) != 2 or unet_kwargs.get("in_channels", 3) != image_shape[-1]:
    raise ValueError(f"dims={unet_kwargs.get('dims', 2)}, in_channels={unet_kwargs.get('in_channels', 3)}: only "
                     f"2-D models whose input channels match image_shape={tuple(image_shape)} are supported.")
  kwargs = {k: unet_kwargs[k] for k in _UNET_KEYS if k in unet_kwargs}
  for key in ("attention_resolutions", "channel_mult"):
    if key in kwargs:
      kwargs[key] = tuple(kwargs[key])  # JSON gives lists; the module must stay hashable
  return OpenAIPreset(name, OpenAIUNet(**kwargs), diffusion, tuple(image_shape))


def get_preset(preset: Union[str, OpenAIPreset]) -> OpenAIPreset:
  """A preset by name (a key of ``PRESETS``), or ``preset`` itself when it already is one."""
  if isinstance(preset, OpenAIPreset):
    return preset
  try:
    return PRESETS[preset]
  except KeyError:
    raise PretrainedError(f"unknown OpenAI diffusion preset {preset!r}: choose one of {sorted(PRESETS)}, or "
                          "build an OpenAIPreset.") from None


# --------------------------------------------------------------------------------------------------------
# Schedules and the sigma -> timestep map.


def alphas_cumprod(schedule: str, num_steps: int) -> np.ndarray:
  """abar_t, t = 0 .. N - 1, in float64, as upstream's ``get_named_beta_schedule`` + ``np.cumprod(1 - betas)``."""
  if schedule == "linear":
    scale = 1000.0 / num_steps  # Ho et al.'s 1e-4 .. 0.02 over 1000 steps, stretched to N steps
    betas = np.linspace(scale * 0.0001, scale * 0.02, num_steps, dtype=np.float64)
  elif schedule == "cosine":
    def abar(s):
      return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = np.array([min(1.0 - abar((i + 1) / num_steps) / abar(i / num_steps), 0.999)
                      for i in range(num_steps)], dtype=np.float64)
  else:
    raise ValueError(f"schedule={schedule!r}: choose one of {SCHEDULES}.")
  return np.cumprod(1.0 - betas)


def fractional_timestep(diffusion: Diffusion, sigma):
  """The fractional step t with interpolated sqrt((1 - abar_t) / abar_t) = 2 sigma (module docstring), clamped to
  [0, N - 1]; works on floats and (traced) arrays."""
  lam = diffusion.log_noise_ratio()
  if isinstance(sigma, (int, float)):
    return float(np.interp(math.log(4.0 * sigma * sigma), lam, np.arange(len(lam), dtype=np.float64)))
  target = jnp.log(4.0 * jnp.square(sigma))
  return jnp.interp(target, jnp.asarray(lam, jnp.float32), jnp.arange(len(lam), dtype=jnp.float32))


def interpolated_alphas_cumprod(diffusion: Diffusion, t):
  """abar at fractional step t under the same interpolation (lambda linear between integers): the inverse of
  ``fractional_timestep``."""
  lam = diffusion.log_noise_ratio()
  lam_t = jnp.interp(t, jnp.arange(len(lam), dtype=jnp.float32), jnp.asarray(lam, jnp.float32))
  return jax.nn.sigmoid(-lam_t)  # abar = 1 / (1 + exp(lambda))


def carlini_timestep(diffusion: Diffusion, sigma: float) -> int:
  """Carlini et al. (2023)'s rule: the smallest integer t >= 1 with sqrt((1 - abar_t) / abar_t) >= 2 sigma."""
  level = np.exp(0.5 * diffusion.log_noise_ratio())
  above = np.nonzero(level[1:] >= 2.0 * sigma)[0]
  if not above.size:
    raise ValueError(f"sigma={sigma} is above the schedule's last level {level[-1] / 2:.4g}.")
  return int(above[0]) + 1


def vp_eps_to_score_fn(eps_fn, diffusion: Diffusion):
  """``score_fn(y, sigma)`` on [0, 1] images from ``eps_fn(x_t, model_t)``, an eps-prediction network on the
  model's [-1, 1] domain called with the timestep it was trained to receive (module docstring)."""

  def score_fn(y, sigma):
    sigma = denoise.sigma_per_example(sigma, y)
    expand = (-1,) + (1,) * (y.ndim - 1)
    mean_coeff = jax.lax.rsqrt(1.0 + 4.0 * jnp.square(sigma)).reshape(expand)  # sqrt(abar), exact
    t = diffusion.model_time(fractional_timestep(diffusion, sigma))
    eps = eps_fn((2.0 * y - 1.0) * mean_coeff, t)[..., : y.shape[-1]]  # learned sigma: 3 more channels
    return -eps / sigma.reshape(expand)

  return score_fn


# --------------------------------------------------------------------------------------------------------
# The loaded score function.


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True, eq=False)
class OpenAIScoreFn:
  """``score_fn(x, sigma)`` of an improved-/guided-diffusion network with its parameters (module docstring).

  Hashable by identity (eq=False); a pytree over ``params`` so that it can be a ``jax.jit`` argument.
  """

  preset: OpenAIPreset
  params: Any

  @property
  def sigma_min(self) -> float:
    return self.preset.diffusion.sigma_min

  @property
  def sigma_max(self) -> float:
    return self.preset.diffusion.sigma_max

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return self.preset.image_shape

  def network(self, x_t: jax.Array, model_t: jax.Array) -> jax.Array:
    """The raw network on NHWC inputs in its own domain: [B, H, W, out_channels]."""
    return self.preset.model.apply({"params": self.params}, x_t, model_t)

  def __call__(self, x: jax.Array, sigma) -> jax.Array:
    return vp_eps_to_score_fn(self.network, self.preset.diffusion)(x, sigma)

  def tree_flatten(self):
    return (self.params,), self.preset

  @classmethod
  def tree_unflatten(cls, preset, children):
    return cls(preset=preset, params=children[0])


# --------------------------------------------------------------------------------------------------------
# Reading state dicts.


def expected_params(preset: Union[str, OpenAIPreset]) -> dict:
  """The preset's Flax parameter shapes (``jax.eval_shape``: nothing is allocated)."""
  preset = get_preset(preset)
  h, w, c = preset.image_shape
  return jax.eval_shape(preset.model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, h, w, c), jnp.float32),
                        jax.ShapeDtypeStruct((1,), jnp.float32))["params"]


def _torch_shape(path: tuple, shape: tuple) -> tuple:
  """PyTorch's shape of a Flax parameter: conv HWIO -> OIHW, dense (in, out) -> (out, in), and the attention's
  1x1 Conv1d (out, in, 1)."""
  if path[-1] != "kernel":
    return tuple(shape)
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if path[-2] in ("qkv", "proj_out"):
    return (shape[1], shape[0], 1)
  return (shape[1], shape[0])


def _to_flax(array: np.ndarray) -> np.ndarray:
  if array.ndim == 4:
    return np.transpose(array, (2, 3, 1, 0))
  if array.ndim == 3:
    return np.transpose(array[:, :, 0])
  if array.ndim == 2:
    return np.transpose(array)
  return array


def _numpy(value) -> np.ndarray:
  """A float32 numpy array from a torch tensor (any float dtype: fp16 checkpoints too) or an array."""
  if hasattr(value, "detach"):
    value = value.detach().cpu().float().numpy()
  return np.asarray(value, np.float32)


def convert_state_dict(state_dict: Mapping[str, Any], preset: Union[str, OpenAIPreset]) -> dict:
  """Flax params (float32 jax arrays) from an improved-/guided-diffusion ``UNetModel`` state dict.

  Raises PretrainedError naming the first key (in the model's order) that is missing or has the wrong shape,
  then the first unexpected one.
  """
  preset = get_preset(preset)
  expected = traverse_util.flatten_dict(expected_params(preset))
  by_key = {torch_key(path): path for path in expected}
  names = sorted(by_key, key=torch_order)  # the state dict's own order, so "first" means the same in both
  got = {k: v for k, v in state_dict.items()}
  flat = {}
  for key in names:
    path = by_key[key]
    want = _torch_shape(path, tuple(expected[path].shape))
    if key not in got:
      raise PretrainedError(f"state dict does not fit preset {preset.name!r}: {key} (shape {want}) is missing"
                            f"{' (the file looks truncated)' if len(got) < len(names) else ''}; is it a "
                            "checkpoint of another model?")
    array = _numpy(got.pop(key))
    if tuple(array.shape) != want:
      raise PretrainedError(f"state dict does not fit preset {preset.name!r}: {key} has shape {tuple(array.shape)} "
                            f"in the file but {want} in the preset. Pick the preset whose flags the checkpoint "
                            "was trained with.")
    flat[path] = jnp.asarray(_to_flax(array))
  if got:
    extra = list(got)  # in the file's order
    raise PretrainedError(f"state dict does not fit preset {preset.name!r}: {extra[0]} (shape "
                          f"{tuple(got[extra[0]].shape)}) is not in the preset's architecture"
                          + (f" ({len(extra) - 1} more)" if len(extra) > 1 else "")
                          + "; a class-conditional model (label_emb) or other flags need their own preset.")
  return traverse_util.unflatten_dict(flat)


def read_state_dict(path) -> Mapping[str, Any]:
  """The state dict of a ``.pt`` file, read with ``torch.load(..., weights_only=True)``."""
  from scoresmooth_jax.modelio import convert  # torch is imported only here

  try:
    state = convert.load_torch_checkpoint(path)
  except convert.ConversionError as err:
    raise PretrainedError(f"{err} Download it from {sorted(p.url for p in PRESETS.values())}.") from None
  if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
    state = state["state_dict"]
  if not isinstance(state, Mapping) or not state:
    raise PretrainedError(f"{path} holds a {type(state).__name__}, not a UNetModel state dict "
                          "(model.state_dict() saved with torch.save).")
  return state


def load_openai(checkpoint_path, preset: Union[str, OpenAIPreset],
                compute_dtype=None) -> tuple[OpenAIScoreFn, float, float]:
  """Loads an improved-/guided-diffusion checkpoint as a score function on [0, 1] images at our sigma.

  Args:
    checkpoint_path: a ``.pt`` state dict (e.g. cifar10_uncond_50M_500K.pt, 256x256_diffusion_uncond.pt).
    preset: a name in ``PRESETS`` or an ``OpenAIPreset``.
    compute_dtype: None or "float32" (default), or "bfloat16": the network's compute dtype (parameters stay
      float32, the score is float32; ``compute_dtype.with_compute_dtype``).

  Returns:
    ``(score_fn, sigma_min, sigma_max)``.
  """
  preset = get_preset(preset)
  params = convert_state_dict(read_state_dict(checkpoint_path), preset)
  score_fn = OpenAIScoreFn(preset=preset, params=params)
  if compute_dtype is not None:
    score_fn = compute_dtype_lib.with_compute_dtype(score_fn, compute_dtype)
  return score_fn, score_fn.sigma_min, score_fn.sigma_max


def is_openai_spec(spec: str) -> bool:
  """True for a string of the form "openai:<preset>:<path>"."""
  return isinstance(spec, str) and spec.startswith(SPEC_PREFIX + ":")


def parse_openai_spec(spec: str) -> tuple[str, str]:
  """Splits "openai:<preset>:<path.pt>" into (preset, path) (``pretrained.split_spec``)."""
  return split_spec(spec, SPEC_PREFIX, "openai:cifar10_uncond_50M_500K:/data/cifar10_uncond_50M_500K.pt", PRESETS)


def load_openai_from_spec(spec: str, compute_dtype=None) -> tuple[OpenAIScoreFn, float, float]:
  """``load_openai`` from a config string "openai:<preset>:<path.pt>"."""
  preset, path = parse_openai_spec(spec)
  return load_openai(path, preset, compute_dtype=compute_dtype)

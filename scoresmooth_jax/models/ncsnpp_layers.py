"""Building blocks of NCSN++ / DDPM++ (models/ncsnpp.py): FIR resampling, convolutions, embeddings, blocks.

The class names (``Conv2d``, ``NIN``, ``AttnBlockpp``, ``ResnetBlockBigGANpp``, ...) and the order in which
each block creates its sub-modules are part of score_sde's checkpoint format: Linen derives parameter names
from them. They must not be renamed or reordered.

Every block computes in its ``dtype`` (float32 by default; bfloat16 for tensor cores): parameters stay float32 and
are cast where used, GroupNorm statistics and the attention softmax stay float32. ``Conv2d``, ``NIN`` and the FIR
filters compute in the dtype of their input.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_DN = ("NHWC", "HWIO", "NHWC")
_SQRT2 = math.sqrt(2.0)

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "swish": nn.swish,
    "relu": nn.relu,
    "elu": nn.elu,
    "lrelu": lambda x: nn.leaky_relu(x, negative_slope=0.2),
}


# --------------------------------------------------------------------------------------------------------
# Initialisers (only matter for training from scratch; checkpoints overwrite them).


def default_init(scale: float = 1.0):
  """DDPM's initialiser: uniform variance scaling on fan_avg; scale 0 means "almost zero" (1e-10)."""
  return nn.initializers.variance_scaling(1e-10 if scale == 0 else scale, "fan_avg", "uniform")


def _conv(x, features: int, kernel: int, *, stride: int = 1, init_scale: float = 1.0, dtype: Any = jnp.float32):
  """A SAME-padded square convolution with bias, named ``Conv_<i>`` in the caller's scope, computed in ``dtype``."""
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding="SAME",
                 kernel_init=default_init(init_scale), bias_init=nn.initializers.zeros, dtype=dtype)(x)


def _group_norm(channels: int, dtype: Any) -> nn.GroupNorm:
  # Flax reduces the statistics in float32 whatever ``dtype``, which is the output's.
  return nn.GroupNorm(num_groups=_num_groups(channels), dtype=dtype)


def _num_groups(channels: int) -> int:
  # score_sde's GroupNorm rule: groups of at least 4 channels, at most 32 groups.
  return min(channels // 4, 32)


# --------------------------------------------------------------------------------------------------------
# FIR resampling (StyleGAN2's upfirdn), NHWC, the same on both spatial axes.


def _fir_kernel_2d(kernel, gain: float) -> np.ndarray:
  k = np.asarray(kernel, dtype=np.float64)
  if k.ndim == 1:
    k = np.outer(k, k)  # a 1-D kernel means the separable 2-D filter
  if k.ndim != 2 or k.shape[0] != k.shape[1]:
    raise ValueError(f"fir_kernel={kernel!r} must be a 1-D list or a square 2-D array, e.g. (1, 3, 3, 1).")
  return (k / k.sum() * gain).astype(np.float32)  # normalised so a constant image keeps its value x gain


def upfirdn_2d(x: jax.Array, kernel: np.ndarray, *, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)):
  """Upsample by zero insertion (``up``), zero-pad (``pad`` before/after), convolve with the 2-D ``kernel``,
  keep every ``down``-th sample. One depthwise convolution does all four steps."""
  pad0, pad1 = pad
  if min(pad0, pad1) < 0:
    raise ValueError(f"upfirdn_2d pad={pad!r}: negative padding (cropping) is not supported.")
  channels = x.shape[-1]
  # lax convolutions correlate; flipping the kernel makes this a true convolution as in upfirdn.
  k = jnp.asarray(kernel[::-1, ::-1], x.dtype)
  rhs = jnp.broadcast_to(k[:, :, None, None], k.shape + (1, channels))
  # lhs_dilation inserts up-1 zeros *between* samples; upfirdn also appends them after the last one.
  padding = [(pad0, pad1 + up - 1)] * 2
  return lax.conv_general_dilated(x, rhs, window_strides=(down, down), padding=padding,
                                  lhs_dilation=(up, up), dimension_numbers=_DN, feature_group_count=channels)


def upsample_2d(x: jax.Array, kernel, factor: int = 2) -> jax.Array:
  """FIR upsampling by ``factor``: [B, H, W, C] -> [B, factor H, factor W, C]."""
  k = _fir_kernel_2d(kernel, gain=factor**2)
  p = k.shape[0] - factor
  return upfirdn_2d(x, k, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(x: jax.Array, kernel, factor: int = 2) -> jax.Array:
  """FIR downsampling by ``factor``: [B, H, W, C] -> [B, H / factor, W / factor, C]."""
  k = _fir_kernel_2d(kernel, gain=1.0)
  p = k.shape[0] - factor
  return upfirdn_2d(x, k, down=factor, pad=((p + 1) // 2, p // 2))


def naive_upsample_2d(x: jax.Array, factor: int = 2) -> jax.Array:
  """Nearest-neighbour upsampling (each pixel repeated factor x factor times)."""
  return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


def naive_downsample_2d(x: jax.Array, factor: int = 2) -> jax.Array:
  """Average pooling over factor x factor blocks."""
  b, h, w, c = x.shape
  return x.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


# --------------------------------------------------------------------------------------------------------
# Layers. Class names are score_sde's: they become parameter names.


class Conv2d(nn.Module):
  """Convolution fused with FIR up- or downsampling (StyleGAN2); parameters ``weight`` [k, k, in, out] and
  ``bias``. Up: stride-2 transposed convolution, then the FIR filter. Down: FIR filter, then a stride-2
  convolution. Padding is applied once, so the output is exactly 2x (or 1/2x) the input size."""

  features: int
  kernel: int
  up: bool = False
  down: bool = False
  resample_kernel: tuple[int, ...] = (1, 3, 3, 1)
  use_bias: bool = True
  kernel_init: Callable = default_init()

  @nn.compact
  def __call__(self, x):
    if self.up and self.down:
      raise ValueError("Conv2d: up and down are exclusive.")
    kc = self.kernel
    w = self.param("weight", self.kernel_init, (kc, kc, x.shape[-1], self.features))
    w = w.astype(x.dtype)
    factor = 2
    if self.up:
      # Transposed convolution = correlation of the zero-dilated input, padded by kc - 1 on each side, with w.
      x = lax.conv_general_dilated(x, w, (1, 1), [(kc - 1, kc - 1)] * 2, lhs_dilation=(factor, factor),
                                   dimension_numbers=_DN)
      k = _fir_kernel_2d(self.resample_kernel, gain=factor**2)
      p = (k.shape[0] - factor) - (kc - 1)
      x = upfirdn_2d(x, k, pad=((p + 1) // 2 + factor - 1, p // 2 + 1))
    elif self.down:
      k = _fir_kernel_2d(self.resample_kernel, gain=1.0)
      p = (k.shape[0] - factor) + (kc - 1)
      x = upfirdn_2d(x, k, pad=((p + 1) // 2, p // 2))
      x = lax.conv_general_dilated(x, w, (factor, factor), "VALID", dimension_numbers=_DN)
    else:
      x = lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=_DN)
    if self.use_bias:
      x = x + self.param("bias", nn.initializers.zeros, (x.shape[-1],)).astype(x.dtype)
    return x


class NIN(nn.Module):
  """A 1x1 "network in network" layer: parameters ``W`` [in, out] and ``b`` [out]."""

  num_units: int
  init_scale: float = 0.1

  @nn.compact
  def __call__(self, x):
    w = self.param("W", default_init(self.init_scale), (x.shape[-1], self.num_units))
    b = self.param("b", nn.initializers.zeros, (self.num_units,))
    return jnp.tensordot(x, w.astype(x.dtype), axes=1) + b.astype(x.dtype)


class GaussianFourierProjection(nn.Module):
  """Random Fourier features [sin(2 pi W c), cos(2 pi W c)] of a scalar per example; ``W`` ~ N(0, scale^2)
  is stored as a parameter but never trained (gradients are stopped)."""

  embedding_size: int = 256
  scale: float = 1.0

  @nn.compact
  def __call__(self, c):
    w = lax.stop_gradient(self.param("W", nn.initializers.normal(stddev=self.scale), (self.embedding_size,)))
    proj = c[:, None] * w[None, :] * (2 * jnp.pi)
    return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)


def timestep_embedding(t: jax.Array, dim: int, max_positions: int = 10000) -> jax.Array:
  """Transformer sinusoidal embedding of a (possibly fractional) time label per example: [B] -> [B, dim]."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_positions) / (half - 1) * jnp.arange(half, dtype=jnp.float32))
  angles = t.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=1)
  return jnp.pad(emb, [(0, 0), (0, dim % 2)])


class AttnBlockpp(nn.Module):
  """Single-head self-attention over all pixels, residual (divided by sqrt 2 when ``skip_rescale``)."""

  skip_rescale: bool = False
  init_scale: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    y = _group_norm(c, self.dtype)(x)
    q, k, v = NIN(c)(y), NIN(c)(y), NIN(c)(y)
    logits = jnp.einsum("bhwc,bHWc->bhwHW", q, k).reshape(b, h, w, h * w) * (c ** -0.5)
    # The softmax in float32 whatever the compute dtype: its exponentials and sum need the range.
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(y.dtype).reshape(b, h, w, h, w)
    y = jnp.einsum("bhwHW,bHWc->bhwc", weights, v)
    y = NIN(c, init_scale=self.init_scale)(y)
    return (x + y) / _SQRT2 if self.skip_rescale else x + y


class Upsample(nn.Module):
  """2x upsampling: FIR (optionally fused with a 3x3 conv) or nearest neighbour (optionally then a 3x3 conv)."""

  out_ch: Optional[int] = None
  with_conv: bool = False
  fir: bool = False
  fir_kernel: tuple[int, ...] = (1, 3, 3, 1)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    out_ch = self.out_ch or x.shape[-1]
    if self.fir:
      if self.with_conv:
        return Conv2d(out_ch, 3, up=True, resample_kernel=self.fir_kernel)(x)
      return upsample_2d(x, self.fir_kernel, factor=2)
    h = naive_upsample_2d(x, 2)
    return _conv(h, out_ch, 3, dtype=self.dtype) if self.with_conv else h


class Downsample(nn.Module):
  """2x downsampling: FIR (optionally fused with a 3x3 conv), or a stride-2 3x3 conv, or 2x2 average pooling."""

  out_ch: Optional[int] = None
  with_conv: bool = False
  fir: bool = False
  fir_kernel: tuple[int, ...] = (1, 3, 3, 1)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    out_ch = self.out_ch or x.shape[-1]
    if self.fir:
      if self.with_conv:
        return Conv2d(out_ch, 3, down=True, resample_kernel=self.fir_kernel)(x)
      return downsample_2d(x, self.fir_kernel, factor=2)
    if self.with_conv:
      return _conv(x, out_ch, 3, stride=2, dtype=self.dtype)
    return naive_downsample_2d(x, 2)


class Combine(nn.Module):
  """Merges the input pyramid ``x`` into features ``y``: a 1x1 conv of ``x`` to y's width, then sum or concat."""

  method: str = "cat"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, y):
    h = _conv(x, y.shape[-1], 1, dtype=self.dtype)
    if self.method == "cat":
      return jnp.concatenate([h, y], axis=-1)
    if self.method == "sum":
      return h + y
    raise ValueError(f"progressive_combine={self.method!r}: use 'cat' or 'sum'.")


def _time_bias(temb, act, out_ch, dtype):
  # Per-channel bias from the (activated) time embedding, broadcast over pixels.
  return nn.Dense(out_ch, kernel_init=default_init(), dtype=dtype)(act(temb))[:, None, None, :]


class ResnetBlockDDPMpp(nn.Module):
  """DDPM's residual block; the shortcut is a NIN (or a 3x3 conv) when the width changes."""

  act: Callable
  out_ch: Optional[int] = None
  conv_shortcut: bool = False
  dropout: float = 0.1
  skip_rescale: bool = False
  init_scale: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, temb=None, train: bool = False):
    in_ch = x.shape[-1]
    out_ch = self.out_ch or in_ch
    dtype = self.dtype
    h = self.act(_group_norm(in_ch, dtype)(x))
    h = _conv(h, out_ch, 3, dtype=dtype)
    if temb is not None:
      h = h + _time_bias(temb, self.act, out_ch, dtype)
    h = self.act(_group_norm(out_ch, dtype)(h))
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = _conv(h, out_ch, 3, init_scale=self.init_scale, dtype=dtype)
    if in_ch != out_ch:
      x = _conv(x, out_ch, 3, dtype=dtype) if self.conv_shortcut else NIN(out_ch)(x)
    return (x + h) / _SQRT2 if self.skip_rescale else x + h


class ResnetBlockBigGANpp(nn.Module):
  """BigGAN's residual block, optionally resampling (FIR or naive) both branches before the first conv;
  the shortcut gets a 1x1 conv when the width or the resolution changes."""

  act: Callable
  up: bool = False
  down: bool = False
  out_ch: Optional[int] = None
  dropout: float = 0.1
  fir: bool = False
  fir_kernel: tuple[int, ...] = (1, 3, 3, 1)
  skip_rescale: bool = True
  init_scale: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, temb=None, train: bool = False):
    in_ch = x.shape[-1]
    out_ch = self.out_ch or in_ch
    dtype = self.dtype
    h = self.act(_group_norm(in_ch, dtype)(x))
    if self.up or self.down:
      if self.up:
        resample = (lambda a: upsample_2d(a, self.fir_kernel)) if self.fir else naive_upsample_2d
      else:
        resample = (lambda a: downsample_2d(a, self.fir_kernel)) if self.fir else naive_downsample_2d
      h, x = resample(h), resample(x)
    h = _conv(h, out_ch, 3, dtype=dtype)
    if temb is not None:
      h = h + _time_bias(temb, self.act, out_ch, dtype)
    h = self.act(_group_norm(out_ch, dtype)(h))
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = _conv(h, out_ch, 3, init_scale=self.init_scale, dtype=dtype)
    if in_ch != out_ch or self.up or self.down:
      x = _conv(x, out_ch, 1, dtype=dtype)
    return (x + h) / _SQRT2 if self.skip_rescale else x + h


# --------------------------------------------------------------------------------------------------------
# The network.

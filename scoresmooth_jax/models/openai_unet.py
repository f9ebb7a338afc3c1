"""OpenAIUNet: the ``UNetModel`` of openai/improved-diffusion and openai/guided-diffusion as a Flax Linen module.

Promises:
  * ``OpenAIUNet(...).apply({"params": p}, x, t)`` with ``x`` NHWC images in the model's own domain (VP-noised
    [-1, 1] images, ``sqrt(abar) x0 + sqrt(1 - abar) eps``) and ``t`` the timestep the network receives, one
    per example ([B], float: fractional timesteps are valid, the embedding is sinusoidal), returns the raw
    network output [B, H, W, out_channels]: with learned sigma (6 channels) eps is ``out[..., :3]`` and the
    variance interpolation ``out[..., 3:]``.
  * It computes, in inference mode (no dropout), the function of both codebases' ``UNetModel`` for
    unconditional image models: scale-shift norm or additive embedding, attention at the chosen downsampling
    factors with a fixed number of heads (``num_heads``) or of channels per head (``num_head_channels``), the
    legacy (heads, then q/k/v) or new (q/k/v, then heads) channel order, resampling by convolution, by
    pooling / nearest-neighbour, or by residual blocks (``resblock_updown``).
  * Parameter names follow the PyTorch module tree: the submodule ``input_blocks.5.1.qkv`` of the state dict is
    ``input_blocks_5_1/qkv`` here (``torch_key`` maps one to the other), so a state dict loads name by name.
  * Height and width must be divisible by 2^(len(channel_mult) - 1); a bad size fails naming it.
  * ``dtype`` (default float32) is the compute dtype; with bfloat16 the parameters stay float32 (cast where
    used), the timestep features, GroupNorm statistics and attention softmax stay float32, and the output is
    float32.

Upstream (openai/improved-diffusion @ 1bc7bbb, openai/guided-diffusion @ 22e0df8, MIT) was read to learn the
architecture; this is an independent NHWC implementation. Differences that do not change the function:
the 1-D convolutions of the attention blocks are Dense layers over channels (a 1x1 convolution), and the
``skip_connection`` is a 1x1 convolution whenever the channel count changes (``UNetModel`` never asks for the
3x3 variant).
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# Both codebases: GroupNorm32(32, channels), PyTorch's default eps, statistics in float32.
_GROUPS = 32
_EPS = 1e-5


def _group_norm(name: str, dtype: Any = jnp.float32) -> nn.GroupNorm:
  # use_fast_variance=False: E[(x - mean)^2] as PyTorch computes it; E[x^2] - mean^2 loses digits that the
  # 1e-4 parity with the PyTorch model needs after ~40 normalisations. The statistics are float32 whatever
  # ``dtype`` (Flax reduces in float32); ``dtype`` is the output's.
  return nn.GroupNorm(num_groups=_GROUPS, epsilon=_EPS, use_fast_variance=False, dtype=dtype, name=name)


def _conv(features: int, name: str, kernel: int = 3, stride: int = 1, dtype: Any = jnp.float32) -> nn.Conv:
  pad = kernel // 2  # PyTorch padding=1 for 3x3 (explicit, so stride 2 keeps exactly H / 2 as upstream)
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                 dtype=dtype, name=name)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal features [cos | sin] of (possibly fractional) timesteps: [B] -> [B, dim], as upstream."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


def _downsample_pool(x: jax.Array) -> jax.Array:
  return nn.avg_pool(x, (2, 2), strides=(2, 2))


def _upsample_nearest(x: jax.Array) -> jax.Array:
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class ResBlock(nn.Module):
  """norm -> SiLU -> [resample] -> conv; embedding as scale/shift of the second norm (or added); skip path.

  ``up``/``down``: the block itself resamples (guided-diffusion's ``resblock_updown``), both the main path
  (after the first activation) and the skip path, by nearest-neighbour upsampling or 2x2 average pooling.
  """

  out_channels: int
  use_scale_shift_norm: bool
  up: bool = False
  down: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
    dtype = self.dtype
    h = nn.silu(_group_norm("in_layers_0", dtype)(x))
    if self.up or self.down:
      resample = _upsample_nearest if self.up else _downsample_pool
      h, x = resample(h), resample(x)
    h = _conv(self.out_channels, "in_layers_2", dtype=dtype)(h)
    width = 2 * self.out_channels if self.use_scale_shift_norm else self.out_channels
    emb_out = nn.Dense(width, dtype=dtype, name="emb_layers_1")(nn.silu(emb))[:, None, None, :]
    if self.use_scale_shift_norm:
      scale, shift = jnp.split(emb_out, 2, axis=-1)
      h = _group_norm("out_layers_0", dtype)(h) * (1.0 + scale) + shift
    else:
      h = _group_norm("out_layers_0", dtype)(h + emb_out)
    h = _conv(self.out_channels, "out_layers_3", dtype=dtype)(nn.silu(h))
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, "skip_connection", kernel=1, dtype=dtype)(x)
    return x + h


class AttentionBlock(nn.Module):
  """Self-attention over all pixels: x + proj_out(attention(qkv(norm(x)))).

  ``legacy_order``: the 3C qkv channels are laid out head by head, each head's q, k, v contiguous (both
  codebases' default, ``QKVAttentionLegacy``); otherwise all q, then all k, then all v
  (``use_new_attention_order``). q and k are each scaled by ch^(-1/4) before the product, as upstream.
  """

  num_heads: int
  legacy_order: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, height, width, c = x.shape
    if c % self.num_heads:
      raise ValueError(f"attention over {c} channels cannot be split into num_heads={self.num_heads} heads.")
    ch = c // self.num_heads
    tokens = x.reshape(b, height * width, c)
    qkv = nn.Dense(3 * c, dtype=self.dtype, name="qkv")(_group_norm("norm", self.dtype)(tokens))
    if self.legacy_order:
      qkv = qkv.reshape(b, height * width, self.num_heads, 3, ch)
      q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
    else:
      qkv = qkv.reshape(b, height * width, 3, self.num_heads, ch)
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    scale = ch ** -0.25
    weights = jnp.einsum("bthc,bshc->bhts", q * scale, k * scale)
    weights = jax.nn.softmax(weights.astype(jnp.float32), axis=-1).astype(weights.dtype)
    out = jnp.einsum("bhts,bshc->bthc", weights, v).reshape(b, height * width, c)
    out = nn.Dense(c, dtype=self.dtype, name="proj_out")(out)
    return (tokens + out).reshape(b, height, width, c)


class Resample(nn.Module):
  """Between levels without ``resblock_updown``: 3x3 conv (stride 2 down, after nearest 2x up) or pooling."""

  up: bool
  use_conv: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    if self.up:
      x = _upsample_nearest(x)
      return _conv(channels, "conv", dtype=self.dtype)(x) if self.use_conv else x
    return _conv(channels, "op", stride=2, dtype=self.dtype)(x) if self.use_conv else _downsample_pool(x)


class OpenAIUNet(nn.Module):
  """improved-/guided-diffusion's ``UNetModel`` (unconditional, 2-D), in inference mode.

  Attributes (upstream's constructor arguments of the same names):
    model_channels: base width; the timestep embedding has 4x as many channels.
    num_res_blocks: residual blocks per level on the way down (one more per level on the way up).
    attention_resolutions: downsampling factors (not pixel sizes) with attention: (2, 4) at 32 px is 16 and 8 px.
    channel_mult: width multipliers per level.
    out_channels: 6 with learned sigma (eps, then the variance interpolation), else 3.
    num_heads: heads per attention block, unless num_head_channels is set.
    num_head_channels: channels per head (-1: use num_heads); guided-diffusion's 256x256 models use 64.
    num_heads_upsample: heads on the way up (-1: num_heads); ignored where num_head_channels is set.
    use_scale_shift_norm: FiLM-style conditioning (both published models use it).
    resblock_updown: resample with residual blocks rather than Resample.
    conv_resample: Resample with convolutions rather than pooling / bare nearest upsampling.
    use_new_attention_order: the q/k/v-first channel order of ``QKVAttention``.
    dtype: compute dtype (float32, or bfloat16 for the tensor cores of a GPU / TPU). Parameters stay float32 and
      are cast where used; the timestep features and GroupNorm statistics are computed in float32, and the output
      is returned in float32.
  """

  model_channels: int
  num_res_blocks: int
  attention_resolutions: tuple[int, ...]
  channel_mult: tuple[int, ...]
  out_channels: int = 6
  num_heads: int = 1
  num_head_channels: int = -1
  num_heads_upsample: int = -1
  use_scale_shift_norm: bool = True
  resblock_updown: bool = False
  conv_resample: bool = True
  use_new_attention_order: bool = False
  dtype: Any = jnp.float32

  def _attention(self, channels: int, name: str, upsample: bool = False) -> AttentionBlock:
    if self.num_head_channels != -1:
      if channels % self.num_head_channels:
        raise ValueError(f"attention over {channels} channels is not divisible by num_head_channels="
                         f"{self.num_head_channels}.")
      heads = channels // self.num_head_channels
    elif upsample and self.num_heads_upsample != -1:
      heads = self.num_heads_upsample
    else:
      heads = self.num_heads
    return AttentionBlock(heads, legacy_order=not self.use_new_attention_order, dtype=self.dtype, name=name)

  def _res(self, out_channels: int, name: str, **kwargs) -> ResBlock:
    return ResBlock(out_channels, self.use_scale_shift_norm, dtype=self.dtype, name=name, **kwargs)

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array) -> jax.Array:
    levels = len(self.channel_mult)
    factor = 2 ** (levels - 1)
    if x.ndim != 4 or x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(f"OpenAIUNet with channel_mult={self.channel_mult} needs NHWC images whose height and "
                       f"width are divisible by {factor}; got shape {x.shape}.")
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
    mc = self.model_channels
    dtype = self.dtype
    emb = nn.Dense(4 * mc, dtype=dtype, name="time_embed_0")(timestep_embedding(t, mc))
    emb = nn.Dense(4 * mc, dtype=dtype, name="time_embed_2")(nn.silu(emb))

    ch = int(self.channel_mult[0] * mc)
    h = _conv(ch, "input_blocks_0_0", dtype=dtype)(x)
    skips = [h]
    block, ds = 1, 1
    for level, mult in enumerate(self.channel_mult):
      for _ in range(self.num_res_blocks):
        ch = int(mult * mc)
        h = self._res(ch, f"input_blocks_{block}_0")(h, emb)
        if ds in self.attention_resolutions:
          h = self._attention(ch, f"input_blocks_{block}_1")(h)
        skips.append(h)
        block += 1
      if level != levels - 1:
        name = f"input_blocks_{block}_0"
        h = (self._res(ch, name, down=True)(h, emb) if self.resblock_updown
             else Resample(up=False, use_conv=self.conv_resample, dtype=dtype, name=name)(h))
        skips.append(h)
        block += 1
        ds *= 2

    h = self._res(ch, "middle_block_0")(h, emb)
    h = self._attention(ch, "middle_block_1")(h)
    h = self._res(ch, "middle_block_2")(h, emb)

    block = 0
    for level, mult in reversed(list(enumerate(self.channel_mult))):
      for i in range(self.num_res_blocks + 1):
        ch = int(mult * mc)
        h = self._res(ch, f"output_blocks_{block}_0")(jnp.concatenate([h, skips.pop()], axis=-1), emb)
        layer = 1
        if ds in self.attention_resolutions:
          h = self._attention(ch, f"output_blocks_{block}_1", upsample=True)(h)
          layer += 1
        if level and i == self.num_res_blocks:
          name = f"output_blocks_{block}_{layer}"
          h = (self._res(ch, name, up=True)(h, emb) if self.resblock_updown
               else Resample(up=True, use_conv=self.conv_resample, dtype=dtype, name=name)(h))
          ds //= 2
        block += 1

    h = nn.silu(_group_norm("out_0", dtype)(h))
    return _conv(self.out_channels, "out_2", dtype=dtype)(h).astype(jnp.float32)


_INDEX = re.compile(r"_(\d+)")
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def torch_key(path: Sequence[str]) -> str:
  """The PyTorch state-dict key of a Flax parameter path: ("input_blocks_5_1", "qkv", "kernel") ->
  "input_blocks.5.1.qkv.weight"."""
  *modules, leaf = path
  return ".".join([_INDEX.sub(r".\1", m) for m in modules] + [_LEAF[leaf]])


# Positions of the names in PyTorch's module registration order (upstream's __init__), weight before bias.
_TORCH_RANK = {"time_embed": 0, "input_blocks": 1, "middle_block": 2, "output_blocks": 3, "out": 4,
               "in_layers": 0, "emb_layers": 1, "out_layers": 2, "skip_connection": 3,
               "norm": 0, "qkv": 1, "proj_out": 2, "op": 0, "conv": 0, "weight": 0, "bias": 1}


def torch_order(key: str) -> tuple:
  """Sort key that puts state-dict keys in the order ``UNetModel.state_dict()`` lists them."""
  return tuple(int(p) if p.isdigit() else _TORCH_RANK[p] for p in key.split("."))

"""ScoreUNet: a noise-conditional score network s(x; sigma) ~ grad_x log p_sigma(x), as a Flax Linen U-Net.

Promises:
  * ``ScoreUNet(...).apply({"params": p}, x, sigma)`` with ``x`` NHWC images in [0, 1] and ``sigma`` one
    positive noise level per example ([B]; a scalar is broadcast) returns a score shaped like ``x``.
    ``train=True`` only switches dropout on (then a "dropout" rng is needed).
  * Conditioning is continuous: sinusoidal features of log sigma go through an MLP, and every residual
    block takes a per-channel scale and shift from that embedding, so any sigma in the trained range is
    valid, not only a fixed list.
  * By default the last layer's output is divided by sigma (NCSNv2's ``scale_by_sigma``). The true score of noisy data
    has norm ~ sqrt(D) / sigma, so the network itself only has to output an O(1) quantity, -z up to the
    denoising error, at every scale; the loss in ``losses.py`` weights by sigma^2 for the same reason.
  * ``sigma_data`` (off by default) switches to EDM's preconditioning (Karras et al. 2022) in [0, 1] pixel
    units: the network sees the centred input scaled to unit variance at every sigma, and its output F is the
    correction to the exact score of a Gaussian prior N(0.5, sigma_data^2) per pixel:
        s(x; sigma) = -(x - 0.5) / (sigma^2 + sigma_data^2) + sigma_data / (sigma sqrt(sigma^2 + sigma_data^2)) F,
    so that the DSM target of F has unit variance at every sigma (-z at small sigma, the clean image over
    sigma_data at large) instead of the noise alone, whose error the denoiser multiplies by sigma.
  * Height and width must be divisible by 2^(len(channel_mults) - 1) (each level after the first halves
    them); a bad size fails with a message naming it.

Architecture (DDPM/NCSN++-style, kept small enough to be cheap on CPU): input conv, then per level
``num_res_blocks`` residual blocks (one count, or one per level; GroupNorm -> swish -> 3x3 conv, twice,
embedding scale/shift on the second norm) with optional self-attention at the resolutions in
``attention_resolutions``, a strided conv between levels; a middle block; the mirror path upsamples (nearest +
conv) and concatenates each level's output as a skip connection at its first block.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def _num_groups(channels: int, max_groups: int) -> int:
  """The largest group count <= max_groups that divides ``channels`` (GroupNorm needs an exact split)."""
  for groups in range(min(max_groups, channels), 0, -1):
    if channels % groups == 0:
      return groups
  return 1


def sigma_features(sigma: jax.Array, dim: int, max_frequency: float = 100.0) -> jax.Array:
  """Sinusoidal features of log sigma: [B] -> [B, dim].

  Frequencies are geometric in [1, max_frequency]: the lowest resolves the whole trained range of log sigma
  (a few units), the highest separates sigmas ~1 % apart, which neighbouring noise levels need.
  """
  if dim % 2:
    raise ValueError(f"sigma embedding dim={dim} must be even (sin and cos halves).")
  freqs = jnp.exp(jnp.linspace(0.0, math.log(max_frequency), dim // 2))
  angles = jnp.log(sigma)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def blocks_per_level(num_res_blocks: int | Sequence[int], num_levels: int) -> tuple[int, ...]:
  """``num_res_blocks`` as one count per level, checked: every level needs at least one block."""
  counts = ((num_res_blocks,) * num_levels if isinstance(num_res_blocks, int)
            else tuple(int(n) for n in num_res_blocks))
  if len(counts) != num_levels or min(counts) < 1:
    raise ValueError(f"num_res_blocks={num_res_blocks!r} must be a count >= 1 or one such count per level "
                     f"({num_levels} levels, one per channel_mults entry).")
  return counts


def res_block_slots(num_res_blocks: int | Sequence[int], num_levels: int) -> list[tuple]:
  """Where each ``ResBlock_<k>`` of the network sits, in call (and so naming) order: ("down", level, i),
  ("middle", j) or ("up", level, i). Two networks that differ only in their block counts share the blocks of
  equal slots, which is how a deeper network starts from a trained shallower one (``training/warm_start.py``)."""
  blocks = blocks_per_level(num_res_blocks, num_levels)
  down = [("down", level, i) for level in range(num_levels) for i in range(blocks[level])]
  up = [("up", level, i) for level in reversed(range(num_levels)) for i in range(blocks[level])]
  return down + [("middle", 0), ("middle", 1)] + up


def attention_block_slots(num_res_blocks: int | Sequence[int], num_levels: int,
                          attention_resolutions: Sequence[int], height: int) -> list[tuple]:
  """The residual-block slot (``res_block_slots``) that each ``AttnBlock_<k>`` follows, in call (and so naming)
  order, for images ``height`` pixels high: a block at every slot whose feature map is one of the
  ``attention_resolutions`` high, the middle one between the two middle residual blocks. Two networks whose
  attention differs share the attention blocks of equal slots (``training/warm_start.py``)."""
  def size(slot):
    return height // 2 ** (num_levels - 1 if slot[0] == "middle" else slot[1])
  return [slot for slot in res_block_slots(num_res_blocks, num_levels)
          if slot != ("middle", 1) and size(slot) in tuple(attention_resolutions)]


class ResBlock(nn.Module):
  """GroupNorm -> swish -> conv -> GroupNorm * (1 + scale) + shift -> swish -> conv, plus a skip path."""

  channels: int
  max_groups: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, emb, train: bool = False):
    h = nn.swish(nn.GroupNorm(_num_groups(x.shape[-1], self.max_groups), dtype=self.dtype)(x))
    h = nn.Conv(self.channels, (3, 3), dtype=self.dtype)(h)
    scale, shift = jnp.split(nn.Dense(2 * self.channels, dtype=self.dtype)(nn.swish(emb)), 2, axis=-1)
    h = nn.GroupNorm(_num_groups(self.channels, self.max_groups), dtype=self.dtype)(h)
    h = h * (1.0 + scale[:, None, None, :]) + shift[:, None, None, :]
    h = nn.Dropout(self.dropout, deterministic=not train)(nn.swish(h))
    # Zero-initialised last conv: each block starts as the identity, which keeps deep U-Nets stable early.
    h = nn.Conv(self.channels, (3, 3), kernel_init=nn.initializers.zeros, dtype=self.dtype)(h)
    if x.shape[-1] != self.channels:
      x = nn.Conv(self.channels, (1, 1), dtype=self.dtype)(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over all positions, residual, zero-initialised output projection."""

  max_groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, hgt, wid, c = x.shape
    h = nn.GroupNorm(_num_groups(c, self.max_groups), dtype=self.dtype)(x).reshape(b, hgt * wid, c)
    q, k, v = jnp.split(nn.Dense(3 * c, dtype=self.dtype)(h), 3, axis=-1)
    logits = jnp.einsum("bqc,bkc->bqk", q, k) / math.sqrt(c)
    # The softmax in float32 whatever the compute dtype: its exponentials and sum need the range.
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(h.dtype)
    h = jnp.einsum("bqk,bkc->bqc", weights, v)
    h = nn.Dense(c, kernel_init=nn.initializers.zeros, dtype=self.dtype)(h)
    return x + h.reshape(b, hgt, wid, c)


class ScoreUNet(nn.Module):
  """Noise-conditional score U-Net (see the module docstring).

  Attributes:
    channels: base width; level i has ``channels * channel_mults[i]`` channels.
    channel_mults: one multiplier per resolution level.
    num_res_blocks: residual blocks per level, on the way down and on the way up: one count for every level, or
      one per level (e.g. (2, 2, 1): depth where it pays, without the parameters of the coarsest level's width).
    attention_resolutions: spatial sizes (height) at which a self-attention block follows each res block.
    embed_dim: width of the sigma embedding (default 4 * channels).
    max_groups: GroupNorm groups (fewer when a width is not divisible).
    dropout: dropout rate inside residual blocks, active only with ``train=True`` (needs a "dropout" rng).
    dtype: compute dtype (e.g. jnp.bfloat16 on TPU); parameters and the output stay float32.
    sigma_data: None for the plain parametrisation (output / sigma); a pixel standard deviation (0.25 suits
      natural images in [0, 1]) for EDM's preconditioning (module docstring).
  """

  channels: int = 32
  channel_mults: Sequence[int] = (1, 2)
  num_res_blocks: int | Sequence[int] = 1
  attention_resolutions: Sequence[int] = ()
  embed_dim: int | None = None
  max_groups: int = 32
  dropout: float = 0.0
  dtype: Any = jnp.float32
  sigma_data: float | None = None

  @nn.compact
  def __call__(self, x, sigma, train: bool = False):
    if self.sigma_data is not None and not self.sigma_data > 0:
      raise ValueError(f"sigma_data={self.sigma_data!r} must be a positive pixel standard deviation "
                       "(0.25 for natural images in [0, 1]) or None for no preconditioning.")
    if x.ndim != 4:
      raise ValueError(f"ScoreUNet expects NHWC images, got shape {x.shape}.")
    factor = 2 ** (len(self.channel_mults) - 1)
    if x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(f"image size {x.shape[1]}x{x.shape[2]} is not divisible by {factor}, which "
                       f"channel_mults={tuple(self.channel_mults)} needs; use fewer levels or pad the images.")
    blocks = blocks_per_level(self.num_res_blocks, len(self.channel_mults))
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32).reshape(-1), (x.shape[0],))
    embed_dim = self.embed_dim or 4 * self.channels
    emb = sigma_features(sigma, self.channels if self.channels % 2 == 0 else self.channels + 1)
    emb = nn.Dense(embed_dim, dtype=self.dtype)(emb)
    emb = nn.Dense(embed_dim, dtype=self.dtype)(nn.swish(emb))

    res_block = lambda ch: functools.partial(ResBlock(ch, self.max_groups, self.dropout, self.dtype), train=train)
    attend = lambda h: (AttnBlock(self.max_groups, self.dtype)(h)
                        if h.shape[1] in self.attention_resolutions else h)

    sigma_b = sigma[:, None, None, None]
    if self.sigma_data is None:  # centred input: the network sees [-1, 1], where zero-mean inits behave best
      net_in = 2.0 * x - 1.0
    else:  # unit variance at every sigma: (x - 0.5) has variance about sigma_data^2 + sigma^2
      total = jnp.square(sigma_b) + self.sigma_data ** 2
      net_in = (x - 0.5) / jnp.sqrt(total)
    h = nn.Conv(self.channels, (3, 3), dtype=self.dtype)(net_in.astype(self.dtype))
    skips = []
    for level, mult in enumerate(self.channel_mults):
      for _ in range(blocks[level]):
        h = attend(res_block(self.channels * mult)(h, emb))
      skips.append(h)
      if level + 1 < len(self.channel_mults):
        h = nn.Conv(h.shape[-1], (3, 3), strides=(2, 2), dtype=self.dtype)(h)

    h = res_block(h.shape[-1])(h, emb)
    h = attend(h)
    h = res_block(h.shape[-1])(h, emb)

    for level, mult in reversed(list(enumerate(self.channel_mults))):
      h = jnp.concatenate([h, skips.pop()], axis=-1)
      for _ in range(blocks[level]):
        h = attend(res_block(self.channels * mult)(h, emb))
      if level > 0:
        b, hgt, wid, c = h.shape
        h = jax.image.resize(h, (b, 2 * hgt, 2 * wid, c), "nearest")
        h = nn.Conv(c, (3, 3), dtype=self.dtype)(h)

    h = nn.swish(nn.GroupNorm(_num_groups(h.shape[-1], self.max_groups), dtype=self.dtype)(h))
    out = nn.Conv(x.shape[-1], (3, 3), dtype=self.dtype)(h).astype(jnp.float32)
    if self.sigma_data is None:
      return out / sigma_b
    return -(x - 0.5) / total + self.sigma_data / (sigma_b * jnp.sqrt(total)) * out

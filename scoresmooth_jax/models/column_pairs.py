"""3x3 convolutions over pairs of image columns: a narrow ResNet stage at the speed of a wide one on CPU.

XLA:CPU (jaxlib 0.10) gives convolutions with more than 16 channels to YNNPACK and runs narrower ones on Eigen at
about half the FLOP rate (2 Zen 4 cores: ~95 vs ~190 GFLOP/s). Holding each pair of neighbouring columns as one
column with twice the channels, a free reshape in NHWC, makes the 16-channel first stage of a CIFAR ResNet a
32-channel one.

A pairing is named by the column its first slot starts at: slot j holds columns (s + 2j, s + 2j + 1) side by side
on the channel axis (the first column's channels, then the second's). The image's own pairing ("aligned",
``pair_columns``) starts at 0; the "offset" pairing starts at -1, so its first slot holds (-1, 0) and its last
(W - 1, W). Columns -1 and W lie outside the image and must hold zeros, which is the zero padding of the 3x3
convolution. Every output slot of a 3x3 convolution that changes the pairing then reads exactly two neighbouring
input slots, so one convolution with a 3x2 kernel over 2C -> 2O channels (``paired_kernel``) computes it, and the
same kernel serves both directions:
  * offset -> aligned: no column padding; W/2 + 1 slots become W/2.
  * aligned -> offset: one slot of zero padding on each side; W/2 slots become W/2 + 1, whose two outside
    columns must be zero again before the next convolution reads them (``offset_relu_of_sum`` zeroes them in the
    ReLU that follows the convolution).
A residual block (aligned -> offset -> aligned) keeps its shortcut in the aligned pairing, so a whole stage runs
paired between one ``pair_columns`` and one ``unpair_columns``. A convolution that keeps the pairing reads three
slots (a 3x3 kernel over 2C -> 2O, twice the multiply-adds); the network's first convolution, from 3 image
channels, is that one, and still runs ~2.8x faster than on the unpaired image.

The price is 4/3 of the multiply-adds (a quarter of each 3x2 paired kernel is zeros) and one more slot in every
convolution to the offset pairing. XLA gives the offset -> aligned convolutions to YNNPACK (~180 GFLOP/s) but
keeps aligned -> offset ones, whose padding is wider than their kernel, on Eigen, which at 32 channels still runs
~154 GFLOP/s; together they repay the price (CIFAR ResNet-110's first stage, batch 64: 505-560 -> 633-704
samples/s). On GPU and TPU every width gets a fast kernel, so pairing would only add work:
``pays_off`` says when to use it.

Promises:
  * ``unpair_columns(pair_columns(x)) == x`` exactly; both are reshapes (no data movement in XLA).
  * ``paired_conv(x, paired_kernel(w, to), to)`` equals the stride-1, zero-padded 3x3 convolution of the unpaired
    image with ``w`` (HWIO), in the pairing ``to`` names, up to float summation order, given zeros in the outside
    columns of an offset input.
  * ``offset_relu_of_sum(u, bias)`` equals ``relu(u + bias) * outside_columns_mask(...)`` bit for bit for finite
    values.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# XLA:CPU's YNNPACK path takes convolutions with more channels than this; Eigen gets the others.
EIGEN_MAX_CHANNELS = 16

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def pays_off(channels: int, backend: str | None = None) -> bool:
  """Whether a stage of ``channels`` channels runs faster paired: on CPU, when pairing lifts it onto YNNPACK."""
  backend = jax.default_backend() if backend is None else backend
  return backend == "cpu" and channels <= EIGEN_MAX_CHANNELS < 2 * channels


def pair_columns(x: jax.Array) -> jax.Array:
  """[B, H, W, C] with W even -> the aligned pairing [B, H, W/2, 2C]."""
  batch, height, width, channels = x.shape
  if width % 2:
    raise ValueError(f"pair_columns needs an even number of columns; got an image {width} columns wide. Run "
                     "the stage unpaired (CifarResNet pairs only images of even width).")
  return x.reshape(batch, height, width // 2, 2 * channels)


def unpair_columns(x: jax.Array) -> jax.Array:
  """The aligned pairing [B, H, W/2, 2C] -> [B, H, W, C]."""
  batch, height, slots, channels = x.shape
  return x.reshape(batch, height, 2 * slots, channels // 2)


# Where a paired convolution's output pairing starts relative to its input's, and the column padding that needs.
TO_OFFSET, TO_ALIGNED, SAME = "offset", "aligned", "same"
_COLUMN_PADDING = {TO_OFFSET: (1, 1), TO_ALIGNED: (0, 0), SAME: (1, 1)}


def paired_kernel(kernel: jax.Array, to: str) -> jax.Array:
  """A 3x3 HWIO kernel [3, 3, C, O] -> the paired kernel [3, T, 2C, 2O] for ``paired_conv(..., to)``.

  To another pairing (``TO_OFFSET`` or ``TO_ALIGNED``) output slot j reads T = 2 input slots; within the same
  pairing (``SAME``, e.g. a network's first convolution, from the image) it reads T = 3, the slot and both
  neighbours. With p the input column within a slot and q the output column, block (tap, p, q) is the 3x3
  kernel's column 2 tap + p - q (minus 1 within the same pairing), or zeros where that falls outside 0..2.
  """
  rows, cols, in_channels, out_channels = kernel.shape
  if (rows, cols) != (3, 3):
    raise ValueError(f"paired_kernel takes a 3x3 kernel (HWIO); got spatial size {(rows, cols)}.")
  if to not in _COLUMN_PADDING:
    raise ValueError(f"paired_kernel(to={to!r}): choose {TO_OFFSET!r}, {TO_ALIGNED!r} or {SAME!r}.")
  num_taps, shift = (3, 1) if to == SAME else (2, 0)
  zeros = jnp.zeros((rows, in_channels, out_channels), kernel.dtype)
  taps = []
  for tap in range(num_taps):
    inputs = []
    for p in range(2):
      outputs = []
      for q in range(2):
        col = 2 * tap + p - q - shift
        outputs.append(kernel[:, col] if 0 <= col <= 2 else zeros)
      inputs.append(jnp.stack(outputs, axis=-2))  # [3, C, 2, O]
    taps.append(jnp.stack(inputs, axis=1))  # [3, 2, C, 2, O]
  return jnp.stack(taps, axis=1).reshape(rows, num_taps, 2 * in_channels, 2 * out_channels)


def paired_conv(x: jax.Array, kernel: jax.Array, to: str) -> jax.Array:
  """The stride-1 3x3 convolution in a paired layout, with ``paired_kernel(kernel_3x3, to)``.

  Args:
    x: [B, H, S, 2C] column pairs.
    kernel: the paired kernel.
    to: ``TO_OFFSET`` (aligned -> offset, S -> S + 1 slots), ``TO_ALIGNED`` (offset -> aligned, S -> S - 1) or
      ``SAME`` (S -> S, within one pairing).
  """
  return jax.lax.conv_general_dilated(x, kernel, window_strides=(1, 1), padding=((1, 1), _COLUMN_PADDING[to]),
                                      dimension_numbers=_DIMENSIONS)


def outside_columns_mask(slots: int, channels: int, dtype) -> jax.Array:
  """[slots, 2C] ones with zeros on the offset pairing's two outside columns: -1 (first slot, first half) and W
  (last slot, second half). Multiplying an offset activation by it restores the zero padding."""
  mask = jnp.ones((slots, 2, channels), dtype)
  return mask.at[0, 0].set(0).at[-1, 1].set(0).reshape(slots, 2 * channels)


def offset_relu_of_sum(u: jax.Array, bias: jax.Array) -> jax.Array:
  """relu(u + bias) for an offset activation ``u`` [B, H, S, 2C], with its two outside columns set to zero, the
  padding the next convolution reads: min(max(u, -bias), ceiling) + bias, where the ceiling is +inf inside
  the image and -bias on the outside columns. Inside that is ``resnet.relu_of_sum`` (bit for bit relu(u + bias)
  for finite values); outside it is -bias + bias, exactly 0.

  Why not multiply by ``outside_columns_mask``: XLA merges the masks (and the ReLUs' zeros) of all blocks into
  one constant with many users, which a YNNPACK fusion on CPU cannot take in, so it is materialised at the
  activation's full size and read by every block. The ceiling depends on the block's own bias, so it fuses.
  """
  slots, channels = u.shape[2], u.shape[3] // 2
  inside = outside_columns_mask(slots, channels, jnp.float32) > 0
  ceiling = jnp.where(inside, jnp.inf, -bias).astype(u.dtype)
  return jnp.minimum(jnp.maximum(u, -bias), ceiling) + bias

"""Image resizing that reproduces PyTorch's ``torch.nn.functional.interpolate`` (align_corners=False), in JAX.

A pipeline that certifies a classifier at another size than its denoiser's images (Carlini et al. (2023): 32 x 32
CIFAR-10 before a ViT at 224 x 224, 256 x 256 ImageNet before BEiT at 512 x 512) resizes every denoised draw, so
the resize is part of the base classifier and must be the one the classifier's pipeline used. ``METHODS``:

  bicubic_antialias   interpolate(mode="bicubic", antialias=True): Keys' cubic with a = -0.5, stretched by the
                      scale factor when shrinking; weights outside the image dropped and the rest renormalised.
  bilinear_antialias  interpolate(mode="bilinear", antialias=True): the triangle kernel, likewise.
  bicubic             interpolate(mode="bicubic", antialias=False): a = -0.75, four taps at every scale, indices
                      clamped at the border (edge pixels repeated).
  bilinear            interpolate(mode="bilinear", antialias=False): two taps at every scale, the source
                      coordinate clamped at 0.

Promises:
  * ``resize(images, (H', W'), method)`` maps NHWC [B, H, W, C] to [B, H', W', C] in float32 (bfloat16 in,
    bfloat16 out), pure and jittable. Each method applies one matrix per axis (``weights``), computed on the host
    in float64 from the sizes alone, so it is exact up to float32 rounding of the two matrix products; at equal
    size every method is the identity.
  * The matrices reproduce PyTorch 2.x's CPU kernels; ``tests/test_vit.py`` checks all four against PyTorch's
    outputs up- and downsampling. Antialiasing only changes shrinking: when enlarging, ``bilinear_antialias``
    equals ``bilinear`` and ``bicubic_antialias`` is the a = -0.5 cubic with renormalised edges.
  * Values are not clipped: cubic kernels overshoot [0, 1] near edges, as PyTorch's do.
  * ``fit_images`` is the certification job's ``classifier.input`` step: a central crop, or ``resize`` optionally
    clipped back to [0, 1].
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ("bicubic_antialias", "bilinear_antialias", "bicubic", "bilinear")


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def _triangle(x: np.ndarray) -> np.ndarray:
  return np.maximum(0.0, 1.0 - np.abs(x))


def _antialiased(size_in: int, size_out: int, kernel, radius: float) -> np.ndarray:
  """PyTorch's (and Pillow's) separable antialiased weights: the kernel stretched by the shrink factor, taps in
  [center - support, center + support) inside the image, renormalised to sum 1."""
  scale = size_in / size_out
  stretch = max(scale, 1.0)
  support = radius * stretch
  w = np.zeros((size_out, size_in))
  for i in range(size_out):
    center = scale * (i + 0.5)
    lo = max(int(center - support + 0.5), 0)
    hi = min(int(center + support + 0.5), size_in)
    taps = np.arange(lo, hi)
    values = kernel((taps - center + 0.5) / stretch)
    w[i, taps] = values / values.sum()
  return w


def _bicubic_clamped(size_in: int, size_out: int, a: float = -0.75) -> np.ndarray:
  """PyTorch's bicubic without antialias: source x = (i + 0.5) * scale - 0.5 (not clamped), taps floor(x) - 1 ..
  floor(x) + 2 with their indices clamped into the image."""
  scale = size_in / size_out
  w = np.zeros((size_out, size_in))
  for i in range(size_out):
    x = (i + 0.5) * scale - 0.5
    base = math.floor(x)
    t = x - base
    for k, weight in zip(range(-1, 3), _cubic(np.array([t + 1, t, 1 - t, 2 - t]), a)):
      w[i, min(max(base + k, 0), size_in - 1)] += weight
  return w


def _bilinear_clamped(size_in: int, size_out: int) -> np.ndarray:
  """PyTorch's bilinear without antialias: source x = max((i + 0.5) * scale - 0.5, 0), taps floor(x) and the next
  (the last pixel repeated at the far edge)."""
  scale = size_in / size_out
  w = np.zeros((size_out, size_in))
  for i in range(size_out):
    x = max((i + 0.5) * scale - 0.5, 0.0)
    base = min(int(x), size_in - 1)
    t = x - base
    w[i, base] += 1.0 - t
    w[i, min(base + 1, size_in - 1)] += t
  return w


@functools.lru_cache(maxsize=64)
def weights(size_in: int, size_out: int, method: str) -> np.ndarray:
  """The [size_out, size_in] float64 matrix that ``method`` applies along one axis."""
  if method not in METHODS:
    raise ValueError(f"resize method {method!r}: choose one of {METHODS}.")
  if size_in < 1 or size_out < 1:
    raise ValueError(f"cannot resize {size_in} pixels to {size_out}: both must be >= 1.")
  if size_in == size_out:
    return np.eye(size_in)
  if method == "bicubic_antialias":
    w = _antialiased(size_in, size_out, lambda x: _cubic(x, -0.5), 2.0)
  elif method == "bilinear_antialias":
    w = _antialiased(size_in, size_out, _triangle, 1.0)
  elif method == "bicubic":
    w = _bicubic_clamped(size_in, size_out)
  else:
    w = _bilinear_clamped(size_in, size_out)
  w.setflags(write=False)
  return w


def resize(images: jax.Array, size: tuple[int, int], method: str = "bicubic_antialias") -> jax.Array:
  """NHWC ``images`` resized to ``size`` = (H', W') by ``method`` (module docstring)."""
  if images.ndim != 4:
    raise ValueError(f"resize takes NHWC batches [B, H, W, C]; got shape {tuple(images.shape)}.")
  h, w = images.shape[1:3]
  out_h, out_w = (int(s) for s in size)
  if (h, w) == (out_h, out_w):
    return images
  dtype = images.dtype if jnp.issubdtype(images.dtype, jnp.floating) else jnp.float32
  rows = jnp.asarray(weights(h, out_h, method), jnp.float32)
  cols = jnp.asarray(weights(w, out_w, method), jnp.float32)
  x = images.astype(jnp.float32)
  x = jnp.einsum("ph,bhwc->bpwc", rows, x, precision=jax.lax.Precision.HIGHEST)
  x = jnp.einsum("qw,bpwc->bpqc", cols, x, precision=jax.lax.Precision.HIGHEST)
  return x.astype(dtype)


def fit_images(images: jax.Array, shape: tuple[int, int, int], how: str, method: str = "bicubic_antialias",
               clip: bool = True) -> jax.Array:
  """Dataset-size images [B, H, W, C] -> a classifier's (H', W', C): unchanged ("none" or equal sizes), the central
  crop ("center_crop"), or ``resize`` by ``method`` ("resize"), clipped back to [0, 1] if ``clip``."""
  if how == "none" or tuple(images.shape[1:]) == tuple(shape):
    return images
  h, w = images.shape[1:3]
  if how == "center_crop":
    top, left = (h - shape[0]) // 2, (w - shape[1]) // 2
    return images[:, top:top + shape[0], left:left + shape[1], :]
  resized = resize(images, shape[:2], method)
  return jnp.clip(resized, 0.0, 1.0) if clip else resized

"""Storage precisions of shipped score models: float32, float16, or int8 with one scale per output channel.

A shipped model is one .npz of flat parameters (keys joined by "/", ``export.ship_score_model``). This module
decides what that file holds for each storage precision and how it reads back.

Promises:
  * ``encode(flat, store_dtype)`` gives the arrays to save; ``decode(arrays)`` gives float32 parameters back from
    any such file, and ``decode(encode(flat, d)) == dequantized(flat, d)`` exactly:
    - "float32": the parameters themselves; "float16": each rounded to float16 (half the bytes);
    - "int8": each kernel (an array of two or more axes: convolutions HWIO, dense layers IO) as int8 codes
      q = round(w / s) in [-127, 127] with one float32 scale s = max|w| / 127 per output channel (the last axis),
      read back as q * s, so the rounding error of a weight is at most s / 2, a 1/254 of its channel's largest
      weight; vectors (biases, normalisation scales: under 0.2 % of a U-Net's parameters) stay float32. A
      quarter of the float32 bytes: a network twice the float16 limit's size fits.
  * ``file_bytes(flat, store_dtype)`` bounds the size of the .npz from above (array bytes plus each member's
    headers), so a precision can be chosen before writing (``smallest_fitting``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

STORE_DTYPES = ("float32", "float16", "int8")
SCALE_SUFFIX = ":int8_scale"  # the key of a kernel's scales: "<kernel key>:int8_scale" (no Flax name has ":")
INT8_MAX = 127


def _check(store_dtype: str):
  if store_dtype not in STORE_DTYPES:
    raise ValueError(f"store_dtype={store_dtype!r}: use one of {STORE_DTYPES}.")


def quantize_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(int8 codes shaped like ``w``, float32 scales [w.shape[-1]]): symmetric, per output channel."""
  w = np.asarray(w, np.float32)
  peak = np.max(np.abs(w.reshape(-1, w.shape[-1])), axis=0)
  scale = np.where(peak > 0, peak / INT8_MAX, 1.0).astype(np.float32)  # an all-zero channel: codes 0, any scale
  codes = np.clip(np.rint(w / scale), -INT8_MAX, INT8_MAX).astype(np.int8)
  return codes, scale


def encode(flat: Mapping[str, np.ndarray], store_dtype: str) -> dict[str, np.ndarray]:
  """The arrays an .npz of precision ``store_dtype`` holds for flat parameters ``flat`` (module docstring)."""
  _check(store_dtype)
  out = {}
  for key, value in flat.items():
    if SCALE_SUFFIX in key:
      raise ValueError(f"parameter name {key!r} contains {SCALE_SUFFIX!r}, which int8 files reserve for scales.")
    value = np.asarray(value, np.float32)
    if store_dtype == "int8" and value.ndim >= 2:
      out[key], out[key + SCALE_SUFFIX] = quantize_int8(value)
    elif store_dtype == "float16":
      out[key] = value.astype(np.float16)
    else:
      out[key] = value
  return out


def decode(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """float32 flat parameters from the arrays of a shipped .npz of any precision (``encode``'s inverse)."""
  out = {}
  for key in arrays:
    if key.endswith(SCALE_SUFFIX):
      continue
    value = np.asarray(arrays[key])
    if value.dtype == np.int8:
      if key + SCALE_SUFFIX not in arrays:
        raise ValueError(f"shipped parameters: {key!r} is int8 but {key + SCALE_SUFFIX!r} is missing; the file is "
                         "incomplete, ship the model again.")
      out[key] = value.astype(np.float32) * np.asarray(arrays[key + SCALE_SUFFIX], np.float32)
    else:
      out[key] = value.astype(np.float32)
  return out


def dequantized(flat: Mapping[str, np.ndarray], store_dtype: str) -> dict[str, np.ndarray]:
  """The float32 parameters that a file of precision ``store_dtype`` gives back for ``flat``."""
  return decode(encode(flat, store_dtype))


def stored_dtype(arrays: Mapping[str, np.ndarray]) -> str:
  """The precision of a shipped file's arrays: "int8" if any kernel is int8, else its float dtype's name."""
  dtypes = {np.asarray(a).dtype for k, a in arrays.items() if not k.endswith(SCALE_SUFFIX)}
  if np.dtype(np.int8) in dtypes:
    return "int8"
  return "float16" if np.dtype(np.float16) in dtypes else "float32"


def file_bytes(flat: Mapping[str, np.ndarray], store_dtype: str) -> int:
  """An upper bound of the .npz size (``np.savez``, uncompressed): array bytes plus, per member, the zip headers
  (30 + 46 bytes and the name twice) and the .npy header (at most 256 bytes)."""
  return sum(a.nbytes + 2 * (len(k) + 4) + 76 + 256 for k, a in encode(flat, store_dtype).items())


def smallest_fitting(flat: Mapping[str, np.ndarray], max_bytes: int) -> str:
  """The most precise storage whose file stays within ``max_bytes``: float32, else float16, else int8."""
  for store_dtype in STORE_DTYPES:
    if file_bytes(flat, store_dtype) <= max_bytes:
      return store_dtype
  raise ValueError(f"{sum(np.size(a) for a in flat.values()):,} parameters need {file_bytes(flat, 'int8'):,} bytes "
                   f"even as int8, more than the limit of {max_bytes:,}; ship a smaller network or raise the limit.")

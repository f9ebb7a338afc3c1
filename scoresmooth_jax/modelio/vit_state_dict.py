"""Upstream ViT / BEiT state dicts matched against the Flax parameters of ``models.vit`` / ``models.beit``.

What ``convert_vit`` (timm) and ``convert_hf_vit`` (Hugging Face) share: an ``Entry`` per Flax parameter names the
upstream tensors it is made of and how (transposed, concatenated); ``match_state_dict`` walks the entries in the
upstream model's order and fails with a ``convert.ConversionError`` naming the first missing or mis-shaped key
(with both shapes), then the first unexpected one in the file's order; ``check_against_module`` guards a table of
entries against the Flax model's own parameter tree.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from scoresmooth_jax import models
from scoresmooth_jax.modelio.convert import ConversionError

INCEPTION_MEAN = INCEPTION_STD = (0.5, 0.5, 0.5)  # timm's IMAGENET_INCEPTION_*; ViTImageProcessor's default


@dataclasses.dataclass(frozen=True)
class Entry:
  """One Flax parameter and the upstream tensors it is made of (several for Hugging Face's q, k, v)."""

  flax_path: tuple[str, ...]
  sources: tuple[tuple[str, tuple[int, ...]], ...]
  combine: Callable[[list], np.ndarray]


def linear_entries(prefix: str, path: tuple, fan_in: int, fan_out: int, bias: bool = True) -> list[Entry]:
  out = [Entry(path + ("kernel",), ((f"{prefix}.weight", (fan_out, fan_in)),), lambda a: a[0].T)]
  if bias:
    out.append(Entry(path + ("bias",), ((f"{prefix}.bias", (fan_out,)),), lambda a: a[0]))
  return out


def norm_entries(prefix: str, path: tuple, dim: int) -> list[Entry]:
  return [Entry(path + ("scale",), ((f"{prefix}.weight", (dim,)),), lambda a: a[0]),
          Entry(path + ("bias",), ((f"{prefix}.bias", (dim,)),), lambda a: a[0])]


def array_entry(key: str, path: tuple, shape: tuple) -> Entry:
  return Entry(path, ((key, tuple(shape)),), lambda a: a[0])


def patch_embed_entries(prefix: str, dim: int, channels: int, patch: int) -> list[Entry]:
  return [Entry(("patch_embed", "kernel"), ((f"{prefix}.weight", (dim, channels, patch, patch)),),
                lambda a: np.transpose(a[0], (2, 3, 1, 0))),  # OIHW -> HWIO
          array_entry(f"{prefix}.bias", ("patch_embed", "bias"), (dim,))]



def _numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor, any float dtype
    value = value.detach().cpu().float().numpy()
  return np.asarray(value, np.float32)


def _shape_text(shape) -> str:
  """(96,) or (?, 96): a shape with the number of classes unknown (no head to read it from) as "?"."""
  return str(tuple("?" if d is None else d for d in shape)).replace("'", "")


def match_state_dict(state: Mapping[str, Any], entries: Sequence[Entry], what: str,
                     buffers: Mapping[str, np.ndarray] | None = None) -> dict:
  """Flax params (numpy float32) from ``state``; raises ConversionError naming the first mismatch (module docstring).

  ``buffers``: keys that may be present and, if so, must equal the given arrays (then they are dropped).
  """
  remaining = dict(state)
  total = sum(len(e.sources) for e in entries)
  flat = {}
  for entry in entries:
    arrays = []
    for key, shape in entry.sources:
      if key not in remaining:
        truncated = " (the file looks truncated)" if len(state) < total else ""
        raise ConversionError(f"the state dict does not fit {what}: {key} (shape {_shape_text(shape)}) is missing"
                              f"{truncated}; is it a checkpoint of another model?")
      value = remaining.pop(key)
      if tuple(value.shape) != shape:
        raise ConversionError(f"the state dict does not fit {what}: {key} has shape {tuple(value.shape)} in the "
                              f"file but {shape} in the architecture. Pick the architecture the checkpoint was "
                              "trained with (its name or constructor arguments).")
      arrays.append(_numpy(value))
    flat[entry.flax_path] = np.ascontiguousarray(entry.combine(arrays), dtype=np.float32)
  for key, expected in (buffers or {}).items():
    if key in remaining:
      got = np.asarray(_numpy(remaining.pop(key)))
      if got.shape != expected.shape or not np.array_equal(got, expected):
        raise ConversionError(f"the state dict does not fit {what}: its buffer {key} differs from the one this "
                              "architecture computes (another image or patch size?).")
  if remaining:
    extra = list(remaining)
    raise ConversionError(f"the state dict does not fit {what}: {extra[0]} (shape {tuple(remaining[extra[0]].shape)}) "
                          "is not part of the architecture" + (f" ({len(extra) - 1} more)" if len(extra) > 1 else "")
                          + "; is it a checkpoint of another model or variant?")
  return {"params": traverse_util.unflatten_dict(flat)}


def check_against_module(variables: dict, module_name: str, model_kwargs: dict, image_shape) -> None:
  """The converted tree must be exactly the Flax model's (guards this table against the model's code)."""
  module = models.get_model(module_name, **model_kwargs)
  expected = jax.eval_shape(module.init, jax.random.key(0), jax.ShapeDtypeStruct((1, *image_shape), jnp.float32))
  want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(expected).items()}
  got = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(variables).items()}
  if want != got:
    diff = sorted(set(want.items()) ^ set(got.items()))[:4]
    raise AssertionError(f"convert_vit's table disagrees with {module_name}({model_kwargs}): {diff}")


def head_rows(state: Mapping[str, Any], key: str, num_classes: int | None) -> int | None:
  """The number of classes the head has (checked against ``num_classes``); without a head, ``num_classes`` (None:
  unknown; the head is then reported missing in its turn, after any tensor the model needs before it)."""
  if key not in state:
    return num_classes
  rows = int(state[key].shape[0])
  if num_classes is not None and num_classes != rows:
    raise ConversionError(f"num_classes={num_classes} was asked, but the checkpoint's head {key!r} has {rows} "
                          "outputs.")
  return rows


def normalisation(mean, std, default_mean, default_std, channels: int):
  mean = tuple(float(v) for v in (mean if mean is not None else default_mean))
  std = tuple(float(v) for v in (std if std is not None else default_std))
  if len(mean) != channels or len(std) != channels:
    raise ConversionError(f"mean={mean} and std={std} need {channels} values each, one per input channel.")
  return mean, std


def unwrap_state_dict(obj) -> dict:
  """The state dict inside what ``torch.load`` returned (a bare dict, or under "state_dict" / "model")."""
  for key in ("state_dict", "model", "module"):
    if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
      obj = obj[key]
  if not isinstance(obj, Mapping) or not obj or not all(hasattr(v, "shape") for v in obj.values()):
    raise ConversionError(f"the checkpoint holds a {type(obj).__name__}, not a state dict of tensors; save "
                          "model.state_dict() with torch.save.")
  return dict(obj)



"""timm and Hugging Face vision transformers -> Flax ViT / BEiT classifiers, checked key by key.

This module holds the timm format, the key-by-key matching both formats share, and ``convert_transformer``, which
dispatches both; ``convert_hf_vit`` reads Hugging Face directories.

Formats:
  * "timm": a state dict saved with ``torch.save(model.state_dict(), path)`` of a timm ``VisionTransformer`` or
    ``Beit``. State dicts do not record the number of heads, so ``arch`` names the architecture: a key of
    ``TIMM_PRESETS`` (timm's model names, e.g. "vit_base_patch16_224", "beit_large_patch16_512"), or a JSON file
    of timm constructor arguments ``{"timm_class": "VisionTransformer" | "Beit", "kwargs": {...}}``.
  * "hf": a Hugging Face ``ViTForImageClassification`` directory: ``config.json`` plus ``model.safetensors`` (or a
    sharded ``model.safetensors.index.json``) or ``pytorch_model.bin``.

Promises:
  * Nothing runs pickled code: safetensors files are parsed with numpy (``convert_hf_vit.read_safetensors``),
    PyTorch files are read with ``torch.load(weights_only=True)`` (``convert.load_torch_checkpoint``); torch is
    needed only for those.
  * Every tensor is matched against the architecture in the upstream model's own order: the first missing or
    mis-shaped key is named with both shapes, then the first unexpected one (in the file's order), in a
    ``convert.ConversionError``. Buffers that are functions of the architecture (BEiT's
    ``relative_position_index``) are checked equal to ours and dropped.
  * The number of classes and the input size come from the tensors (head rows, position-embedding or
    relative-bias-table size) through the preset's shapes; ``num_classes=`` is checked against the head.
  * The input normalisation is the preset's (timm's default config for that model), a Hugging Face directory's
    ``preprocessor_config.json`` (else ViTImageProcessor's 0.5 / 0.5), or ``mean=`` / ``std=``; it is recorded in
    the export. ``ConvertedClassifier.export`` writes what ``classifier.load_classifier`` reads back as
    x in [0, 1] NHWC -> logits.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from scoresmooth_jax import models
from scoresmooth_jax.models import vit
from scoresmooth_jax.modelio import convert
from scoresmooth_jax.modelio.convert import ConversionError, ConvertedClassifier

FORMATS = ("timm", "hf")
INCEPTION_MEAN = INCEPTION_STD = (0.5, 0.5, 0.5)  # timm's IMAGENET_INCEPTION_*; ViTImageProcessor's default


@dataclasses.dataclass(frozen=True)
class TimmArch:
  """What a timm ViT / BEiT state dict does not record, and the input normalisation of its default weights."""

  timm_class: str            # "VisionTransformer" or "Beit"
  img_size: int
  patch_size: int
  embed_dim: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  class_token: bool = True   # VisionTransformer only; BEiT always has one
  global_pool: str = "token"
  fc_norm: bool | None = None
  layer_scale: bool = False  # timm's init_values given
  use_abs_pos_emb: bool = True   # Beit only
  use_rel_pos_bias: bool = False  # Beit only
  mean: tuple[float, ...] = INCEPTION_MEAN
  std: tuple[float, ...] = INCEPTION_STD

  @property
  def mlp_dim(self) -> int:
    return int(self.embed_dim * self.mlp_ratio)


def _vit(img: int, patch: int, dim: int, depth: int, heads: int) -> TimmArch:
  return TimmArch("VisionTransformer", img, patch, dim, depth, heads)


def _beit(img: int, dim: int, depth: int, heads: int, mean=INCEPTION_MEAN, std=INCEPTION_STD) -> TimmArch:
  return TimmArch("Beit", img, 16, dim, depth, heads, global_pool="avg", layer_scale=True, use_abs_pos_emb=False,
                  use_rel_pos_bias=True, mean=tuple(mean), std=tuple(std))


# timm's registered constructors (timm/models/vision_transformer.py, beit.py) and the mean/std of their default
# pretrained tags: the augreg ViTs and BEiT use 0.5 / 0.5, BEiT v2 ImageNet's statistics.
TIMM_PRESETS: dict[str, TimmArch] = {
    "vit_tiny_patch16_224": _vit(224, 16, 192, 12, 3),
    "vit_tiny_patch16_384": _vit(384, 16, 192, 12, 3),
    "vit_small_patch16_224": _vit(224, 16, 384, 12, 6),
    "vit_small_patch16_384": _vit(384, 16, 384, 12, 6),
    "vit_base_patch16_224": _vit(224, 16, 768, 12, 12),
    "vit_base_patch16_384": _vit(384, 16, 768, 12, 12),
    "vit_base_patch32_224": _vit(224, 32, 768, 12, 12),
    "vit_large_patch16_224": _vit(224, 16, 1024, 24, 16),
    "vit_large_patch16_384": _vit(384, 16, 1024, 24, 16),
    "beit_base_patch16_224": _beit(224, 768, 12, 12),
    "beit_base_patch16_384": _beit(384, 768, 12, 12),
    "beit_large_patch16_224": _beit(224, 1024, 24, 16),
    "beit_large_patch16_384": _beit(384, 1024, 24, 16),
    "beit_large_patch16_512": _beit(512, 1024, 24, 16),
    "beitv2_base_patch16_224": _beit(224, 768, 12, 12, convert.IMAGENET_MEAN, convert.IMAGENET_STD),
    "beitv2_large_patch16_224": _beit(224, 1024, 24, 16, convert.IMAGENET_MEAN, convert.IMAGENET_STD),
}

# timm constructor arguments a JSON architecture may hold that change nothing at inference.
_INERT_TIMM_KWARGS = {"in_chans", "num_classes", "drop_rate", "pos_drop_rate", "proj_drop_rate", "attn_drop_rate",
                      "drop_path_rate", "head_init_scale", "weight_init"}
_TIMM_KWARGS = {"img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "class_token",
                "global_pool", "fc_norm", "init_values", "use_abs_pos_emb", "use_rel_pos_bias",
                "use_shared_rel_pos_bias"}


def timm_arch_from_kwargs(timm_class: str, kwargs: Mapping[str, Any]) -> TimmArch:
  """A ``TimmArch`` from timm constructor arguments; arguments this port does not implement fail by name."""
  if timm_class not in ("VisionTransformer", "Beit"):
    raise ConversionError(f"timm_class={timm_class!r}: only 'VisionTransformer' and 'Beit' are supported.")
  unknown = sorted(set(kwargs) - _TIMM_KWARGS - _INERT_TIMM_KWARGS)
  if unknown:
    raise ConversionError(f"timm constructor arguments {unknown} are not supported by this converter (it covers "
                          f"{sorted(_TIMM_KWARGS)}); convert a model that leaves them at timm's defaults.")
  if kwargs.get("use_shared_rel_pos_bias"):
    raise ConversionError("use_shared_rel_pos_bias=True (one relative position bias for all blocks) is not "
                          "supported; the published beit_* models have one per block.")
  beit = timm_class == "Beit"
  size = kwargs.get("img_size", 224)
  patch = kwargs.get("patch_size", 16)
  if not isinstance(size, int) or not isinstance(patch, int):
    raise ConversionError(f"img_size={size!r}, patch_size={patch!r}: only square sizes (one integer) are supported.")
  return TimmArch(timm_class, size, patch, int(kwargs.get("embed_dim", 768)), int(kwargs.get("depth", 12)),
                  int(kwargs.get("num_heads", 12)), float(kwargs.get("mlp_ratio", 4.0)),
                  bool(kwargs.get("qkv_bias", True)), True if beit else bool(kwargs.get("class_token", True)),
                  str(kwargs.get("global_pool", "avg" if beit else "token")), kwargs.get("fc_norm"),
                  kwargs.get("init_values") is not None and kwargs.get("init_values") != 0,
                  bool(kwargs.get("use_abs_pos_emb", True)) if beit else True,
                  bool(kwargs.get("use_rel_pos_bias", False)) if beit else False)


def resolve_timm_arch(arch) -> tuple[str, TimmArch]:
  """(name, TimmArch) from a preset name, a JSON file of constructor arguments, or a ``TimmArch``."""
  if isinstance(arch, TimmArch):
    return "custom", arch
  if arch in TIMM_PRESETS:
    return arch, TIMM_PRESETS[arch]
  path = pathlib.Path(str(arch)).expanduser()
  if isinstance(arch, (str, pathlib.Path)) and str(arch).endswith(".json") and path.is_file():
    spec = json.loads(path.read_text())
    if not isinstance(spec, dict) or "timm_class" not in spec:
      raise ConversionError(f"{path} must hold {{\"timm_class\": \"VisionTransformer\" | \"Beit\", \"kwargs\": "
                            "{...timm constructor arguments}}.")
    return path.name, timm_arch_from_kwargs(spec["timm_class"], spec.get("kwargs", {}))
  raise ConversionError(f"arch={arch!r} is not a known timm architecture: choose one of {sorted(TIMM_PRESETS)}, "
                        "or pass a JSON file {\"timm_class\": ..., \"kwargs\": {...}} of its constructor arguments.")


# --------------------------------------------------------------------------------------------------------
# The expected tensors: (upstream key, upstream shape) per Flax leaf, in the upstream model's order.


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


def timm_entries(arch: TimmArch, num_classes: int, channels: int = 3) -> list[Entry]:
  """The tensors of a timm ``VisionTransformer`` / ``Beit`` state dict, in the model's order."""
  d, grid = arch.embed_dim, arch.img_size // arch.patch_size
  tokens = grid * grid + int(arch.class_token)
  beit = arch.timm_class == "Beit"
  out = []
  if arch.class_token:
    out.append(array_entry("cls_token", ("cls_token",), (1, 1, d)))
  if not beit or arch.use_abs_pos_emb:
    out.append(array_entry("pos_embed", ("pos_embed",), (1, tokens, d)))
  out += patch_embed_entries("patch_embed.proj", d, channels, arch.patch_size)
  for i in range(arch.depth):
    b, p = f"blocks.{i}", (f"block_{i}",)
    if beit and arch.layer_scale:
      out += [array_entry(f"{b}.gamma_1", p + ("ls1",), (d,)), array_entry(f"{b}.gamma_2", p + ("ls2",), (d,))]
    out += norm_entries(f"{b}.norm1", p + ("norm1",), d)
    if beit:
      if arch.qkv_bias:
        out += [array_entry(f"{b}.attn.q_bias", p + ("attn", "q_bias"), (d,)),
                array_entry(f"{b}.attn.v_bias", p + ("attn", "v_bias"), (d,))]
      if arch.use_rel_pos_bias:
        out.append(array_entry(f"{b}.attn.relative_position_bias_table", p + ("attn", "relative_position_bias_table"),
                          (vit.num_relative_distances(grid, grid), arch.num_heads)))
      out += linear_entries(f"{b}.attn.qkv", p + ("attn", "qkv"), d, 3 * d, bias=False)
    else:
      out += linear_entries(f"{b}.attn.qkv", p + ("attn", "qkv"), d, 3 * d, bias=arch.qkv_bias)
    out += linear_entries(f"{b}.attn.proj", p + ("attn", "proj"), d, d)
    if not beit and arch.layer_scale:
      out.append(array_entry(f"{b}.ls1.gamma", p + ("ls1",), (d,)))
    out += norm_entries(f"{b}.norm2", p + ("norm2",), d)
    out += linear_entries(f"{b}.mlp.fc1", p + ("mlp", "fc1"), d, arch.mlp_dim)
    out += linear_entries(f"{b}.mlp.fc2", p + ("mlp", "fc2"), arch.mlp_dim, d)
    if not beit and arch.layer_scale:
      out.append(array_entry(f"{b}.ls2.gamma", p + ("ls2",), (d,)))
  norm = "fc_norm" if _uses_fc_norm(arch) else "norm"
  out += norm_entries(norm, (norm,), d)
  out += linear_entries("head", ("head",), d, num_classes)
  return out


def _uses_fc_norm(arch: TimmArch) -> bool:
  return arch.global_pool == "avg" if arch.fc_norm is None else bool(arch.fc_norm)


def timm_module(arch: TimmArch, num_classes: int) -> tuple[str, dict]:
  """(registry name, constructor kwargs) of the Flax model for ``arch``."""
  common = dict(num_classes=num_classes, patch_size=arch.patch_size, embed_dim=arch.embed_dim, depth=arch.depth,
                num_heads=arch.num_heads, mlp_dim=arch.mlp_dim, qkv_bias=arch.qkv_bias,
                global_pool=arch.global_pool, layer_scale=arch.layer_scale)
  if arch.timm_class == "Beit":
    return "beit", dict(common, use_abs_pos_emb=arch.use_abs_pos_emb, use_rel_pos_bias=arch.use_rel_pos_bias)
  return "vit", dict(common, class_token=arch.class_token, fc_norm=_uses_fc_norm(arch))


# --------------------------------------------------------------------------------------------------------
# Matching a state dict against the entries.


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


# --------------------------------------------------------------------------------------------------------
# Files.


def unwrap_state_dict(obj) -> dict:
  """The state dict inside what ``torch.load`` returned (a bare dict, or under "state_dict" / "model")."""
  for key in ("state_dict", "model", "module"):
    if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
      obj = obj[key]
  if not isinstance(obj, Mapping) or not obj or not all(hasattr(v, "shape") for v in obj.values()):
    raise ConversionError(f"the checkpoint holds a {type(obj).__name__}, not a state dict of tensors; save "
                          "model.state_dict() with torch.save.")
  return dict(obj)


def convert_timm_checkpoint(path, arch, *, num_classes: int | None = None, mean=None, std=None,
                            trust_checkpoint: bool = False) -> ConvertedClassifier:
  """Converts a timm ViT / BEiT state dict (``torch.save(model.state_dict())``).

  Args:
    path: the ``torch.save`` file.
    arch: a key of ``TIMM_PRESETS``, a JSON file of timm constructor arguments, or a ``TimmArch``.
    num_classes: expected number of classes, checked against ``head.weight`` (None: take the head's).
    mean, std: per-channel normalisation of [0, 1] images (default: the preset's).
    trust_checkpoint: allow full unpickling when the weights-only reader refuses the file (arbitrary code!).
  """
  name, timm_arch = resolve_timm_arch(arch)
  state = unwrap_state_dict(convert.load_torch_checkpoint(path, trust_checkpoint=trust_checkpoint))
  classes = head_rows(state, "head.weight", num_classes)
  channels = int(state["patch_embed.proj.weight"].shape[1]) if "patch_embed.proj.weight" in state else 3
  module_name, model_kwargs = timm_module(timm_arch, classes)
  grid = timm_arch.img_size // timm_arch.patch_size
  buffers = {}
  if timm_arch.timm_class == "Beit" and timm_arch.use_rel_pos_bias:  # older timm saved this constant buffer
    buffers = {f"blocks.{i}.attn.relative_position_index": vit.relative_position_index(grid, grid)
               for i in range(timm_arch.depth)}
  variables = match_state_dict(state, timm_entries(timm_arch, classes, channels), f"timm {name}", buffers)
  shape = (timm_arch.img_size, timm_arch.img_size, channels)
  check_against_module(variables, module_name, model_kwargs, shape)
  mean, std = normalisation(mean, std, timm_arch.mean, timm_arch.std, channels)
  metadata = {"source_format": "timm", "source_arch": name,
              "source_checkpoint": str(pathlib.Path(path).expanduser().resolve())}
  return ConvertedClassifier(module_name, model_kwargs, variables, mean, std, classes, shape, metadata)


def convert_transformer(path, format: str, *, arch=None, num_classes: int | None = None, mean=None, std=None,
                        trust_checkpoint: bool = False) -> ConvertedClassifier:
  """``convert_timm_checkpoint`` (format "timm", needs ``arch``) or ``convert_hf_vit.convert_hf_model`` (format
  "hf"): what ``scripts/convert_torch_classifier.py`` calls for both."""
  if format == "timm":
    if arch is None:
      raise ConversionError(f"format 'timm' needs the architecture's name (timm state dicts do not record the "
                            f"number of heads): pass arch= one of {sorted(TIMM_PRESETS)}, or a JSON file of its "
                            "constructor arguments.")
    return convert_timm_checkpoint(path, arch, num_classes=num_classes, mean=mean, std=std,
                                   trust_checkpoint=trust_checkpoint)
  if format == "hf":
    if arch is not None:
      raise ConversionError(f"arch={arch!r} is for format 'timm'; a Hugging Face directory's config.json names "
                            "its architecture.")
    from scoresmooth_jax.modelio import convert_hf_vit  # pylint: disable=import-outside-toplevel (it imports us)

    return convert_hf_vit.convert_hf_model(path, num_classes=num_classes, mean=mean, std=std,
                                           trust_checkpoint=trust_checkpoint)
  raise ConversionError(f"format={format!r}: choose one of {FORMATS}.")

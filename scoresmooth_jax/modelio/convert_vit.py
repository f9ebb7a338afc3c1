"""timm and Hugging Face vision transformers -> Flax ViT / BEiT classifiers, checked key by key.

This module holds the timm format and ``convert_transformer``, which dispatches both; ``convert_hf_vit`` reads Hugging
Face directories, and ``vit_state_dict`` holds the key-by-key matching both share.

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
  * The number of classes is the head's (``num_classes=`` is checked against it); the input size is the
    architecture's, and weights made for another size fail on the position-embedding or relative-bias-table shape.
  * The input normalisation is the preset's (timm's default config for that model), a Hugging Face directory's
    ``preprocessor_config.json`` (else ViTImageProcessor's 0.5 / 0.5), or ``mean=`` / ``std=``; it is recorded in
    the export. ``ConvertedClassifier.export`` writes what ``classifier.load_classifier`` reads back as
    x in [0, 1] NHWC -> logits.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Mapping

from scoresmooth_jax.models import vit
from scoresmooth_jax.modelio import convert
from scoresmooth_jax.modelio import convert_hf_vit
from scoresmooth_jax.modelio.convert import ConversionError, ConvertedClassifier
from scoresmooth_jax.modelio.vit_state_dict import (INCEPTION_MEAN, INCEPTION_STD, Entry, array_entry,
                                                    check_against_module, head_rows, linear_entries,
                                                    match_state_dict, norm_entries, normalisation,
                                                    patch_embed_entries, unwrap_state_dict)

FORMATS = ("timm", "hf")


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
    return convert_hf_vit.convert_hf_model(path, num_classes=num_classes, mean=mean, std=std,
                                           trust_checkpoint=trust_checkpoint)
  raise ConversionError(f"format={format!r}: choose one of {FORMATS}.")

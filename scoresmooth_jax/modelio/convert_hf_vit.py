"""Hugging Face ``ViTForImageClassification`` directories -> Flax ViT classifiers (``convert_vit``'s "hf" format).

A directory as ``save_pretrained`` writes it or the hub serves it: ``config.json`` plus ``model.safetensors`` (or a
sharded ``model.safetensors.index.json``) or ``pytorch_model.bin``.

Promises:
  * safetensors files are parsed here with numpy (``read_safetensors``): no pickle, no new dependency; a
    ``pytorch_model.bin`` is read with ``torch.load(weights_only=True)``.
  * The separate query / key / value projections become ``vit.Attention``'s fused one; every tensor is checked
    as ``vit_state_dict.match_state_dict`` does (the first missing or mis-shaped key in the model's order, then the
    first unexpected one), and layer_norm_eps, qkv_bias and the GELU variant come from ``config.json``.
  * The normalisation is ``preprocessor_config.json``'s image_mean / image_std (none if do_normalize is false),
    else ViTImageProcessor's 0.5 / 0.5, unless ``mean=`` / ``std=`` are given.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any, Mapping

import numpy as np

from scoresmooth_jax.modelio import convert
from scoresmooth_jax.modelio import vit_state_dict
from scoresmooth_jax.modelio.convert import ConversionError, ConvertedClassifier
from scoresmooth_jax.modelio.vit_state_dict import INCEPTION_MEAN, INCEPTION_STD, Entry


@dataclasses.dataclass(frozen=True)
class HFArch:
  """The parts of a Hugging Face ``ViTConfig`` that decide the function."""

  image_size: int
  patch_size: int
  num_channels: int
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  intermediate_size: int
  layer_norm_eps: float
  qkv_bias: bool
  gelu_approximate: bool


_HF_GELUS = {"gelu": False, "gelu_new": True, "gelu_pytorch_tanh": True}


def hf_arch_from_config(config: Mapping[str, Any], source="config.json") -> HFArch:
  """An ``HFArch`` from a ``config.json``; models other than ViT image classifiers fail by name."""
  if config.get("model_type") != "vit":
    raise ConversionError(f"{source}: model_type={config.get('model_type')!r}; only Hugging Face ViT "
                          "('vit', ViTForImageClassification) is supported.")
  architectures = config.get("architectures") or ["ViTForImageClassification"]
  if "ViTForImageClassification" not in architectures:
    raise ConversionError(f"{source}: architectures={architectures}; a classifier is needed "
                          "(ViTForImageClassification), not a backbone without its head.")
  act = config.get("hidden_act", "gelu")
  if act not in _HF_GELUS:
    raise ConversionError(f"{source}: hidden_act={act!r} is not supported; choose one of {sorted(_HF_GELUS)}.")
  try:
    return HFArch(int(config.get("image_size", 224)), int(config.get("patch_size", 16)),
                  int(config.get("num_channels", 3)), int(config["hidden_size"]), int(config["num_hidden_layers"]),
                  int(config["num_attention_heads"]), int(config["intermediate_size"]),
                  float(config.get("layer_norm_eps", 1e-12)), bool(config.get("qkv_bias", True)), _HF_GELUS[act])
  except KeyError as err:
    raise ConversionError(f"{source} lacks {err.args[0]!r}; it is not a complete ViTConfig.") from None


def hf_entries(arch: HFArch, num_classes: int) -> list[Entry]:
  """The tensors of a ``ViTForImageClassification`` state dict, in the model's order."""
  d, grid = arch.hidden_size, arch.image_size // arch.patch_size
  out = [vit_state_dict.array_entry("vit.embeddings.cls_token", ("cls_token",), (1, 1, d)),
         vit_state_dict.array_entry("vit.embeddings.position_embeddings", ("pos_embed",), (1, grid * grid + 1, d))]
  out += vit_state_dict.patch_embed_entries("vit.embeddings.patch_embeddings.projection", d, arch.num_channels,
                                         arch.patch_size)
  for i in range(arch.num_hidden_layers):
    b, p = f"vit.encoder.layer.{i}", (f"block_{i}",)
    qkv = [f"{b}.attention.attention.{n}" for n in ("query", "key", "value")]
    # Separate q, k, v projections become the fused one: output columns (q | k | v), as vit.Attention splits them.
    out.append(Entry(p + ("attn", "qkv", "kernel"), tuple((f"{k}.weight", (d, d)) for k in qkv),
                     lambda a: np.concatenate([w.T for w in a], axis=1)))
    if arch.qkv_bias:
      out.append(Entry(p + ("attn", "qkv", "bias"), tuple((f"{k}.bias", (d,)) for k in qkv), np.concatenate))
    out += vit_state_dict.linear_entries(f"{b}.attention.output.dense", p + ("attn", "proj"), d, d)
    out += vit_state_dict.linear_entries(f"{b}.intermediate.dense", p + ("mlp", "fc1"), d, arch.intermediate_size)
    out += vit_state_dict.linear_entries(f"{b}.output.dense", p + ("mlp", "fc2"), arch.intermediate_size, d)
    out += vit_state_dict.norm_entries(f"{b}.layernorm_before", p + ("norm1",), d)
    out += vit_state_dict.norm_entries(f"{b}.layernorm_after", p + ("norm2",), d)
  out += vit_state_dict.norm_entries("vit.layernorm", ("norm",), d)
  out += vit_state_dict.linear_entries("classifier", ("head",), d, num_classes)
  return out


def hf_module(arch: HFArch, num_classes: int) -> tuple[str, dict]:
  return "vit", dict(num_classes=num_classes, patch_size=arch.patch_size, embed_dim=arch.hidden_size,
                     depth=arch.num_hidden_layers, num_heads=arch.num_attention_heads,
                     mlp_dim=arch.intermediate_size, qkv_bias=arch.qkv_bias, class_token=True, global_pool="token",
                     fc_norm=False, layer_scale=False, layer_norm_eps=arch.layer_norm_eps,
                     gelu_approximate=arch.gelu_approximate)


_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
                       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                       "BOOL": np.bool_}


def read_safetensors(path) -> dict[str, np.ndarray]:
  """Every tensor of a ``.safetensors`` file as a numpy array (bfloat16 widened to float32); no pickle involved.

  The format: an unsigned 64-bit little-endian header length N, N bytes of JSON ``{name: {"dtype", "shape",
  "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the tensors' bytes (little-endian, C order) with
  offsets relative to the end of the header. A truncated or inconsistent file fails naming what is wrong.
  """
  path = pathlib.Path(path).expanduser()
  try:
    raw = path.read_bytes()
  except OSError as err:
    raise ConversionError(f"cannot read {path}: {err.strerror or err}.") from None
  if len(raw) < 8:
    raise ConversionError(f"{path} is {len(raw)} bytes long: not a safetensors file (truncated?).")
  header_len = int.from_bytes(raw[:8], "little")
  if header_len > len(raw) - 8:
    raise ConversionError(f"{path}: the header claims {header_len} bytes but the file has {len(raw) - 8} after the "
                          "length; the file is truncated or not a safetensors file.")
  try:
    header = json.loads(raw[8:8 + header_len])
  except (UnicodeDecodeError, json.JSONDecodeError) as err:
    raise ConversionError(f"{path}: the safetensors header is not valid JSON ({err}).") from None
  data = memoryview(raw)[8 + header_len:]
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
    if dtype is None:
      raise ConversionError(f"{path}: tensor {name} has dtype {info.get('dtype')!r}, which this reader does not "
                            f"handle ({sorted(_SAFETENSORS_DTYPES)}).")
    shape = tuple(int(s) for s in info["shape"])
    begin, end = (int(o) for o in info["data_offsets"])
    size = math.prod(shape) * np.dtype(dtype).itemsize
    if end > len(data) or end - begin != size or begin < 0:
      raise ConversionError(f"{path}: tensor {name} ({info['dtype']} {list(shape)}) needs bytes [{begin}, "
                            f"{begin + size}) of {len(data)}; the file is truncated or corrupt.")
    array = np.frombuffer(data[begin:end], dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
    if info["dtype"] == "BF16":  # bfloat16 is the top half of a float32
      array = (array.astype(np.uint32) << 16).view(np.float32)
    out[name] = array
  return out


def read_hf_weights(model_dir: pathlib.Path, trust_checkpoint: bool = False) -> dict:
  """The state dict of a Hugging Face model directory: safetensors (single or sharded) first, else the .bin."""
  single, index, binary = (model_dir / n for n in ("model.safetensors", "model.safetensors.index.json",
                                                    "pytorch_model.bin"))
  if single.is_file():
    return read_safetensors(single)
  if index.is_file():
    shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
    state = {}
    for shard in shards:
      state.update(read_safetensors(model_dir / shard))
    return state
  if binary.is_file():
    return vit_state_dict.unwrap_state_dict(convert.load_torch_checkpoint(binary, trust_checkpoint=trust_checkpoint))
  raise ConversionError(f"{model_dir} has no weights: expected model.safetensors, model.safetensors.index.json or "
                        "pytorch_model.bin beside config.json (save_pretrained writes them).")


def _hf_normalisation(model_dir: pathlib.Path):
  """mean/std of the directory's image processor, else ViTImageProcessor's defaults."""
  path = model_dir / "preprocessor_config.json"
  if not path.is_file():
    return INCEPTION_MEAN, INCEPTION_STD
  config = json.loads(path.read_text())
  if config.get("do_normalize", True) is False:
    return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
  return tuple(config.get("image_mean", INCEPTION_MEAN)), tuple(config.get("image_std", INCEPTION_STD))


def convert_hf_model(model_dir, *, num_classes: int | None = None, mean=None, std=None,
                     trust_checkpoint: bool = False) -> ConvertedClassifier:
  """Converts a Hugging Face ``ViTForImageClassification`` directory (``save_pretrained`` / a hub snapshot).

  Args:
    model_dir: the directory with ``config.json`` and the weights.
    num_classes: expected number of classes, checked against ``classifier.weight``.
    mean, std: per-channel normalisation of [0, 1] images (default: ``preprocessor_config.json``, else 0.5 / 0.5).
    trust_checkpoint: allow full unpickling of ``pytorch_model.bin`` when the weights-only reader refuses it.
  """
  model_dir = pathlib.Path(model_dir).expanduser()
  config_path = model_dir / "config.json"
  if not config_path.is_file():
    raise ConversionError(f"{model_dir} is not a Hugging Face model directory: it has no config.json.")
  arch = hf_arch_from_config(json.loads(config_path.read_text()), config_path)
  state = read_hf_weights(model_dir, trust_checkpoint)
  classes = vit_state_dict.head_rows(state, "classifier.weight", num_classes)
  module_name, model_kwargs = hf_module(arch, classes)
  variables = vit_state_dict.match_state_dict(state, hf_entries(arch, classes), f"the ViT of {config_path}")
  shape = (arch.image_size, arch.image_size, arch.num_channels)
  vit_state_dict.check_against_module(variables, module_name, model_kwargs, shape)
  default_mean, default_std = _hf_normalisation(model_dir)
  mean, std = vit_state_dict.normalisation(mean, std, default_mean, default_std, arch.num_channels)
  metadata = {"source_format": "hf", "source_arch": "ViTForImageClassification",
              "source_checkpoint": str(model_dir.resolve())}
  return ConvertedClassifier(module_name, model_kwargs, variables, mean, std, classes, shape, metadata)


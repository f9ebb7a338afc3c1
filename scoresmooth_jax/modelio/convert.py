"""PyTorch classifier checkpoints -> Flax variables and classifier metadata, checked name by name.

Formats (``format=``; "auto" detects them):
  * "akamaster": ``{'state_dict', 'best_prec1'}`` from akamaster/pytorch_resnet_cifar10 (``module.`` prefixes,
    head ``linear``, option-A shortcuts), normalised with the ImageNet mean/std as that repository does.
  * "cohen": ``{'arch', 'state_dict'}`` from Cohen et al. (2019): the model is ``Sequential(NormalizeLayer,
    model)`` possibly inside ``DataParallel``, so keys look like ``1.module.conv1.weight`` or
    ``module.1.conv1.weight``. ``arch`` "cifar_resnet<depth>" (option-B shortcuts, CIFAR-10 mean/std) or
    "resnet50" (torchvision layout, ImageNet mean/std).
  * "torchvision": a torchvision ResNet-50 state dict (ImageNet mean/std, 224x224x3 inputs).

Promises:
  * Checkpoints are untrusted input: they are read with ``torch.load(..., weights_only=True)``, which runs no
    pickled code. Only with ``trust_checkpoint=True`` is a file that needs full unpickling read again with
    ``weights_only=False``.
  * ``torch`` is imported only inside conversion: this module imports without it, and a missing torch fails
    with the command that installs it.
  * Depth, shortcut option, width, input channels and number of classes are read from the tensors; what the
    checkpoint says or the caller asks (``arch``, ``depth=``, ``shortcut=``, ``num_classes=``) must agree, or
    conversion fails naming both. Every tensor is then matched against the Flax model: missing, unexpected and
    mis-shaped keys are reported together, in PyTorch's names, in one error.
  * Conv weights OIHW -> HWIO, linear (out, in) -> (in, out), BatchNorm weight/bias/running_mean/running_var
    -> params scale/bias and batch_stats mean/var; the converted model computes the PyTorch model's function
    in inference mode (up to float rounding).
"""

from __future__ import annotations

import dataclasses
import pathlib
import pickle
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from scoresmooth_jax import models

FORMATS = ("auto", "akamaster", "cohen", "torchvision")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Cohen et al.'s CIFAR-10 statistics (datasets.py of locuslab/smoothing).
COHEN_CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
COHEN_CIFAR10_STD = (0.2023, 0.1994, 0.2010)

RESNET50_STAGES = (3, 4, 6, 3)

TORCH_INSTALL_HINT = ("PyTorch is needed only to read PyTorch checkpoints: install it with "
                      "`pip install torch==2.13.0` (the CPU build; or `pip install scoresmooth-jax[torch]`).")

_IGNORED_SUFFIXES = (".num_batches_tracked",)  # a BatchNorm step counter: no effect in inference mode
_NORMALISE_MEAN_NAMES = ("means", "mean", "mu")
_NORMALISE_STD_NAMES = ("sds", "std", "stds", "sigma")


class ConversionError(ValueError):
  """A PyTorch checkpoint cannot be converted: unreadable, of an unknown format, or not the model it claims."""


@dataclasses.dataclass(frozen=True)
class ConvertedClassifier:
  """A converted classifier: everything ``classifier.export_classifier`` needs.

  Attributes:
    module_name: registry name in ``scoresmooth_jax.models`` ("cifar_resnet" or "resnet50").
    model_kwargs: constructor keywords, e.g. ``{"depth": 20, "num_classes": 10, "shortcut": "A", "width": 16}``.
    variables: ``{"params": ..., "batch_stats": ...}`` as float32 numpy arrays.
    mean, std: per-channel input normalisation of images in [0, 1].
    num_classes: number of logits.
    image_shape: (H, W, C) of the inputs the model was trained on.
    metadata: where it came from (format, source path, arch, best_prec1, ...), kept in the export.
  """

  module_name: str
  model_kwargs: dict
  variables: dict
  mean: tuple[float, ...]
  std: tuple[float, ...]
  num_classes: int
  image_shape: tuple[int, int, int]
  metadata: dict = dataclasses.field(default_factory=dict)

  def export(self, path) -> pathlib.Path:
    """Writes the export that ``classifier.load_classifier`` reads; returns its absolute path."""
    # Imported here so that `import scoresmooth_jax.modelio.convert` does not pull in the Orbax stack.
    from scoresmooth_jax.modelio import classifier  # pylint: disable=import-outside-toplevel

    return classifier.export_classifier(path, self.module_name, self.model_kwargs, self.variables, self.mean,
                                        self.std, self.num_classes, self.image_shape,
                                        extra_metadata=self.metadata)

  def to_classifier(self, compute_dtype=None):
    """The converted model as an in-memory ``classifier.Classifier`` (no export needed)."""
    from scoresmooth_jax.modelio import classifier  # pylint: disable=import-outside-toplevel

    return classifier.Classifier(module=models.get_model(self.module_name, **self.model_kwargs),
                                 variables=jax.tree.map(jnp.asarray, self.variables), mean=self.mean,
                                 std=self.std, num_classes=self.num_classes, image_shape=self.image_shape,
                                 compute_dtype=compute_dtype, metadata=dict(self.metadata))


def _import_torch():
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as err:
    raise ImportError(TORCH_INSTALL_HINT) from err
  return torch


def load_torch_checkpoint(path, trust_checkpoint: bool = False) -> Any:
  """``torch.load`` on CPU with ``weights_only=True``; full unpickling only when ``trust_checkpoint``."""
  torch = _import_torch()
  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise ConversionError(f"checkpoint {path} does not exist or is not a file.")
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as err:
    if not trust_checkpoint:
      detail = next((line.strip() for line in str(err).splitlines() if "WeightsUnpickler error" in line),
                    str(err).splitlines()[0] if str(err) else type(err).__name__)
      detail = detail.split(". Please use")[0]  # torch's allowlisting advice is about its API, not ours
      raise ConversionError(
          f"checkpoint {path} holds more than tensors and plain containers ({detail}), so it cannot be read "
          "with torch.load(weights_only=True). Reading it fully unpickles it, which can run arbitrary code "
          "hidden in the file. Only if you trust its source, opt in with --trust_checkpoint "
          "(trust_checkpoint=True); otherwise re-save just its state_dict where you trust the code.") from None
  except Exception as err:  # torch raises RuntimeError, EOFError, ... for damaged files; all mean the same here
    raise ConversionError(f"cannot read {path} as a PyTorch checkpoint ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}); the file is truncated, corrupt or "
                          "not a torch.save file.") from None
  # Only reached for trusted checkpoints that need more than the weights-only unpickler.
  return torch.load(path, map_location="cpu", weights_only=False)


def _is_tensor_mapping(obj) -> bool:
  torch = _import_torch()
  return isinstance(obj, Mapping) and bool(obj) and all(
      isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _unwrap(obj, format: str) -> tuple[str, dict, dict]:
  """Finds the state dict in a loaded checkpoint: returns (format, state_dict, source facts)."""
  if format not in FORMATS:
    raise ConversionError(f"format={format!r}: choose one of {FORMATS}.")
  facts: dict = {}
  if isinstance(obj, Mapping) and "state_dict" in obj:
    state_dict = obj["state_dict"]
    for key in ("arch", "best_prec1", "epoch"):
      value = obj.get(key)
      if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # 0-d tensors in some checkpoints
        value = value.item()
      if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        facts[key] = value
    detected = "cohen" if "arch" in obj else "akamaster"
  elif _is_tensor_mapping(obj):
    state_dict = obj
    detected = "torchvision" if any(re.match(r"(.*\.)?layer4\.", k) for k in obj) else None
  else:
    top = sorted(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
    raise ConversionError(f"the checkpoint is neither a state dict nor a dict with a 'state_dict' entry (found "
                          f"{top}); save model.state_dict() or pass a supported format {FORMATS[1:]}.")
  if not _is_tensor_mapping(state_dict):
    raise ConversionError("the checkpoint's state_dict is empty or holds non-tensor values; it is not a model "
                          "state dict.")
  if format == "auto":
    if detected is None:
      raise ConversionError("the checkpoint is a bare state dict of a CIFAR-style ResNet, whose input "
                            "normalisation it does not record: pass format='akamaster' (ImageNet mean/std) or "
                            "'cohen' (CIFAR-10 mean/std), or give mean= and std= explicitly.")
    format = detected
  return format, dict(state_dict), facts


def _strip_wrappers(state_dict: dict) -> tuple[dict, dict]:
  """Removes DataParallel (``module.``) and Sequential (``<i>.``) prefixes.

  Returns (model tensors by plain name, other Sequential members' tensors by their full key). The model is the
  Sequential member that holds ``conv1.weight``; Cohen et al.'s normalisation layer is another member.
  """
  groups: dict[int | None, dict] = {}
  for key, value in state_dict.items():
    parts = key.split(".")
    index = None
    while parts and (parts[0] == "module" or (parts[0].isdigit() and index is None)):
      if parts[0].isdigit():
        index = int(parts[0])
      parts = parts[1:]
    groups.setdefault(index, {})[".".join(parts)] = (key, value)
  model_groups = [i for i, g in groups.items() if "conv1.weight" in g]
  if len(model_groups) != 1:
    raise ConversionError(f"cannot find the ResNet in the state dict: expected one model with a 'conv1.weight' "
                          f"tensor, found {len(model_groups)} (first keys: {sorted(state_dict)[:8]}).")
  model = {name: value for name, (_, value) in groups.pop(model_groups[0]).items()}
  others = {full: value for group in groups.values() for _, (full, value) in group.items()}
  return model, others


def _normalisation_from_layer(others: dict) -> tuple[dict, tuple | None, tuple | None]:
  """Reads mean/std buffers of a normalisation layer if it registered them; returns (unused, mean, std)."""
  mean = std = None
  unused = {}
  for key, value in others.items():
    leaf = key.split(".")[-1]
    if leaf in _NORMALISE_MEAN_NAMES and value.ndim <= 1:
      mean = tuple(float(v) for v in value.reshape(-1).tolist())
    elif leaf in _NORMALISE_STD_NAMES and value.ndim <= 1:
      std = tuple(float(v) for v in value.reshape(-1).tolist())
    else:
      unused[key] = value
  return unused, mean, std


def _block_counts(names, num_stages: int) -> tuple[int, ...]:
  counts = []
  for stage in range(1, num_stages + 1):
    indices = {int(m.group(1)) for n in names if (m := re.match(rf"layer{stage}\.(\d+)\.", n))}
    counts.append(max(indices) + 1 if indices else 0)
  return tuple(counts)


def torch_name(path: tuple[str, ...], head: str = "fc", shortcut_name: str = "downsample") -> str:
  """Flax variable path (collection, modules..., leaf) -> the PyTorch state-dict key it comes from."""
  collection, *modules, leaf = path
  parts = []
  for module in modules:
    if m := re.fullmatch(r"layer(\d+)_(\d+)", module):
      parts += [f"layer{m.group(1)}", m.group(2)]
    elif module == "downsample_conv":
      parts += [shortcut_name, "0"]
    elif module == "downsample_bn":
      parts += [shortcut_name, "1"]
    elif module == "fc":
      parts.append(head)
    else:
      parts.append(module)
  if collection == "batch_stats":
    parts.append({"mean": "running_mean", "var": "running_var"}[leaf])
  else:
    parts.append({"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf])
  return ".".join(parts)


def _to_torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  if len(shape) == 4:  # HWIO -> OIHW
    return (shape[3], shape[2], shape[0], shape[1])
  if len(shape) == 2:  # (in, out) -> (out, in)
    return (shape[1], shape[0])
  return tuple(shape)


def _to_flax(array: np.ndarray) -> np.ndarray:
  if array.ndim == 4:
    return np.ascontiguousarray(np.transpose(array, (2, 3, 1, 0)))
  if array.ndim == 2:
    return np.ascontiguousarray(array.T)
  return array


def _tensor_to_numpy(tensor) -> np.ndarray:
  return tensor.detach().to("cpu").float().numpy().astype(np.float32)


def _cifar_architecture(names, fmt: str, arch: str | None, depth, shortcut) -> tuple[int, str]:
  counts = _block_counts(names, 3)
  if not all(counts):
    raise ConversionError(f"the state dict does not hold a CIFAR ResNet: blocks per stage layer1..layer3 = "
                          f"{counts}, but every stage needs at least one block.")
  blocks = max(counts)  # a short stage then shows up as missing keys, listed with every other problem
  found_depth = 6 * blocks + 2
  found_shortcut = "B" if any(re.match(r"layer\d+\.\d+\.(downsample|shortcut)\.", n) for n in names) else "A"
  expected = [(depth, f"depth={depth}")]
  if arch is not None and (m := re.fullmatch(r"cifar_resnet(\d+)", arch)):
    expected.append((int(m.group(1)), f"arch={arch!r}"))
  for want, source in expected:
    if want is not None and want != found_depth:
      raise ConversionError(f"{source} asks for a depth-{want} CIFAR ResNet, but the checkpoint holds depth "
                            f"{found_depth} ({blocks} blocks per stage; 6n + 2 = {found_depth}). Pass the "
                            "checkpoint of the model you mean, or the depth it really has.")
  shortcut_sources = [(shortcut, f"shortcut={shortcut!r}")]
  if fmt == "cohen" and shortcut is None:  # an explicit shortcut= is the caller's deliberate override
    shortcut_sources.append(("B", "Cohen et al.'s cifar_resnet (format 'cohen')"))
  names_of = {"A": "parameter-free option-A shortcuts (no downsample/shortcut tensors)",
              "B": "option-B shortcuts (1x1 conv + BatchNorm tensors under downsample.* or shortcut.*)"}
  for want, source in shortcut_sources:
    if want is not None and want != found_shortcut:
      raise ConversionError(f"{source} expects {names_of[want]}, but the checkpoint has "
                            f"{names_of[found_shortcut]}. Check the checkpoint, or pass "
                            f"shortcut={found_shortcut!r} / the format it was saved in.")
  return found_depth, found_shortcut


def convert_torch_checkpoint(path, *, format: str = "auto", num_classes: int | None = None, mean=None,
                             std=None, depth: int | None = None, shortcut: str | None = None,
                             image_shape=None, trust_checkpoint: bool = False) -> ConvertedClassifier:
  """Converts a PyTorch ResNet checkpoint into Flax variables plus classifier metadata.

  Args:
    path: the ``torch.save`` file.
    format: "auto", "akamaster", "cohen" or "torchvision" (see the module docstring).
    num_classes: expected number of classes; checked against the head (None: take the head's).
    mean, std: per-channel normalisation of [0, 1] images, overriding the format's default.
    depth: expected CIFAR ResNet depth; checked against the tensors (None: take the tensors').
    shortcut: expected CIFAR shortcut option "A" or "B"; checked likewise.
    image_shape: (H, W, C) to record (default 32x32 for CIFAR ResNets, 224x224 for ResNet-50).
    trust_checkpoint: allow full unpickling (arbitrary code!) when weights-only loading fails.

  Returns:
    A ``ConvertedClassifier``; ``.export(path)`` writes it for ``classifier.load_classifier``.
  """
  loaded = load_torch_checkpoint(path, trust_checkpoint=trust_checkpoint)
  fmt, state_dict, facts = _unwrap(loaded, format)
  arch = facts.get("arch")
  model_tensors, others = _strip_wrappers(state_dict)
  others, layer_mean, layer_std = _normalisation_from_layer(others)
  names = set(model_tensors)

  if fmt == "cohen":
    if arch is None:  # a bare state dict passed with format="cohen": the tensors tell which family
      arch = "resnet50" if any(n.startswith("layer4.") for n in names) else None
    elif arch != "resnet50" and not re.fullmatch(r"cifar_resnet\d+", arch):
      raise ConversionError(f"arch={arch!r} is not one of Cohen et al.'s ResNets: expected 'resnet50' or "
                            "'cifar_resnet<depth>' (e.g. 'cifar_resnet110').")
  imagenet = fmt == "torchvision" or arch == "resnet50"
  if imagenet and (depth is not None or shortcut is not None):
    raise ConversionError(f"depth={depth!r} / shortcut={shortcut!r} describe CIFAR ResNets; this checkpoint is "
                          "an ImageNet ResNet-50 (drop them).")
  if shortcut is not None and shortcut not in ("A", "B"):
    raise ConversionError(f"shortcut={shortcut!r}: choose 'A' or 'B'.")

  head = "linear" if ("linear.weight" in names and "fc.weight" not in names) else "fc"
  if f"{head}.weight" not in names:
    raise ConversionError("the state dict has no classifier head ('fc.weight' or 'linear.weight'); it is "
                          "not a complete classification model.")
  found_classes = int(model_tensors[f"{head}.weight"].shape[0])
  if num_classes is not None and num_classes != found_classes:
    raise ConversionError(f"num_classes={num_classes} was asked, but the checkpoint's head "
                          f"'{head}.weight' has {found_classes} outputs.")
  channels = int(model_tensors["conv1.weight"].shape[1])

  if imagenet:
    stages = _block_counts(names, 4)
    if stages != RESNET50_STAGES or not any(n.endswith(".conv3.weight") for n in names):
      raise ConversionError(f"only ResNet-50 is supported among ImageNet ResNets (Bottleneck blocks per stage "
                            f"{RESNET50_STAGES}); this checkpoint has {stages} blocks per stage"
                            f"{'' if any(n.endswith('.conv3.weight') for n in names) else ' of BasicBlocks'}.")
    module_name = "resnet50"
    model_kwargs = {"num_classes": found_classes}
    default_shape = (224, 224, channels)
    default_mean, default_std = IMAGENET_MEAN, IMAGENET_STD
  else:
    found_depth, found_shortcut = _cifar_architecture(names, fmt, arch, depth, shortcut)
    module_name = "cifar_resnet"
    model_kwargs = {"depth": found_depth, "num_classes": found_classes, "shortcut": found_shortcut,
                    "width": int(model_tensors["conv1.weight"].shape[0])}
    default_shape = (32, 32, channels)
    if fmt == "cohen":
      default_mean, default_std = COHEN_CIFAR10_MEAN, COHEN_CIFAR10_STD
    else:  # akamaster's loader normalises CIFAR-10 with the ImageNet statistics
      default_mean, default_std = IMAGENET_MEAN, IMAGENET_STD
  shape = tuple(int(d) for d in (image_shape if image_shape is not None else default_shape))
  if len(shape) != 3 or shape[-1] != channels:
    raise ConversionError(f"image_shape={image_shape!r} must be (H, W, {channels}): the first convolution "
                          f"takes {channels} channels.")
  mean = tuple(mean) if mean is not None else (layer_mean or default_mean)
  std = tuple(std) if std is not None else (layer_std or default_std)
  if len(mean) != channels or len(std) != channels:
    raise ConversionError(f"mean={mean} and std={std} need {channels} values each, one per input channel.")

  # The Flax model's variables, by the PyTorch key each must come from.
  module = models.get_model(module_name, **model_kwargs)
  abstract = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, *shape), jnp.float32))
  shortcut_name = "shortcut" if any(re.match(r"layer\d+\.\d+\.shortcut\.", n) for n in names) else "downsample"
  wanted = {}
  for key_path, leaf in jax.tree_util.tree_leaves_with_path(abstract):
    flax_path = tuple(k.key for k in key_path)
    wanted[torch_name(flax_path, head, shortcut_name)] = (flax_path, tuple(leaf.shape))

  given = {n for n in names if not n.endswith(_IGNORED_SUFFIXES)}
  missing = sorted(set(wanted) - given)
  unexpected = sorted(given - set(wanted)) + sorted(k for k in others if not k.endswith(_IGNORED_SUFFIXES))
  misshaped = sorted(f"{n}: checkpoint {tuple(model_tensors[n].shape)}, model needs "
                     f"{_to_torch_shape(wanted[n][1])}" for n in given & set(wanted)
                     if tuple(model_tensors[n].shape) != _to_torch_shape(wanted[n][1]))
  if missing or unexpected or misshaped:
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
      if items:
        problems.append(f"{len(items)} {label}: {', '.join(items)}")
    raise ConversionError(f"the checkpoint does not match a {module_name} {model_kwargs} (inferred from its "
                          f"tensors): " + "; ".join(problems) + ". The file is truncated, from another "
                          "architecture, or saved in another format (try format=...).")

  variables: dict = {}
  for name, (flax_path, _) in wanted.items():
    node = variables
    for part in flax_path[:-1]:
      node = node.setdefault(part, {})
    node[flax_path[-1]] = _to_flax(_tensor_to_numpy(model_tensors[name]))

  metadata = {"source_format": fmt, "source_checkpoint": str(pathlib.Path(path).expanduser().resolve()),
              **{f"source_{k}": v for k, v in facts.items()}}
  return ConvertedClassifier(module_name=module_name, model_kwargs=model_kwargs, variables=variables,
                             mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std),
                             num_classes=found_classes, image_shape=shape, metadata=metadata)
